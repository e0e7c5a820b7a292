"""Krea Realtime 14B's loop (rules 1-6 of `bcjax.pipeline.krea`), each against a case
computed by hand: closed forms for the sampler, and one plain forward over [context | block]
with a block-causal mask for the rebuilt context and its positions."""

import dataclasses
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shared
from shared import subprocess_env

import ports
from bcjax.model import text_kv
from bcjax.model.wan import forward
from bcjax.schedule.flow import block_noise

HW = (4, 6)
KREA = ports.get("krea_14b").pipeline
forward = jax.jit(forward, static_argnums=0)


@pytest.fixture(scope="module")
def text(tiny_cfg, tiny_params):
    ctx = np.random.default_rng(17).standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)).astype(np.float32)
    return text_kv(tiny_cfg, tiny_params, jnp.asarray(ctx))


def test_rule1_timesteps_and_sigmas():
    # the server's float32 list: the warp of [1000, 750, 500, 250, 0] at shift 5, every entry a pass
    np.testing.assert_allclose(KREA.timesteps, [1000.0, 937.5, 833.3333, 625.0, 0.0], rtol=1e-6)
    np.testing.assert_allclose(KREA.sigmas, [1.0, 0.9375, 0.8333333, 0.625, 0.0049800797], rtol=1e-6)
    four = dataclasses.replace(KREA, denoising_steps=(1000, 666, 333, 0))
    np.testing.assert_allclose(four.timesteps, [1000.0, 908.8428, 713.9794, 0.0], rtol=1e-6)
    # the same list with the trailing 0 as the end point (Self-Forcing's reading): 4 passes
    assert dataclasses.replace(KREA, trailing_zero="end").num_steps == 4 and KREA.num_steps == 5


def _constant_flow(cfg, params, flow):
    """Parameters whose DiT predicts the same flow [C] everywhere (head kernel 0, bias = flow)."""
    _, ph, pw = cfg.patch_size
    head = dict(params["head"])
    head["head"] = {"kernel": jnp.zeros_like(params["head"]["head"]["kernel"]),
                    "bias": jnp.asarray(np.tile(flow, ph * pw), jnp.float32)}
    return {**params, "head": head}


def test_rule2_every_entry_a_pass_output_the_t0_x0(tiny_cfg, tiny_params, text):
    flow = np.linspace(-1, 1, tiny_cfg.out_channels).astype(np.float32)
    params = _constant_flow(tiny_cfg, tiny_params, flow)
    key = jax.random.key(2)
    got = np.asarray(shared.runner(tiny_cfg, KREA, HW, program="krea").generate(params, text, key, num_blocks=2))
    sig = [1.0, 0.9375, 0.8333333, 0.625, 0.0049800797]  # sigma(0) = table entry 999, not 0
    for b in range(2):
        shape = (1, 3, *HW, tiny_cfg.in_channels)
        x = np.asarray(block_noise(key, b, 0, shape))
        for k in range(5):
            x0 = x - sig[k] * flow
            if k < 4:
                x = (1 - sig[k + 1]) * x0 + sig[k + 1] * np.asarray(block_noise(key, b, k + 1, shape))  # 4 fresh draws
        np.testing.assert_allclose(got[:, 3 * b:3 * b + 3], x0, atol=1e-5)


def _by_hand(cfg, params, text, context, key, block):
    """Block `block` (>= 1) as one plain forward per pass over [context (t = 0, RoPE 0..2) |
    block (RoPE 3..5)] where the context rows see only the context (rules 3-5)."""
    p = cfg.tokens_per_frame(*HW)
    mask = np.ones((1, 2, 6 * p), bool)
    mask[0, 0, 3 * p:] = False
    shape = (1, 3, *HW, cfg.in_channels)
    x = block_noise(key, block, 0, shape)
    for k, (t, s) in enumerate(zip(KREA.timesteps, KREA.sigmas, strict=True)):
        t_all = jnp.concatenate([jnp.zeros((1, 3)), jnp.full((1, 3), t)], axis=1)
        v, _ = forward(cfg, params, jnp.concatenate([context, x], axis=1), t_all, text, jnp.arange(6), None,
                       jnp.asarray(mask))
        x0 = x - s * v[:, 3:]
        if k < KREA.num_steps - 1:
            x = (1 - KREA.sigmas[k + 1]) * x0 + KREA.sigmas[k + 1] * block_noise(key, block, k + 1, shape)
    return np.asarray(x0)


