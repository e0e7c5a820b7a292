"""Krea Realtime 14B's per-block loop: the context rebuilt before every block, a final pass at t = 0.

Upstream: krea-ai/realtime-video `release_server.py`, `GenerationSession.generate_block` with
the default `GenerateParams` (kv_cache_num_frames 3, keep_first_frame False, 5 steps, shift 5),
as that code runs:

1. Timesteps: the warp of [1000, 750, 500, 250, 0] at shift 5 = [1000, 937.5, 833.33, 625, 0]
   (float32; the yaml's [1000, 937, 833, 625, 0] is ignored). Every entry is a DiT pass, the
   trailing 0 included (`PipelineConfig(trailing_zero="pass")`).
2. Each pass: x0 = x - sigma(t) flow with sigma(t) the scheduler's nearest table entry (0.00498
   for t = 0); between passes x = (1 - sigma_next) x0 + sigma_next eps, a fresh draw. The block's
   output is the x0 of the t = 0 pass.
3. Nothing persists between blocks: no clean pass writes a cache.
4. Before every block b >= 1, one pass at t = 0 over the 3 (kv_cache_num_frames = cache_frames
   = the block size) context frames rebuilds the K/V the block attends to: block 1 attends to
   frames 0, 1, 2 as generated; block b >= 2 to [R, 3b-2, 3b-1], R the VAE encoding (as a lone
   first frame, an image latent) of the last pixel frame decoded from latent frame 3b-3. The
   context frames attend only to each other, at RoPE frames 0 .. 2.
5. The block's passes sit at RoPE frames C .. C + bf - 1 (block 0: 0 .. bf - 1) and attend to
   [the C context frames | the block's own frames], bidirectional within the block.
6. keep_first_frame: the context's first frame is the video's frame 0 instead of R.

The rebuild pass of block b's context, block b-1's frames at t = 0 seeing only each other, is
exactly a clean pass that ignores the cache; with a cache of one block, the block's passes then
read what Krea's rebuild computes (RoPE offsets between the two blocks are the same 3 frames). So
the block and tick programs run Krea's mode too (`check_rebuild`): in the cascade an
in-flight block's context is its predecessor's K/V at its current noise level, as in every
cascade, and the rebuilt clean K/V once the predecessor has passed its clean stage; R there is
the latent frame itself and keep_first_frame is refused. P1-causal equals this loop (tests).

R needs the VAE: a Krea runner's `blocks`, `generate` and `start` take the round trip (`reencode=`,
`bcjax.app.t2v.VAERoundTrip`: the checkpoint's VAE decodes the stream and encodes the last
pixel frame alone); without one (latent-only runs, tests) R is the latent frame itself, unchanged.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from bcjax.model.config import WanConfig
from bcjax.model.tensor_parallel import Layout
from bcjax.model.wan import KV, forward
from bcjax.sampler import check_source, sample_block
from bcjax.schedule.config import PipelineConfig
from bcjax.stepping import Step, StepState, block_entering, blocks_done


def context_frames(pcfg: PipelineConfig, previous, first_frame, reencoded):
    """[B, C, H, W, Ch] the frames block b >= 2 attends to, from block b-1's x0 (`previous`), the
    video's frame 0 [B, 1, ...] and R, the re-encoded first frame of block b-1 [B, 1, ...]
    (rules 4, 6). Block 1 attends to block 0's frames as they are."""
    head = first_frame if pcfg.keep_first_frame else reencoded
    return jnp.concatenate([head, previous[:, 1:]], axis=1)


def rebuild(cfg: WanConfig, params, text: KV, context, model_axis: str | None = None) -> KV:
    """Rule 4: the context frames [B, C, ...] at t = 0, attending only to each other, at RoPE
    frames 0 .. C-1. Returns their K/V [L, B, C * P, N, H]."""
    c = context.shape[1]
    _, kv = forward(cfg, params, context, jnp.zeros(context.shape[:2], jnp.float32), text, jnp.arange(c),
                    model_axis=model_axis)
    return kv


