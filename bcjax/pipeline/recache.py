"""KV recache at a prompt switch (LongLive's baseline, which Block Cascading makes unnecessary).

The clean cache holds K/V computed under the prompt that was active when each block finished.
After a switch, LongLive re-runs the frames still in the window through the DiT at
t = context_noise under the new prompt and replaces the cache: one pass over the whole window,
the stall the paper measures (~200 ms for the 1.3B model on an H100). Here that pass is one
jitted forward over the cache's slots in their ring order: attention masks come from the slots'
frame ids, so no reordering is needed and the cache shape never changes.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import KVCache
from bcjax.model.rope import rope_positions
from bcjax.model.wan import KV, forward
from bcjax.pipeline.config import PipelineConfig


def recache_mask(frame_ids, block_frames: int, tokens_per_frame: int):
    """bool [1, C, C * P]: query slot i sees key slot j when both hold frames and j's block is not
    newer than i's (block-causal, bidirectional inside a block: how the frames were first
    cached); an empty slot sees itself so every row is defined (its output is never used)."""
    ids = jnp.asarray(frame_ids)
    valid = ids >= 0
    blk = jnp.where(valid, ids // block_frames, -1)
    see = valid[None, :] & valid[:, None] & (blk[None, :] <= blk[:, None])
    see = see | jnp.eye(ids.shape[0], dtype=bool)
    return jnp.repeat(see, tokens_per_frame, axis=1)[None]


def recache(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, frames, cache: KVCache, keep_sink: bool = False) -> KVCache:
    """The cache rebuilt under `text`: frames [B, C, H, W, C_in] are the clean latents of the
    cache's slots (slot order; empty slots anything). keep_sink keeps the sink frames' K/V from
    the old prompt (LongLive's option: the sink anchors the video's start)."""
    ids = cache.frame_ids
    mask = recache_mask(ids, pcfg.block_frames, cache.tokens_per_frame)
    t = jnp.full(frames.shape[:2], pcfg.context_noise, jnp.float32)
    positions = rope_positions(jnp.maximum(ids, 0), cache.base, pcfg.sink_frames)  # the rotation the cache holds
    _, kv = forward(cfg, params, frames, t, text, positions, None, mask)
    k, v = kv.k.astype(cache.k.dtype), kv.v.astype(cache.v.dtype)
    if keep_sink and pcfg.sink_frames:
        sink_tokens = pcfg.sink_frames * cache.tokens_per_frame
        k = k.at[:, :, :sink_tokens].set(cache.k[:, :, :sink_tokens])
        v = v.at[:, :, :sink_tokens].set(cache.v[:, :, :sink_tokens])
    return KVCache(k, v, ids, cache.base)


def frames_for_cache(frame_ids, blocks: dict[int, np.ndarray], block_frames: int, like: np.ndarray) -> np.ndarray:
    """[B, C, H, W, C_in] the clean latents of every cache slot, from {block id: x0 [B, bf, H, W, C_in]}
    (the blocks a stream has produced, the given context included); empty slots are zeros."""
    ids = np.asarray(frame_ids)
    out = np.zeros((like.shape[0], len(ids), *like.shape[2:]), like.dtype)
    for slot, f in enumerate(ids):
        if f >= 0:
            b = int(f) // block_frames
            if b not in blocks:
                raise KeyError(f"cache slot {slot} holds frame {int(f)} of block {b}, which the stream no longer keeps")
            out[:, slot] = blocks[b][:, int(f) % block_frames]
    return out
