"""The flow-matching denoising schedule (sigmas) and the few-step sampler, as pure functions.

Forward process x_t = (1 - sigma) x0 + sigma eps; the model predicts the flow v = eps - x0, so
x0 = x_t - sigma v. The few-step (DMD-style) sampler predicts x0 at every step and re-noises it
to the next sigma with *fresh* noise; it is not an Euler ODE step (paper.md §2.2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
TRAILING_ZERO = ("end", "pass")


def shifted_sigmas(shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """The scheduler's sigma table: s = linspace(1, 0, N+1)[:-1], sigma = shift s / (1 + (shift-1) s)."""
    s = np.linspace(1.0, 0.0, num_train_timesteps + 1)[:-1]
    return shift * s / (1.0 + (shift - 1.0) * s)


def warp_denoising_steps(steps, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """Self-Forcing's `warp_denoising_step`: step k of [1000, 750, ...] becomes table entry N - k.

    [1000, 750, 500, 250] at shift 5 -> timesteps [1000, 937.5, 833.3, 625].
    """
    table = np.concatenate([num_train_timesteps * shifted_sigmas(shift, num_train_timesteps), [0.0]])
    idx = num_train_timesteps - np.asarray(steps, dtype=np.int64)
    if np.any(idx < 0) or np.any(idx > num_train_timesteps):
        raise ValueError(f"denoising steps {list(steps)} must lie in [0, {num_train_timesteps}]")
    return table[idx]


def sigma_of_timestep(timesteps, shift: float, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> np.ndarray:
    """sigma for each timestep, from the nearest entry of the scheduler table (as upstream does)."""
    sig = shifted_sigmas(shift, num_train_timesteps)
    table = num_train_timesteps * sig
    t = np.atleast_1d(np.asarray(timesteps, dtype=np.float64))
    return sig[np.argmin(np.abs(table[None, :] - t[:, None]), axis=1)]


def denoising_schedule(steps, shift: float, warp: bool, trailing_zero: str = "end") -> tuple[np.ndarray, np.ndarray]:
    """(timesteps, sigmas) of a few-step sampler, float32 [n_passes] each.

    A trailing 0 in `steps` is either the end point, not a pass (trailing_zero="end": how
    Self-Forcing reads its configs), or a DiT pass at t = 0 whose x0 is the block's output
    (trailing_zero="pass": Krea's `release_server.py` runs every entry of its list, the 0
    included, with sigma = the nearest table entry, 0.00498 at shift 5).
    """
    if trailing_zero not in TRAILING_ZERO:
        raise ValueError(f"trailing_zero={trailing_zero!r}: expected one of {TRAILING_ZERO}")
    steps = list(steps)
    if steps and steps[-1] == 0 and trailing_zero == "end":
        steps = steps[:-1]
    if not steps:
        raise ValueError("the denoising step list is empty")
    timesteps = warp_denoising_steps(steps, shift) if warp else np.asarray(steps, np.float64)
    return timesteps.astype(np.float32), sigma_of_timestep(timesteps, shift).astype(np.float32)


def predict_x0(x_t, flow, sigma):
    """x0 = x_t - sigma * v (float32)."""
    return x_t.astype(jnp.float32) - sigma * flow.astype(jnp.float32)


def renoise(x0, noise, sigma):
    """Re-noise a clean estimate to noise level sigma: (1 - sigma) x0 + sigma eps."""
    return (1.0 - sigma) * x0 + sigma * noise


def block_noise(key, block, step, shape, dtype=jnp.float32):
    """Gaussian noise for block `block` at sampler step `step`.

    Drawn from fold_in(fold_in(key, block), step), so it depends only on (seed, block, step),
    never on which device or tick processes the block. Step 0 is the initial noise; step k >= 1
    is the fresh noise used to re-noise to the k-th sigma.
    """
    return jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, block), step), shape, dtype)
