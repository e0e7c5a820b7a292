"""Sampler and cache settings of a block-causal pipeline (one small dataclass; presets in ports/)."""

from __future__ import annotations

import dataclasses

import numpy as np

from bcjax.names import CONTEXTS, POSITIONS, Context, Positions  # re-exported: checked here
from bcjax.schedule.flow import denoising_schedule


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How a block-causal model is sampled.

    window_frames is the attention span in latent frames *including the block being denoised*
    (Self-Forcing's global 21-frame cache; LongLive's local_attn_size 12); sink_frames of them are
    the first frames of the video, kept forever (LongLive's attention sink). The clean cache holds
    window_frames - block_frames finished frames.

    positions: "absolute" (RoPE at the absolute frame index, the base models' semantics; a stream
    ends at the RoPE table) or "rolling" (the same until the table ends, then non-sink positions
    jump back by `rope_period` frames and cached keys are re-rotated; see bcjax.model.rope).

    trailing_zero: what a trailing 0 in denoising_steps is: "end" (the end point, not a pass:
    Self-Forcing) or "pass" (a DiT pass at t = 0 whose x0 is the output: Krea).

    context: what a block attends to besides itself. "clean-pass" (Self-Forcing, CausVid,
    LongLive): a cache of finished blocks' K/V, written by a clean pass at context_noise after
    each block. "rebuild" (Krea Realtime 14B): nothing persists; before every block the previous
    block's frames are re-run in one pass at t = 0 attending only to each other (the first of
    them re-encoded through the VAE as an image, or the video's frame 0 when keep_first_frame),
    and the block attends to them (`bcjax.pipeline.krea`). In the sequential pipeline and the
    cascade that rebuild pass is the clean pass (t = 0, seeing only itself; R = the latent).
    "last-pass": a cache like "clean-pass" but with no clean pass: a block's cache entry is the
    K/V of its last denoising pass (at t_0, with its own input as it was in flight), taken from
    that pass as it runs. One pass less per block (n instead of n + 1: -20% with 4 steps) at no
    extra cost, and in the cascade the pass that emits the block's x0 writes its entry, so the
    one-scan tick keeps its shapes (`P<k>-no-clean`, `bcjax.schedule.stagger`). The alternative,
    the K/V of the block's x0, needs a pass over the x0, which exists only after the emitting
    pass: another pass after it, i.e. the clean pass again. The price: the cached context is the
    t_0 input (sigma_0 of noise left), not the clean x0 the models were trained to attend to.
    Given context frames (`prefill`) are still written by a pass at t = 0.
    """

    denoising_steps: tuple[float, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    shift: float = 5.0
    block_frames: int = 3
    window_frames: int = 21
    sink_frames: int = 0
    context_noise: float = 0.0
    positions: Positions = "absolute"
    trailing_zero: str = "end"
    context: Context = "clean-pass"
    keep_first_frame: bool = False

    def __post_init__(self):
        if self.positions not in POSITIONS:
            raise ValueError(f"positions={self.positions!r}: expected one of {POSITIONS}")
        if self.context not in CONTEXTS:
            raise ValueError(f"context={self.context!r}: expected one of {CONTEXTS}")
        if self.keep_first_frame and self.context != "rebuild":
            raise ValueError("keep_first_frame=True needs context='rebuild' (Krea's rebuilt context)")
        if self.context == "rebuild" and self.sink_frames:
            raise ValueError(f"context='rebuild' keeps no cache, so no sink: sink_frames={self.sink_frames}")
        if self.block_frames < 1:
            raise ValueError(f"block_frames={self.block_frames} must be >= 1")
        if self.sink_frames < 0:
            raise ValueError(f"sink_frames={self.sink_frames} must be >= 0")
        rolling = self.cache_frames - self.sink_frames
        if rolling < self.block_frames:
            raise ValueError(
                f"window_frames={self.window_frames} leaves {rolling} rolling cache frames after the "
                f"{self.block_frames}-frame block and {self.sink_frames} sink frames; need >= {self.block_frames}"
            )
        denoising_schedule(self.denoising_steps, self.shift, self.warp_denoising_step, self.trailing_zero)  # validates

    @property
    def clean_pass(self) -> bool:
        """Whether a block has a pass after its denoising steps (the clean pass, or Krea's rebuild)."""
        return self.context != "last-pass"

    @property
    def cache_frames(self) -> int:
        return self.window_frames - self.block_frames

    def rope_period(self, max_positions: int) -> int:
        """Frames a rolling stream's positions jump back by, a whole number of blocks: as far as
        the table allows while the sink, the rolling cache and up to num_steps + 1 in-flight
        blocks (a P1 cascade's) still fit behind the newest frame."""
        bf = self.block_frames
        span = self.cache_frames - self.sink_frames + (self.num_steps + 1) * bf
        period = bf * ((max_positions - self.sink_frames - span) // bf)
        if period < bf:
            raise ValueError(f"positions='rolling' needs a RoPE table longer than sink {self.sink_frames} + "
                             f"rolling cache {self.cache_frames - self.sink_frames} + "
                             f"{self.num_steps + 1} in-flight blocks of {bf} frames + one block; "
                             f"the model has {max_positions} positions")
        return period

    def check_length(self, max_positions: int, num_blocks: int, first_block: int = 0) -> None:
        """Refuse a stream of num_blocks blocks from first_block that absolute positions cannot hold."""
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        last = (first_block + num_blocks) * self.block_frames
        if self.positions == "absolute" and last > max_positions:
            raise ValueError(f"{num_blocks} blocks reach latent frame {last - 1}, past the {max_positions}-position "
                             "RoPE table of this model (PipelineConfig(positions='rolling') streams past it)")

    def stream_blocks(self, max_positions: int, first_block: int = 0) -> int | None:
        """Blocks a stream starting at `first_block` can generate: None (unbounded) when rolling."""
        if self.positions == "rolling":
            return None
        return max_positions // self.block_frames - first_block

    @property
    def timesteps(self) -> np.ndarray:
        return denoising_schedule(self.denoising_steps, self.shift, self.warp_denoising_step, self.trailing_zero)[0]

    @property
    def sigmas(self) -> np.ndarray:
        return denoising_schedule(self.denoising_steps, self.shift, self.warp_denoising_step, self.trailing_zero)[1]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)
