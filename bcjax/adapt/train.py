"""Training an adapter: optax AdamW (warmup, global-norm clipping), orbax checkpoints (resumable),
each DiT layer rematerialised, a tqdm bar with the loss.

One step: a batch of prompts and a fresh noise key (both drawn from (seed, step), so a resumed
run sees what the uninterrupted one would); the teacher's K-block trajectory under the base
weights (no gradient); the teacher-forced ticks' loss under base + adapter
(`bcjax.adapt.teacher`); one AdamW update of the factors. The base weights stay frozen in their
stored dtype (they are an argument of the step, never differentiated); the factors are float32
and enter the tick cast to the compute dtype. One device: the step is a plain jitted function.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bcjax.adapt import store
from bcjax.adapt.teacher import forced_tick_loss, teacher_trajectory
from bcjax.model import lora
from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import init_cache
from bcjax.model.wan import text_kv
from bcjax.names import DEFAULT_MASK, Mask
from bcjax.sampler import clean_block
from bcjax.schedule.config import PipelineConfig

# a batch of prompts for one step: rng -> (prompt embeddings [B, Lt, text_dim], given clean context
# frames [B, G * block_frames, H, W, C] or None)
Source = Callable[[np.random.Generator], tuple[np.ndarray, np.ndarray | None]]


@dataclasses.dataclass(frozen=True)
class AdaptConfig:
    """What an adapter is trained for and how (its settings go into adapter.json)."""

    stagger: str = "P4"
    mask: Mask = DEFAULT_MASK
    rank: int = 16
    steps: int = 300
    batch: int = 4  # prompts per step
    blocks: int = 8  # blocks per teacher generation (every tick of it is scored)
    lr: float = 2e-3
    warmup: int = 20
    clip: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    save_every: int = 50

    def __post_init__(self):
        store.check_stagger(self.stagger)
        for field in ("rank", "steps", "batch", "blocks", "save_every"):
            if getattr(self, field) < 1:
                raise ValueError(f"adapt {field}={getattr(self, field)}: expected >= 1")


class TrainState(NamedTuple):
    step: jax.Array  # int32 []
    lora: dict  # the factors, float32
    opt_state: optax.OptState


def make_optimizer(acfg: AdaptConfig) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, acfg.lr, min(acfg.warmup, acfg.steps), acfg.steps,
                                                  end_value=0.1 * acfg.lr)
    return optax.chain(optax.clip_by_global_norm(acfg.clip), optax.adamw(schedule, weight_decay=acfg.weight_decay))


def apply_grads(opt: optax.GradientTransformation, state: TrainState, grads) -> TrainState:
    """One optimizer update of the factors (the training loop's step and `bcjax.adapt.step`'s)."""
    updates, opt_state = opt.update(grads, state.opt_state, state.lora)
    return TrainState(state.step + 1, optax.apply_updates(state.lora, updates), opt_state)


def init_state(cfg: WanConfig, acfg: AdaptConfig) -> TrainState:
    factors = lora.init(cfg, jax.random.fold_in(jax.random.key(acfg.seed), 1 << 20), acfg.rank)
    return TrainState(jnp.int32(0), factors, make_optimizer(acfg).init(factors))


def tick_spec(cfg: WanConfig, pcfg: PipelineConfig, latent_hw: tuple[int, int], stagger: str, mask: Mask):
    """The cascade's TickSpec for one device, each layer rematerialised (what the runner ticks)."""
    from bcjax.runners import make_runner

    spec = make_runner(cfg, pcfg, latent_hw, stagger, mask).tick_program.spec
    return dataclasses.replace(spec, remat=True)


def _prefill(cfg, pcfg, params, text, context, latent_hw):
    """The clean cache with given context frames written at t = 0, block by block (as runners do)."""
    batch, bf = text.k.shape[1], pcfg.block_frames
    cache = init_cache(cfg, batch, pcfg.cache_frames, cfg.tokens_per_frame(*latent_hw))
    groups = 0 if context is None else context.shape[1] // bf
    for g in range(groups):
        cache = clean_block(cfg, pcfg, params, text, context[:, g * bf:(g + 1) * bf], cache, jnp.int32(g),
                            timestep=0.0)
    return cache, groups


def loss_fn(cfg: WanConfig, pcfg: PipelineConfig, spec, acfg: AdaptConfig, latent_hw, factors, params, embeddings,
            context, key):
    """The teacher-forced loss of `factors` on one batch (`bcjax.adapt.teacher`)."""
    text = text_kv(cfg, params, embeddings)
    cache, first = _prefill(cfg, pcfg, params, text, context, latent_hw)
    traj = jax.lax.stop_gradient(teacher_trajectory(cfg, pcfg, params, text, key, acfg.blocks, latent_hw, cache, first))
    return forced_tick_loss(spec, lora.adapted(params, factors, cfg.compute_dtype), text, key, traj, first)


def make_step(cfg: WanConfig, pcfg: PipelineConfig, latent_hw: tuple[int, int], acfg: AdaptConfig):
    """step(state, params, embeddings, context, key) -> (state, loss), jitted; the state donated."""
    spec = tick_spec(cfg, pcfg, latent_hw, acfg.stagger, acfg.mask)
    opt = make_optimizer(acfg)

    def step(state: TrainState, params, embeddings, context, key):
        loss, grads = jax.value_and_grad(
            lambda f: loss_fn(cfg, pcfg, spec, acfg, latent_hw, f, params, embeddings, context, key))(state.lora)
        return apply_grads(opt, state, grads), loss

    return jax.jit(step, donate_argnums=(0,))


