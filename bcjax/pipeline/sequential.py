"""The sequential block-causal pipeline (Self-Forcing's `CausalInferencePipeline` semantics).

Per block of `block_frames` latent frames: `num_steps` denoising passes (predict x0, re-noise to
the next sigma with fresh noise), then one clean pass at t = context_noise on the final x0 whose
post-RoPE K/V are written into the clean cache. Every pass attends to [clean cache | the block].

One jitted function denoises one block; the block index is a traced scalar and the cache has
a fixed capacity, so the same executable serves a stream of any length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp

from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import KVCache, init_cache, rebase, write_frames
from bcjax.model.rope import rope_base, rope_positions
from bcjax.model.wan import KV, check_latents, forward
from bcjax.pipeline.config import PipelineConfig
from bcjax.schedule.flow import block_noise, predict_x0, renoise


def place(cfg: WanConfig, pcfg: PipelineConfig, cache: KVCache, frame_ids, last_frame):
    """(cache, positions): the cache rebased for a pass whose newest frame is `last_frame`, and the
    RoPE positions of frame_ids (int [F]) in that pass. Absolute positions: (cache, frame_ids)."""
    frame_ids = jnp.asarray(frame_ids, jnp.int32)
    if pcfg.positions == "absolute":
        return cache, frame_ids
    base = rope_base(cfg.rope_max_positions, pcfg.rope_period(cfg.rope_max_positions), last_frame)
    base = jnp.maximum(base, cache.base)  # never backwards (a drained tick has no newest block)
    cache = rebase(cfg, cache, base, pcfg.sink_frames)
    return cache, rope_positions(frame_ids, base, pcfg.sink_frames)


def cached_pass(cfg: WanConfig, params, x, t, text: KV, cache: KVCache, positions):
    """One DiT pass of a block over [valid cache | its own tokens] (bidirectional inside the block).

    x [B, F, H, W, C], t [B, F], positions int [F] (RoPE time index). Returns (flow
    [B, F, H, W, C], this pass's KV).
    """
    own = x.shape[1] * cache.tokens_per_frame
    key_mask = jnp.concatenate([cache.valid_tokens(), jnp.ones((own,), bool)])[None, None, :]
    return forward(cfg, params, x, t, text, positions, cache.as_context(), key_mask)


def denoise_block(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, cache: KVCache, key, block,
                  latent_hw: tuple[int, int]):
    """Denoise block `block` (traced int) and write its clean K/V. Returns (cache, x0 [B, F, H, W, C])."""
    batch = text.k.shape[1]
    bf = pcfg.block_frames
    shape = (batch, bf, *latent_hw, cfg.in_channels)
    frame_ids = block * bf + jnp.arange(bf)
    cache, positions = place(cfg, pcfg, cache, frame_ids, frame_ids[-1])
    timesteps = jnp.asarray(pcfg.timesteps)
    sigmas = jnp.asarray(pcfg.sigmas)
    next_sigmas = jnp.concatenate([sigmas[1:], jnp.zeros((1,), sigmas.dtype)])

    def step(x, xs):
        k, t_k, s_k, s_next = xs
        flow, _ = cached_pass(cfg, params, x, jnp.full((batch, bf), t_k), text, cache, positions)
        x0 = predict_x0(x, flow, s_k)
        # The last step's re-noise is unused (s_next = 0 gives x0 back); keeping it makes every
        # step the same program.
        return renoise(x0, block_noise(key, block, k + 1, shape), s_next), x0

    x = block_noise(key, block, 0, shape)
    steps = jnp.arange(pcfg.num_steps)
    _, x0s = jax.lax.scan(step, x, (steps, timesteps, sigmas, next_sigmas))
    x0 = x0s[-1]
    return clean_block(cfg, pcfg, params, text, x0, cache, block), x0


def clean_block(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, x0, cache: KVCache, block) -> KVCache:
    """The clean pass: block `block`'s x0 [B, F, H, W, C] at t = context_noise, its K/V written
    into the cache (after denoising, for given context frames, and for a recache)."""
    bf = x0.shape[1]
    frame_ids = block * bf + jnp.arange(bf)
    cache, positions = place(cfg, pcfg, cache, frame_ids, frame_ids[-1])
    t_ctx = jnp.full((x0.shape[0], bf), pcfg.context_noise, jnp.float32)
    _, kv = cached_pass(cfg, params, x0, t_ctx, text, cache, positions)
    return write_frames(cache, kv, frame_ids, pcfg.sink_frames)


@dataclasses.dataclass
class SequentialPipeline:
    """Block-by-block generation with one compiled block function.

    >>> pipe = SequentialPipeline(cfg, PipelineConfig(), latent_hw=(60, 104))
    >>> latents = pipe.generate(params, text_kv, num_blocks=7, key=jax.random.key(0))
    """

    cfg: WanConfig
    pcfg: PipelineConfig
    latent_hw: tuple[int, int]

    def __post_init__(self):
        check_latents(self.cfg, jax.ShapeDtypeStruct((1, 1, *self.latent_hw, self.cfg.in_channels), jnp.float32))
        if self.pcfg.positions == "rolling":
            self.pcfg.rope_period(self.cfg.rope_max_positions)  # validates the table against the window
        self._block_fn = jax.jit(
            partial(denoise_block, self.cfg, self.pcfg, latent_hw=tuple(self.latent_hw)), donate_argnums=(2,)
        )
        self._clean_fn = jax.jit(partial(clean_block, self.cfg, self.pcfg), donate_argnums=(3,))

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame(*self.latent_hw)

    def init_cache(self, batch: int) -> KVCache:
        return init_cache(self.cfg, batch, self.pcfg.cache_frames, self.tokens_per_frame)

    def _check_length(self, num_blocks: int, first_block: int = 0):
        self.pcfg.check_length(self.cfg.rope_max_positions, num_blocks, first_block)

    def prefill(self, params, text: KV, frames, cache: KVCache | None = None, first_block: int = 0) -> KVCache:
        """Write given clean frames [B, G * block_frames, H, W, C] (an image-to-video first block,
        a video to continue) into the cache as blocks first_block .. first_block + G - 1, by the
        same clean pass a generated block gets."""
        bf = self.pcfg.block_frames
        if frames.ndim != 5 or frames.shape[1] % bf or frames.shape[2:] != (*self.latent_hw, self.cfg.in_channels):
            raise ValueError(f"context frames must be [B, G * {bf}, {self.latent_hw[0]}, {self.latent_hw[1]}, "
                             f"{self.cfg.in_channels}]; got {tuple(frames.shape)}")
        self._check_length(frames.shape[1] // bf, first_block)
        cache = cache if cache is not None else self.init_cache(frames.shape[0])
        for g in range(frames.shape[1] // bf):
            cache = self._clean_fn(params, text, frames[:, g * bf:(g + 1) * bf], cache, jnp.int32(first_block + g))
        return cache

    def blocks(self, params, text: KV, key, num_blocks: int, cache: KVCache | None = None,
               first_block: int = 0) -> Iterator[jax.Array]:
        """Yield each block's x0 latents [B, block_frames, H, W, C] as soon as it is denoised;
        blocks first_block .. first_block + num_blocks - 1 (after a prefilled cache)."""
        self._check_length(num_blocks, first_block)
        cache = cache if cache is not None else self.init_cache(text.k.shape[1])
        for b in range(first_block, first_block + num_blocks):
            cache, x0 = self._block_fn(params, text, cache, key, jnp.int32(b))
            yield x0

    def generate(self, params, text: KV, num_blocks: int, key, context=None) -> jax.Array:
        """Latents [B, num_blocks * block_frames, H, W, C] for one prompt's text K/V; after the
        given clean `context` frames [B, G * block_frames, H, W, C] when there are any."""
        cache, first = None, 0
        if context is not None:
            cache, first = self.prefill(params, text, context), context.shape[1] // self.pcfg.block_frames
        return jnp.concatenate(list(self.blocks(params, text, key, num_blocks, cache, first)), axis=1)
