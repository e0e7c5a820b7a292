"""The KV-cached sequential pipeline against the diffusers oracle and against itself."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shared

from bcjax.compile_count import CompileCounter
from bcjax.model import forward, text_kv
from bcjax.pipeline import PipelineConfig
from bcjax.schedule import block_noise

HW = (4, 6)  # latent height, width -> 2x3 = 6 tokens per frame
P = 6


def _context(cfg, seed=0):
    return np.random.default_rng(seed).standard_normal((1, cfg.text_len, cfg.text_dim)).astype(np.float32)


def _visible_frames(pcfg: PipelineConfig, num_frames: int) -> np.ndarray:
    """[F, F] frames each frame's block may attend to: its block, the sink, and the newest
    cache_frames - sink_frames finished frames before its block (Self-Forcing/LongLive window)."""
    bf, sink, rolling = pcfg.block_frames, pcfg.sink_frames, pcfg.cache_frames - pcfg.sink_frames
    vis = np.zeros((num_frames, num_frames), bool)
    for q in range(num_frames):
        start = (q // bf) * bf
        for k in range(num_frames):
            vis[q, k] = (start <= k < start + bf) or (k < start and (k < sink or k >= start - rolling))
    return vis


def oracle_generate(oracle, pcfg, ctx, num_blocks, key, hw=HW):
    """Sequential generation driven by the diffusers oracle on the full sequence, no KV cache."""
    from torch_oracle import block_causal_mask

    cfg = oracle.cfg
    bf, n = pcfg.block_frames, pcfg.num_steps
    shape = (1, bf, *hw, cfg.in_channels)
    clean = []
    for b in range(num_blocks):
        x = np.asarray(block_noise(key, b, 0, shape))
        frames = (b + 1) * bf
        blocks = np.arange(frames) // bf
        mask = block_causal_mask(blocks, P, _visible_frames(pcfg, frames))
        for k in range(n):
            seq = np.concatenate(clean + [x], axis=1)
            t = np.concatenate([np.full((1, b * bf), pcfg.context_noise), np.full((1, bf), pcfg.timesteps[k])], 1)
            flow = oracle(seq, t.astype(np.float32), ctx, mask)[:, -bf:]
            x0 = x - pcfg.sigmas[k] * flow
            if k + 1 < n:
                s = pcfg.sigmas[k + 1]
                x = (1 - s) * x0 + s * np.asarray(block_noise(key, b, k + 1, shape))
        clean.append(x0)
    return np.concatenate(clean, axis=1)


@pytest.mark.parametrize(
    "pcfg,num_blocks",
    [
        (PipelineConfig(window_frames=21), 3),  # Self-Forcing: global cache
        (PipelineConfig(window_frames=9, sink_frames=3), 5),  # LongLive-like: sink + rolling window, evicts
    ],
    ids=["global", "sink+rolling"],
)
def test_sequential_matches_oracle_driver(tiny_cfg, torch_tiny_params, oracle, pcfg, num_blocks):
    ctx = _context(tiny_cfg)
    key = jax.random.key(7)
    ref = oracle_generate(oracle, pcfg, ctx, num_blocks, key)
    pipe = shared.runner(tiny_cfg, pcfg, HW, program="block")
    text = text_kv(tiny_cfg, torch_tiny_params, jnp.asarray(ctx))
    ours = np.asarray(pipe.generate(torch_tiny_params, text, key, num_blocks=num_blocks))
    err = np.abs(ours - ref).max(axis=(0, 2, 3, 4))
    assert ours.shape == ref.shape
    assert (err <= 1e-4).all(), err


def test_cached_generation_equals_teacher_forced_forward(tiny_cfg, tiny_params):
    """One-step sampler: block b's output x0_b = noise_b - flow(noise_b | clean x0 of older blocks).
    A single forward over [clean blocks | noisy blocks] with duplicated RoPE positions and a
    block-causal (windowed) mask must reproduce every block of the KV-cached generation."""
    pcfg = PipelineConfig(denoising_steps=(1000,), window_frames=9, sink_frames=3)
    nb, bf = 5, pcfg.block_frames
    key = jax.random.key(3)
    text = text_kv(tiny_cfg, tiny_params, jnp.asarray(_context(tiny_cfg, 1)))
    x0 = shared.runner(tiny_cfg, pcfg, HW, program="block").generate(tiny_params, text, key, num_blocks=nb)
    noise = jnp.concatenate([block_noise(key, b, 0, (1, bf, *HW, tiny_cfg.in_channels)) for b in range(nb)], 1)

    f = nb * bf
    vis = _visible_frames(pcfg, f)  # clean frame q sees vis[q]; noisy frame q sees vis[q] minus its own clean block
    own = (np.arange(f)[:, None] // bf) == (np.arange(f)[None, :] // bf)
    clean_q = np.concatenate([vis, np.zeros_like(vis)], 1)
    noisy_q = np.concatenate([vis & ~own, own], 1)
    block_rows = np.concatenate([clean_q, noisy_q], 0)[::bf]  # one key mask per query block
    key_mask = jnp.asarray(np.repeat(block_rows, P, axis=1))[None]
    seq = jnp.concatenate([x0, noise], 1)
    t = jnp.concatenate([jnp.zeros((1, f)), jnp.full((1, f), pcfg.timesteps[0])], 1)
    flow, _ = forward(tiny_cfg, tiny_params, seq, t, text, jnp.tile(jnp.arange(f), 2), None, key_mask)
    teacher_x0 = noise - pcfg.sigmas[0] * flow[:, f:]
    np.testing.assert_allclose(np.asarray(teacher_x0), np.asarray(x0), atol=1e-5)


def test_rope_positions_continue_across_blocks(tiny_cfg):
    from bcjax.model.rope import rope_tables

    whole = rope_tables(tiny_cfg, jnp.arange(9), (2, 3))
    later = rope_tables(tiny_cfg, jnp.arange(6, 9), (2, 3))
    for a, b in zip(whole, later, strict=True):
        np.testing.assert_array_equal(np.asarray(a)[6 * 6:], np.asarray(b))
    # and the temporal channels really move with the frame index
    assert not np.allclose(np.asarray(later[0])[:6], np.asarray(whole[0])[:6])


def test_one_compile_serves_a_long_stream(tiny_cfg, tiny_params):
    pcfg = PipelineConfig(window_frames=9, sink_frames=3)
    pipe = shared.runner(tiny_cfg, pcfg, HW, program="block")
    text = text_kv(tiny_cfg, tiny_params, jnp.asarray(_context(tiny_cfg)))
    key = jax.random.key(0)
    stream = pipe.blocks(tiny_params, text, key, num_blocks=12)
    jax.block_until_ready(next(stream))  # compiles the block function once
    with CompileCounter() as cc:
        rest = [jax.block_until_ready(x) for _, x in stream]  # cache fills, then rolls 7 times
    assert len(rest) == 11
    assert cc.count == 0, f"{cc.count} recompiles while streaming"
    assert all(np.isfinite(np.asarray(x)).all() for x in rest)


def test_same_seed_same_video_and_noise_depends_on_block_and_step(tiny_cfg, tiny_params):
    pipe = shared.runner(tiny_cfg, PipelineConfig(), HW, program="block")
    text = text_kv(tiny_cfg, tiny_params, jnp.asarray(_context(tiny_cfg)))
    a = pipe.generate(tiny_params, text, jax.random.key(5), num_blocks=2)
    b = pipe.generate(tiny_params, text, jax.random.key(5), num_blocks=2)
    c = pipe.generate(tiny_params, text, jax.random.key(6), num_blocks=2)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0.1
    key = jax.random.key(5)
    n = [np.asarray(block_noise(key, bl, st, (4,))) for bl, st in [(0, 0), (0, 1), (1, 0), (0, 0)]]
    np.testing.assert_array_equal(n[0], n[3])
    assert not np.allclose(n[0], n[1]) and not np.allclose(n[0], n[2])


def test_bad_latent_shape_is_named(tiny_cfg, tiny_params):
    text = text_kv(tiny_cfg, tiny_params, jnp.asarray(_context(tiny_cfg)))
    with pytest.raises(ValueError, match=r"channels.*\(1, 3, 4, 6, 8\)"):
        forward(tiny_cfg, tiny_params, jnp.zeros((1, 3, 4, 6, 8)), jnp.zeros((1, 3)), text, jnp.arange(3))
    with pytest.raises(ValueError, match="divisible"):
        shared.runner(tiny_cfg, PipelineConfig(), (5, 6), program="block")
    with pytest.raises(ValueError, match=r"timesteps t must be \[batch, frames\]"):
        forward(tiny_cfg, tiny_params, jnp.zeros((1, 3, 4, 6, 16)), jnp.zeros((1,)), text, jnp.arange(3))
    with pytest.raises(ValueError, match="prompt embeddings"):
        text_kv(tiny_cfg, tiny_params, jnp.zeros((1, 16, 7)))
    with pytest.raises(ValueError, match="RoPE table"):
        next(shared.runner(tiny_cfg, PipelineConfig(), HW, program="block").blocks(tiny_params, text, jax.random.key(0),
                                                                                 num_blocks=400))


def test_pipeline_config_rejects_a_window_without_room(tiny_cfg):
    with pytest.raises(ValueError, match="rolling cache frames"):
        PipelineConfig(window_frames=6, sink_frames=3)
    assert dataclasses.replace(PipelineConfig(), window_frames=12, sink_frames=3).cache_frames == 9
