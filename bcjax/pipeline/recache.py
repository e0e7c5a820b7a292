"""KV recache at a prompt switch: LongLive v1.0's baseline, which Block Cascading makes unnecessary.

Upstream: NVlabs/LongLive v1.0, `pipeline/interactive_causal_inference.py::_recache_after_switch`
with the self-attention KV-cache path of `wan/modules/causal_model.py::CausalWanSelfAttention`
(`local_attn_size` W = window_frames, `sink_size`, `global_sink: true`). A switch before the
block starting at latent frame s (s = the newest cached frame + 1) does, as that code runs:

1. the text K/V become the new prompt's (LongLive resets its cross-attention cache);
2. frames s - min(W, s) .. s - 1, the generated clean latents, go through the model in ONE pass
   at t = context_noise under the new prompt, at their absolute RoPE positions. Upstream builds
   a block-causal mask for that pass but its KV-cache attention path ignores it: the pass is
   bidirectional over the frames it stores, plus the cache's sink;
3. s > W: the sink keeps its K/V from the old prompt (LongLive's `global_sink: true` does not
   zero the cache, and a recompute never writes the sink region); the pass attends to those old
   sink K/V. Only the last W - sink recomputed frames are written (s - W + sink .. s - 1) and
   only they are keys: frames s - W .. s - W + sink - 1 are computed, as upstream computes them,
   but neither stored nor attended to;
4. s <= W: the pass starts at frame 0, which upstream does not count as a recompute, so every
   frame is rewritten, the sink included, and every recomputed frame is a key.

Policies (`POLICIES`): "no-recache" (only the text changes: Block Cascading's point),
"recache" (the above, exactly), and "recache-causal": the same frames, sink and writes, but
under the block-causal mask LongLive builds and then ignores (what its code appears to intend;
kept as a named variant to measure whether the bidirectional pass matters).

LongLive's `global_sink: false` (the whole cache zeroed, the recomputed window written from the
buffer's start, so its first frames become the new "sink") is not reproduced: the released
interactive config sets `global_sink: true`.

The pass is one jitted forward over W frame slots (static shape: slots before frame 0 are
masked), with the whole clean cache as context masked to its sink, so no stream recompiles.
"""

from __future__ import annotations

import functools
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.distributed import put
from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import KVCache, write_frames
from bcjax.model.wan import KV, forward
from bcjax.names import POLICIES, Policy  # re-exported: checked here
from bcjax.sampler import pass_positions
from bcjax.schedule.config import PipelineConfig


def recache_frames(start_frame, window_frames: int, sink: int, xp=jnp):
    """(frame_ids int [W], stored bool [W], old_sink bool []): the frames a switch at latent frame
    `start_frame` (s) recomputes, s - W .. s - 1 (ids < 0: no frame, s < W), which of them the
    cache takes (and the pass attends to), and whether the old sink stays (s > W)."""
    ids = start_frame - window_frames + xp.arange(window_frames)
    old_sink = xp.asarray(start_frame > window_frames)
    stored = (ids >= 0) & (~old_sink | (ids >= start_frame - window_frames + sink))
    return ids, stored, old_sink


def recache_mask(frame_ids, stored, old_sink, cache_frame_ids, *, sink: int, block_frames: int,
                 tokens_per_frame: int, causal: bool = False):
    """bool [1, W, (C + W) * P]: per recomputed frame (one query block each), which keys of
    [cache slots (C of them; the sink's are enough) | the W recomputed frames] it sees: the
    cached sink frames when the old sink stays, and the stored recomputed frames (under `causal`,
    only those whose block is not newer). Every frame also sees itself, so rows of frames nobody
    reads stay defined."""
    ids = jnp.asarray(frame_ids)
    cache_ids = jnp.asarray(cache_frame_ids)
    cache = old_sink & (cache_ids >= 0) & (cache_ids < sink)
    cache = jnp.broadcast_to(cache[None, :], (ids.shape[0], cache_ids.shape[0]))
    own = jnp.broadcast_to(stored[None, :], (ids.shape[0], ids.shape[0]))
    if causal:
        blk = jnp.floor_divide(ids, block_frames)
        own = own & (blk[None, :] <= blk[:, None])
    own = own | jnp.eye(ids.shape[0], dtype=bool)
    mask = jnp.concatenate([cache, own], axis=1)
    return jnp.repeat(mask, tokens_per_frame, axis=1)[None]


