"""Attention masks of a cascade tick, as pure functions of the slot table and the cache.

Keys of a tick are [clean cache (capacity frames) | every slot's block (num_slots * block_frames
frames)], each frame `tokens_per_frame` tokens. A query block starting at frame q0 sees:

* a cached frame f if the slot holds one and f is inside q0's attention window;
* an in-flight frame of another busy slot if it is inside q0's window and, under the `causal`
  window, the block is not newer than the query's (under `bidirectional`, newer blocks too);
* its own block, always.

q0's window is the model's: the sink frames, plus the `rolling` frames before q0. Newer
in-flight blocks are never cut by it (they are ahead of q0).
"""

from __future__ import annotations

import jax.numpy as jnp

from bcjax.names import WINDOWS  # noqa: F401  (re-exported: checked here)


def _in_window(frames, q_start, sink: int, rolling: int):
    # frames [..., K], q_start [Q, 1] -> [Q, K]
    return (frames < sink) | (frames >= q_start - rolling)


def tick_key_mask(q_slots, slot_blocks, slot_busy, cache_frame_ids, *, block_frames: int,
                  tokens_per_frame: int, sink: int, rolling: int, window: str, isolated=None):
    """bool [1, Q, (C + M * block_frames) * tokens_per_frame] for the query slots `q_slots` [Q]:
    `tick_frame_mask` with every key frame spelled out as its tokens."""
    mask = tick_frame_mask(q_slots, slot_blocks, slot_busy, cache_frame_ids, block_frames=block_frames, sink=sink,
                           rolling=rolling, window=window, isolated=isolated)
    return jnp.repeat(mask, tokens_per_frame, axis=1)[None]


def tick_frame_mask(q_slots, slot_blocks, slot_busy, cache_frame_ids, *, block_frames: int, sink: int,
                    rolling: int, window: str, isolated=None):
    """bool [Q, C + M * block_frames]: which key frames each query slot of `q_slots` [Q] sees.

    slot_blocks, slot_busy: [M] the block in every slot and whether the slot is busy;
    cache_frame_ids: [C] absolute frame of each cache slot (-1 = empty); isolated: bool [Q],
    query slots that see only their own block (Krea's rebuilt context in the clean stage).
    """
    if window not in WINDOWS:
        raise ValueError(f"window {window!r}: expected one of {WINDOWS}")
    bf = block_frames
    num_slots = slot_blocks.shape[0]
    q_blocks = slot_blocks[q_slots]
    q_start = (q_blocks * bf)[:, None]  # [Q, 1]

    cache = (cache_frame_ids >= 0)[None, :] & _in_window(cache_frame_ids[None, :], q_start, sink, rolling)

    # [M * bf] frame index and owning slot of every in-flight frame
    frames = (slot_blocks[:, None] * bf + jnp.arange(bf)[None, :]).reshape(-1)
    owner = jnp.repeat(jnp.arange(num_slots), bf)
    visible = slot_busy[owner][None, :] & _in_window(frames[None, :], q_start, sink, rolling)
    if window == "causal":
        visible &= slot_blocks[owner][None, :] <= q_blocks[:, None]
    if isolated is not None:
        cache = cache & ~isolated[:, None]
        visible = visible & ~isolated[:, None]
    visible |= owner[None, :] == q_slots[:, None]  # a block always sees itself (idle slots too: no empty rows)

    return jnp.concatenate([cache, visible], axis=1)
