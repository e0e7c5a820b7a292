"""Block-causal flow-matching training of a tiny Wan DiT on the toy world (clean context, one target block).

Each training clip is what the sampler shows the model when it denoises one block: up to
`context_blocks` clean blocks (the KV cache of a [rolling window] of finished blocks, at
t = context_noise) and the block being denoised at one noise level, in one forward over
`[clean blocks | noisy block]`. Clean blocks attend block-causally among themselves (as they did
when their cache entries were written), the noisy block to every visible clean block and
itself. This is teacher forcing with clean context, the regime of the paper's models (cascading
then feeds them noisy context they never saw); unlike teacher forcing over a whole video
([clean | noisy] copies of every block), each forward is only (context + 1) blocks long, which
on a 2-core CPU buys ~2x more supervised blocks per second because attention dominates.

Clips are drawn at the start of a video (the still first block as the only context: the
image-to-video step, where only the prompt says how the sprites move) a third of the time, else
later in the stream (moving, bouncing context); the number of visible context blocks varies
from 1 to context_blocks, so every window fill the sampler meets is trained. The loss is the MSE
of the flow v = eps - x0 on the noisy block. Its sigma comes mostly from the few-step sampler's
table (PipelineConfig().sigmas = [1, 0.9375, 0.8333, 0.625]), the rest shifted-uniform.

    python -m bcjax.toyworld.train --out /tmp/toyrun --time-limit 1080

Restarting with the same --out continues from the last checkpoint. The folder holds
`run.json` (configs), `ckpt/` (orbax: params, optimizer state, step, loss history), `model/`
(the final DiT as a bcjax checkpoint, `bcjax.checkpoint.restore`-able), `loss.png`, `summary.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bcjax.model.config import WanConfig
from bcjax.model.wan import encode_text, forward, init_params
from bcjax.pipeline.config import PipelineConfig
from bcjax.toyworld.world import WorldConfig, prompt_embedding, render, sample_scene


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. context_blocks: clean blocks before the target (the sampler's window
    minus the block itself); max_block: latest video block a target is drawn from; first_prob:
    fraction of clips whose target is the first moving block (after the still image);
    table_prob: fraction of sigmas drawn from the sampler's table (the rest: shifted-uniform)."""

    steps: int = 1900
    batch: int = 8
    context_blocks: int = 2
    max_block: int = 12
    first_prob: float = 1 / 3
    lr: float = 2e-3
    warmup: int = 100
    end_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    table_prob: float = 0.75
    seed: int = 0
    checkpoint_every: int = 200


def toy_pipeline_config(tcfg: TrainConfig | None = None) -> PipelineConfig:
    """The sampler the toy model is trained for: the real models' 4-step sigma table, a window of
    the trained context + the block itself, no sink."""
    k = (tcfg or TrainConfig()).context_blocks
    return PipelineConfig(window_frames=(k + 1) * PipelineConfig.block_frames)


def toy_model_config(world: WorldConfig, **overrides) -> WanConfig:
    """A tiny Wan DiT for the toy world: patch (1, 2, 2) -> 36 tokens per 12x12 frame, head_dim 32.

    Sized for the 20-minute, 2-core CPU budget; four layers because carrying a sprite along a
    prompt's velocity takes a cross-attention hop (which velocity) before the self-attention
    hops that fetch the sprite from the right offset of the previous frames.

    rope_theta 100, not Wan's 10 000: head_dim 32 leaves each spatial axis 5 RoPE frequencies,
    and with theta 10 000 only the first two turn by a useful angle across a 6-token grid, so an
    attention score can barely tell offset v from v +- 1 (qk-norm bounds the logits). Theta 100
    spreads the 5 frequencies over periods of 6 to 250 tokens, as Wan's spread over its 30x52
    grid; measured (one sprite, 1900 steps): loss 0.145 -> 0.132, sequential sprite position
    error 9.5 -> 7.3 px.
    """
    base = {"dim": 96, "ffn_dim": 256, "num_heads": 3, "num_layers": 4, "in_channels": world.channels,
            "out_channels": world.channels, "text_dim": world.text_dim, "text_len": world.text_len, "attention": "xla",
            "rope_theta": 100.0}
    return WanConfig(**{**base, **overrides})


