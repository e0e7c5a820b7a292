"""Denoising schedules (flow-matching sigmas, the few-step sampler), the sampler's config and the stagger
tables."""

from bcjax.schedule.config import PipelineConfig
from bcjax.schedule.flow import (
    block_noise,
    denoising_schedule,
    predict_x0,
    renoise,
    shifted_sigmas,
    sigma_of_timestep,
    warp_denoising_steps,
)

__all__ = [
    "PipelineConfig", "block_noise", "denoising_schedule", "predict_x0", "renoise", "shifted_sigmas",
    "sigma_of_timestep", "warp_denoising_steps",
]
