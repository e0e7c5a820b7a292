"""One cascade tick: a joint DiT pass over every in-flight block, then the blocks step forward.

The same function runs on one device (every token local) and per device under `shard_map` over
the `tokens` axis. There the tick's tokens are split (`bcjax.cascade.tokens`): each device runs
the DiT on its share of the query tokens, in groups inside one latent frame, and every attention
layer all-gathers the tick's K/V over `tokens` (one collective per layer), so the sharded tick
computes exactly the joint pass. A block may span devices; a device may hold parts of several.

Why an all-gather of K and V: every query of the tick may see every in-flight key (the
bidirectional mask), so each device needs all T keys; an all-gather moves (N-1)/N of the
tick's K/V to each device, the least any exact split of the queries can move, in one collective
whose latency a ring hides behind the layer's own projections on GPUs and TPUs. Splitting heads
instead (all-to-all) would move the same bytes twice per layer (queries in, outputs back) and
caps the device count at the head count.

The state outside the pass (each slot's x0, the cache) is small next to the pass and is kept
whole on every device of the `tokens` axis: noise, re-noise and the x0 update are elementwise over a few
blocks, and after the pass one all-gather of the flow (T x patch features) gives every device
the same x0, so no psum or slot ownership is needed.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcjax.cascade.masks import tick_frame_mask
from bcjax.cascade.tokens import TokenSplit
from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import KVCache, write_frames
from bcjax.model.rope import rope_tables
from bcjax.model.wan import KV, forward_tokens, grid_hw, patchify, unpatchify
from bcjax.names import Mask
from bcjax.sampler import pass_positions, stage_input, stage_sigmas
from bcjax.schedule.config import PipelineConfig
from bcjax.schedule.flow import predict_x0
from bcjax.schedule.stagger import Stagger, slot_state


class CascadeState(NamedTuple):
    # [num_slots, B, block_frames, H, W, C]: each slot's x0 from its last pass (whole on every
    # device). The re-noise to the next sigma happens at the start of the next tick, so a
    # tick draws noise once.
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
    plan: Stagger  # its stagger's table (`bcjax.schedule.stagger.make_stagger`)
    mask: Mask
    latent_hw: tuple[int, int]
    split: TokenSplit  # the tick's tokens over the `tokens` devices (one device: every token)
    remat: bool = False  # each DiT layer rematerialised in a backward pass (training, `bcjax.adapt`)

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame(*self.latent_hw)

    @property
    def block_shape(self) -> tuple[int, ...]:
        return (self.pcfg.block_frames, *self.latent_hw, self.cfg.in_channels)


def tick(spec: TickSpec, params, text: KV, key, num_blocks, state: CascadeState, axis: str | None = None,
         model_axis: str | None = None):
    """Advance the cascade by one tick.

    num_blocks: blocks to generate in the whole stream (traced; a huge number for an endless
    stream), the first one with absolute id state.first_block (frame ids, noise, cache slots).
    axis: the `tokens` mesh axis the tick's tokens are split over (this device's share follows from
    its index on it: a compiled tick takes no constant array, so it lowers from abstract values
    alone); model_axis: the tensor-parallel axis (params, text and cache hold this device's
    heads), both inside shard_map.
    Returns (state, (x0 [B, block_frames, H, W, C] of the block that finished denoising this
    tick or zeros, its block id or -1)).
    """
    cfg, pcfg, st, sp = spec.cfg, spec.pcfg, spec.plan, spec.split
    bf, n, p = pcfg.block_frames, st.num_steps, spec.tokens_per_frame
    m = st.num_slots
    batch = state.x.shape[1]
    hh, ww = spec.latent_hw

    blocks, stages, busy = slot_state(st, state.tick, jnp.arange(m), num_blocks, xp=jnp)
    blocks = blocks + state.first_block
    stage_c = jnp.clip(stages, 0, n)

    def per_slot(v):  # [M] -> broadcastable over [M, B, bf, H, W, C]
        return v[:, None, None, None, None, None]

    # the clean stage: at context_noise, or for Krea's rebuilt context at t = 0 seeing only itself
    rebuild = pcfg.context == "rebuild"
    t_clean = 0.0 if rebuild else pcfg.context_noise
    timesteps = jnp.concatenate([jnp.asarray(pcfg.timesteps), jnp.full((1,), t_clean, jnp.float32)])
    sigmas = stage_sigmas(pcfg)

    # every slot's input from its last x0, by the sampler's one rule (`bcjax.sampler.stage_input`)
    x = jax.vmap(lambda b, k, x0: stage_input(key, b, k, x0, sigmas, (batch, *spec.block_shape)))(
        blocks, stage_c, state.x)

    # rolling positions: the pass's newest frame is the last frame of the newest busy block
    newest = jnp.max(jnp.where(busy, blocks, 0)) * bf + bf - 1
    frame_ids = (blocks[:, None] * bf + jnp.arange(bf)[None]).reshape(-1)  # [M * bf], slot-major
    cache, positions = pass_positions(cfg, pcfg, state.cache, frame_ids, newest)
    positions = jnp.clip(positions, 0, cfg.rope_max_positions - 1)  # idle slots past the stream's end
    frame_mask = tick_frame_mask(
        jnp.arange(m), blocks, busy, cache.frame_ids, block_frames=bf, sink=pcfg.sink_frames,
        rolling=pcfg.cache_frames - pcfg.sink_frames, mask=spec.mask,
        isolated=(stages == n) if rebuild else None, clean=busy & (stages == st.clean_stage),
    )  # [M, C + M * bf]

    # -- this device's share of the tick's tokens (token order: slot, frame, row, col) ----------
    g, per_dev = sp.group, sp.per_device
    first = 0 if axis is None else jax.lax.axis_index(axis) * per_dev  # this device's first group
    group_ids = first + jnp.arange(per_dev)
    pad = group_ids >= sp.groups  # padding groups: idle queries, keys nobody sees
    group_frame = jnp.minimum(group_ids * g // p, m * bf - 1)

    def mine(a):  # [T, ...] -> this device's [per_dev * g, ...], padded past the tick's end
        a = jnp.pad(a, [(0, sp.padded_tokens - sp.tokens)] + [(0, 0)] * (a.ndim - 1))
        return jax.lax.dynamic_slice_in_dim(a, first * g, per_dev * g, axis=0)

    x_frames = jnp.swapaxes(x, 0, 1).reshape(batch, m * bf, *x.shape[3:])
    tokens = mine(jnp.swapaxes(patchify(cfg, x_frames), 0, 1))  # [per_dev * g, B, features]
    tokens = jnp.swapaxes(tokens, 0, 1)
    rope = tuple(mine(a) for a in rope_tables(cfg, positions, grid_hw(cfg, hh, ww)))
    t = jnp.broadcast_to(jnp.repeat(timesteps[stage_c], bf)[group_frame][None], (batch, per_dev))
    # [per_dev, (C + M * bf) * p | padding]: a group's row is its slot's; padding sees only padding
    rows = jnp.repeat(frame_mask[group_frame // bf], p, axis=1) & ~pad[:, None]
    pad_cols = jnp.broadcast_to(pad[:, None], (per_dev, sp.padded_tokens - sp.tokens))
    key_mask = jnp.concatenate([rows, pad_cols], axis=1)[None]

    # the block in the clean stage (at most one) hands its K/V to the cache after this pass; with
    # no clean stage, the block in its last denoising stage (the one emitting its x0) does
    is_writer = busy & (stages == st.write_stage)
    writer = jnp.argmax(is_writer)
    flow, kv = forward_tokens(cfg, params, tokens, t, text, rope, cache.as_context(), key_mask,
                              kv_axis=axis, kv_out=(writer * bf * p, bf * p), model_axis=model_axis,
                              remat=spec.remat)
    if axis is not None:  # every device gets every slot's flow: the same x0 everywhere
        flow = jax.lax.all_gather(flow, axis, axis=1, tiled=True)
    flow = unpatchify(cfg, flow[:, :sp.tokens], m * bf, hh, ww)
    flow = jnp.swapaxes(flow.reshape(batch, m, *spec.block_shape), 0, 1)

    x0 = predict_x0(x, flow, per_slot(sigmas[stage_c]))

    emitting = busy & (stages == n - 1)
    emitted = jnp.sum(jnp.where(per_slot(emitting), x0, 0.0), axis=0)
    emitted_block = jnp.where(jnp.any(emitting), blocks[jnp.argmax(emitting)], -1)

    writer_frames = blocks[writer] * bf + jnp.arange(bf)
    cache = write_frames(cache, kv, writer_frames, pcfg.sink_frames, enabled=jnp.any(is_writer))
    return CascadeState(x0, cache, state.tick + 1, state.first_block), (emitted, emitted_block)
