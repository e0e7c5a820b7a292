"""The sequential block-causal pipeline (Self-Forcing's `CausalInferencePipeline` semantics).

Per block of `block_frames` latent frames: `num_steps` denoising passes (predict x0, re-noise to
the next sigma with fresh noise), then one clean pass at t = context_noise on the final x0 whose
post-RoPE K/V are written into the clean cache (the passes: `bcjax.sampler`). Every pass attends
to [clean cache | the block]. Under `PipelineConfig(context="last-pass")` there is no clean pass:
the last denoising pass's K/V are the block's cache entry.
Given context frames (an image-to-video first block, a video to continue) are written by the
same pass at t = 0 whatever context_noise is: upstream Self-Forcing's
`CausalInferencePipeline.inference` writes `initial_latent` at t = 0, and context_noise applies
only to the clean pass of generated blocks.

One jitted function denoises one block; the block index is a traced scalar and the cache has
a fixed capacity, so the same executable serves a stream of any length.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import KVCache
from bcjax.model.tensor_parallel import Layout
from bcjax.model.wan import KV
from bcjax.sampler import check_rebuild, check_source, clean_block, denoise_block, write_context
from bcjax.schedule.config import PipelineConfig
from bcjax.stepping import Step, StepState, block_entering, blocks_done, keeps_clean_cache


@dataclasses.dataclass
class BlockProgram:
    """The sequential stagger's whole block (its num_steps denoising passes and its clean pass)
    compiled into one call, and video-to-video from the same block: the "block" program of a
    `bcjax.runners.Runner` (`make_runner` builds both; the checks common to every program are there)."""

    cfg: WanConfig  # resolved for the layout's platform
    pcfg: PipelineConfig
    latent_hw: tuple[int, int]
    # Tensor parallel: its mesh's `model` axis splits heads and FFN (bcjax.model.tensor_parallel;
    # a `tokens` axis, if any, holds replicas). No mesh: one device.
    layout: Layout

    def __post_init__(self):
        check_rebuild(self.pcfg, "the sequential pipeline")
        lay, cfg, pcfg, hw = self.layout, self.cfg, self.pcfg, self.latent_hw
        self.mesh = lay.mesh
        w, t, c = lay.specs()
        self._block_fn = jax.jit(lay.shard_map(partial(denoise_block, cfg, pcfg, latent_hw=hw),
                                               (w, t, c, P(), P()), (c, P())), donate_argnums=(2,))

        # video-to-video: the same block program started from a noised input block
        def v2v(params, text, cache, key, block, source, model_axis=None):
            return denoise_block(cfg, pcfg, params, text, cache, key, block, hw, source, model_axis)

        self._v2v_fn = jax.jit(lay.shard_map(v2v, (w, t, c, P(), P(), P()), (c, P())), donate_argnums=(2,))
        # given context is written at t = 0 (upstream's initial_latent), not at context_noise
        self._context_fn = jax.jit(lay.shard_map(partial(clean_block, cfg, pcfg, timestep=0.0), (w, t, P(), c, P()), c),
                                   donate_argnums=(3,))

    @property
    def tokens_per_frame(self) -> int:
        return self.cfg.tokens_per_frame(*self.latent_hw)

    # -- compiled programs for given inputs (benches, compile-only targets) ---------------------
    def abstract_inputs(self, batch: int = 1) -> tuple:
        """(params, text, cache, key, block) of one block step as ShapeDtypeStructs placed where
        the block function computes; nothing is allocated (works in a compile-only process)."""
        lay = self.layout
        return (lay.abstract_params(), lay.abstract_text(batch),
                lay.abstract_cache(batch, self.pcfg.cache_frames, self.tokens_per_frame), lay.abstract_key(),
                lay.abstract_scalar())

    def lower(self, params, text: KV, cache: KVCache, key, block) -> jax.stages.Lowered:
        """The block function (num_steps denoising passes and the clean pass) lowered for these
        inputs, concrete or abstract (`abstract_inputs`); `.compile()` gives the executable."""
        return self._block_fn.lower(params, text, cache, key, block)

    def init_cache(self, batch: int) -> KVCache:
        return self.layout.init_cache(batch, self.pcfg.cache_frames, self.tokens_per_frame)

    def _placed(self, params, text):
        """params and text K/V in the layout the compiled passes take (a no-op without tensor parallelism)."""
        return self.layout.place_params(params), self.layout.place_text(text)

    def _check_length(self, num_blocks: int, first_block: int = 0):
        self.pcfg.check_length(self.cfg.rope_max_positions, num_blocks, first_block)

    def prefill(self, params, text: KV, frames, cache: KVCache | None = None, first_block: int = 0) -> KVCache:
        """Write given clean frames [B, G * block_frames, H, W, C] (an image-to-video first block,
        a video to continue) into the cache as blocks first_block .. first_block + G - 1, by the
        clean pass at t = 0 (Self-Forcing writes `initial_latent` at t = 0 whatever
        context_noise is)."""
        params, text = self._placed(params, text)
        cache = cache if cache is not None else self.init_cache(frames.shape[0])
        return write_context(self._context_fn, self.cfg, self.pcfg, self.latent_hw, params, text, frames, cache,
                             first_block)

    # -- the stepping interface (bcjax.stepping): one block per step --------------------------
    keeps_cache = property(lambda self: keeps_clean_cache(self.pcfg))

    def start(self, params, text: KV, key, *, num_blocks: int | None = None, context=None, source=None,
              reencode=None) -> StepState:
        """A stream before its first block (`Runner.start`; it has refused reencode). source:
        video-to-video input latents [B, num_blocks * block_frames, H, W, C], block i of them
        noised to the first sigma as the start of generated block i (a sampler from
        `bcjax.app.prompts.with_strength`)."""
        first = 0 if context is None else context.shape[1] // self.pcfg.block_frames
        if num_blocks is None:
            num_blocks = self.pcfg.stream_blocks(self.cfg.rope_max_positions, first)
        if num_blocks is not None:
            self._check_length(num_blocks, first)
        params, text = self._placed(params, text)
        if source is not None:
            if num_blocks is None:
                raise ValueError("video-to-video (source) needs num_blocks: the stream ends with its input")
            check_source(source, num_blocks, self.pcfg.block_frames)
        cache = self.init_cache(text.k.shape[1]) if context is None else self.prefill(params, text, context)
        return StepState(cache, key, 0, first, num_blocks, source)

    def step(self, params, text: KV, state: StepState) -> tuple[StepState, Step]:
        """Denoise the next block under `text` and write its clean K/V (one compiled call; the
        cache is donated). Every step emits its block."""
        b, i, bf = self.entering(state), state.step, self.pcfg.block_frames
        if state.source is None:
            cache, x0 = self._block_fn(*self.step_inputs(params, text, state))
        else:
            params, text = self._placed(params, text)
            cache, x0 = self._v2v_fn(params, text, state.carry, state.key, jnp.int32(b),
                                     state.source[:, i * bf:(i + 1) * bf])
        stages = tuple((b, s) for s in range(self.pcfg.num_steps + int(self.pcfg.clean_pass)))
        return state._replace(carry=cache, step=state.step + 1), Step(b, x0, stages)

    def step_inputs(self, params, text: KV, state: StepState) -> tuple:
        """(params, text, cache, key, block) of the next block, placed: `lower`'s inputs
        (text-to-video; video-to-video runs another function)."""
        if state.source is not None:
            raise ValueError("a video-to-video step runs another program than `lower`'s: time it through `step`")
        params, text = self._placed(params, text)
        return params, text, state.carry, state.key, jnp.int32(self.entering(state))

    entering = staticmethod(block_entering)  # one step is one block (bcjax.stepping)
    done = staticmethod(blocks_done)

    def cache(self, state: StepState) -> KVCache:
        return state.carry

    def with_cache(self, state: StepState, cache: KVCache) -> StepState:
        return state._replace(carry=cache)
