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
from bcjax.model.kv_cache import KVCache, init_cache, write_frames
from bcjax.model.wan import KV, check_latents, forward
from bcjax.pipeline.config import PipelineConfig
from bcjax.schedule.flow import block_noise, predict_x0, renoise


def cached_pass(cfg: WanConfig, params, x, t, text: KV, cache: KVCache, frame_ids):
    """One DiT pass of a block over [valid cache | its own tokens] (bidirectional inside the block).

    x [B, F, H, W, C], t [B, F]. Returns (flow [B, F, H, W, C], this pass's KV).
    """
    own = x.shape[1] * cache.tokens_per_frame
    key_mask = jnp.concatenate([cache.valid_tokens(), jnp.ones((own,), bool)])[None, None, :]
    return forward(cfg, params, x, t, text, frame_ids, cache.as_context(), key_mask)


def denoise_block(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, cache: KVCache, key, block,
                  latent_hw: tuple[int, int]):
    """Denoise block `block` (traced int) and write its clean K/V. Returns (cache, x0 [B, F, H, W, C])."""
    batch = text.k.shape[1]
    bf = pcfg.block_frames
    shape = (batch, bf, *latent_hw, cfg.in_channels)
    frame_ids = block * bf + jnp.arange(bf)
    timesteps = jnp.asarray(pcfg.timesteps)
    sigmas = jnp.asarray(pcfg.sigmas)
    next_sigmas = jnp.concatenate([sigmas[1:], jnp.zeros((1,), sigmas.dtype)])

    def step(x, xs):
        k, t_k, s_k, s_next = xs
        flow, _ = cached_pass(cfg, params, x, jnp.full((batch, bf), t_k), text, cache, frame_ids)
        x0 = predict_x0(x, flow, s_k)
        # The last step's re-noise is unused (s_next = 0 gives x0 back); keeping it makes every
        # step the same program.
        return renoise(x0, block_noise(key, block, k + 1, shape), s_next), x0

    x = block_noise(key, block, 0, shape)
    steps = jnp.arange(pcfg.num_steps)
    _, x0s = jax.lax.scan(step, x, (steps, timesteps, sigmas, next_sigmas))
    x0 = x0s[-1]
    t_ctx = jnp.full((batch, bf), pcfg.context_noise, jnp.float32)
    _, kv = cached_pass(cfg, params, x0, t_ctx, text, cache, frame_ids)
    return write_frames(cache, kv, frame_ids, pcfg.sink_frames), x0


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
        self._block_fn = jax.jit(
            partial(denoise_block, self.cfg, self.pcfg, latent_hw=tuple(self.latent_hw)), donate_argnums=(2,)
        )

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame(*self.latent_hw)

    def init_cache(self, batch: int) -> KVCache:
        return init_cache(self.cfg, batch, self.pcfg.cache_frames, self.tokens_per_frame)

    def _check_length(self, num_blocks: int):
        last = num_blocks * self.pcfg.block_frames
        if last > self.cfg.rope_max_positions:
            raise ValueError(
                f"{num_blocks} blocks reach latent frame {last - 1}, past the {self.cfg.rope_max_positions}-position "
                "RoPE table of this model"
            )

    def blocks(self, params, text: KV, key, num_blocks: int, cache: KVCache | None = None) -> Iterator[jax.Array]:
        """Yield each block's x0 latents [B, block_frames, H, W, C] as soon as it is denoised."""
        self._check_length(num_blocks)
        cache = cache if cache is not None else self.init_cache(text.k.shape[1])
        for b in range(num_blocks):
            cache, x0 = self._block_fn(params, text, cache, key, jnp.int32(b))
            yield x0

    def generate(self, params, text: KV, num_blocks: int, key) -> jax.Array:
        """Latents [B, num_blocks * block_frames, H, W, C] for one prompt's text K/V."""
        return jnp.concatenate(list(self.blocks(params, text, key, num_blocks)), axis=1)
