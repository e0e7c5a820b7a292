"""Where upstream's conventions differ from the obvious ones:
given context frames are written at t = 0 whatever context_noise is (Self-Forcing's
`CausalInferencePipeline.inference` writes `initial_latent` at t = 0; context_noise is for the
clean pass of generated blocks), and short prompt embeddings are zero-padded to text_len
(Wan's `WanModel.forward`)."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shared

from bcjax.model import text_kv
from bcjax.model.wan import forward
from bcjax.pipeline import PipelineConfig

HW = (4, 6)
NOISY_CONTEXT = PipelineConfig(window_frames=9, sink_frames=3, context_noise=50.0)
forward = jax.jit(forward, static_argnums=0)


@pytest.fixture(scope="module")
def prompt(tiny_cfg):
    return np.random.default_rng(3).standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)).astype(np.float32)


def _kv_at(cfg, params, text, frames, t, first_frame):
    _, kv = forward(cfg, params, frames, jnp.full(frames.shape[:2], t, jnp.float32), text,
                    first_frame + jnp.arange(frames.shape[1]))
    return np.asarray(kv.k)


@pytest.mark.slow
def test_given_context_at_t0_generated_blocks_at_context_noise(tiny_cfg, tiny_params, prompt):
    text = text_kv(tiny_cfg, tiny_params, prompt)
    key = jax.random.key(8)
    pipe = shared.runner(tiny_cfg, NOISY_CONTEXT, HW, program="block")
    given = jax.random.normal(jax.random.key(9), (1, 3, *HW, tiny_cfg.in_channels))
    cache = pipe.block_program.prefill(tiny_params, text, given)
    p = cache.tokens_per_frame
    at0 = _kv_at(tiny_cfg, tiny_params, text, given, 0.0, 0)
    at50 = _kv_at(tiny_cfg, tiny_params, text, given, 50.0, 0)
    np.testing.assert_allclose(np.asarray(cache.k[:, :, :3 * p]), at0, atol=2e-5)
    assert np.abs(at0 - at50).max() > 1e-3  # the two conventions are distinguishable
    # a generated block's clean pass still runs at context_noise: block 0 from scratch
    cache0, x0 = pipe.block_program._block_fn(tiny_params, text, pipe.block_program.init_cache(1), key, jnp.int32(0))
    np.testing.assert_allclose(np.asarray(cache0.k[:, :, :3 * p]), _kv_at(tiny_cfg, tiny_params, text, x0, 50.0, 0),
                               atol=2e-5)
    # the cascade's context path is the same: P1-causal after context == sequential after context
    seq = pipe.generate(tiny_params, text, key, num_blocks=3, context=given)
    p1 = shared.runner(tiny_cfg, NOISY_CONTEXT, HW, "P1", "causal", program="tick").generate(tiny_params, text, key,
                                                                                           num_blocks=3, context=given)
    np.testing.assert_allclose(np.asarray(p1), np.asarray(seq), atol=1e-5)
    # what writing the context at context_noise (the old convention) would have changed
    old = shared.runner(tiny_cfg, NOISY_CONTEXT, HW, program="block")
    old_cache = old.block_program.init_cache(1)
    from bcjax.sampler import clean_block

    old_cache = jax.jit(clean_block, static_argnums=(0, 1))(tiny_cfg, NOISY_CONTEXT, tiny_params, text, given,
                                                            old_cache, jnp.int32(0))
    state = old.with_cache(old.start(tiny_params, text, key, num_blocks=3, context=given), old_cache)
    outs = []
    while not old.done(state):
        state, out = old.step(tiny_params, text, state)
        outs.append(np.asarray(out.x0))
    before = np.concatenate(outs, 1)
    print("given context at t=context_noise (50) vs t=0: "
          f"outputs differ by {np.abs(before - np.asarray(seq)).max():.3f}")
    assert np.abs(before - np.asarray(seq)).max() > 1e-3


def test_short_prompt_embeddings_are_zero_padded(tiny_cfg, tiny_params, prompt):
    short = prompt[:, :5]
    padded = np.concatenate([short, np.zeros((1, tiny_cfg.text_len - 5, tiny_cfg.text_dim), np.float32)], axis=1)
    got, ref = text_kv(tiny_cfg, tiny_params, short), text_kv(tiny_cfg, tiny_params, padded)
    assert got.k.shape == ref.k.shape and got.k.shape[2] == tiny_cfg.text_len
    np.testing.assert_array_equal(np.asarray(got.k), np.asarray(ref.k))
    np.testing.assert_array_equal(np.asarray(got.v), np.asarray(ref.v))
    # unpadded (the old behaviour) attends to 5 text tokens instead of text_len: another video
    unpadded = text_kv(dataclasses.replace(tiny_cfg, text_len=5), tiny_params, short)
    pipe = shared.runner(tiny_cfg, PipelineConfig(window_frames=9), HW, program="block")
    key = jax.random.key(10)
    a, b = pipe.generate(tiny_params, got, key, num_blocks=1), pipe.generate(tiny_params, unpadded, key, num_blocks=1)
    print(f"unpadded vs zero-padded prompt embeddings: outputs differ by {float(jnp.abs(a - b).max()):.3f}")
    assert float(jnp.abs(a - b).max()) > 1e-3
    with pytest.raises(ValueError, match=rf"17 tokens .* text_len is {tiny_cfg.text_len}"):
        text_kv(tiny_cfg, tiny_params, np.zeros((1, tiny_cfg.text_len + 1, tiny_cfg.text_dim), np.float32))