# -- the training forward (pure functions) ----------------------------------------------------

def context_mask(num_context: int, visible, tokens_per_block: int):
    """bool [B, K + 1, (K + 1) * tokens_per_block] key mask of one [K clean | 1 noisy] forward.

    visible int [B]: how many of the K context blocks (the newest) the sample shows. Clean block
    c sees the visible clean blocks up to itself (block-causal, as when it entered the cache); the
    noisy block sees every visible clean block and itself; a hidden block sees only itself.
    """
    k = num_context
    q = jnp.arange(k + 1)[:, None]
    kb = jnp.arange(k + 1)[None, :]
    first = (k - jnp.asarray(visible))[:, None, None]  # [B, 1, 1] first visible context block
    clean = (q < k) & (kb <= q) & (kb >= first) & (q >= first)
    noisy = (q == k) & (((kb < k) & (kb >= first)) | (kb == k))
    own = q == kb
    return jnp.repeat(clean | noisy | own, tokens_per_block, axis=2)


def context_flow(cfg: WanConfig, params, context, x_t, t_noisy, visible, text, context_noise: float = 0.0):
    """Flow prediction for a noisy block after its clean context, in one forward.

    context [B, K * bf, H, W, C] clean blocks; x_t [B, bf, H, W, C] the noisy block; t_noisy [B]
    its timestep; visible int [B] context blocks shown (the newest). Returns [B, bf, H, W, C].
    """
    b, kf, hh, ww, _ = context.shape
    bf = x_t.shape[1]
    k = kf // bf
    mask = context_mask(k, visible, bf * cfg.tokens_per_frame(hh, ww))
    seq = jnp.concatenate([context, x_t.astype(context.dtype)], axis=1)
    t = jnp.concatenate([jnp.full((b, kf), context_noise, jnp.float32),
                         jnp.broadcast_to(t_noisy.astype(jnp.float32)[:, None], (b, bf))], axis=1)
    flow, _ = forward(cfg, params, seq, t, text, jnp.arange(kf + bf), None, mask)
    return flow[:, kf:]


def sample_sigmas(key, shape, pcfg: PipelineConfig, table_prob: float):
    """(sigma, timestep) float32 [*shape]: from the sampler's table with prob table_prob, else
    shifted-uniform (sigma = shift u / (1 + (shift - 1) u)), timestep = 1000 sigma."""
    k_pick, k_idx, k_u = jax.random.split(key, 3)
    table_s, table_t = jnp.asarray(pcfg.sigmas), jnp.asarray(pcfg.timesteps)
    idx = jax.random.randint(k_idx, shape, 0, len(pcfg.sigmas))
    u = jax.random.uniform(k_u, shape)
    s_u = pcfg.shift * u / (1.0 + (pcfg.shift - 1.0) * u)
    pick = jax.random.uniform(k_pick, shape) < table_prob
    return jnp.where(pick, table_s[idx], s_u), jnp.where(pick, table_t[idx], 1000.0 * s_u)


def flow_loss(cfg: WanConfig, pcfg: PipelineConfig, table_prob: float, params, clip, visible, context, key):
    """MSE of the flow (eps - x0) on a clip's last block. clip [B, (K + 1) * bf, H, W, C];
    visible int [B]; context: prompt embeddings [B, Lt, text_dim]."""
    bf = pcfg.block_frames
    x0 = clip[:, -bf:]
    k_sig, k_eps = jax.random.split(key)
    sigma, t = sample_sigmas(k_sig, (clip.shape[0],), pcfg, table_prob)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    s = sigma[:, None, None, None, None]
    x_t = (1.0 - s) * x0 + s * eps
    text = encode_text(cfg, params, context)
    flow = context_flow(cfg, params, clip[:, :-bf], x_t, t, visible, text, pcfg.context_noise)
    return jnp.mean((flow - (eps - x0)) ** 2)