def krea_block(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, context, key, block,
               latent_hw: tuple[int, int], source=None, model_axis: str | None = None):
    """Block `block` (traced int) under Krea's rules: the rebuild pass over `context` [B, C, H, W,
    Ch] (ignored for block 0), then one pass per timestep. Returns x0 [B, bf, H, W, Ch].
    source: video-to-video input latents of the block, noised to the first sigma (Krea's v2v).
    model_axis: inside shard_map, the tensor-parallel axis (params and text split by heads)."""
    batch = text.k.shape[1]
    bf, c = pcfg.block_frames, context.shape[1]
    shape = (batch, bf, *latent_hw, cfg.in_channels)
    has_context = block > 0
    ctx = rebuild(cfg, params, text, context, model_axis)
    p = cfg.tokens_per_frame(*latent_hw)
    # one program for every block: block 0 masks the (rebuilt-from-zeros) context away and sits at 0..bf-1
    key_mask = jnp.concatenate([jnp.repeat(has_context, c * p), jnp.ones((bf * p,), bool)])[None, None]
    positions = jnp.where(has_context, c, 0) + jnp.arange(bf)

    def pass_fn(x, t_k):
        return forward(cfg, params, x, jnp.full((batch, bf), t_k), text, positions, ctx, key_mask,
                       model_axis=model_axis)[0]

    # source (Krea's v2v): latents * (1 - sigma) + randn * sigma, as the sampler's video-to-video
    return sample_block(pass_fn, pcfg, key, block, shape, source)[0]


class KreaCarry(NamedTuple):
    """What Krea's loop carries from block b-1 to block b (rules 4, 6)."""

    previous: Any  # [B, bf, H, W, C] block b-1's x0
    first: Any  # [B, 1, H, W, C] the video's frame 0 (keep_first_frame)
    r: Any  # [B, 1, H, W, C] R of block b-1: its first latent frame through the VAE round trip
    reencode: Callable | None  # the round trip (x0 -> R), None: R is the latent frame itself


