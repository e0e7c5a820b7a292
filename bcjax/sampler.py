"""The few-step sampler, written once, below every runner and the trainer.

A block of `block_frames` latent frames goes through stages 0 .. n-1 (n = num_steps denoising
passes: predict x0, re-noise it to the next sigma with fresh noise) and, in a clean-pass sampler,
stage n: one pass at t = context_noise over the final x0 whose post-RoPE K/V go to the cache.
Noise depends only on (key, block, stage), so a block comes out the same whoever runs its stages
and in whatever order they are interleaved with other blocks':

* `sample_block`: the stages of one block one after another (`bcjax.pipeline.sequential`,
  Krea's loop in `bcjax.pipeline.krea`, the trainer's self-rollout in `bcjax.toyworld.train`);
* `stage_input`: the input of any stage from the previous stage's x0, the rule the cascade's tick
  applies to every in-flight block at once (`bcjax.cascade.tick`).

`pass_positions` is the RoPE side of a pass (absolute or rolling positions, the cache's keys
rotated when a rolling base moves); `cached_pass`, `denoise_block` and `clean_block` are the
sequential clean-pass sampler's passes over a `KVCache` (under `context="last-pass"` the last
denoising pass writes the cache and there is no clean pass).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import KVCache, rebase, write_frames
from bcjax.model.rope import rope_base, rope_positions
from bcjax.model.wan import KV, forward
from bcjax.schedule.flow import block_noise, predict_x0, renoise

if TYPE_CHECKING:  # only its fields are read; bcjax.pipeline imports this module
    from bcjax.schedule.config import PipelineConfig


def check_rebuild(pcfg: PipelineConfig, runner: str) -> None:
    """Krea's rebuilt context in a clean-pass runner: the clean pass of block b-1 at t = 0,
    attending only to itself, IS the rebuild pass of block b's context (at the same relative
    RoPE offsets), so a cache of one block serves it; R is the latent frame itself (no VAE here).
    keep_first_frame needs frame 0 in place of R: only Krea's loop (program 'krea') has it."""
    if pcfg.context == "rebuild":
        if pcfg.keep_first_frame:
            raise ValueError(f"{runner} rebuilds Krea's context from the previous block as it is; "
                             "keep_first_frame=True needs Krea's loop (make_runner(..., program='krea'))")
        if pcfg.cache_frames != pcfg.block_frames:
            raise ValueError(f"Krea's rebuilt context is the previous block: window_frames={pcfg.window_frames} "
                             f"must be 2 x block_frames={pcfg.block_frames}")


def pass_positions(cfg: WanConfig, pcfg: PipelineConfig, cache: KVCache, frame_ids, last_frame):
    """(cache, positions): the cache rebased for a pass whose newest frame is `last_frame`, and the
    RoPE positions of frame_ids (int [F]) in that pass. Absolute positions: (cache, frame_ids)."""
    frame_ids = jnp.asarray(frame_ids, jnp.int32)
    if pcfg.positions == "absolute":
        return cache, frame_ids
    base = rope_base(cfg.rope_max_positions, pcfg.rope_period(cfg.rope_max_positions), last_frame)
    base = jnp.maximum(base, cache.base)  # never backwards (a drained tick has no newest block)
    cache = rebase(cfg, cache, base, pcfg.sink_frames)
    return cache, rope_positions(frame_ids, base, pcfg.sink_frames)


def stage_sigmas(pcfg: PipelineConfig):
    """float32 [n + 1]: the sigma each stage's input is noised to; the clean stage's is 0."""
    return jnp.concatenate([jnp.asarray(pcfg.sigmas, jnp.float32), jnp.zeros((1,), jnp.float32)])


def stage_input(key, block, stage, x0_prev, sigmas, shape: tuple[int, ...]):
    """The input of stage `stage` (traced int in [0, n]) of block `block`: pure noise (key, block,
    0) at stage 0, else the previous stage's x0 re-noised to sigmas[stage] with noise (key, block,
    stage); the clean stage (sigma 0) gets x0 itself. sigmas: `stage_sigmas`."""
    eps = block_noise(key, block, stage, shape)
    return jnp.where(stage == 0, eps, renoise(x0_prev, eps, sigmas[stage]))


def check_source(source, num_blocks: int, block_frames: int) -> None:
    """Video-to-video input latents must cover the blocks they start; named when they do not."""
    if source is not None and (source.ndim != 5 or source.shape[1] < num_blocks * block_frames):
        raise ValueError(f"video-to-video source latents must be [B, >= {num_blocks * block_frames}, H, W, C] for "
                         f"{num_blocks} blocks; got {tuple(source.shape)}")


