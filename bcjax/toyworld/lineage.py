"""The real models' lineage in the toy world: a bidirectional many-step base, its ODE trajectories,
and a block-causal few-step student initialised from it (`python -m bcjax.toyworld.train --stage`
base, ode-init, stream-teacher, stream-rollout).

CausVid, Self-Forcing, LongLive and Krea Realtime are students of Wan2.1-T2V: a bidirectional
flow-matching DiT sampled in many steps. The student starts from the base's weights (so from a
network that reads the frames *after* a frame), is regressed onto the base's ODE trajectories
under the block-causal mask (CausVid's ODE initialisation, Self-Forcing's `ode_regression.py`),
then trained on its own KV-cached rollouts (Self-Forcing's self-rollout; LongLive's streaming
tuning adds a rolling window, an attention sink and prompt switches). Here, the same stages:

* base: full attention over a clip of `clip_blocks` blocks (the still image, clean at t = 0, and
  the rest at one sigma, shifted-uniform like the sampler's grid); flow-matching loss. Sampled by
  `base_sample`: `base_steps` Euler steps on Wan's shifted grid, through which the student's four
  sigmas are threaded exactly, so the trajectory holds the states the student starts each pass from.
* ode-init: `ode_dataset` runs the base's sampler on `ode_clips` prompts once (kept in the run
  folder); each step regresses the student's x0 on the base's final x0 from the trajectory's state at
  one of the student's sigmas per block (drawn per block), block-causal over the clip with the
  student's window and sink (the still image clean in front, as the sink).
* stream-teacher: CausVid's teacher forcing over the stream's layout (`stream_teacher_loss`):
  `rollout_blocks` blocks after the same context, each the truth noised to one of the student's
  sigmas, all targets of one forward; the cheap stage that teaches the student the world.
* stream-rollout: the student generates `rollout_blocks` blocks with the few-step sampler after
  the cache a stream really has at video block j (the sink block, the rolling window's blocks
  before j), j drawn up to `max_block` (so the sink's growing RoPE offset in a long stream is
  trained, as LongLive's long tuning does), a `switch_prob` of the clips under a switched prompt
  from block j on (the new colour and direction; the context rendered under the old one); then
  one forward recomputes each generated block's pass at one sampler step with gradient and
  regresses its x0 on the world's truth (the world is deterministic; no DMD critic is needed
  to know the right answer) while the blocks it generated before match the truth
  (`consistent_blocks`: after a drifted block the truth is no longer the answer to its context).

Every layout here is one DiT forward with a block mask (`bcjax.toyworld.train.layout_mask`): a
clean block's K/V over the blocks it saw is exactly the cache entry its clean pass wrote.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.model.config import WanConfig
from bcjax.model.wan import forward, text_kv
from bcjax.sampler import sample_block
from bcjax.schedule.config import PipelineConfig
from bcjax.toyworld.world import WorldConfig, prompt_embedding, render, render_stream, sample_scene, switch_scene


def base_sigmas(steps: int, shift: float, student: np.ndarray) -> np.ndarray:
    """float64 [steps' + 1]: the base's Euler grid from 1 to 0 (Wan's shifted-uniform, `steps`
    intervals) with the student's sigmas inserted, descending, ending at 0."""
    u = np.linspace(1.0, 0.0, steps + 1)
    grid = shift * u / (1.0 + (shift - 1.0) * u)
    grid = np.unique(np.concatenate([np.round(grid, 12), np.round(np.asarray(student, np.float64), 12)]))[::-1]
    return grid


def base_flow(cfg: WanConfig, params, first, x, sigma, text, first_frame: int = 0):
    """The base's flow over [first (clean) | x (one sigma)], full attention. first [B, bf, H, W, C];
    x [B, (N - 1) * bf, H, W, C]; sigma [B]. Returns the flow of x's frames."""
    b, bf = first.shape[:2]
    seq = jnp.concatenate([first, x.astype(first.dtype)], axis=1)
    t = jnp.concatenate([jnp.zeros((b, bf), jnp.float32),
                         jnp.broadcast_to(1000.0 * sigma.astype(jnp.float32)[:, None], (b, x.shape[1]))], axis=1)
    flow, _ = forward(cfg, params, seq, t, text, first_frame + jnp.arange(seq.shape[1]), None, None)
    return flow[:, bf:]


def base_loss(cfg: WanConfig, pcfg: PipelineConfig, params, clip, context, key):
    """Flow matching of the bidirectional base: clip [B, N * bf, H, W, C] (block 0 the given image,
    clean), one shifted-uniform sigma per sample for the other blocks."""
    bf = pcfg.block_frames
    first, x0 = clip[:, :bf], clip[:, bf:]
    k_u, k_eps = jax.random.split(key)
    u = jax.random.uniform(k_u, (clip.shape[0],))
    sigma = pcfg.shift * u / (1.0 + (pcfg.shift - 1.0) * u)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    s = sigma[:, None, None, None, None]
    flow = base_flow(cfg, params, first, (1.0 - s) * x0 + s * eps, sigma, text_kv(cfg, params, context))
    return jnp.mean((flow - (eps - x0)) ** 2)


def base_sample(cfg: WanConfig, pcfg: PipelineConfig, params, text, first, num_blocks: int, key, steps: int):
    """The base's many-step sampler: (x0 [B, num_blocks * bf, H, W, C] of the blocks after the given
    image, the states at the student's sigmas [B, n, num_blocks * bf, H, W, C]). Euler on the flow
    over `base_sigmas(steps, pcfg.shift, pcfg.sigmas)`, from noise drawn from `key`."""
    grid = base_sigmas(steps, pcfg.shift, pcfg.sigmas)
    keep = [int(np.argmin(np.abs(grid - s))) for s in pcfg.sigmas]
    b, bf, hh, ww, c = first.shape
    x = jax.random.normal(key, (b, num_blocks * bf, hh, ww, c), jnp.float32)

    def step(x, s):
        s_now, s_next = s[0], s[1]
        flow = base_flow(cfg, params, first, x, jnp.full((b,), s_now), text)
        return x + (s_next - s_now) * flow, x

    pairs = jnp.asarray(np.stack([grid[:-1], grid[1:]], axis=1), jnp.float32)
    x0, xs = jax.lax.scan(step, x, pairs)
    return x0, jnp.moveaxis(xs[jnp.asarray(keep)], 0, 1)


_base_sample_jit = jax.jit(base_sample, static_argnums=(0, 1, 5, 7))


def ode_dataset(path: str, world: WorldConfig, cfg: WanConfig, pcfg: PipelineConfig, teacher: Callable, clips: int,
                clip_blocks: int, steps: int, seed: int, batch: int = 32, progress: bool = True) -> dict:
    """The base's ODE trajectories for `clips` prompts (scenes drawn from default_rng([seed, 1e6 + i])),
    computed once with the params `teacher()` returns and kept at `path` (.npz, written atomically):
    first [M, bf, H, W, C], text [M, Lt, Dt], states [M, n, (N - 1) * bf, H, W, C] at the
    student's sigmas, x0 [M, (N - 1) * bf, H, W, C], seconds."""
    if os.path.isfile(path):
        with np.load(path) as z:
            return {k: z[k] for k in z.files}
    from tqdm.auto import tqdm

    bf = world.block_frames
    t0 = time.perf_counter()
    teacher = teacher()  # restored only when the trajectories are not there yet
    firsts, texts, states, x0s = [], [], [], []
    for lo in tqdm(range(0, clips, batch), desc="ode trajectories", disable=not progress):
        scenes = [sample_scene(np.random.default_rng([seed, 10**6 + i]), world) for i in range(lo, min(lo + batch,
                                                                                                        clips))]
        first = np.stack([render(s, bf, world) for s in scenes])
        ctx = np.stack([prompt_embedding(s, world) for s in scenes])
        text = text_kv(cfg, teacher, jnp.asarray(ctx))
        x0, st = _base_sample_jit(cfg, pcfg, teacher, text, jnp.asarray(first), clip_blocks - 1,
                                  jax.random.key(seed * 7919 + lo), steps)
        firsts.append(first)
        texts.append(ctx)
        states.append(np.asarray(st))
        x0s.append(np.asarray(x0))
    data: dict[str, np.ndarray] = {"first": np.concatenate(firsts), "text": np.concatenate(texts),
                                   "states": np.concatenate(states), "x0": np.concatenate(x0s),
                                   "seconds": np.asarray(time.perf_counter() - t0)}
    tmp = path + ".tmp.npz"
    np.savez(tmp, **data)  # type: ignore[arg-type]  # numpy's stub types savez's **kwds as its first argument
    os.replace(tmp, path)
    return data


def causal_block_mask(num_blocks: int, rolling_blocks: int, sink_blocks: int, tokens_per_block: int):
    """bool [1, N, N * tokens_per_block]: block q sees itself, the rolling_blocks blocks before it
    and the first sink_blocks blocks (the student's window, clip positions 0..N-1)."""
    q, k = np.arange(num_blocks)[:, None], np.arange(num_blocks)[None, :]
    m = (k == q) | ((k < q) & ((k >= q - rolling_blocks) | (k < sink_blocks)))
    return jnp.asarray(np.repeat(m, tokens_per_block, axis=1))[None]


def window_blocks(pcfg: PipelineConfig) -> tuple[int, int]:
    """(rolling blocks, sink blocks) of the student's window: LongLive's 12 frames with a 3-frame
    sink are 2 rolling blocks and 1 sink block before the block itself."""
    bf = pcfg.block_frames
    return (pcfg.cache_frames - pcfg.sink_frames) // bf, pcfg.sink_frames // bf


def ode_init_loss(cfg: WanConfig, pcfg: PipelineConfig, params, first, states, x0, context, key):
    """CausVid's ODE regression: each of the N - 1 blocks after the image starts from the base's
    trajectory state at one of the student's sigmas (drawn per block), the image clean in front;
    block-causal forward with the student's window and sink; MSE of the student's x0 against the
    base's final x0. first [B, bf, ...]; states [B, n, (N - 1) * bf, ...]; x0 [B, (N - 1) * bf, ...]."""
    bf, n = pcfg.block_frames, pcfg.num_steps
    b, nf = x0.shape[:2]
    nb = nf // bf
    idx = jax.random.randint(key, (b, nb), 0, n)
    frame_idx = jnp.repeat(idx, bf, axis=1)  # [B, (N - 1) * bf]
    x_t = jnp.take_along_axis(states, frame_idx[:, None, :, None, None, None], axis=1)[:, 0]
    sigma = jnp.asarray(pcfg.sigmas, jnp.float32)[frame_idx]
    t = jnp.concatenate([jnp.full((b, bf), pcfg.context_noise, jnp.float32),
                         jnp.asarray(pcfg.timesteps, jnp.float32)[frame_idx]], axis=1)
    rolling, sink = window_blocks(pcfg)
    mask = causal_block_mask(nb + 1, rolling, sink, bf * cfg.tokens_per_frame(*first.shape[2:4]))
    seq = jnp.concatenate([first, x_t], axis=1)
    flow, _ = forward(cfg, params, seq, t, text_kv(cfg, params, context), jnp.arange(seq.shape[1]), None, mask)
    pred = x_t - sigma[:, :, None, None, None] * flow[:, bf:]
    return jnp.mean((pred - x0) ** 2)


# -- stream-rollout ---------------------------------------------------------------------------

def stream_layout(rolling: int, rollout: int) -> tuple[np.ndarray, np.ndarray]:
    """(video block offset, is_sink) of the clip positions [sink | rolling context | rollout]: clip
    position c > 0 is video block j - rolling - 1 + c."""
    c = np.arange(1 + rolling + rollout)
    return c - rolling - 1, c == 0


def stream_frame_ids(j, offsets, sink, bf: int):
    """int32 [P * bf] RoPE frame ids of clip positions: the sink (bool [P]) at video block 0, the
    others at video block j + offset (int [P]; one not in the stream yet at any position: hidden)."""
    video = jnp.where(jnp.asarray(sink), 0, jnp.maximum(j + jnp.asarray(offsets), 0))
    return (video[:, None] * bf + jnp.arange(bf)[None]).reshape(-1).astype(jnp.int32)


def stream_mask(index, kinds, exists, rolling: int, tokens_per_block: int):
    """bool [B, P, P * tokens]: clip positions `index` (static, 0 = the sink), CLEAN (0) or TARGET (2)
    kinds; a clean block sees older clean blocks in its window (the rolling ones and the sink),
    as its clean pass did; a target sees the clean blocks in its window; everyone sees itself;
    exists bool [B, P] hides blocks a stream at this j does not have yet."""
    index, kinds = np.asarray(index), np.asarray(kinds)
    q, k = index[:, None], index[None, :]
    rule = (kinds[None, :] == 0) & (k < q) & ((k >= q - rolling) | (k == 0))
    own = np.eye(len(index), dtype=bool)
    m = (jnp.asarray(rule)[None] & jnp.asarray(exists)[:, None, :]) | jnp.asarray(own)[None]
    return jnp.repeat(m, tokens_per_block, axis=2)


def stream_rollout_x0(cfg: WanConfig, pcfg: PipelineConfig, rollout_blocks: int, params, clip, exists, j, context,
                      key, record):
    """(x0 predictions with gradient [B, R * bf, ...], the rollout [B, R * bf, ...]) of the
    stream-rollout stage. clip [B, (1 + K + R) * bf, ...] the truth at [sink | K rolling context |
    R rollout] (`stream_layout`); exists bool [B, 1 + K] which of sink and context the stream has
    at video block j (int32 []); record int [B, R] the sampler step each block is trained at.

    The context's K/V are recomputed over the clip's own blocks: a stream's cache entry of a
    rolling block also saw the blocks before it that the window has since evicted, so the rollout is
    exactly the pipeline's up to j = rolling + 1 (the test pins it) and an approximation later,
    as Self-Forcing's own training rollouts are shorter than its streams."""
    bf, r = pcfg.block_frames, rollout_blocks
    rolling, _ = window_blocks(pcfg)
    b, _, hh, ww, c = clip.shape
    tpb = bf * cfg.tokens_per_frame(hh, ww)
    offset, sink = stream_layout(rolling, r)
    text = text_kv(cfg, params, context)
    frozen, ftext = jax.lax.stop_gradient((params, text))
    ctx_n = 1 + rolling
    gen: list[jax.Array] = []
    inputs: list[jax.Array] = []
    for blk in range(r):
        idx = np.arange(ctx_n + blk + 1)
        kinds = np.asarray([0] * (ctx_n + blk) + [2])
        ex = jnp.concatenate([exists, jnp.ones((b, blk + 1), bool)], axis=1)
        mask = stream_mask(idx, kinds, ex, rolling, tpb)
        fids = stream_frame_ids(j, offset[:ctx_n + blk + 1], sink[:ctx_n + blk + 1], bf)
        prefix = jnp.concatenate([clip[:, :ctx_n * bf], *gen], axis=1)

        def pass_fn(x, t_k, prefix=prefix, mask=mask, fids=fids):
            seq = jnp.concatenate([prefix, x], axis=1)
            t = jnp.concatenate([jnp.full((b, prefix.shape[1]), pcfg.context_noise, jnp.float32),
                                 jnp.full((b, bf), t_k, jnp.float32)], axis=1)
            return forward(cfg, frozen, seq, t, ftext, fids, None, mask)[0][:, -bf:]

        # noise of video block j + blk, as the pipeline draws it for that block
        x0, xs_in, _ = sample_block(pass_fn, pcfg, key, j + blk, (b, bf, hh, ww, c))
        gen.append(jax.lax.stop_gradient(x0))
        inputs.append(xs_in[record[:, blk], jnp.arange(b)])
    x_in = jnp.concatenate(inputs, axis=1)
    clean = jnp.concatenate(gen[:-1], axis=1) if r > 1 else x_in[:, :0]
    pred = stream_targets_x0(cfg, pcfg, params, text, clip[:, :ctx_n * bf], clean, x_in, record, exists, j)
    return pred, jnp.concatenate(gen, axis=1)


def stream_targets_x0(cfg: WanConfig, pcfg: PipelineConfig, params, text, context, clean, x_in, record, exists, j):
    """x0 predictions with gradient [B, R * bf, ...] of R target blocks in one forward over
    [sink | K rolling context | the R - 1 blocks before the last target, clean | the R targets]:
    target r sees the clean blocks of its window (the sink, and of the context and `clean` the
    rolling ones before it), as the sequential pass over a KV cache does. context [B, (1 + K) * bf,
    ...]; clean [B, (R - 1) * bf, ...]; x_in [B, R * bf, ...] the targets' inputs at the sampler
    steps record int [B, R]; exists bool [B, 1 + K]; j the video block of the first target."""
    bf = pcfg.block_frames
    rolling, _ = window_blocks(pcfg)
    b, _, hh, ww, _ = x_in.shape
    r = x_in.shape[1] // bf
    tpb = bf * cfg.tokens_per_frame(hh, ww)
    offset, sink = stream_layout(rolling, r)
    ctx_n = 1 + rolling
    index = np.concatenate([np.arange(ctx_n + r - 1), np.arange(ctx_n, ctx_n + r)])
    kinds = np.asarray([0] * (ctx_n + r - 1) + [2] * r)
    ex = jnp.concatenate([exists, jnp.ones((b, 2 * r - 1), bool)], axis=1)
    mask = stream_mask(index, kinds, ex, rolling, tpb)
    seq = jnp.concatenate([context, clean, x_in], axis=1)
    sig, ts = jnp.asarray(pcfg.sigmas, jnp.float32)[record], jnp.asarray(pcfg.timesteps, jnp.float32)[record]
    t = jnp.concatenate([jnp.full((b, (ctx_n + r - 1) * bf), pcfg.context_noise, jnp.float32),
                         jnp.repeat(ts, bf, axis=1)], axis=1)
    flow, _ = forward(cfg, params, seq, t, text, stream_frame_ids(j, offset[index], sink[index], bf), None, mask)
    s = jnp.repeat(sig, bf, axis=1)[:, :, None, None, None]
    return x_in - s * flow[:, -r * bf:]


def stream_teacher_loss(cfg: WanConfig, pcfg: PipelineConfig, rollout_blocks: int, params, clip, exists, j, context,
                        key):
    """Teacher forcing over the stream's layout (CausVid's, before Self-Forcing's rollout): the R
    blocks after the context are all targets in one forward, each the truth noised to one of the
    student's sigmas (drawn per block), each seeing the truth's clean blocks of its window; MSE of
    the x0 predictions against the truth. No rollout passes and R targets per forward: on the
    2-core CPU 0.09 s per trained block at R = 2 (batch 16), against 0.14 s for
    `stream_rollout_loss` with one rollout block; a larger R is not cheaper here (R = 6: over 13 s
    a step, one forward of 14 blocks whose attention is quadratic in them)."""
    bf, r = pcfg.block_frames, rollout_blocks
    ctx_n = 1 + window_blocks(pcfg)[0]
    k_step, k_eps = jax.random.split(key)
    record = jax.random.randint(k_step, (clip.shape[0], r), 0, pcfg.num_steps)
    truth = clip[:, -r * bf:]
    s = jnp.repeat(jnp.asarray(pcfg.sigmas, jnp.float32)[record], bf, axis=1)[:, :, None, None, None]
    x_in = (1.0 - s) * truth + s * jax.random.normal(k_eps, truth.shape, jnp.float32)
    pred = stream_targets_x0(cfg, pcfg, params, text_kv(cfg, params, context), clip[:, :ctx_n * bf],
                             truth[:, :-bf], x_in, record, exists, j)
    return jnp.mean((pred - truth) ** 2)


# A generated block "is" the truth when its MSE to the world's render is below this: a crisp
# sprite at the true corner (on the 12 x 12 canvas a sprite one patch off costs 0.33, the right
# sprite at half its amplitude 0.06).
CONSISTENT_MSE = 0.02


def consistent_blocks(gen, truth, bf: int, tol: float = CONSISTENT_MSE):
    """float32 [B, R]: 1 where every generated block before rollout block k matched the truth (MSE
    < tol), i.e. where the world's truth of block k is the continuation of the context the student
    made. gen, truth [B, R * bf, ...]."""
    b = gen.shape[0]
    err = jnp.mean(((gen - truth) ** 2).reshape(b, -1, bf * int(np.prod(gen.shape[2:]))), axis=-1)  # [B, R]
    ok = jnp.cumprod((err < tol).astype(jnp.float32), axis=1)
    return jnp.concatenate([jnp.ones((b, 1), jnp.float32), ok[:, :-1]], axis=1)


def stream_rollout_loss(cfg: WanConfig, pcfg: PipelineConfig, rollout_blocks: int, params, clip, exists, j, context,
                        key):
    """MSE of `stream_rollout_x0`'s predictions against the truth of the rollout blocks, each
    rollout block counted only while the blocks the student generated before it match the truth
    (`consistent_blocks`). Why the gate: the truth is the only teacher here, and it is the right
    answer for block k only if the context is the world's; after a drifted block the world's
    block k is not a continuation of what the student saw, and regressing onto it teaches the
    mean of the possible answers (a smear: measured 8.95 px and no crisp frame without the gate).
    Self-Forcing's DMD does not need this because its teacher scores the student's own context."""
    bf = pcfg.block_frames
    k_roll, k_step = jax.random.split(key)
    record = jax.random.randint(k_step, (clip.shape[0], rollout_blocks), 0, pcfg.num_steps)
    pred, gen = stream_rollout_x0(cfg, pcfg, rollout_blocks, params, clip, exists, j, context, k_roll, record)
    truth = clip[:, -rollout_blocks * bf:]
    w = consistent_blocks(gen, truth, bf)  # [B, R]
    per_block = jnp.mean(((pred - truth) ** 2).reshape(w.shape[0], rollout_blocks, -1), axis=-1)
    return jnp.sum(w * per_block) / jnp.sum(w)


def stream_clips(rng: np.random.Generator, world: WorldConfig, pcfg: PipelineConfig, batch: int, rollout: int,
                 max_block: int, first_prob: float, switch_prob: float, block: int | None = None):
    """(clips [B, (1 + K + R) * bf, ...], exists bool [B, 1 + K], j int32, prompt embeddings [B, Lt, Dt])
    for one stream-rollout step: one video block j for the batch (1, the first move after the
    image, with prob first_prob, else uniform in [2, max_block]); a switch_prob of the clips switch
    at j (`switch_scene`: a new colour and direction; the text is the new prompt). block: j given."""
    bf = world.block_frames
    rolling, _ = window_blocks(pcfg)
    j = 1 if rng.random() < first_prob else int(rng.integers(2, max(max_block, 2) + 1))
    j = j if block is None else block
    offset, sink = stream_layout(rolling, rollout)
    video = np.where(sink, 0, np.maximum(j + offset, 0))  # a block before the stream's first: hidden
    n = int(video.max()) + 1
    clips, exists, text = [], [], []
    for _ in range(batch):
        scene = sample_scene(rng, world)
        segments = [(0, scene)]
        if rng.random() < switch_prob:
            segments.append((j, switch_scene(rng, scene, j, world)))
        frames = render_stream(segments, n * bf, world)
        clips.append(np.concatenate([frames[v * bf:(v + 1) * bf] for v in video]))
        exists.append(np.concatenate([[True], (j + offset[1:1 + rolling]) >= 1]))
        text.append(prompt_embedding(segments[-1][1], world))
    return np.stack(clips), np.stack(exists), np.int32(j), np.stack(text)


# -- the base as the teacher and the upper reference ------------------------------------------

def evaluate_base(path: str, prompts: int = 16, seeds: int = 3, steps: int | None = None) -> dict:
    """The base's own samples scored as the study scores a student's: {field: [seeds, prompts,
    blocks]} over its trained clip (`clip_blocks` - 1 blocks after the image), `steps` Euler steps
    (default: its training config's base_steps)."""
    from bcjax.toyworld.evaluate import block_metrics, eval_scenes, load_model

    model = load_model(path)
    world, cfg, pcfg = model.world, model.cfg, model.pcfg
    train = model.provenance.get("train", {})
    steps = steps or int(train.get("base_steps", 20))
    n = int(train.get("clip_blocks", 5)) - 1
    scenes = eval_scenes(world, prompts)
    bf = world.block_frames
    first = jnp.asarray(np.stack([render(s, bf, world) for s in scenes]))
    text = text_kv(cfg, model.params, jnp.asarray(np.stack([prompt_embedding(s, world) for s in scenes])))
    out: dict[str, list] = {}
    for seed in range(seeds):
        x0, _ = _base_sample_jit(cfg, pcfg, model.params, text, first, n, jax.random.key(seed), steps)
        lat = np.concatenate([np.asarray(first), np.asarray(x0)], axis=1)
        for k, v in block_metrics(lat, scenes, world).items():
            out.setdefault(k, []).append(v)
    res = {k: np.stack(v) for k, v in out.items()}
    res["psnr_sample"] = 10 * np.log10((2 * world.amplitude) ** 2 / np.maximum(res["mse"].mean(-1), 1e-12))
    return res


def base_summary(m: dict) -> dict:
    """{field: (mean, 95% CI half-width) over prompts and seeds} of `evaluate_base`'s metrics."""
    from bcjax.toyworld.study import mean_ci

    return {"pos_err": mean_ci(m["pos_err"].mean(-1)), "psnr": mean_ci(m["psnr_sample"]),
            "crisp": mean_ci(m["crisp"].mean(-1)), "colour": mean_ci(m["colour"].mean(-1)),
            "jump": mean_ci(m["jump"].mean(-1))}


def ship_base(model_dir: str, dst: str, prompts: int = 8, seeds: int = 1) -> dict:
    """Copy a base checkpoint into the package (lineage-3f's teacher, `lineage-base`) with the
    metrics of its own samples that a test re-derives (metrics.json); written atomically."""
    from bcjax.toyworld.evaluate import publish

    m = evaluate_base(model_dir, prompts, seeds)
    record = {"prompts": prompts, "seeds": seeds, "summary": {k: list(v) for k, v in base_summary(m).items()},
              "pos_err_per_block": [float(v) for v in m["pos_err"].mean((0, 1))], "jax": jax.__version__}
    publish(model_dir, dst, record)
    return record


def main(argv=None) -> dict:
    import argparse

    p = argparse.ArgumentParser(description="the bidirectional base's own samples, scored like the students'")
    p.add_argument("base", help="a base checkpoint (a training run's model-base, or lineage-base)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, help="Euler steps (default: its base_steps)")
    a = p.parse_args(argv)
    m = evaluate_base(a.base, a.prompts, a.seeds, a.steps)
    rows = base_summary(m)
    for k, (mean, ci) in rows.items():
        print(f"base {k}: {mean:.3f} +- {ci:.3f}")
    print("per block position error:", " ".join(f"{v:.2f}" for v in m["pos_err"].mean((0, 1))))
    return rows


if __name__ == "__main__":
    main()
