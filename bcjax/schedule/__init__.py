"""Noise schedules (flow matching, few-step sampler) and, later, stagger tables."""

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
    "block_noise", "denoising_schedule", "predict_x0", "renoise", "shifted_sigmas",
    "sigma_of_timestep", "warp_denoising_steps",
]