def sample_clips(rng: np.random.Generator, world: WorldConfig, tcfg: TrainConfig):
    """(clips float32 [B, (K + 1) * bf, H, W, C], visible int32 [B], prompt embeddings [B, Lt, Dt]).

    The target is video block j (j = 1, the first moving block, with prob first_prob, else
    uniform in [2, max_block]); visible ~ uniform [1, min(K, j)]. Hidden context blocks (before
    the video's start or outside `visible`) are rendered but masked out.
    """
    k, bf = tcfg.context_blocks, world.block_frames
    clips, visible, text = [], [], []
    for _ in range(tcfg.batch):
        scene = sample_scene(rng, world)
        j = 1 if rng.random() < tcfg.first_prob else int(rng.integers(2, max(tcfg.max_block, 2) + 1))
        visible.append(int(rng.integers(1, min(k, j) + 1)))
        clips.append(render(scene, (k + 1) * bf, world, start_frame=(j - k) * bf))
        text.append(prompt_embedding(scene, world))
    return np.stack(clips), np.asarray(visible, np.int32), np.stack(text)


# -- optimisation ------------------------------------------------------------------------------

class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array  # int32 []


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, tcfg.lr, min(tcfg.warmup, max(tcfg.steps - 1, 1)), max(tcfg.steps, 2), tcfg.lr * tcfg.end_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip),
                       optax.adamw(schedule, b1=0.9, b2=0.99, weight_decay=tcfg.weight_decay))


def init_state(cfg: WanConfig, tcfg: TrainConfig) -> TrainState:
    params = init_params(cfg, jax.random.key(tcfg.seed))
    return TrainState(params, make_optimizer(tcfg).init(params), jnp.int32(0))


@functools.lru_cache(maxsize=4)
def make_train_step(cfg: WanConfig, pcfg: PipelineConfig, tcfg: TrainConfig):
    """jitted (state, clips, visible, context, key) -> (state, loss); the state is donated. Cached per config,
    so a resumed session in the same process reuses the compiled step."""
    opt = make_optimizer(tcfg)
    loss_fn = partial(flow_loss, cfg, pcfg, tcfg.table_prob)

    def step(state: TrainState, clips, visible, context, key):
        loss, grads = jax.value_and_grad(loss_fn)(state.params, clips, visible, context, key)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        return TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1), loss

    return jax.jit(step, donate_argnums=(0,))


def batch_for_step(world: WorldConfig, pcfg: PipelineConfig, tcfg: TrainConfig, step: int):
    """The data and noise key of a step depend only on (seed, step): a resumed run sees what an
    uninterrupted one would."""
    clips, visible, ctx = sample_clips(np.random.default_rng([tcfg.seed, step]), world, tcfg)
    return jnp.asarray(clips), jnp.asarray(visible), jnp.asarray(ctx), jax.random.fold_in(jax.random.key(tcfg.seed + 1), step)


# -- the run folder ----------------------------------------------------------------------------

def _run_dict(world, cfg, pcfg, tcfg) -> dict:
    return {name: dataclasses.asdict(c) for name, c in
            (("world", world), ("model", cfg), ("pipeline", pcfg), ("train", tcfg))}


def _from_dict(cls, data: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in data.items()})


def load_run(out: str):
    """(world, cfg, pcfg, tcfg) of a run folder, from its run.json."""
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    return (_from_dict(WorldConfig, run["world"]), _from_dict(WanConfig, run["model"]),
            _from_dict(PipelineConfig, run["pipeline"]), _from_dict(TrainConfig, run["train"]))


def _checkpoint_manager(out: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.join(os.path.abspath(out), "ckpt"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
                                 item_names=("state", "meta"))


def save_state(mngr, state: TrainState, losses: list[float], extra: dict | None = None) -> None:
    import orbax.checkpoint as ocp

    step = int(state.step)
    meta = {"step": step, "losses": [float(x) for x in losses[:step]], **(extra or {})}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
    mngr.wait_until_finished()


def restore_state(mngr, cfg: WanConfig, tcfg: TrainConfig):
    """(state, meta) of the newest checkpoint, or None when the folder holds none."""
    import orbax.checkpoint as ocp

    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.eval_shape(lambda: init_state(cfg, tcfg))
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     meta=ocp.args.JsonRestore()))
    return TrainState(*got["state"]), dict(got["meta"])


