"""The sequential block-causal pipeline (Self-Forcing's `CausalInferencePipeline` semantics).

Per block of `block_frames` latent frames: `num_steps` denoising passes (predict x0, re-noise to
the next sigma with fresh noise), then one clean pass at t = context_noise on the final x0 whose
post-RoPE K/V are written into the clean cache. Every pass attends to [clean cache | the block].
Given context frames (an image-to-video first block, a video to continue) are written by the
same pass at t = 0 whatever context_noise is: upstream Self-Forcing's
`CausalInferencePipeline.inference` writes `initial_latent` at t = 0, and context_noise applies
only to the clean pass of generated blocks.

One jitted function denoises one block; the block index is a traced scalar and the cache has
a fixed capacity, so the same executable serves a stream of any length.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import KVCache, rebase, write_frames
from bcjax.model.rope import rope_base, rope_positions
from bcjax.model.tensor_parallel import Layout
from bcjax.model.wan import KV, check_latents, forward
from bcjax.pipeline.config import PipelineConfig
from bcjax.pipeline.stepping import Step, StepState
from bcjax.schedule.flow import block_noise, predict_x0, renoise


def check_rebuild(pcfg: PipelineConfig, runner: str) -> None:
    """Krea's rebuilt context in a clean-pass runner: the clean pass of block b-1 at t = 0,
    attending only to itself, IS the rebuild pass of block b's context (at the same relative
    RoPE offsets), so a cache of one block serves it; R is the latent frame itself (no VAE here).
    keep_first_frame needs frame 0 in place of R: only KreaPipeline has it."""
    if pcfg.context == "rebuild":
        if pcfg.keep_first_frame:
            raise ValueError(f"{runner} rebuilds Krea's context from the previous block as it is; keep_first_frame=True "
                             "needs bcjax.pipeline.krea.KreaPipeline")
        if pcfg.cache_frames != pcfg.block_frames:
            raise ValueError(f"Krea's rebuilt context is the previous block: window_frames={pcfg.window_frames} must be "
                             f"2 x block_frames={pcfg.block_frames}")


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


def cached_pass(cfg: WanConfig, params, x, t, text: KV, cache: KVCache, positions, see_cache: bool = True,
                model_axis: str | None = None):
    """One DiT pass of a block over [valid cache | its own tokens] (bidirectional inside the block).

    x [B, F, H, W, C], t [B, F], positions int [F] (RoPE time index); see_cache False: the block
    attends only to itself (Krea's rebuilt context). Returns (flow [B, F, H, W, C], this pass's KV).
    """
    own = x.shape[1] * cache.tokens_per_frame
    key_mask = jnp.concatenate([cache.valid_tokens() & see_cache, jnp.ones((own,), bool)])[None, None, :]
    return forward(cfg, params, x, t, text, positions, cache.as_context(), key_mask, model_axis=model_axis)


def denoise_block(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, cache: KVCache, key, block,
                  latent_hw: tuple[int, int], source=None, model_axis: str | None = None):
    """Denoise block `block` (traced int) and write its clean K/V. Returns (cache, x0 [B, F, H, W, C]).

    source: video-to-video, the input video's latents of this block [B, F, H, W, C], noised to
    the first step's sigma instead of starting from pure noise (`bcjax.pipeline.prompts.with_strength`).
    model_axis: inside shard_map, the tensor-parallel axis (params, text and cache hold this
    device's heads)."""
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
        flow, _ = cached_pass(cfg, params, x, jnp.full((batch, bf), t_k), text, cache, positions, model_axis=model_axis)
        x0 = predict_x0(x, flow, s_k)
        # The last step's re-noise is unused (s_next = 0 gives x0 back); keeping it makes every
        # step the same program.
        return renoise(x0, block_noise(key, block, k + 1, shape), s_next), x0

    x = block_noise(key, block, 0, shape)
    if source is not None:
        x = renoise(source.astype(jnp.float32), x, sigmas[0])
    steps = jnp.arange(pcfg.num_steps)
    _, x0s = jax.lax.scan(step, x, (steps, timesteps, sigmas, next_sigmas))
    x0 = x0s[-1]
    return clean_block(cfg, pcfg, params, text, x0, cache, block, model_axis=model_axis), x0


def clean_block(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, x0, cache: KVCache, block,
                timestep: float | None = None, model_axis: str | None = None) -> KVCache:
    """The clean pass: block `block`'s x0 [B, F, H, W, C] at t = `timestep` (default
    context_noise, the generated blocks' convention; 0 for given context frames), its K/V
    written into the cache."""
    bf = x0.shape[1]
    frame_ids = block * bf + jnp.arange(bf)
    cache, positions = place(cfg, pcfg, cache, frame_ids, frame_ids[-1])
    rebuild = pcfg.context == "rebuild"  # Krea: the context frames at t = 0, attending only to each other
    t = 0.0 if rebuild else pcfg.context_noise if timestep is None else timestep
    t_ctx = jnp.full((x0.shape[0], bf), t, jnp.float32)
    _, kv = cached_pass(cfg, params, x0, t_ctx, text, cache, positions, see_cache=not rebuild, model_axis=model_axis)
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
    # Tensor parallel: a mesh whose `model` axis splits heads and FFN (bcjax.model.tensor_parallel;
    # a `stage` axis, if any, holds replicas). None or model = 1: one device, as before.
    mesh: Mesh | None = None

    def __post_init__(self):
        check_latents(self.cfg, jax.ShapeDtypeStruct((1, 1, *self.latent_hw, self.cfg.in_channels), jnp.float32))
        check_rebuild(self.pcfg, "SequentialPipeline")
        if self.pcfg.positions == "rolling":
            self.pcfg.rope_period(self.cfg.rope_max_positions)  # validates the table against the window
        self.layout = lay = Layout.split_only(self.cfg, self.mesh)
        self.cfg = lay.resolve(self.cfg)  # attention for the platform compiled for, not the process default
        self.mesh = lay.mesh  # nothing to split: one device (a `stage` axis is the cascade's business)
        # the stepping interface's placement: leaves where the passes compute (replicated; DiT
        # params split over `model`; text K/V split by heads), the layout's own methods
        self.replicate, self.place_params, self.place_text = lay.replicate, lay.place_params, lay.place_text
        cfg, pcfg, hw = self.cfg, self.pcfg, tuple(self.latent_hw)
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
        return self.place_params(params), self.place_text(text)

    def encode_text(self, params, context) -> KV:
        """Prompt embeddings [B, Lt, text_dim] -> text K/V, computed where they live (split by heads
        under tensor parallelism, so no device needs every layer's cross-attention weights)."""
        return self.layout.encode_text(params, context)

    def _check_length(self, num_blocks: int, first_block: int = 0):
        self.pcfg.check_length(self.cfg.rope_max_positions, num_blocks, first_block)

    def prefill(self, params, text: KV, frames, cache: KVCache | None = None, first_block: int = 0) -> KVCache:
        """Write given clean frames [B, G * block_frames, H, W, C] (an image-to-video first block,
        a video to continue) into the cache as blocks first_block .. first_block + G - 1, by the
        clean pass at t = 0 (Self-Forcing writes `initial_latent` at t = 0 whatever
        context_noise is)."""
        bf = self.pcfg.block_frames
        if frames.ndim != 5 or frames.shape[1] % bf or frames.shape[2:] != (*self.latent_hw, self.cfg.in_channels):
            raise ValueError(f"context frames must be [B, G * {bf}, {self.latent_hw[0]}, {self.latent_hw[1]}, "
                             f"{self.cfg.in_channels}]; got {tuple(frames.shape)}")
        self._check_length(frames.shape[1] // bf, first_block)
        params, text = self._placed(params, text)
        cache = cache if cache is not None else self.init_cache(frames.shape[0])
        for g in range(frames.shape[1] // bf):
            cache = self._context_fn(params, text, frames[:, g * bf:(g + 1) * bf], cache, jnp.int32(first_block + g))
        return cache

    def blocks(self, params, text: KV, key, num_blocks: int, cache: KVCache | None = None,
               first_block: int = 0, source=None) -> Iterator[jax.Array]:
        """Yield each block's x0 latents [B, block_frames, H, W, C] as soon as it is denoised;
        blocks first_block .. first_block + num_blocks - 1 (after a prefilled cache).

        source: video-to-video input latents [B, num_blocks * block_frames, H, W, C], block i of
        them noised to the first sigma as the start of generated block first_block + i (use a
        sampler from `bcjax.pipeline.prompts.with_strength`)."""
        self._check_length(num_blocks, first_block)
        bf = self.pcfg.block_frames
        if source is not None and (source.ndim != 5 or source.shape[1] < num_blocks * bf):
            raise ValueError(f"video-to-video source latents must be [B, >= {num_blocks * bf}, H, W, C] for "
                             f"{num_blocks} blocks; got {tuple(source.shape)}")
        params, text = self._placed(params, text)
        cache = cache if cache is not None else self.init_cache(text.k.shape[1])
        for i, b in enumerate(range(first_block, first_block + num_blocks)):
            if source is None:
                cache, x0 = self._block_fn(params, text, cache, key, jnp.int32(b))
            else:
                cache, x0 = self._v2v_fn(params, text, cache, key, jnp.int32(b), source[:, i * bf:(i + 1) * bf])
            yield x0

    def generate(self, params, text: KV, num_blocks: int, key, context=None) -> jax.Array:
        """Latents [B, num_blocks * block_frames, H, W, C] for one prompt's text K/V; after the
        given clean `context` frames [B, G * block_frames, H, W, C] when there are any."""
        cache, first = None, 0
        if context is not None:
            cache, first = self.prefill(params, text, context), context.shape[1] // self.pcfg.block_frames
        return jnp.concatenate(list(self.blocks(params, text, key, num_blocks, cache, first)), axis=1)

    # -- the stepping interface shared with Cascade (bcjax.pipeline.stepping) --------------------
    def start(self, params, text: KV, key, num_blocks: int | None = None, context=None) -> StepState:
        """A stream before its first step. context: given clean frames [B, G * block_frames, H, W, C]
        written under `text` (generation starts at block G); num_blocks None: until the caller
        stops (absolute positions: until the RoPE table ends)."""
        first = 0 if context is None else context.shape[1] // self.pcfg.block_frames
        if num_blocks is None:
            num_blocks = self.pcfg.stream_blocks(self.cfg.rope_max_positions, first)
        if num_blocks is not None:
            self._check_length(num_blocks, first)
        params, text = self._placed(params, text)
        cache = self.init_cache(text.k.shape[1]) if context is None else self.prefill(params, text, context)
        return StepState(cache, key, 0, first, num_blocks)

    def step(self, params, text: KV, state: StepState) -> tuple[StepState, Step]:
        """Denoise the next block under `text` and write its clean K/V (one compiled call; the
        cache is donated). Every step emits its block."""
        b = self.entering(state)
        params, text = self._placed(params, text)
        cache, x0 = self._block_fn(params, text, state.carry, state.key, jnp.int32(b))
        stages = tuple((b, s) for s in range(self.pcfg.num_steps + 1))
        return state._replace(carry=cache, step=state.step + 1), Step(b, x0, stages)

    def entering(self, state: StepState) -> int:
        """The block the next step starts: its prompt is the one in force for that step."""
        return state.first_block + state.step

    def done(self, state: StepState) -> bool:
        return state.num_blocks is not None and state.step >= state.num_blocks

    def cache(self, state: StepState) -> KVCache:
        return state.carry

    def with_cache(self, state: StepState, cache: KVCache) -> StepState:
        return state._replace(carry=cache)

    # replicate / place_params / place_text: the layout's (see __post_init__)