@dataclasses.dataclass
class KreaProgram:
    """Sequential generation in Krea's mode (`PipelineConfig(context="rebuild")`) with its VAE
    round trip: the "krea" program of a `bcjax.runners.Runner` (`make_runner` builds both)."""

    cfg: WanConfig  # resolved for the layout's platform
    pcfg: PipelineConfig
    latent_hw: tuple[int, int]
    # Tensor parallel: its mesh's `model` axis splits heads and FFN (bcjax.model.tensor_parallel);
    # no mesh: one device. The carried frames (previous block, frame 0, R) are replicated.
    layout: Layout

    def __post_init__(self):
        if self.pcfg.context != "rebuild":
            raise ValueError(f"Krea's loop needs PipelineConfig(context='rebuild'); got {self.pcfg.context!r} "
                             "(program 'block' runs a clean-pass cache)")
        if self.pcfg.cache_frames != self.pcfg.block_frames:
            raise ValueError(f"Krea's rebuilt context is the previous block: window_frames={self.pcfg.window_frames} "
                             f"must be 2 x block_frames={self.pcfg.block_frames} (kv_cache_num_frames = the block)")
        lay, cfg, pcfg, hw = self.layout, self.cfg, self.pcfg, self.latent_hw
        self.mesh = lay.mesh
        w, t, _ = lay.specs()
        self._block_fn = jax.jit(lay.shard_map(partial(krea_block, cfg, pcfg, latent_hw=hw),
                                               (w, t, P(), P(), P()), P()))

        def v2v(params, text, context, key, block, source, model_axis=None):
            return krea_block(cfg, pcfg, params, text, context, key, block, hw, source, model_axis)

        self._v2v_fn = jax.jit(lay.shard_map(v2v, (w, t, P(), P(), P(), P()), P()))

    # -- compiled programs for given inputs (benches, compile-only targets) ---------------------
    def abstract_inputs(self, batch: int = 1) -> tuple:
        """(params, text, context, key, block) of one block of Krea's loop as ShapeDtypeStructs
        placed where it computes; nothing is allocated (works in a compile-only process)."""
        lay = self.layout
        ctx = jax.ShapeDtypeStruct((batch, self.pcfg.block_frames, *self.latent_hw, self.cfg.in_channels), jnp.float32)
        return (lay.abstract_params(), lay.abstract_text(batch), lay.abstract(ctx), lay.abstract_key(),
                lay.abstract_scalar())

    def lower(self, params, text: KV, context, key, block) -> jax.stages.Lowered:
        """One block of Krea's loop (the rebuilt-context pass and the denoising passes) lowered
        for these inputs, concrete or abstract (`abstract_inputs`)."""
        return self._block_fn.lower(params, text, context, key, block)

    # -- what a stream carries between blocks: (block b-1's x0, frame 0, R of block b-1) -------------
    def _empty(self, batch: int, reencode: Callable | None = None) -> KreaCarry:
        zeros = jnp.zeros((batch, self.pcfg.block_frames, *self.latent_hw, self.cfg.in_channels), jnp.float32)
        return KreaCarry(zeros, zeros[:, :1], zeros[:, :1], reencode)

    def _context(self, carry: KreaCarry, b: int):
        # block 0: masked away; block 1: frames 0..2 as they are, frame 0 an image latent already
        return carry.previous if b <= 1 else context_frames(self.pcfg, carry.previous, carry.first, carry.r)

    @staticmethod
    def _advance(carry: KreaCarry, x0, b: int) -> KreaCarry:
        # every block goes through the round trip, so a streaming VAE decoder stays in step
        r = x0[:, :1] if carry.reencode is None else carry.reencode(x0)
        return carry._replace(previous=x0, first=x0[:, :1] if b == 0 else carry.first, r=r)

    # -- the stepping interface shared with the other runners (bcjax.stepping) ----------------
    keeps_cache = False  # the context is rebuilt under the prompt in force before every block

    def start(self, params, text: KV, key, *, num_blocks: int | None = None, context=None, source=None,
              reencode: Callable | None = None) -> StepState:
        """A stream before its first block; context: given frames [B, G * block_frames, H, W, C]
        (blocks 0..G-1; generation starts at block G); num_blocks None: until the caller stops
        (positions never grow). reencode: the VAE round trip giving R [B, 1, H, W, C] (rule 4;
        `bcjax.app.t2v.VAERoundTrip` decodes the stream and encodes that frame's last pixel frame
        as an image), called with every block's x0 in order, given blocks first; None: R is the
        latent frame itself (latent-only runs, tests). source: video-to-video input latents
        [B, >= num_blocks * block_frames, H, W, C]."""
        if num_blocks is not None and num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        if source is not None:
            if num_blocks is None:
                raise ValueError("video-to-video (source) needs num_blocks: the stream ends with its input")
            check_source(source, num_blocks, self.pcfg.block_frames)
        carry, first = self._empty(text.k.shape[1], reencode), 0
        if context is not None:
            bf = self.pcfg.block_frames
            if context.ndim != 5 or context.shape[1] % bf or context.shape[1] == 0:
                raise ValueError(f"context frames must be [B, G * {bf}, H, W, C]; got {tuple(context.shape)}")
            first = context.shape[1] // bf
            for g in range(first):
                block = jnp.asarray(context[:, g * bf:(g + 1) * bf], jnp.float32)
                carry = self._advance(carry, block, g)
        return StepState(carry, key, 0, first, num_blocks, source)

    def step(self, params, text: KV, state: StepState) -> tuple[StepState, Step]:
        """The next block under `text` (its context rebuilt under `text` too: nothing to recache)."""
        b, i, bf = self.entering(state), state.step, self.pcfg.block_frames
        params, text = self.layout.place_params(params), self.layout.place_text(text)
        if state.source is None:
            x0 = self._block_fn(params, text, self._context(state.carry, b), state.key, jnp.int32(b))
        else:
            x0 = self._v2v_fn(params, text, self._context(state.carry, b), state.key, jnp.int32(b),
                              state.source[:, i * bf:(i + 1) * bf])
        carry = self._advance(state.carry, x0, b)
        stages = tuple((b, s) for s in range(self.pcfg.num_steps))
        return state._replace(carry=carry, step=state.step + 1), Step(b, x0, stages)

    entering = staticmethod(block_entering)  # one step is one block (bcjax.stepping)
    done = staticmethod(blocks_done)

    def cache(self, state: StepState):
        raise ValueError("Krea's loop keeps no cache: its context is rebuilt under the prompt in force before every "
                         "block, so a recache policy does not apply (use 'no-recache')")

    def with_cache(self, state: StepState, cache):
        raise ValueError("Krea's loop keeps no cache to replace")
