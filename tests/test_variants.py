"""The training-free tick variants: the restricted bidirectional windows and the cascade without
a clean pass (P4-no-clean), against the sequential pipeline, across devices, and streamed."""

import dataclasses

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

HW = (4, 6)
GLOBAL = PipelineConfig(window_frames=21)
ROLLING = PipelineConfig(window_frames=9, sink_frames=3)  # sink 3 + rolling 3 + the block's 3
VARIANTS = [("P4", "bidirectional-clean-causal"), ("P4", "bidirectional-windowed"), ("P4-no-clean", "causal"),
            ("P4-no-clean", "bidirectional"), ("P4-no-clean", "bidirectional-windowed")]


@pytest.fixture(scope="module")
def text(tiny_cfg, tiny_params):
    ctx = np.random.default_rng(11).standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)).astype(np.float32)
    return text_kv(tiny_cfg, tiny_params, jnp.asarray(ctx))


def _cascade(cfg, pcfg, schedule, window, mesh=None):
    """The run's runner of this configuration (tests/shared.py: compiled once for every test)."""
    return shared.runner(cfg, pcfg, HW, schedule, window, mesh=mesh, program="tick")


def _sequential(cfg, pcfg):
    return shared.runner(cfg, pcfg, HW, program="block")


def _max_err(a, b):
    return float(jnp.abs(jnp.asarray(a) - jnp.asarray(b)).max())


def _last_pass(pcfg):
    return dataclasses.replace(pcfg, context="last-pass")


@pytest.mark.slow
@pytest.mark.parametrize("pcfg", [GLOBAL, ROLLING], ids=["global", "sink+rolling"])
def test_p1_no_clean_is_the_sequential_pipeline_without_the_clean_pass(tiny_cfg, tiny_params, text, pcfg):
    key = jax.random.key(2)
    seq = _sequential(tiny_cfg, _last_pass(pcfg)).generate(tiny_params, text, key, num_blocks=7)
    cas = _cascade(tiny_cfg, pcfg, "P1-no-clean", "causal")
    assert cas.plan.in_flight == 1 and cas.plan.num_stages == 4 and cas.pcfg.context == "last-pass"
    out = cas.generate(tiny_params, text, key, num_blocks=7)
    assert out.shape == seq.shape == (1, 21, *HW, tiny_cfg.in_channels)
    assert _max_err(out, seq) <= 1e-5
    # the same cascade, named by the sampler instead of the schedule
    assert _max_err(_cascade(tiny_cfg, _last_pass(pcfg), "P1", "bidirectional").generate(tiny_params, text, key,
                                                                                         num_blocks=7),
                    seq) <= 1e-5
    # a different sampler: block 0 is the same (no cache yet), later blocks see a t_0 cache entry
    clean = _sequential(tiny_cfg, pcfg).generate(tiny_params, text, key, num_blocks=7)
    assert _max_err(clean[:, :3], seq[:, :3]) <= 1e-5 and _max_err(clean[:, 3:], seq[:, 3:]) > 1e-4


@pytest.mark.slow
def test_p1_clean_causal_is_the_sequential_pipeline(tiny_cfg, tiny_params, text):
    """Under P1 the only newer block a bidirectional row sees is the next block's first step, seen
    by the clean stage; with the clean stage causal, P1 is the sequential pipeline again."""
    key = jax.random.key(3)
    seq = _sequential(tiny_cfg, ROLLING).generate(tiny_params, text, key, num_blocks=5)
    out = _cascade(tiny_cfg, ROLLING, "P1", "bidirectional-clean-causal").generate(tiny_params, text, key, num_blocks=5)
    assert _max_err(out, seq) <= 1e-5
    bi = _cascade(tiny_cfg, ROLLING, "P1", "bidirectional").generate(tiny_params, text, key, num_blocks=5)
    assert _max_err(bi, seq) > 1e-4


def test_sequential_without_the_clean_pass_steps_four_stages(tiny_cfg, tiny_params, text):
    pipe = shared.runner(tiny_cfg, _last_pass(ROLLING), HW, "sequential")
    assert pipe.kind == "block"
    state = pipe.start(tiny_params, text, jax.random.key(1), num_blocks=2)
    _, out = pipe.step(tiny_params, text, state)
    assert out.stages == ((0, 0), (0, 1), (0, 2), (0, 3))


@pytest.mark.slow
@pytest.mark.parametrize("devices", [2, 4])
@pytest.mark.parametrize("window", ["causal", "bidirectional"])
def test_p4_no_clean_on_2_and_4_devices_equals_one(tiny_cfg, tiny_params, text, devices, window):
    if jax.device_count() < devices:
        pytest.skip(f"needs {devices} devices")
    key = jax.random.key(4)
    one = _cascade(tiny_cfg, ROLLING, "P4-no-clean", window)
    assert one.plan.in_flight == 4
    ref = one.generate(tiny_params, text, key, num_blocks=6)
    cas = _cascade(tiny_cfg, ROLLING, "P4-no-clean", window, make_mesh(devices))
    assert cas.tick_program.spec.split.padded_tokens == cas.tick_program.spec.split.tokens  # 4 blocks: no padding group
    assert _max_err(cas.generate(tiny_params, text, key, num_blocks=6), ref) <= 1e-5
    # a real cascade, not the clean-pass P4 again
    assert _max_err(_cascade(tiny_cfg, ROLLING, "P4", window).generate(tiny_params, text, key, num_blocks=6),
                    ref) > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("schedule,window", VARIANTS)