def export_model(out: str, cfg: WanConfig, params, world: WorldConfig, pcfg: PipelineConfig, tcfg: TrainConfig,
                 step: int) -> str:
    """The trained DiT as a bcjax checkpoint folder out/model (provenance: world, sampler, training)."""
    from bcjax.checkpoint import save

    path = os.path.join(out, "model")
    save(path, {"dit": (cfg, params)}, {"source": "bcjax.toyworld.train", "step": step,
                                         "world": dataclasses.asdict(world), "pipeline": dataclasses.asdict(pcfg),
                                         "train": dataclasses.asdict(tcfg)},
         overwrite=True)
    return path


def plot_losses(path: str, losses) -> None:
    from bcjax.toyworld.png import line_plot, write_png

    y = np.asarray(losses, np.float64)
    if not y.size:
        return
    w = max(1, len(y) // 25)  # trailing mean over 4% of the run (shorter at the start)
    csum = np.concatenate([[0.0], np.cumsum(y)])
    lo = np.maximum(np.arange(1, len(y) + 1) - w, 0)
    mean = (csum[1:] - csum[lo]) / (np.arange(1, len(y) + 1) - lo)
    write_png(path, line_plot({"loss": y, "mean": mean}, log_y=True, colours=((170, 200, 230), (20, 70, 160))))


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def train(out: str, world: WorldConfig, cfg: WanConfig, pcfg: PipelineConfig, tcfg: TrainConfig,
          progress: bool = True, until: int | None = None, time_limit: float | None = None) -> dict:
    """Train (or resume) into `out` up to tcfg.steps; stop early, checkpointed and exported, at step
    `until` (as an interrupted session would) or once this session has run `time_limit` seconds.
    Returns the summary also written to out/summary.json."""
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    run_json = os.path.join(out, "run.json")
    if os.path.isfile(run_json):
        for name, was, now in zip(("world", "model", "pipeline"), load_run(out), (world, cfg, pcfg)):
            if was != now:
                raise ValueError(f"run {out} was started with {name} config {was}; got {now} (use a new folder)")
    with open(run_json, "w") as f:
        json.dump(_run_dict(world, cfg, pcfg, tcfg), f, indent=2)
    mngr = _checkpoint_manager(out)
    restored = restore_state(mngr, cfg, tcfg)
    if restored is None:
        state, losses, prior_wall = init_state(cfg, tcfg), [], 0.0
    else:
        state, meta = restored
        losses, prior_wall = list(meta["losses"]), float(meta.get("wall_s", 0.0))
    # Restored arrays come back committed to a device; commit fresh ones too, so a fresh and a
    # resumed session in one process share one compiled step.
    state = jax.device_put(state, jax.devices()[0])
    start = int(state.step)
    step_fn = make_train_step(cfg, pcfg, tcfg)
    t_begin = time.perf_counter()
    step_times = []
    stop = tcfg.steps if until is None else min(until, tcfg.steps)
    bar = tqdm(total=tcfg.steps, initial=start, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    try:
        for step in range(start, stop):
            clips, visible, ctx, key = batch_for_step(world, pcfg, tcfg, step)
            t0 = time.perf_counter()
            state, loss = step_fn(state, clips, visible, ctx, key)
            loss = float(loss)  # blocks: the step time below is the real one
            step_times.append(time.perf_counter() - t0)
            losses.append(loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", ms=f"{1e3 * step_times[-1]:.0f}")
            done = step + 1
            out_of_time = time_limit is not None and time.perf_counter() - t_begin > time_limit
            if done % tcfg.checkpoint_every == 0 or done == stop or out_of_time:
                save_state(mngr, state, losses, {"wall_s": prior_wall + time.perf_counter() - t_begin})
                plot_losses(os.path.join(out, "loss.png"), losses)
            if out_of_time:
                print(f"stopping at step {done}: this session ran past --time-limit {time_limit:.0f}s")
                break
    except KeyboardInterrupt:  # keep what was done; rerunning continues from here
        try:
            if int(state.step) > start:
                save_state(mngr, state, losses, {"wall_s": prior_wall + time.perf_counter() - t_begin})
        except (RuntimeError, ValueError, OSError) as e:  # e.g. a donated state deleted mid-dispatch
            print(f"could not checkpoint the interrupted step ({e}); resuming starts from the last checkpoint")
        raise
    finally:
        bar.close()
    wall = prior_wall + time.perf_counter() - t_begin
    if int(state.step) > start or not os.path.isdir(os.path.join(out, "model")):
        export_model(out, cfg, state.params, world, pcfg, tcfg, int(state.step))
        plot_losses(os.path.join(out, "loss.png"), losses)
    steady = step_times[1:] or step_times
    head = np.mean(losses[:10]) if losses else float("nan")
    tail = np.mean(losses[-50:]) if losses else float("nan")
    summary = {
        "steps": int(state.step), "planned_steps": tcfg.steps, "resumed_from": start, "batch": tcfg.batch,
        "context_blocks": tcfg.context_blocks,
        "session_wall_s": time.perf_counter() - t_begin,
        "ms_per_step": 1e3 * float(np.median(steady)) if steady else None,
        "first_step_s (compile)": step_times[0] if step_times else None,
        "wall_s (all sessions)": wall,
        "loss_first10": float(head), "loss_last50": float(tail),
        "params": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
        "model_bytes": dir_size(os.path.join(out, "model")), "ckpt_bytes": dir_size(os.path.join(out, "ckpt")),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder; an existing one is resumed")
    p.add_argument("--steps", type=int, help="total optimisation steps (default 1900)")
    for name, typ in (("batch", int), ("context-blocks", int), ("lr", float), ("warmup", int), ("seed", int),
                      ("table-prob", float), ("checkpoint-every", int), ("dim", int), ("ffn-dim", int),
                      ("heads", int), ("layers", int), ("patch", int), ("rope-theta", float)):
        p.add_argument(f"--{name}", type=typ)
    for name in ("size", "sprite", "min-sprites", "max-sprites"):
        p.add_argument(f"--{name}", type=int, help=f"world {name.replace('-', ' ')} (new runs only)")
    p.add_argument("--until", type=int, help="stop (checkpointed) at this step; rerun to continue")
    p.add_argument("--time-limit", type=float, help="stop (checkpointed) after this many seconds of this session")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    train_args = {"steps": a.steps, "batch": a.batch, "context_blocks": a.context_blocks, "lr": a.lr, "warmup": a.warmup,
                  "seed": a.seed, "table_prob": a.table_prob, "checkpoint_every": a.checkpoint_every}
    model_args = {"dim": a.dim, "ffn_dim": a.ffn_dim, "num_heads": a.heads, "num_layers": a.layers, "rope_theta": a.rope_theta,
                  "patch_size": None if a.patch is None else (1, a.patch, a.patch)}
    world_args = {"size": a.size, "sprite": a.sprite, "min_sprites": a.min_sprites, "max_sprites": a.max_sprites}
    train_args = {k: v for k, v in train_args.items() if v is not None}
    world_args = {k: v for k, v in world_args.items() if v is not None}
    model_args = {k: v for k, v in model_args.items() if v is not None}
    if os.path.isfile(os.path.join(a.out, "run.json")):
        # Resuming: the run's configs stand; a flag may only restate them (or change --steps etc.).
        world, cfg, pcfg, tcfg = load_run(a.out)
        clash = {k: (getattr(cfg, k), v) for k, v in model_args.items() if getattr(cfg, k) != v}
        if clash:
            raise SystemExit(f"run {a.out} was started with model {({k: c[0] for k, c in clash.items()})}; "
                             f"got {({k: c[1] for k, c in clash.items()})} (use a new --out)")
        if any(getattr(world, k) != v for k, v in world_args.items()):
            raise SystemExit(f"run {a.out} was started with world {world}; world flags {world_args} cannot change it")
        tcfg = dataclasses.replace(tcfg, **train_args)
    else:
        world, tcfg = WorldConfig(**world_args), TrainConfig(**train_args)
        cfg, pcfg = toy_model_config(world, **model_args), toy_pipeline_config(tcfg)
    summary = train(a.out, world, cfg, pcfg, tcfg, progress=not a.no_progress, until=a.until, time_limit=a.time_limit)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
