"""Prompt switching: no retrace, the recache pass, and the two policies in both pipelines."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shared

from bcjax.app.interactive import parse_prompt_schedule, stream
from bcjax.cascade import make_mesh
from bcjax.compile_count import CompileCounter
from bcjax.model import text_kv
from bcjax.pipeline import PipelineConfig
from bcjax.pipeline.recache import POLICIES

HW = (4, 6)
GLOBAL = PipelineConfig(window_frames=21)
ROLLING = PipelineConfig(window_frames=9, sink_frames=3)


@pytest.fixture(scope="module")
def texts(tiny_cfg, tiny_params):
    rng = np.random.default_rng(21)
    return [text_kv(tiny_cfg, tiny_params,
                        jnp.asarray(rng.standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)), jnp.float32))
            for _ in range(2)]


def _run(runner, params, schedule, key, n, **kw):
    return list(stream(runner, params, schedule, key, n, **kw))


def _cat(events):
    return np.concatenate([e.x0 for e in events], axis=1)


def test_schedule_parsing_names_the_problem():
    assert parse_prompt_schedule("a red fox@0; a wolf@4;snow@9") == [(0, "a red fox"), (4, "a wolf"), (9, "snow")]
    assert parse_prompt_schedule("just one prompt") == [(0, "just one prompt")]
    with pytest.raises(ValueError, match="must start at block 0"):
        parse_prompt_schedule("a@2;b@5")
    with pytest.raises(ValueError, match="strictly increase"):
        parse_prompt_schedule("a@0;b@5;c@5")
    with pytest.raises(ValueError, match="expected 'TEXT@BLOCK'"):
        parse_prompt_schedule("a@0;b")


def test_sequential_switch_policies(tiny_cfg, tiny_params, texts):
    pipe = shared.runner(tiny_cfg, ROLLING, HW, program="block")
    key = jax.random.key(4)
    a_only = _cat(_run(pipe, tiny_params, [(0, texts[0])], key, 6))
    no_rc = _run(pipe, tiny_params, [(0, texts[0]), (3, texts[1])], key, 6)
    assert [e.prompt for e in no_rc] == [0, 0, 0, 1, 1, 1] and all(e.recache_s == 0 for e in no_rc)
    got = _cat(no_rc)
    np.testing.assert_allclose(got[:, :9], a_only[:, :9], atol=1e-6)  # before the switch: prompt a
    # after: the same compiled block function, only the text changed (== a manual loop)
    cache = pipe.block_program.init_cache(1)
    manual = []
    for b in range(6):
        cache, x0 = pipe.block_program._block_fn(tiny_params, texts[0 if b < 3 else 1], cache, key, jnp.int32(b))
        manual.append(np.asarray(x0))
    np.testing.assert_allclose(got, np.concatenate(manual, axis=1), atol=1e-6)
    rc = _run(pipe, tiny_params, [(0, texts[0]), (3, texts[1])], key, 6, policy="recache")
    assert rc[3].recache_s > 0 and all(e.recache_s == 0 for i, e in enumerate(rc) if i != 3)
    rc = _cat(rc)
    np.testing.assert_allclose(rc[:, :9], a_only[:, :9], atol=1e-6)
    assert np.abs(rc[:, 9:] - got[:, 9:]).max() > 1e-4  # the rebuilt cache changes what follows


@pytest.mark.slow
@pytest.mark.parametrize("policy", POLICIES)
def test_switching_never_retraces(tiny_cfg, tiny_params, texts, policy):
    for runner in (shared.runner(tiny_cfg, ROLLING, HW, program="block"), shared.runner(tiny_cfg, ROLLING, HW, "P4",
                                                                                    "bidirectional", program="tick")):
        key = jax.random.key(5)
        sched = [(0, texts[0]), (3, texts[1]), (5, texts[0]), (8, texts[1])]
        _run(runner, tiny_params, sched[:2], key, 5, policy=policy)  # compiles block/tick and recache once
        with CompileCounter() as cc:
            events = _run(runner, tiny_params, sched, key, 11, policy=policy)
        assert cc.count == 0, f"{runner.label}: {cc.count} recompiles over 3 switches"
        assert [e.block for e in events] == list(range(11))


@pytest.mark.slow
def test_p1_causal_with_recache_is_the_sequential_recache(tiny_cfg, tiny_params, texts, mesh5=None):
    """With a global window the cascade's block-causal recache (before the tick the new prompt's
    block enters, while its predecessor takes its clean pass under the new prompt) rebuilds
    exactly what the sequential pipeline's does, so P1-causal still equals sequential. (LongLive's
    bidirectional recache lets older frames see that predecessor, which a P1 tick cannot yet.)"""
    key = jax.random.key(6)
    sched = [(0, texts[0]), (3, texts[1])]
    seq = _cat(_run(shared.runner(tiny_cfg, GLOBAL, HW, program="block"), tiny_params, sched, key, 6,
                    policy="recache-causal"))
    p1 = _cat(_run(shared.runner(tiny_cfg, GLOBAL, HW, "P1", "causal", program="tick"), tiny_params, sched, key, 6,
                   policy="recache-causal"))
    np.testing.assert_allclose(p1, seq, atol=1e-5)


@pytest.mark.slow
def test_sharded_cascade_switch_equals_batched(tiny_cfg, tiny_params, texts):
    if jax.device_count() < 5:
        pytest.skip("needs 5 devices")
    key = jax.random.key(7)
    sched = [(0, texts[0]), (4, texts[1])]
    for policy in POLICIES:
        one = _cat(_run(shared.runner(tiny_cfg, ROLLING, HW, "P4", "bidirectional", program="tick"), tiny_params, sched,
                        key, 7,
                        policy=policy))
        five = _cat(_run(shared.runner(tiny_cfg, ROLLING, HW, "P4", "bidirectional", make_mesh(5), program="tick"),
                         tiny_params, sched, key,
                         7, policy=policy))
        np.testing.assert_allclose(five, one, atol=1e-5)
