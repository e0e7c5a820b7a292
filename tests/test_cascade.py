"""The cascade: exactness against the sequential pipeline, sharded == batched, masks, noise, compiles."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shared

from bcjax.cascade import make_mesh
from bcjax.cascade.tick import tick
from bcjax.compile_count import CompileCounter
from bcjax.model import text_kv
from bcjax.pipeline import PipelineConfig
from bcjax.schedule import block_noise

HW = (4, 6)
GLOBAL = PipelineConfig(window_frames=21)
ROLLING = PipelineConfig(window_frames=9, sink_frames=3)  # sink + a window the stream outgrows


@pytest.fixture(scope="module")
def text(tiny_cfg, tiny_params):
    ctx = np.random.default_rng(11).standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)).astype(np.float32)
    return text_kv(tiny_cfg, tiny_params, jnp.asarray(ctx))


@pytest.fixture(scope="module")
def mesh5():
    if jax.device_count() < 5:
        pytest.skip("needs 5 devices (XLA_FLAGS=--xla_force_host_platform_device_count=5)")
    return make_mesh(5)


def _cascade(cfg, pcfg, schedule, window, mesh=None):
    """The run's runner of this configuration (tests/shared.py: compiled once for every test)."""
    return shared.runner(cfg, pcfg, HW, schedule, window, mesh=mesh, program="tick")


def _sequential(cfg, pcfg):
    return shared.runner(cfg, pcfg, HW, program="block")


def _max_err(a, b):
    return float(jnp.abs(jnp.asarray(a) - jnp.asarray(b)).max())


@pytest.mark.parametrize("pcfg", [GLOBAL, ROLLING], ids=["global", "sink+rolling"])
def test_p1_causal_reproduces_sequential(tiny_cfg, tiny_params, text, pcfg):
    key = jax.random.key(2)
    seq = _sequential(tiny_cfg, pcfg).generate(tiny_params, text, key, num_blocks=7)
    cas = _cascade(tiny_cfg, pcfg, "P1", "causal")
    assert cas.plan.in_flight == 2  # really overlapping: next block's first step beside the clean pass
    out = cas.generate(tiny_params, text, key, num_blocks=7)
    assert out.shape == seq.shape == (1, 21, *HW, tiny_cfg.in_channels)
    assert _max_err(out, seq) <= 1e-5


@pytest.mark.parametrize("schedule", ["P2", "P4"])
@pytest.mark.parametrize("window", ["causal", "bidirectional"])
def test_sharded_tick_equals_batched_tick(tiny_cfg, tiny_params, text, mesh5, schedule, window):
    key = jax.random.key(4)
    batched = _cascade(tiny_cfg, ROLLING, schedule, window).generate(tiny_params, text, key, num_blocks=6)
    sharded = _cascade(tiny_cfg, ROLLING, schedule, window, mesh=mesh5).generate(tiny_params, text, key, num_blocks=6)
    assert _max_err(batched, sharded) <= 1e-5


def test_sharded_p1_with_padding_groups_is_still_sequential(tiny_cfg, tiny_params, text, mesh5):
    import bcjax

    key = jax.random.key(8)
    cas = _cascade(tiny_cfg, GLOBAL, "P1", "causal", mesh=mesh5)
    # 2 blocks x 3 frames of one 6-token group each on 5 devices: 4 padding groups
    split = cas.tick_program.spec.split
    assert cas.plan.num_slots == 2 and split.padded_tokens - split.tokens == 4 * 6
    seq = _sequential(tiny_cfg, GLOBAL).generate(tiny_params, text, key, num_blocks=6)
    ctx = np.random.default_rng(11).standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)).astype(np.float32)
    # the public one-call API, from raw prompt embeddings
    out = bcjax.generate(tiny_cfg, tiny_params, jnp.asarray(ctx), key, num_blocks=6, pcfg=GLOBAL, latent_hw=HW,
                         stagger="P1", mask="causal", mesh=mesh5)
    assert _max_err(out, seq) <= 1e-5