def sample_block(pass_fn: Callable, pcfg: PipelineConfig, key, block, shape: tuple[int, ...], source=None,
                 last_aux: bool = False):
    """The n denoising stages of one block, one after another.

    pass_fn(x [shape], t_k scalar) -> flow [shape]: one DiT pass at timestep t_k. source:
    video-to-video, the input latents of this block, noised to the first sigma instead of pure
    noise. Returns (x0 of the last stage, every stage's input [n, *shape], every stage's x0).
    last_aux: pass_fn returns (flow, aux) and the last stage's aux comes back as a fourth value
    (the last pass's K/V: the cache entry of `context="last-pass"`); it rides in the scan's
    carry, so only one pass's worth is ever held.
    """
    timesteps, sigmas = jnp.asarray(pcfg.timesteps), stage_sigmas(pcfg)

    def step(carry, xs):
        x, _ = carry
        k, t_k = xs
        flow, aux = pass_fn(x, t_k) if last_aux else (pass_fn(x, t_k), ())
        x0 = predict_x0(x, flow, sigmas[k])
        # the last stage's re-noise is to sigma 0 (x0 back): every step is the same program
        return (stage_input(key, block, k + 1, x0, sigmas, shape), aux), (x, x0)

    x = block_noise(key, block, 0, shape)
    if source is not None:
        x = renoise(source.astype(jnp.float32), x, sigmas[0])
    aux = ()
    if last_aux:
        aux = jax.tree_util.tree_map(lambda a: jnp.zeros(a.shape, a.dtype), jax.eval_shape(pass_fn, x, timesteps[0])[1])
    (_, aux), (inputs, x0s) = jax.lax.scan(step, (x, aux), (jnp.arange(pcfg.num_steps), timesteps))
    return (x0s[-1], inputs, x0s, aux) if last_aux else (x0s[-1], inputs, x0s)


def cached_pass(cfg: WanConfig, params, x, t, text: KV, cache: KVCache, positions, see_cache: bool = True,
                model_axis: str | None = None):
    """One DiT pass of a block over [valid cache | its own tokens] (bidirectional inside the block).

    x [B, F, H, W, C], t [B, F], positions int [F] (RoPE time index); see_cache False: the block
    attends only to itself (Krea's rebuilt context). Returns (flow [B, F, H, W, C], this pass's KV).
    """
    own = x.shape[1] * cache.tokens_per_frame
    key_mask = jnp.concatenate([cache.valid_tokens() & see_cache, jnp.ones((own,), bool)])[None, None, :]
    return forward(cfg, params, x, t, text, positions, cache.as_context(), key_mask, model_axis=model_axis)


def denoise_block(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, cache: KVCache, key, block,
                  latent_hw: tuple[int, int], source=None, model_axis: str | None = None):
    """Denoise block `block` (traced int) and write its cache entry: the clean pass's K/V, or
    under `context="last-pass"` its last denoising pass's (no clean pass). Returns (cache, x0
    [B, F, H, W, C]).

    source: video-to-video, the input video's latents of this block [B, F, H, W, C], noised to
    the first step's sigma instead of starting from pure noise (`bcjax.app.prompts.with_strength`).
    model_axis: inside shard_map, the tensor-parallel axis (params, text and cache hold this
    device's heads)."""
    batch = text.k.shape[1]
    bf = pcfg.block_frames
    shape = (batch, bf, *latent_hw, cfg.in_channels)
    frame_ids = block * bf + jnp.arange(bf)
    cache, positions = pass_positions(cfg, pcfg, cache, frame_ids, frame_ids[-1])

    def pass_fn(x, t_k):
        return cached_pass(cfg, params, x, jnp.full((batch, bf), t_k), text, cache, positions, model_axis=model_axis)

    if not pcfg.clean_pass:
        x0, _, _, kv = sample_block(pass_fn, pcfg, key, block, shape, source, last_aux=True)
        return write_frames(cache, kv, frame_ids, pcfg.sink_frames), x0
    x0, _, _ = sample_block(lambda x, t_k: pass_fn(x, t_k)[0], pcfg, key, block, shape, source)
    return clean_block(cfg, pcfg, params, text, x0, cache, block, model_axis=model_axis), x0


def clean_block(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, x0, cache: KVCache, block,
                timestep: float | None = None, model_axis: str | None = None) -> KVCache:
    """The clean pass: block `block`'s x0 [B, F, H, W, C] at t = `timestep` (default
    context_noise, the generated blocks' convention; 0 for given context frames), its K/V
    written into the cache."""
    bf = x0.shape[1]
    frame_ids = block * bf + jnp.arange(bf)
    cache, positions = pass_positions(cfg, pcfg, cache, frame_ids, frame_ids[-1])
    rebuild = pcfg.context == "rebuild"  # Krea: the context frames at t = 0, attending only to each other
    t = 0.0 if rebuild else pcfg.context_noise if timestep is None else timestep
    t_ctx = jnp.full((x0.shape[0], bf), t, jnp.float32)
    _, kv = cached_pass(cfg, params, x0, t_ctx, text, cache, positions, see_cache=not rebuild, model_axis=model_axis)
    return write_frames(cache, kv, frame_ids, pcfg.sink_frames)


def write_context(context_fn: Callable, cfg: WanConfig, pcfg: PipelineConfig, latent_hw: tuple[int, int], params,
                  text: KV, frames, cache: KVCache, first_block: int = 0) -> KVCache:
    """Given clean frames [B, G * block_frames, H, W, C] (an image-to-video first block, a video
    to continue) written into `cache` as blocks first_block .. first_block + G - 1, one
    context_fn(params, text, frames of a block, cache, block) -> cache call each: a runner's
    jitted `clean_block` at t = 0 (Self-Forcing writes `initial_latent` at t = 0 whatever
    context_noise is)."""
    bf = pcfg.block_frames
    if frames.ndim != 5 or frames.shape[1] % bf or frames.shape[2:] != (*latent_hw, cfg.in_channels):
        raise ValueError(f"context frames must be [B, G * {bf}, {latent_hw[0]}, {latent_hw[1]}, "
                         f"{cfg.in_channels}]; got {tuple(frames.shape)}")
    pcfg.check_length(cfg.rope_max_positions, frames.shape[1] // bf, first_block)
    for g in range(frames.shape[1] // bf):
        cache = context_fn(params, text, frames[:, g * bf:(g + 1) * bf], cache, jnp.int32(first_block + g))
    return cache