def recache(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, frames, start_frame, cache: KVCache,
            causal: bool = False) -> KVCache:
    """The cache after a switch to `text` before the block starting at latent frame
    `start_frame` (traced int): frames [B, W, H, W, C] are the clean latents of frames
    start_frame - W .. start_frame - 1 (W = window_frames; anything where the id is < 0)."""
    w, sink = pcfg.window_frames, pcfg.sink_frames
    if frames.shape[1] != w:
        raise ValueError(f"recache needs the {w} frames before the switch (window_frames); got {frames.shape[1]}")
    start_frame = jnp.asarray(start_frame, jnp.int32)
    ids, stored, old_sink = recache_frames(start_frame, w, sink)
    cache, positions = pass_positions(cfg, pcfg, cache, jnp.maximum(ids, 0), start_frame - 1)
    # the sink frames own the cache's first slots (kv_cache.frame_slot): only they can be keys
    p = cache.tokens_per_frame
    mask = recache_mask(ids, stored, old_sink, cache.frame_ids[:sink], sink=sink, block_frames=pcfg.block_frames,
                        tokens_per_frame=p, causal=causal)
    t = jnp.full(frames.shape[:2], pcfg.context_noise, jnp.float32)
    sink_kv = KV(cache.k[:, :, :sink * p], cache.v[:, :, :sink * p])
    _, kv = forward(cfg, params, frames, t, text, positions, sink_kv, mask)
    # in frame order, so the ring keeps the newest frames (the older stored ones are the frames
    # upstream's next roll evicts before anything reads them)
    return write_frames(cache, kv, ids, sink, enabled=stored)


@functools.lru_cache(maxsize=16)
def _recache_fn(cfg: WanConfig, pcfg: PipelineConfig, causal: bool):
    # one compiled recache per model/sampler/policy, shared by every stream (a jit per stream would recompile)
    return jax.jit(partial(recache, cfg, pcfg, causal=causal))


def gather_frames(blocks: dict[int, np.ndarray], start_frame: int, window_frames: int, block_frames: int,
                  like: np.ndarray) -> np.ndarray:
    """[B, W, H, W, C] the clean latents of frames start_frame - W .. start_frame - 1 from
    {block id: x0 [B, block_frames, H, W, C]} (the stream's blocks, given context included);
    frames before frame 0 are zeros."""
    out = np.zeros((like.shape[0], window_frames, *like.shape[2:]), like.dtype)
    for i, f in enumerate(range(start_frame - window_frames, start_frame)):
        if f >= 0:
            b = f // block_frames
            if b not in blocks:
                raise KeyError(f"recache at frame {start_frame} needs frame {f} of block {b}, which the stream no "
                               f"longer keeps (it keeps blocks {sorted(blocks)})")
            out[:, i] = blocks[b][:, f % block_frames]
    return out


class Recacher:
    """A switch policy's state: the clean blocks a recache may need, and the jitted pass.

    add(block, x0) after every generated (or given) block; __call__(params, text, cache) at a
    switch returns the cache to continue with ("no-recache": the cache unchanged).
    sharding: where the gathered frames go (a replicated NamedSharding for a mesh), or None.
    """

    def __init__(self, cfg: WanConfig, pcfg: PipelineConfig, policy: Policy = "recache", sharding=None):
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: expected one of {POLICIES}")
        self.policy, self.pcfg, self.sharding = policy, pcfg, sharding
        self.fn = None if policy == "no-recache" else _recache_fn(cfg, pcfg, policy == "recache-causal")
        # the window's blocks, plus the newest emitted blocks a cascade has not cached yet
        self.keep = -(-pcfg.window_frames // pcfg.block_frames) + 2
        self.blocks: dict[int, np.ndarray] = {}

    @property
    def active(self) -> bool:
        return self.fn is not None

    def add(self, block: int, x0) -> None:
        if self.fn is None:
            return
        self.blocks[block] = np.asarray(x0)
        for b in [b for b in self.blocks if b <= block - self.keep]:
            del self.blocks[b]

    def __call__(self, params, text: KV, cache: KVCache) -> KVCache:
        if self.fn is None:
            return cache
        start = int(np.max(jax.device_get(cache.frame_ids))) + 1
        if start <= 0 or not self.blocks:  # nothing generated yet: LongLive returns at frame 0 too
            return cache
        like = next(iter(self.blocks.values()))
        host = gather_frames(self.blocks, start, self.pcfg.window_frames, self.pcfg.block_frames, like)
        frames = put(host, self.sharding) if self.sharding is not None else jnp.asarray(host)
        return jax.block_until_ready(self.fn(params, text, frames, jnp.int32(start), cache))