@pytest.mark.slow
def test_block_zero_is_the_same_under_every_schedule(tiny_cfg, tiny_params, text):
    key = jax.random.key(6)
    seq = _sequential(tiny_cfg, GLOBAL).generate(tiny_params, text, key, num_blocks=3)[:, :3]
    for schedule in ["sequential", "P1", "P2", "P4"]:
        out = _cascade(tiny_cfg, GLOBAL, schedule, "causal").generate(tiny_params, text, key, num_blocks=3)
        assert _max_err(out[:, :3], seq) <= 1e-5, schedule
    # Bidirectional: block 0 also attends to newer blocks once they enter, which under P1 is
    # only after its x0 is out; under P2/P4 it sees them while denoising (by design).
    p1 = _cascade(tiny_cfg, GLOBAL, "P1", "bidirectional").generate(tiny_params, text, key, num_blocks=3)
    assert _max_err(p1[:, :3], seq) <= 1e-5
    p4 = _cascade(tiny_cfg, GLOBAL, "P4", "bidirectional").generate(tiny_params, text, key, num_blocks=3)
    assert _max_err(p4[:, :3], seq) > 1e-3


@pytest.mark.slow
def test_noise_depends_only_on_seed_block_and_step(tiny_cfg, tiny_params, text, mesh5):
    """With the flow head zeroed the sampler is x_{k+1} = (1 - s_{k+1}) x_k + s_{k+1} eps(b, k+1):
    every block's output is a closed form of block_noise(key, b, 0..n-1), whatever the
    schedule, slot, tick or device that processed it."""
    zero = jax.tree_util.tree_map(lambda a: a, tiny_params)
    zero["head"] = jax.tree_util.tree_map(jnp.zeros_like, tiny_params["head"])
    pcfg, nb, key = GLOBAL, 6, jax.random.key(9)
    shape = (1, pcfg.block_frames, *HW, tiny_cfg.in_channels)
    expected = []
    for b in range(nb):
        x = np.asarray(block_noise(key, b, 0, shape))
        for k in range(1, pcfg.num_steps):
            s = pcfg.sigmas[k]
            x = (1 - s) * x + s * np.asarray(block_noise(key, b, k, shape))
        expected.append(x)
    expected = np.concatenate(expected, axis=1)
    for schedule, mesh in [("P4", None), ("P2", None), ("P4", mesh5), ("P2", mesh5)]:
        out = _cascade(tiny_cfg, pcfg, schedule, "bidirectional", mesh=mesh).generate(zero, text, key, num_blocks=nb)
        assert _max_err(out, expected) <= 1e-5, (schedule, mesh)


@pytest.mark.parametrize("window,changes", [("causal", False), ("bidirectional", True)])
def test_perturbing_a_newer_block(tiny_cfg, tiny_params, text, window, changes):
    """Mid-stream P4 tick: perturb the block in stage 1; blocks in stages 2, 3, 4 (older) must not
    move under the causal window, and must under the bidirectional one."""
    cas = _cascade(tiny_cfg, ROLLING, "P4", window)
    key, nb = jax.random.key(1), jnp.int32(20)
    state = cas.tick_program.init_state(1)
    step = cas.lower(tiny_params, text, key, nb, state).compile()
    for _ in range(7):  # pipeline full, cache rolling
        state, _ = step(tiny_params, text, key, nb, state)
    slots = jnp.arange(cas.plan.num_slots)
    stages = (int(state.tick) - slots) % cas.plan.num_slots  # P4, stride 1: stage of each slot
    newer = int(jnp.argmax(stages == 1))
    bumped = state._replace(x=state.x.at[newer].add(0.5))
    run = jax.jit(lambda s: tick(cas.tick_program.spec, tiny_params, text, key, nb, s))
    (a, (ea, _)), (b, (eb, _)) = run(state), run(bumped)
    stages = np.asarray(stages)
    assert sorted(stages) == [0, 1, 2, 3, 4]
    # stage 2 re-noises its x0, stage 3 emits its x0, stage 4 writes its clean K/V
    moved = max(_max_err(a.x[stages == 2], b.x[stages == 2]), _max_err(ea, eb), _max_err(a.cache.k, b.cache.k))
    if changes:
        assert moved > 1e-3
    else:
        assert moved == 0.0
    assert _max_err(a.x[newer], b.x[newer]) > 1e-3  # the perturbed block itself moved