@pytest.mark.parametrize("keep_first_frame", [False, True])
def test_rules3_to_6_rebuilt_context(tiny_cfg, tiny_params, text, keep_first_frame):
    pcfg = dataclasses.replace(KREA, keep_first_frame=keep_first_frame)
    key = jax.random.key(3)
    seen = []

    def reencode(x0):  # a stand-in VAE round trip that is easy to recognise
        seen.append(np.asarray(x0))
        return 0.5 * x0[:, :1] + 0.25

    out = np.asarray(shared.runner(tiny_cfg, pcfg, HW, program="krea").generate(tiny_params, text, key, num_blocks=4,
                                                                              reencode=reencode))
    assert len(seen) == 4  # every block goes through the round trip, in order
    blocks = [out[:, 3 * b:3 * b + 3] for b in range(4)]
    # block 0: no context, RoPE 0..2
    shape = (1, 3, *HW, tiny_cfg.in_channels)
    x = block_noise(key, 0, 0, shape)
    for k, (t, s) in enumerate(zip(KREA.timesteps, KREA.sigmas, strict=True)):
        v, _ = forward(tiny_cfg, tiny_params, x, jnp.full((1, 3), t), text, jnp.arange(3))
        x0 = x - s * v
        if k < 4:
            x = (1 - KREA.sigmas[k + 1]) * x0 + KREA.sigmas[k + 1] * block_noise(key, 0, k + 1, shape)
    np.testing.assert_allclose(blocks[0], np.asarray(x0), atol=2e-5)
    # block 1: frames 0, 1, 2 as generated
    np.testing.assert_allclose(blocks[1], _by_hand(tiny_cfg, tiny_params, text, blocks[0], key, 1), atol=2e-5)
    # block b >= 2: [R (or frame 0), 3b-2, 3b-1]; nothing else of the past matters
    for b in (2, 3):
        head = blocks[0][:, :1] if keep_first_frame else 0.5 * blocks[b - 1][:, :1] + 0.25
        context = np.concatenate([head, blocks[b - 1][:, 1:]], axis=1)
        np.testing.assert_allclose(blocks[b], _by_hand(tiny_cfg, tiny_params, text, context, key, b), atol=2e-5)


def test_clean_pass_variant_keeps_its_name_and_bad_combinations_are_named(tiny_cfg):
    clean = ports.get("krea_14b_clean_pass").pipeline
    assert clean.context == "clean-pass" and clean.num_steps == 4
    keep = dataclasses.replace(KREA, keep_first_frame=True)
    with pytest.raises(ValueError, match="keep_first_frame=True needs Krea.s loop"):
        shared.runner(tiny_cfg, keep, HW, program="block")
    with pytest.raises(ValueError, match="keep_first_frame=True needs Krea.s loop"):
        shared.runner(tiny_cfg, keep, HW, "P1", "causal", program="tick")
    with pytest.raises(ValueError, match="needs PipelineConfig\\(context='rebuild'\\)"):
        shared.runner(tiny_cfg, clean, HW, program="krea")
    with pytest.raises(ValueError, match="keep_first_frame=True needs context='rebuild'"):
        dataclasses.replace(clean, keep_first_frame=True)


@pytest.mark.slow
def test_cascade_in_krea_mode(tiny_cfg, tiny_params, text):
    """Krea's rebuild pass is the cascade's clean stage (block b-1 at t = 0 seeing only itself;
    its K/V a one-block cache): P1-causal == Krea's own loop; the same for the sequential
    pipeline; P4 sharded over 5 devices == batched."""
    key = jax.random.key(6)
    ref = np.asarray(shared.runner(tiny_cfg, KREA, HW, program="krea").generate(tiny_params, text, key, num_blocks=5))
    seq = np.asarray(shared.runner(tiny_cfg, KREA, HW, program="block").generate(tiny_params, text, key, num_blocks=5))
    p1 = np.asarray(shared.runner(tiny_cfg, KREA, HW, "P1", "causal", program="tick").generate(tiny_params, text, key,
                                                                                             num_blocks=5))
    print(f"Krea mode vs Krea's loop: sequential {np.abs(seq - ref).max():.1e}, "
          f"P1-causal {np.abs(p1 - ref).max():.1e}")
    assert np.abs(seq - ref).max() <= 1e-5 and np.abs(p1 - ref).max() <= 1e-5
    for window in ("causal", "bidirectional"):
        one = np.asarray(shared.runner(tiny_cfg, KREA, HW, "P4", window, program="tick").generate(
            tiny_params, text, key, num_blocks=5))
        assert np.abs(one - ref).max() > 1e-3  # a real cascade: blocks start from noisy context
        if jax.device_count() >= 5:
            from bcjax.cascade import make_mesh

            five = np.asarray(shared.runner(tiny_cfg, KREA, HW, "P4", window, make_mesh(5),
                                          program="tick").generate(tiny_params, text, key, num_blocks=5))
            assert np.abs(five - one).max() <= 1e-5


_BITS = """
import os, sys, hashlib
sys.path.insert(0, {tests!r})
os.environ["JAX_PLATFORMS"] = "cpu"
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
import ports
from bcjax.model import WanConfig, text_kv, init_params
cfg = WanConfig.preset("tiny", attention="xla")
params = init_params(cfg, jax.random.key(0))
ctx = np.random.default_rng(17).standard_normal((1, cfg.text_len, cfg.text_dim)).astype(np.float32)
text = text_kv(cfg, params, jnp.asarray(ctx))
from bcjax.runners import make_runner
runner = make_runner(cfg, ports.get("krea_14b").pipeline, (4, 6), program="krea")
out = runner.generate(params, text, jax.random.key(5), num_blocks=3)
print(jax.device_count(), hashlib.sha256(np.asarray(out).tobytes()).hexdigest())
"""


@pytest.mark.slow
def test_sequential_krea_mode_is_bit_stable_across_1_and_5_devices():
    code = _BITS.format(tests=os.path.dirname(__file__))
    digests = []
    for n in (1, 5):
        env = subprocess_env(n)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        count, digest = out.stdout.split()[-2:]
        assert int(count) == n
        digests.append(digest)
    assert digests[0] == digests[1]
