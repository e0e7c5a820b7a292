"""Attention masks of a cascade tick, as pure functions of the slot table and the cache.

Keys of a tick are [clean cache (capacity frames) | every slot's block (num_slots * block_frames
frames)], each frame `tokens_per_frame` tokens. A query block starting at frame q0 sees:

* a cached frame f if the slot holds one and f is inside q0's attention window (the cache span);
* an in-flight frame of another busy slot if it is inside q0's window and, under a causal row,
  the block is not newer than the query's (under a bidirectional row, newer blocks too);
* its own block, always.

q0's window is the model's: the sink frames, plus the `rolling` frames before q0. The masks
(`bcjax.names.MASKS`: what the in-flight blocks of a tick see of each other), all training-free
and all the same one-pass tick:

* `causal`: every row causal (the training mask; P1 is then the sequential pipeline).
* `bidirectional`: every row bidirectional; newer in-flight blocks are never cut by the window
  (they are ahead of q0), so a query may see up to (in flight - 1) blocks more than the model's
  window_frames.
* `bidirectional-clean-causal`: bidirectional, except the rows of the clean stage, which see only
  older blocks and the cache. The clean stage's K/V are what the cache keeps, so the cache is made
  as the sequential pipeline makes it (from the block's x0 and the older context only), while
  the denoising stages keep the bidirectional context that removes P4's artifacts.
* `bidirectional-windowed`: bidirectional, but newer blocks count against the query's window: a
  query sees the sink plus at most rolling + block_frames non-sink frames, the model's
  window_frames in all, never more frames than it was trained on. The window slides forward to
  end at the newest in-flight block it can reach, so the *oldest non-sink* frames are dropped
  first (the far end of the rolling cache, then older in-flight blocks), and newer blocks are
  cut only past q0 + rolling + block_frames (the query's own block always stays). Why oldest
  first: the visible set stays the sink plus one contiguous run of frames, the shape of the
  training mask's local window and the order the rolling cache itself evicts in (oldest first,
  sink kept); relative RoPE distances stay within those trained on; and the nearest blocks,
  the ones the bidirectional context is for, are kept.
"""

from __future__ import annotations

import jax.numpy as jnp

from bcjax.names import MASKS, Mask  # re-exported: checked here


def tick_key_mask(q_slots, slot_blocks, slot_busy, cache_frame_ids, *, block_frames: int,
                  tokens_per_frame: int, sink: int, rolling: int, mask: Mask, isolated=None, clean=None):
    """bool [1, Q, (C + M * block_frames) * tokens_per_frame] for the query slots `q_slots` [Q]:
    `tick_frame_mask` with every key frame spelled out as its tokens."""
    frames = tick_frame_mask(q_slots, slot_blocks, slot_busy, cache_frame_ids, block_frames=block_frames, sink=sink,
                             rolling=rolling, mask=mask, isolated=isolated, clean=clean)
    return jnp.repeat(frames, tokens_per_frame, axis=1)[None]


def tick_frame_mask(q_slots, slot_blocks, slot_busy, cache_frame_ids, *, block_frames: int, sink: int,
                    rolling: int, mask: Mask, isolated=None, clean=None):
    """bool [Q, C + M * block_frames]: which key frames each query slot of `q_slots` [Q] sees.

    slot_blocks, slot_busy: [M] the block in every slot and whether the slot is busy;
    cache_frame_ids: [C] absolute frame of each cache slot (-1 = empty); isolated: bool [Q],
    query slots that see only their own block (Krea's rebuilt context in the clean stage);
    clean: bool [Q], query slots in the clean stage (their rows are causal under
    `bidirectional-clean-causal`; ignored by the other masks).
    """
    if mask not in MASKS:
        raise ValueError(f"mask {mask!r}: expected one of {MASKS}")
    bf = block_frames
    num_slots = slot_blocks.shape[0]
    q_blocks = slot_blocks[q_slots]
    q_start = (q_blocks * bf)[:, None]  # [Q, 1]

    # [M * bf] frame index and owning slot of every in-flight frame
    frames = (slot_blocks[:, None] * bf + jnp.arange(bf)[None, :]).reshape(-1)
    owner = jnp.repeat(jnp.arange(num_slots), bf)
    busy = slot_busy[owner][None, :]  # [1, M * bf]
    newer = slot_blocks[owner][None, :] > q_blocks[:, None]  # [Q, M * bf]

    causal = jnp.full(q_blocks.shape, mask == "causal")  # [Q] rows that see no newer block
    if mask == "bidirectional-clean-causal" and clean is not None:
        causal = clean

    # [Q, 1] the query's window of non-sink frames: [lo, hi)
    lo, hi = q_start - rolling, jnp.full_like(q_start, jnp.iinfo(jnp.int32).max)
    if mask == "bidirectional-windowed":
        span = rolling + bf
        newest_end = jnp.max(jnp.where(busy, frames[None, :] + 1, 0), axis=1, keepdims=True)  # [1, 1]
        hi = jnp.clip(newest_end, q_start + bf, q_start + span)
        lo = hi - span

    def in_window(f):  # f [..., K] -> [Q, K]
        return (f < sink) | ((f >= lo) & (f < hi))

    cache = (cache_frame_ids >= 0)[None, :] & in_window(cache_frame_ids[None, :])
    visible = busy & in_window(frames[None, :]) & ~(causal[:, None] & newer)
    if isolated is not None:
        cache = cache & ~isolated[:, None]
        visible = visible & ~isolated[:, None]
    visible |= owner[None, :] == q_slots[:, None]  # a block always sees itself (idle slots too: no empty rows)

    return jnp.concatenate([cache, visible], axis=1)