def test_stream_equals_scan_and_never_recompiles(tiny_cfg, tiny_params, text):
    cas = _cascade(tiny_cfg, ROLLING, "P4", "bidirectional")
    key = jax.random.key(12)
    whole = cas.generate(tiny_params, text, key, num_blocks=8)
    stream = cas.blocks(tiny_params, text, key, num_blocks=None)  # endless stream
    got = [next(stream)]  # compiles the tick once
    with CompileCounter() as cc:
        while len(got) < 20:  # 20 blocks, 24 ticks: cache full and rolling
            got.append(next(stream))
    assert cc.count == 0, f"{cc.count} recompiles while streaming"
    assert [b for b, _ in got] == list(range(20))
    streamed = jnp.concatenate([x for _, x in got[:8]], axis=1)
    # A block only ever sees blocks that entered by its emit tick, so blocks 0-4 agree with the
    # 8-block scan; blocks 5-7 of the scan saw fewer newer blocks (drain), the stream saw 8, 9, ...
    assert _max_err(streamed[:, :15], whole[:, :15]) <= 1e-5
    assert _max_err(streamed[:, 15:], whole[:, 15:]) > 1e-3


@pytest.mark.parametrize("schedule", ["P2", "P4"])
def test_finite_stream_equals_scan(tiny_cfg, tiny_params, text, schedule):
    cas = _cascade(tiny_cfg, ROLLING, schedule, "bidirectional")
    key = jax.random.key(13)
    whole = cas.generate(tiny_params, text, key, num_blocks=5)
    got = list(cas.blocks(tiny_params, text, key, num_blocks=5))
    assert [b for b, _ in got] == [0, 1, 2, 3, 4]
    assert _max_err(jnp.concatenate([x for _, x in got], axis=1), whole) <= 1e-5


def test_bad_mesh_and_flags_are_named(tiny_cfg, mesh5):
    from jax.sharding import Mesh

    with pytest.raises(ValueError, match="mask 'sideways'"):
        shared.runner(tiny_cfg, GLOBAL, HW, "P4", "sideways", program="tick")
    with pytest.raises(ValueError, match="stagger 'P4x'"):
        shared.runner(tiny_cfg, GLOBAL, HW, "P4x", "causal", program="tick")
    with pytest.raises(ValueError, match="no 'tokens' axis"):
        shared.runner(tiny_cfg, GLOBAL, HW, mesh=Mesh(np.asarray(jax.devices()[:5]), ("data",)), program="tick")
    with pytest.raises(ValueError, match="'model' = 5 must divide num_heads = 2 and ffn_dim = 128"):
        shared.runner(tiny_cfg, GLOBAL, HW, mesh=make_mesh(1, 5), program="tick")
    with pytest.raises(ValueError, match="needs 15 devices"):
        make_mesh(5, 3)


@pytest.mark.slow
def test_given_context_blocks_continue_exactly(tiny_cfg, tiny_params, text, mesh5):
    """Image-to-video / continuation: given blocks prefilled by the clean pass, then generation from
    the next block id. A prefilled cache equals the one the pipeline wrote while generating those
    blocks; P1-causal after context == sequential after context; sharded == batched."""
    key = jax.random.key(5)
    pipe = _sequential(tiny_cfg, ROLLING)
    full = pipe.generate(tiny_params, text, key, num_blocks=6)
    given = full[:, :6]  # blocks 0, 1 as context; the rest continue them
    cont = pipe.generate(tiny_params, text, key, num_blocks=4, context=given)
    assert cont.shape == (1, 12, *HW, tiny_cfg.in_channels)
    assert _max_err(cont, full[:, 6:]) <= 1e-5  # same noise (block ids are absolute), same cache
    p1 = _cascade(tiny_cfg, ROLLING, "P1", "causal").generate(tiny_params, text, key, num_blocks=4, context=given)
    assert _max_err(p1, cont) <= 1e-5
    for window in ("causal", "bidirectional"):
        batched = _cascade(tiny_cfg, ROLLING, "P4", window).generate(tiny_params, text, key, num_blocks=4,
                                                                     context=given)
        sharded = _cascade(tiny_cfg, ROLLING, "P4", window, mesh=mesh5).generate(tiny_params, text, key, num_blocks=4,
                                                                                 context=given)
        assert _max_err(batched, sharded) <= 1e-5
        assert _max_err(batched, cont) > 1e-4  # a real cascade, not the sequential result again
    cas = _cascade(tiny_cfg, ROLLING, "P4", "bidirectional")
    ids = [b for b, _ in cas.blocks(tiny_params, text, key, num_blocks=4, context=given)]
    assert ids == [2, 3, 4, 5]
    with pytest.raises(ValueError, match="context frames must be"):
        pipe.generate(tiny_params, text, key, num_blocks=2, context=given[:, :4])
