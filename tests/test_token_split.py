"""The `tokens` axis splits a tick's tokens: any device count runs any stagger and equals one device.

No torch: random Flax-initialised weights; the reference is the same runner on one device (whose
parity with the diffusers oracle and upstream pipelines the other tests hold)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import token_split_case
from shared import runner

import ports
from bcjax.cascade import make_mesh
from bcjax.cascade.tokens import token_split
from bcjax.model import init_params, text_kv
from bcjax.pipeline import PipelineConfig

HW = (4, 6)  # 2 x 3 = 6 tokens per frame with the tiny model's 2 x 2 patches
ROLLING = PipelineConfig(window_frames=9, sink_frames=3)
KREA = ports.get("krea_14b").pipeline
P_480 = 30 * 52  # tokens per latent frame at 480 x 832


@pytest.mark.parametrize("frames, devices, group, padding", [
    (15, 1, 1560, 0), (15, 2, 780, 0), (15, 4, 390, 0), (15, 5, 1560, 0), (15, 8, 195, 0),  # P4 (5 blocks)
    (3, 5, 312, 0), (3, 8, 195, 0), (3, 2, 780, 0),  # sequential: context parallelism of one block
    (9, 8, 195, 0), (6, 4, 780, 0),  # P2 (3 blocks), P1 (2 blocks)
])
def test_480p_splits_use_every_device_without_padding(frames, devices, group, padding):
    sp = token_split(frames, P_480, devices)
    assert (sp.group, sp.padded_tokens - sp.tokens) == (group, padding)
    assert sp.tokens == frames * P_480 and P_480 % sp.group == 0
    assert sp.per_device * devices * sp.group == sp.padded_tokens


def test_a_split_that_cannot_divide_pads_little_and_keeps_groups_large():
    sp = token_split(15, P_480, 16)  # no divisor of 1560 makes 15 frames split 16 ways
    assert sp.group >= 64 and (sp.padded_tokens - sp.tokens) / sp.padded_tokens < 0.025
    assert token_split(15, 6, 8).group == 6  # a frame smaller than the floor: whole frames
    with pytest.raises(ValueError, match="token group 4 must divide tokens_per_frame = 6"):
        token_split(15, 6, 8, group=4)
    with pytest.raises(ValueError, match="devices >= 1"):
        token_split(15, 6, 0)


@pytest.fixture(scope="module")
def model():
    cfg = token_split_case.CFG  # its one-device references are the ones the 8-device case compares to
    params = init_params(cfg, jax.random.key(0), HW)
    prompt = jnp.asarray(np.random.default_rng(0).standard_normal((1, cfg.text_len, cfg.text_dim)), jnp.float32)
    return cfg, params, text_kv(cfg, params, prompt)


def _err(a, b):
    return float(jnp.abs(jnp.asarray(a) - jnp.asarray(b)).max())


# a spread of staggers x device counts x group sizes (all of them on 8 devices: token_split_case.py)
@pytest.mark.parametrize("name, schedule, window, devices, group", [
    ("sequential", "sequential", "causal", 2, None),
    ("sequential", "sequential", "causal", 3, 2),
    ("krea", "sequential", "causal", 4, 3),
    ("sequential", "P2", "causal", 3, None),
    ("sequential", "P2", "bidirectional", 4, 2),
    ("sequential", "P4", "causal", 2, None),
    ("sequential", "P4", "bidirectional", 3, 1),
    ("sequential", "P4", "bidirectional", 4, 2),
])
def test_split_ticks_equal_one_device(model, name, schedule, window, devices, group):
    if jax.device_count() < devices:
        pytest.skip(f"needs {devices} devices")
    cfg, params, text = model
    pcfg = KREA if name == "krea" else ROLLING
    key = jax.random.key(3)
    ref = runner(cfg, pcfg, HW, schedule, window, program="tick").generate(params, text, key, num_blocks=5)
    got = runner(cfg, pcfg, HW, schedule, window, make_mesh(devices), token_group=group,
                 program="tick").generate(params, text, key, num_blocks=5)
    assert _err(got, ref) <= 1e-5


@pytest.mark.slow
def test_context_parallel_sequential_is_the_sequential_pipeline_and_krea_loop(model):
    """The sequential stagger split over devices is the sequential pipeline (and, with Krea's
    rules, Krea's loop with R the latent frame) computed on one device."""
    if jax.device_count() < 5:
        pytest.skip("needs 5 devices")
    cfg, params, text = model
    key = jax.random.key(5)
    seq = runner(cfg, ROLLING, HW, program="block").generate(params, text, key, num_blocks=5)
    cp = runner(cfg, ROLLING, HW, "sequential", mesh=make_mesh(5), program="tick")
    assert _err(cp.generate(params, text, key, num_blocks=5), seq) <= 1e-5
    krea = runner(cfg, KREA, HW, program="krea").generate(params, text, key, num_blocks=5)
    cp = runner(cfg, KREA, HW, "sequential", mesh=make_mesh(5), program="tick")
    assert _err(cp.generate(params, text, key, num_blocks=5), krea) <= 1e-5


@pytest.fixture(scope="module")
def report():
    """token_split_case.py's figures (8 of the suite's 10 devices)."""
    if jax.device_count() < 8:
        pytest.skip("needs 8 devices (tests/shared.py gives the suite 10)")
    return token_split_case.report()


@pytest.mark.slow
def test_every_schedule_on_8_devices_and_stage_model_meshes_equal_one_device(report):
    errors = report["errors"]
    names = ("sequential", "krea", "P2-causal", "P2-bidirectional", "P4-causal", "P4-bidirectional")
    assert {f"{n} 8 group={g}" for n in names for g in ("None", "2")} <= set(errors)
    assert {f"{n} {m} group={g}" for n in ("sequential", "P4-bidirectional") for m in ("4x2", "2x2")
            for g in ("None", "2")} <= set(errors)
    bad = {case: e for case, e in errors.items() if not e <= 1e-5}
    assert not bad, bad
    # P4 on 8 with 2-token groups: 45 groups, 6 per device, 3 padding groups
    assert report["splits"]["P4-bidirectional 8 group=2"] == [2, 45, 6, 8]


@pytest.mark.slow
def test_a_split_stream_never_recompiles(report):
    assert report["stream_compiles"] == 0


@pytest.mark.slow
def test_the_cascade_without_a_clean_pass_on_8_devices_equals_one_device(report):
    errors = report["errors"]
    assert errors["P4-no-clean 8 group=None"] <= 1e-5 and errors["P4-no-clean 8 group=2"] <= 1e-5
    # 4 blocks x 3 frames of 6 tokens in 2-token groups: 36 groups, 5 per device (4 padding groups)
    assert report["splits"]["P4-no-clean 8 group=2"] == [2, 36, 5, 8]
