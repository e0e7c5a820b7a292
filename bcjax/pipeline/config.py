"""Sampler and cache settings of a block-causal pipeline (one small dataclass; presets in ports/)."""

from __future__ import annotations

import dataclasses

import numpy as np

from bcjax.schedule.flow import denoising_schedule


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    """How a block-causal model is sampled.

    window_frames is the attention span in latent frames *including the block being denoised*
    (Self-Forcing's global 21-frame cache; LongLive's local_attn_size 12); sink_frames of them are
    the first frames of the video, kept forever (LongLive's attention sink). The clean cache holds
    window_frames - block_frames finished frames.
    """

    denoising_steps: tuple[float, ...] = (1000, 750, 500, 250)
    warp_denoising_step: bool = True
    shift: float = 5.0
    block_frames: int = 3
    window_frames: int = 21
    sink_frames: int = 0
    context_noise: float = 0.0

    def __post_init__(self):
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
        denoising_schedule(self.denoising_steps, self.shift, self.warp_denoising_step)  # validates

    @property
    def cache_frames(self) -> int:
        return self.window_frames - self.block_frames

    @property
    def timesteps(self) -> np.ndarray:
        return denoising_schedule(self.denoising_steps, self.shift, self.warp_denoising_step)[0]

    @property
    def sigmas(self) -> np.ndarray:
        return denoising_schedule(self.denoising_steps, self.shift, self.warp_denoising_step)[1]

    @property
    def num_steps(self) -> int:
        return len(self.timesteps)
