"""The clean KV cache: a fixed-capacity [sink | rolling window] buffer of finished frames.

Static shapes whatever the stream length: `capacity` frame slots of `tokens_per_frame` tokens,
a frame-id per slot (-1 = empty) that doubles as the validity mask, and writes through
`dynamic_update_slice`. The first `sink` frames of the video keep their slots forever; every
later frame goes to a ring over the remaining slots, so the oldest non-sink frame is the one
overwritten. Keys are stored post-RoPE, so slot order is irrelevant to attention and no
shifting is needed; `base` records the rolling-position shift their rotation holds (see rope.py),
and `rebase` rotates them when it moves.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcjax.model.config import WanConfig
from bcjax.model.rope import apply_rope, time_shift
from bcjax.model.wan import KV


class KVCache(NamedTuple):
    k: jax.Array  # [layers, batch, capacity * tokens_per_frame, heads, head_dim]
    v: jax.Array  # same
    frame_ids: jax.Array  # int32 [capacity]; absolute latent frame held by each slot, -1 = empty
    # int32 []: non-sink keys are rotated at position frame - base (0 unless positions="rolling")
    base: jax.Array

    @property
    def capacity(self) -> int:
        return self.frame_ids.shape[0]

    @property
    def tokens_per_frame(self) -> int:
        return self.k.shape[2] // self.capacity

    def as_context(self) -> KV:
        return KV(self.k, self.v)

    def valid_tokens(self):
        """bool [capacity * tokens_per_frame]: which cached key tokens hold a frame."""
        return jnp.repeat(self.frame_ids >= 0, self.tokens_per_frame)


def init_cache(cfg: WanConfig, batch: int, capacity: int, tokens_per_frame: int, dtype=None) -> KVCache:
    shape = (cfg.num_layers, batch, capacity * tokens_per_frame, cfg.num_heads, cfg.head_dim)
    dtype = dtype or cfg.compute_dtype
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.full((capacity,), -1, jnp.int32),
                   jnp.int32(0))


def frame_slot(frame, sink: int, capacity: int):
    """Slot of absolute frame `frame`: its own slot inside the sink, else a ring over the rest."""
    frame = jnp.asarray(frame, jnp.int32)
    return jnp.where(frame < sink, frame, sink + (frame - sink) % (capacity - sink))


def write_frames(cache: KVCache, kv: KV, frame_ids, sink: int, enabled=True) -> KVCache:
    """Write the K/V of F frames (kv: [L, B, F*P, N, H]) at their slots.

    enabled (traced bool, or bool [F] per frame): when False the slots are rewritten with what
    they hold, so a tick with no finished block costs a slot-sized copy, not a select over the
    whole cache. Frames are written in order, so a later frame wins a ring slot.
    """
    frame_ids = jnp.asarray(frame_ids, jnp.int32)
    enabled = jnp.broadcast_to(jnp.asarray(enabled, bool), frame_ids.shape)
    p = cache.tokens_per_frame
    k, v, ids = cache.k, cache.v, cache.frame_ids
    for i in range(frame_ids.shape[0]):  # static: block_frames writes
        slot = frame_slot(frame_ids[i], sink, cache.capacity)
        start = (0, 0, slot * p, 0, 0)
        new_k, new_v = (a[:, :, i * p:(i + 1) * p] for a in (kv.k, kv.v))
        old_k, old_v = (jax.lax.dynamic_slice(a, start, new_k.shape) for a in (k, v))
        k = jax.lax.dynamic_update_slice(k, jnp.where(enabled[i], new_k.astype(k.dtype), old_k), start)
        v = jax.lax.dynamic_update_slice(v, jnp.where(enabled[i], new_v.astype(v.dtype), old_v), start)
        ids = ids.at[slot].set(jnp.where(enabled[i], frame_ids[i], ids[slot]))
    return KVCache(k, v, ids, cache.base)


def rebase(cfg: WanConfig, cache: KVCache, base, sink: int) -> KVCache:
    """The cache with its non-sink keys re-rotated from `cache.base` to `base` (traced int >=
    cache.base). Costs one elementwise pass over the keys, and only on a tick where base moves."""

    def rotate(cache):
        rotate = jnp.repeat((cache.frame_ids >= sink), cache.tokens_per_frame)
        cos, sin = time_shift(cfg, base - cache.base, rotate.shape[0], rotate)
        k = cache.k.reshape(-1, *cache.k.shape[2:])
        k = apply_rope(k, cos, sin).reshape(cache.k.shape)
        return KVCache(k, cache.v, cache.frame_ids, jnp.asarray(base, jnp.int32))

    return jax.lax.cond(base != cache.base, rotate, lambda c: c, cache)
