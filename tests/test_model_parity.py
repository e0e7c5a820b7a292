"""bcjax's Wan DiT against diffusers' WanTransformer3DModel, same original-layout weights."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.model import forward, text_kv

TOL = 1e-4


def _inputs(cfg, frames=3, hw=(4, 6), seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((1, frames, *hw, cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((1, cfg.text_len, cfg.text_dim)).astype(np.float32)
    return x, ctx


@pytest.mark.parametrize("timestep", [1000.0, 937.5, 0.0])
def test_full_sequence_scalar_timestep(tiny_cfg, torch_tiny_params, oracle, timestep):
    x, ctx = _inputs(tiny_cfg, frames=6)
    ref = oracle(x, np.array([timestep], np.float32), ctx)  # diffusers' scalar-timestep path
    t = np.full((1, 6), timestep, np.float32)
    ours, _ = forward(tiny_cfg, torch_tiny_params, jnp.asarray(x), jnp.asarray(t),
                      text_kv(tiny_cfg, torch_tiny_params, jnp.asarray(ctx)), jnp.arange(6))
    err = np.abs(np.asarray(ours) - ref).max()
    assert err <= TOL, err
    assert np.abs(ref).max() > 0.1  # the comparison is not between two near-zero outputs


def test_full_sequence_per_frame_timesteps(tiny_cfg, torch_tiny_params, oracle):
    x, ctx = _inputs(tiny_cfg, frames=6, seed=1)
    t = np.array([[0.0, 0.0, 0.0, 833.3333, 833.3333, 833.3333]], np.float32)
    ref = oracle(x, t, ctx)
    ours, _ = forward(tiny_cfg, torch_tiny_params, jnp.asarray(x), jnp.asarray(t),
                      text_kv(tiny_cfg, torch_tiny_params, jnp.asarray(ctx)), jnp.arange(6))
    err = np.abs(np.asarray(ours) - ref).max()
    assert err <= TOL, err
    # per-frame timesteps really differ from a scalar one
    ref_scalar = oracle(x, np.full_like(t, 833.3333), ctx)
    assert np.abs(ref_scalar - ref).max() > 10 * TOL


def test_batch_of_two(tiny_cfg, torch_tiny_params, oracle):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 4, 4, tiny_cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((2, tiny_cfg.text_len, tiny_cfg.text_dim)).astype(np.float32)
    t = np.array([[1000.0] * 3, [625.0] * 3], np.float32)
    ref = oracle(x, t, ctx)
    ours, _ = forward(tiny_cfg, torch_tiny_params, jnp.asarray(x), jnp.asarray(t),
                      text_kv(tiny_cfg, torch_tiny_params, jnp.asarray(ctx)), jnp.arange(3))
    assert np.abs(np.asarray(ours) - ref).max() <= TOL


def test_bf16_runs_close_to_fp32(tiny_cfg, tiny_params):
    import dataclasses

    cfg16 = dataclasses.replace(tiny_cfg, dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), tiny_params)
    x, ctx = _inputs(tiny_cfg)
    t = jnp.full((1, 3), 500.0)
    out32, _ = forward(tiny_cfg, tiny_params, jnp.asarray(x), t, text_kv(tiny_cfg, tiny_params, jnp.asarray(ctx)),
                       jnp.arange(3))
    out16, kv16 = forward(cfg16, p16, jnp.asarray(x), t, text_kv(cfg16, p16, jnp.asarray(ctx)), jnp.arange(3))
    assert out16.dtype == jnp.float32 and kv16.k.dtype == jnp.bfloat16
    rel = float(jnp.abs(out16 - out32).max() / jnp.abs(out32).max())
    assert rel < 0.05, rel
