"""One cascade tick: a joint DiT pass over every in-flight block, then the blocks step forward.

The same function runs batched on one device (all slots local) and per device under
`shard_map` over the `stage` axis (each device holds its slots; K/V are all-gathered inside
every attention layer so the sharded tick computes exactly the joint pass).
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcjax.cascade.masks import tick_key_mask
from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import KVCache, write_frames
from bcjax.model.wan import KV, forward
from bcjax.pipeline.config import PipelineConfig
from bcjax.pipeline.sequential import place
from bcjax.schedule.flow import block_noise, predict_x0, renoise
from bcjax.schedule.stagger import Stagger, slot_state


class CascadeState(NamedTuple):
    # [num_slots, B, block_frames, H, W, C]: each slot's x0 from its last pass. The re-noise to
    # the next sigma happens at the start of the next tick, so a tick draws noise once.
    x: jax.Array
    cache: KVCache  # clean K/V of finished blocks, identical on every device
    tick: jax.Array  # int32 []
    # int32 []: absolute id of the stream's first generated block (> 0 after given context
    # blocks were written to the cache: image-to-video, video continuation)
    first_block: jax.Array


@dataclasses.dataclass(frozen=True)
class TickSpec:
    """Everything static about a tick (hashable, so it can close over jitted functions)."""

    cfg: WanConfig
    pcfg: PipelineConfig
    stagger: Stagger
    window: str
    latent_hw: tuple[int, int]

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame(*self.latent_hw)

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.pcfg.block_frames, *self.latent_hw, self.cfg.in_channels)


def tick(spec: TickSpec, params, text: KV, key, num_blocks, state: CascadeState, axis: str | None = None,
         model_axis: str | None = None):
    """Advance the cascade by one tick.

    state.x holds the Q slots held here: all of them when batched, else the Q consecutive slots of
    this device's index on `axis` (computed, not passed: a compiled tick takes no constant array,
    so it lowers from abstract values alone).
    num_blocks: blocks to generate in the whole stream (traced; a huge number for an endless
    stream), the first one with absolute id state.first_block (frame ids, noise, cache slots).
    axis: the `stage` mesh axis the slots are spread over; model_axis: the tensor-parallel axis
    (params, text and cache hold this device's heads), both inside shard_map.
    Returns (state, (x0 [B, block_frames, H, W, C] of the block that finished denoising this
    tick or zeros, its block id or -1)).
    """
    cfg, pcfg, st = spec.cfg, spec.pcfg, spec.stagger
    bf, n, p = pcfg.block_frames, st.num_steps, spec.tokens_per_frame
    batch = state.x.shape[1]
    q = state.x.shape[0]
    slot_ids = jnp.arange(q) + (0 if axis is None else jax.lax.axis_index(axis) * q)

    all_blocks, all_stages, all_busy = slot_state(st, state.tick, jnp.arange(st.num_slots), num_blocks, xp=jnp)
    all_blocks = all_blocks + state.first_block
    blocks, stages, busy = all_blocks[slot_ids], all_stages[slot_ids], all_busy[slot_ids]
    stage_c = jnp.clip(stages, 0, n)

    def per_slot(v):  # [Q] -> broadcastable over [Q, B, bf, H, W, C]
        return v[:, None, None, None, None, None]

    # the clean stage: at context_noise, or for Krea's rebuilt context at t = 0 seeing only itself
    rebuild = pcfg.context == "rebuild"
    t_clean = 0.0 if rebuild else pcfg.context_noise
    timesteps = jnp.concatenate([jnp.asarray(pcfg.timesteps), jnp.full((1,), t_clean, jnp.float32)])
    sigmas = jnp.concatenate([jnp.asarray(pcfg.sigmas), jnp.zeros((1,), jnp.float32)])

    # Stage 0 starts from noise (block, 0); stage k < n re-noises the last x0 with noise
    # (block, k); the clean stage takes x0 as is. Noise depends only on (key, block, step).
    eps = jax.vmap(lambda b, k: block_noise(key, b, k, (batch, *spec.block_shape)))(blocks, jnp.minimum(stage_c, n - 1))
    x = jnp.where(per_slot(stages == 0), eps,
                  jnp.where(per_slot(stages < n), renoise(state.x, eps, per_slot(sigmas[stage_c])), state.x))
    # [B, Q * bf]: every frame carries its own block's noise level
    t = jnp.broadcast_to(jnp.repeat(timesteps[stage_c], bf)[None], (batch, q * bf))
    # rolling positions: the pass's newest frame is the last frame of the newest busy block
    newest = jnp.max(jnp.where(all_busy, all_blocks, 0)) * bf + bf - 1
    cache, positions = place(cfg, pcfg, state.cache, (blocks[:, None] * bf + jnp.arange(bf)[None]).reshape(-1), newest)
    positions = jnp.clip(positions, 0, cfg.rope_max_positions - 1)  # idle slots past the stream's end
    key_mask = tick_key_mask(
        slot_ids, all_blocks, all_busy, cache.frame_ids, block_frames=bf, tokens_per_frame=p,
        sink=pcfg.sink_frames, rolling=pcfg.cache_frames - pcfg.sink_frames, window=spec.window,
        isolated=(stages == n) if rebuild else None,
    )
    # the block in the clean stage (at most one) hands its K/V to the cache after this pass
    is_writer = all_busy & (all_stages == n)
    writer = jnp.argmax(is_writer)
    x_flat = jnp.swapaxes(x, 0, 1).reshape(batch, q * bf, *x.shape[3:])
    flow, kv = forward(cfg, params, x_flat, t, text, positions, cache.as_context(), key_mask,
                       kv_axis=axis, kv_out=(writer * bf * p, bf * p), model_axis=model_axis)
    flow = jnp.swapaxes(flow.reshape(batch, q, *spec.block_shape), 0, 1)

    x0 = predict_x0(x, flow, per_slot(sigmas[stage_c]))

    emitting = busy & (stages == n - 1)
    emitted = jnp.sum(jnp.where(per_slot(emitting), x0, 0.0), axis=0)
    if axis is not None:
        emitted = jax.lax.psum(emitted, axis)
    all_emitting = all_busy & (all_stages == n - 1)
    emitted_block = jnp.where(jnp.any(all_emitting), all_blocks[jnp.argmax(all_emitting)], -1)

    writer_frames = all_blocks[writer] * bf + jnp.arange(bf)
    cache = write_frames(cache, kv, writer_frames, pcfg.sink_frames, enabled=jnp.any(is_writer))
    return CascadeState(x0, cache, state.tick + 1, state.first_block), (emitted, emitted_block)