def test_every_variant_generates_and_streams_with_no_recompile(tiny_cfg, tiny_params, text, schedule, window):
    cas = shared.runner(tiny_cfg, ROLLING, HW, schedule, window)
    key = jax.random.key(13)
    whole = cas.generate(tiny_params, text, key, num_blocks=5)
    state = cas.start(tiny_params, text, key, num_blocks=5)
    state, first = cas.step(tiny_params, text, state)  # compiles the tick once
    got = [first] if first.block >= 0 else []
    with CompileCounter() as cc:
        while not cas.done(state):
            state, out = cas.step(tiny_params, text, state)
            if out.block >= 0:
                got.append(out)
    assert cc.count == 0, f"{cc.count} recompiles while stepping {schedule} {window}"
    assert [o.block for o in got] == [0, 1, 2, 3, 4]
    assert _max_err(jnp.concatenate([o.x0 for o in got], axis=1), whole) <= 1e-5
    assert bool(jnp.all(jnp.isfinite(whole)))


def _mid_stream(tiny_cfg, tiny_params, text, schedule, window, bump_stage, ticks=7):
    """A full, rolling P4 tick run twice, once with the block in `bump_stage` perturbed.
    Returns (stages [M], tick outputs, perturbed tick outputs)."""
    cas = _cascade(tiny_cfg, ROLLING, schedule, window)
    key, nb = jax.random.key(1), jnp.int32(20)
    state = cas.tick_program.init_state(1)
    step = cas.lower(tiny_params, text, key, nb, state).compile()
    for _ in range(ticks):
        state, _ = step(tiny_params, text, key, nb, state)
    m = cas.plan.num_slots
    stages = np.asarray((int(state.tick) - np.arange(m)) % m)  # stride 1: the stage of each slot
    bumped = state._replace(x=state.x.at[int(np.argmax(stages == bump_stage))].add(0.5))
    run = jax.jit(lambda s: tick(cas.tick_program.spec, tiny_params, text, key, nb, s))
    return stages, run(state), run(bumped)


@pytest.mark.parametrize("window,cache_moves", [("bidirectional", True), ("bidirectional-clean-causal", False)])
def test_clean_causal_cache_entry_ignores_newer_blocks(tiny_cfg, tiny_params, text, window, cache_moves):
    """Perturb the block in stage 1: under clean-causal the clean stage's K/V (the cache it writes)
    do not move, while the denoising stages still see the newer block (bidirectional)."""
    stages, (a, _), (b, _) = _mid_stream(tiny_cfg, tiny_params, text, "P4", window, bump_stage=1)
    assert sorted(stages) == [0, 1, 2, 3, 4]
    assert (_max_err(a.cache.k, b.cache.k) > 1e-3) == cache_moves
    assert _max_err(a.x[stages == 2], b.x[stages == 2]) > 1e-3


@pytest.mark.parametrize("window,far_moves", [("bidirectional", True), ("bidirectional-windowed", False)])
def test_windowed_query_does_not_reach_past_the_models_window(tiny_cfg, tiny_params, text, window, far_moves):
    """ROLLING's window is 9 frames (sink 3 + 6): a windowed query sees its block and one newer
    block, so a change reaches one block further back per layer. Perturb the block in stage 1
    (stage 0 starts from pure noise): the block one older (stage 2) moves; the block three older
    (stage 4, the clean pass) writes K/V from the hidden states entering each of the 2 layers,
    which no change two blocks away reaches, so the cache does not move. Under the plain
    bidirectional window it does."""
    assert tiny_cfg.num_layers == 2
    stages, (a, _), (b, _) = _mid_stream(tiny_cfg, tiny_params, text, "P4", window, bump_stage=1)
    assert _max_err(a.x[stages == 2], b.x[stages == 2]) > 1e-3
    far = _max_err(a.cache.k, b.cache.k)
    assert (far > 1e-3) == far_moves
    if not far_moves:
        assert far == 0.0


def test_no_clean_is_refused_for_krea_rebuilt_context(tiny_cfg):
    import ports

    with pytest.raises(ValueError, match="stagger 'P4-no-clean' has no clean stage"):
        shared.runner(tiny_cfg, ports.get("krea_14b").pipeline, HW, "P4-no-clean", program="tick")


def test_bench_flops_per_block_of_every_variant():
    """`bcjax bench cascade`'s FLOPs per emitted block (480 x 832, the 1.3B model): the causal and
    windowed rows see the model's window, as sequential; no clean pass is one pass in five less."""
    import ports
    from bcjax.bench.cascade import _variant_table
    from bcjax.model import WanConfig

    f = _variant_table(WanConfig.preset("wan2.1-1.3b"), ports.get("self_forcing").pipeline, 1560)
    seq = f["sequential"]
    assert f["sequential-no-clean"] == pytest.approx(0.8 * seq)
    for sched in ("P1", "P2", "P4"):
        assert f[f"{sched} causal"] == pytest.approx(seq) and f[f"{sched} bidirectional-windowed"] == pytest.approx(seq)
    assert f["P4 causal"] < f["P4 bidirectional-clean-causal"] < f["P4 bidirectional"]
    assert f["P4-no-clean causal"] == pytest.approx(0.8 * seq) == f["P4-no-clean bidirectional-windowed"]
