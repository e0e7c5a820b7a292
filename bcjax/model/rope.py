"""Wan's 3D rotary position embedding, as pure functions.

The temporal index is the *absolute* latent-frame index, so a block rotated at frames
[3b, 3b+3) and cached post-RoPE lines up with every later block without re-rotation.

Past the end of the table (`rope_max_positions` frames, 1024 for Wan: ~4 minutes of video) a
stream has two options (`PipelineConfig.positions`):

* "absolute": the base models' semantics; a stream that would run past the table is refused.
* "rolling": positions of non-sink frames are `frame - base`, where `base` jumps forward by a
  fixed `period` whenever the newest frame of a pass would leave the table, and the cached keys
  (stored post-RoPE) are rotated back by the jump. RoPE scores depend only on position
  differences, so every offset between window frames and in-flight blocks is unchanged: with no
  sink the stream is the absolute one, exactly (up to rounding), forever. Sink frames keep their
  original positions 0..sink-1 (LongLive keeps its sink in place), so after a jump the oldest
  window frame sits right after the sink, and every offset the model sees stays inside the table.
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


def rope_base(max_positions: int, period: int, last_frame, xp=jnp):
    """Rolling positions: frames subtracted from non-sink positions in a pass whose newest frame
    is `last_frame` (int, may be traced): 0 until the table ends, then the smallest multiple of
    `period` that brings `last_frame` back inside [0, max_positions)."""
    over = xp.asarray(last_frame) - (max_positions - 1)
    return xp.where(over > 0, period * ((over + period - 1) // period), 0).astype(xp.int32)


def rope_positions(frame_ids, base, sink: int):
    """RoPE time index of absolute frames frame_ids (int [F]): sink frames keep theirs, the rest
    are shifted back by `base` (0 in absolute mode)."""
    frame_ids = jnp.asarray(frame_ids, jnp.int32)
    return jnp.where(frame_ids < sink, frame_ids, frame_ids - base)


def time_shift(cfg: WanConfig, delta, tokens: int, rotate):
    """cos/sin [tokens, head_dim//2] that move post-RoPE keys back by `delta` frames (int, traced,
    0 <= delta < rope_max_positions) on the temporal frequencies, for the tokens where `rotate`
    (bool [tokens]) holds; identity elsewhere and on the height/width frequencies."""
    (ct, st), _, _ = _angle_tables(cfg.head_dim, cfg.rope_split, cfg.rope_max_positions, cfg.rope_theta)
    n_t, half = ct.shape[1], cfg.head_dim // 2
    # R(p - d) = R(-d) R(p): cos(-a) = cos(a), sin(-a) = -sin(a), from the same float64 table
    cos = jnp.concatenate([jnp.asarray(ct)[delta], jnp.ones((half - n_t,), jnp.float32)])
    sin = jnp.concatenate([-jnp.asarray(st)[delta], jnp.zeros((half - n_t,), jnp.float32)])
    rotate = jnp.broadcast_to(jnp.asarray(rotate)[:, None], (tokens, half))
    return jnp.where(rotate, cos[None], 1.0), jnp.where(rotate, sin[None], 0.0)


def apply_rope(x, cos, sin):
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x: [B, T, N, H] by angles [T, H//2]."""
    xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
    x1, x2 = xf[..., 0], xf[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)