def make_eval(cfg: WanConfig, pcfg: PipelineConfig, latent_hw: tuple[int, int], acfg: AdaptConfig):
    """loss(factors, params, embeddings, context, key), jitted: the teacher-forced loss alone."""
    spec = tick_spec(cfg, pcfg, latent_hw, acfg.stagger, acfg.mask)
    return jax.jit(functools.partial(loss_fn, cfg, pcfg, spec, acfg, latent_hw))


def batch_for_step(source: Source, acfg: AdaptConfig, step: int):
    """(embeddings, context, key) of step `step`: drawn from (seed, step) alone."""
    embeddings, context = source(np.random.default_rng([acfg.seed, step]))
    key = jax.random.fold_in(jax.random.key(acfg.seed), step)
    return jnp.asarray(embeddings), None if context is None else jnp.asarray(context), key


def _settings(acfg: AdaptConfig) -> dict:
    return {k: v for k, v in dataclasses.asdict(acfg).items() if k not in ("stagger", "mask", "rank", "save_every")}


def _manager(out: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.join(out, "ckpt"), options=ocp.CheckpointManagerOptions(max_to_keep=2,
                                 create=True), item_names=("state", "meta"))


def _check_resume(out: str, meta: dict, identity: dict, settings: dict) -> None:
    """A run in `out` continues only under the same identity and settings; else the field is named."""
    for k, v in {**identity, **settings}.items():
        if k == "format":
            continue
        got = meta.get(k, meta.get("settings", {}).get(k))
        if got != v:
            raise ValueError(f"--out {out} holds an unfinished adapter run with {k}={got}; this run asks for {k}={v} "
                             "(use another --out, or delete it to start over)")


def adapt(out: str, cfg: WanConfig, pcfg: PipelineConfig, params, latent_hw: tuple[int, int], source: Source,
          acfg: AdaptConfig, *, progress: bool = True, callback: Callable[[int, float], None] | None = None,
          extra: dict | None = None) -> store.Adapter:
    """Train an adapter into the folder `out` (`bcjax.adapt.store`) and return it.

    An unfinished run in `out` (a killed `adapt`) resumes from its newest checkpoint, refused
    (naming the field) when its model, rank, stagger, mask, sampler or settings differ; a
    finished adapter there is refused. callback(step, loss) after every step (may raise to stop:
    the checkpoints stay). extra: more fields for adapter.json (e.g. the base model's name)."""
    import orbax.checkpoint as ocp
    from tqdm.auto import tqdm

    from bcjax.paths import resolve

    out = resolve(out)
    identity = store.describe(cfg, pcfg, params, acfg.rank, acfg.stagger, acfg.mask)
    settings = _settings(acfg)
    meta = store.read_meta(out)
    if meta is not None and meta.get("complete") is True:
        raise ValueError(f"--out {out} already holds a finished adapter ({meta.get('step')} steps); delete it or "
                         "choose another folder")
    step_fn = make_step(cfg, pcfg, latent_hw, acfg)
    state = init_state(cfg, acfg)
    losses: list[float] = []
    mngr = None
    if meta is not None:
        _check_resume(out, meta, identity, settings)
        mngr = _manager(out)
        last = mngr.latest_step()
        if last is not None:
            abstract = jax.eval_shape(lambda: init_state(cfg, acfg))
            got = mngr.restore(last, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                            meta=ocp.args.JsonRestore()))
            state = TrainState(*got["state"])
            losses = [float(x) for x in got["meta"]["losses"]][:last]
    else:
        store.write_meta(out, {**identity, "settings": settings, **(extra or {}), "complete": False, "step": 0})
        mngr = _manager(out)
    base = dict(identity, settings=settings, **(extra or {}))

    def save(state):
        step = int(state.step)
        mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                meta=ocp.args.JsonSave({"step": step, "losses": losses})), force=True)
        mngr.wait_until_finished()
        store.write_meta(out, {**base, "complete": False, "step": step})

    start = int(state.step)
    bar = tqdm(total=acfg.steps, initial=start, desc=f"adapt {acfg.stagger} {acfg.mask}", unit="step",
               disable=not progress)
    try:
        for s in range(start, acfg.steps):
            embeddings, context, key = batch_for_step(source, acfg, s)
            state, loss = step_fn(state, params, embeddings, context, key)
            losses.append(float(loss))
            bar.update(1)
            bar.set_postfix(loss=f"{losses[-1]:.4g}")
            if (s + 1) % acfg.save_every == 0 and s + 1 < acfg.steps:
                save(state)
            if callback is not None:
                callback(s + 1, losses[-1])
    finally:
        bar.close()
    save(state)
    first, last10 = losses[:10], losses[-10:]
    summary = {"step": int(state.step), "loss_first": float(np.mean(first)) if first else None,
               "loss_last": float(np.mean(last10)) if last10 else None}
    store.save(out, state.lora, {**base, **summary})
    return store.load(out, cfg, params)
