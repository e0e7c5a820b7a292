"""LongLive v1.0's KV-cache bookkeeping and interactive loop, restated frame by frame (test oracle).

A plain-Python restatement of NVlabs/LongLive v1.0:
- `wan/modules/causal_model.py::CausalWanSelfAttention.forward` (KV-cache path): the buffer of
  `local_attn_size` frames, roll-and-insert when a new frame does not fit, the write window
  (a recompute, `current_end <= global_end_index and current_start > 0`, never writes the sink
  region), and the keys (the sink plus the last `local_attn_size - sink_size` frames up to the
  write end; no mask at all);
- `_apply_cache_updates` (every pass commits its writes and end indices);
- `pipeline/interactive_causal_inference.py`: the block loop and `_recache_after_switch`
  (global_sink: the cache is not zeroed; frames s - min(W, s) .. s - 1 re-run at t =
  context_noise).

Unlike bcjax's ring cache (post-RoPE keys in slots, validity by frame id), this keeps an ordered
buffer of per-frame K/V exactly as LongLive's indices move, and only borrows bcjax's `forward`
(itself checked against diffusers) for the DiT pass, with the keys passed as explicit context.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.model.wan import KV, empty_context, forward
from bcjax.schedule.flow import block_noise, predict_x0, renoise

_forward = jax.jit(forward, static_argnums=0)  # one compile per (frames, context length)


class LongLiveCache:
    """One layer-stacked KV buffer of `size` frames (entries: (k, v) [L, B, P, N, H] per frame)."""

    def __init__(self, size: int, sink: int):
        self.size, self.sink = size, sink
        self.buf: list = [None] * size
        self.global_end = 0
        self.local_end = 0

    def run(self, cfg, params, x, t, text, start: int):
        """One DiT pass over frames start .. start + n - 1 (x [B, n, H, W, C]) through the cache;
        returns the flow and commits the cache update, as LongLive's KV-cache path does."""
        n, sink = x.shape[1], self.sink
        end = start + n
        recompute = end <= self.global_end and start > 0
        temp = [("old", e) if e is not None else None for e in self.buf]
        if end > self.global_end and n + self.local_end > self.size:  # roll and insert
            evict = n + self.local_end - self.size
            rolled = self.local_end - evict - sink
            temp[sink:sink + rolled] = temp[sink + evict:sink + evict + rolled]
            local_end = self.local_end + end - self.global_end - evict
        else:  # direct insert
            local_end = self.local_end + end - self.global_end
        local_start = local_end - n
        write_start = max(local_start, sink) if recompute else local_start
        offset = max(0, write_start - local_start)
        for j in range(write_start, local_end):
            temp[j] = ("new", offset + j - write_start)
        if sink > 0:
            keys = list(range(sink)) + list(range(max(sink, local_end - (self.size - sink)), local_end))
        else:
            keys = list(range(max(0, local_end - self.size), local_end))
        window = [temp[j] for j in keys]
        assert all(e is not None for e in window), "the oracle reached an unwritten slot"
        old = [e for kind, e in window if kind == "old"]
        own_visible = {e for kind, e in window if kind == "new"}
        p = cfg.tokens_per_frame(x.shape[2], x.shape[3])
        if old:
            ctx = KV(jnp.concatenate([k for k, _ in old], axis=2), jnp.concatenate([v for _, v in old], axis=2))
        else:
            ctx = empty_context(cfg, x.shape[0])
        mask = np.concatenate([np.ones(len(old) * p, bool), np.repeat([i in own_visible for i in range(n)], p)])
        flow, kv = _forward(cfg, params, x, t, text, jnp.arange(start, end), ctx, jnp.asarray(mask)[None, None])
        for j in range(write_start, local_end):
            i = temp[j][1]
            temp[j] = ("old", (kv.k[:, :, i * p:(i + 1) * p], kv.v[:, :, i * p:(i + 1) * p]))
        self.buf = [e[1] if e is not None else None for e in temp]
        self.global_end, self.local_end = end, local_end
        return flow


def interactive(cfg, params, pcfg, texts, switches: dict[int, int], key, num_blocks: int, latent_hw):
    """LongLive's interactive loop: x0 [B, num_blocks * bf, H, W, C]. texts: text K/V per prompt;
    switches: {block id: prompt index} where a new prompt starts (recache before that block)."""
    bf = pcfg.block_frames
    batch = texts[0].k.shape[1]
    shape = (batch, bf, *latent_hw, cfg.in_channels)
    cache = LongLiveCache(pcfg.window_frames, pcfg.sink_frames)
    out, prompt = [], 0
    timesteps, sigmas = pcfg.timesteps, pcfg.sigmas
    for b in range(num_blocks):
        s = b * bf
        if b in switches:
            prompt = switches[b]
            if s > 0:  # _recache_after_switch
                n = min(pcfg.window_frames, s)
                frames = jnp.concatenate(out, axis=1)[:, s - n:s]
                cache.run(cfg, params, frames, jnp.full((batch, n), pcfg.context_noise, jnp.float32), texts[prompt],
                          s - n)
        text = texts[prompt]
        x = block_noise(key, b, 0, shape)
        for k in range(len(timesteps)):
            flow = cache.run(cfg, params, x, jnp.full((batch, bf), timesteps[k], jnp.float32), text, s)
            x0 = predict_x0(x, flow, sigmas[k])
            if k < len(timesteps) - 1:
                x = renoise(x0, block_noise(key, b, k + 1, shape), sigmas[k + 1])
        cache.run(cfg, params, x0, jnp.full((batch, bf), pcfg.context_noise, jnp.float32), text, s)
        out.append(x0)
    return np.asarray(jnp.concatenate(out, axis=1))
