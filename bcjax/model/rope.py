"""Wan's 3D rotary position embedding, as pure functions.

The temporal index is the *absolute* latent-frame index, so a block rotated at frames
[3b, 3b+3) and cached post-RoPE lines up with every later block without re-rotation.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from bcjax.model.config import WanConfig


@functools.lru_cache(maxsize=16)
def _angle_tables(head_dim: int, split: tuple[int, int, int], positions: int, theta: float):
    # Built in float64 like Wan's `rope_params`, then rounded once to float32.
    tables = []
    for axis_dim in split:
        inv_freq = 1.0 / np.power(theta, np.arange(0, axis_dim, 2, dtype=np.float64) / axis_dim)
        tables.append(np.outer(np.arange(positions, dtype=np.float64), inv_freq))
    return tuple((np.cos(t).astype(np.float32), np.sin(t).astype(np.float32)) for t in tables)


def rope_tables(cfg: WanConfig, frame_ids, grid_hw: tuple[int, int]):
    """cos/sin for the tokens of `len(frame_ids)` latent frames on a (h, w) token grid.

    frame_ids: int [F] absolute latent-frame indices (may be traced).
    Returns (cos, sin), each [F*h*w, head_dim//2], token order (frame, row, col).
    """
    h, w = grid_hw
    (ct, st), (ch, sh), (cw, sw) = _angle_tables(
        cfg.head_dim, cfg.rope_split, cfg.rope_max_positions, cfg.rope_theta
    )
    frame_ids = jnp.asarray(frame_ids, jnp.int32)
    f = frame_ids.shape[0]

    def grid(t_tab, h_tab, w_tab):
        # [F, h, w, n_axis_freqs] for each axis, concatenated along frequencies as Wan does.
        tf = jnp.broadcast_to(jnp.asarray(t_tab)[frame_ids][:, None, None, :], (f, h, w, t_tab.shape[1]))
        th = jnp.broadcast_to(jnp.asarray(h_tab)[:h][None, :, None, :], (f, h, w, h_tab.shape[1]))
        tw = jnp.broadcast_to(jnp.asarray(w_tab)[:w][None, None, :, :], (f, h, w, w_tab.shape[1]))
        return jnp.concatenate([tf, th, tw], axis=-1).reshape(f * h * w, -1)

    return grid(ct, ch, cw), grid(st, sh, sw)


def apply_rope(x, cos, sin):
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x: [B, T, N, H] by angles [T, H//2]."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
