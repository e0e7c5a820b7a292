"""The recache policy is LongLive v1.0's `_recache_after_switch`: which frames are
recomputed, which are stored, what the sink holds after the switch, and that the pass has no
causal mask; a whole interactive stream equals a frame-by-frame restatement of LongLive's
KV-cache bookkeeping (tests/longlive_reference.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shared
from longlive_reference import interactive

from bcjax.app.interactive import stream
from bcjax.model import text_kv
from bcjax.model.wan import KV, forward
from bcjax.pipeline import PipelineConfig
from bcjax.pipeline.recache import gather_frames, recache_frames
from bcjax.pipeline.recache import recache as _recache

HW = (4, 6)
LONGLIVE = PipelineConfig(window_frames=12, sink_frames=3)  # local_attn_size 12, sink_size 3
NO_SINK = PipelineConfig(window_frames=12, sink_frames=0)
recache = jax.jit(_recache, static_argnums=(0, 1), static_argnames="causal")
forward = jax.jit(forward, static_argnums=0)


@pytest.fixture(scope="module")
def texts(tiny_cfg, tiny_params):
    rng = np.random.default_rng(12)
    return [text_kv(tiny_cfg, tiny_params,
                        jnp.asarray(rng.standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)), jnp.float32))
            for _ in range(2)]


def _generate(pipe, params, text, key, n):
    """(cache after n blocks, {block: x0})"""
    cache, blocks = pipe.block_program.init_cache(1), {}
    for b in range(n):
        cache, x0 = pipe.block_program._block_fn(params, text, cache, key, jnp.int32(b))
        blocks[b] = np.asarray(x0)
    return cache, blocks


def _frame_kv(cache, frame):
    """k, v [L, B, P, N, H] of the slot holding `frame`."""
    slot = int(np.flatnonzero(np.asarray(cache.frame_ids) == frame)[0])
    p = cache.tokens_per_frame
    return np.asarray(cache.k[:, :, slot * p:(slot + 1) * p]), np.asarray(cache.v[:, :, slot * p:(slot + 1) * p])


def test_frames_recomputed_and_stored():
    ids, stored, old = recache_frames(15, 12, 3, xp=np)
    assert list(ids) == list(range(3, 15)) and bool(old)  # s > W: s-12 .. s-1, old sink kept
    assert list(ids[stored]) == list(range(6, 15))  # s-9 .. s-1 stored; s-12 .. s-10 computed only
    ids, stored, old = recache_frames(12, 12, 3, xp=np)
    assert list(ids[stored]) == list(range(12)) and not bool(old)  # s <= W: everything, the sink included
    ids, stored, old = recache_frames(6, 12, 3, xp=np)
    assert list(ids[stored]) == list(range(6)) and not bool(old) and (ids[~stored] < 0).all()
    ids, stored, old = recache_frames(15, 12, 0, xp=np)
    assert list(ids[stored]) == list(range(3, 15)) and bool(old)  # no sink: all twelve stored


def _recached(cfg, params, pcfg, text, blocks, cache, s, causal=False):
    frames = gather_frames(blocks, s, pcfg.window_frames, pcfg.block_frames, blocks[0])
    return recache(cfg, pcfg, params, text, jnp.asarray(frames), jnp.int32(s), cache, causal=causal), frames


@pytest.mark.slow
def test_past_the_window_the_sink_keeps_the_old_prompt(tiny_cfg, tiny_params, texts):
    """s = 15 > 12: sink K/V untouched; the stored frames are one bidirectional pass over frames
    6..14 that also attends to the OLD sink K/V (frames 3..5 are not keys)."""
    pipe = shared.runner(tiny_cfg, LONGLIVE, HW, program="block")
    cache, blocks = _generate(pipe, tiny_params, texts[0], jax.random.key(1), 5)
    new, frames = _recached(tiny_cfg, tiny_params, LONGLIVE, texts[1], blocks, cache, 15)
    assert sorted(np.asarray(new.frame_ids).tolist()) == [0, 1, 2, 9, 10, 11, 12, 13, 14]
    for f in range(3):
        for got, old in zip(_frame_kv(new, f), _frame_kv(cache, f), strict=True):
            np.testing.assert_array_equal(got, old)
    # oracle: a plain forward of frames 6..14 under the new prompt with the old sink as context, no mask
    p = cache.tokens_per_frame
    sink = KV(cache.k[:, :, :3 * p], cache.v[:, :, :3 * p])
    _, kv = forward(tiny_cfg, tiny_params, jnp.asarray(frames[:, 3:]), jnp.zeros((1, 9)), texts[1], jnp.arange(6, 15),
                    sink)
    for f in range(9, 15):
        i = f - 6
        np.testing.assert_allclose(_frame_kv(new, f)[0], np.asarray(kv.k[:, :, i * p:(i + 1) * p]), atol=2e-5)
        np.testing.assert_allclose(_frame_kv(new, f)[1], np.asarray(kv.v[:, :, i * p:(i + 1) * p]), atol=2e-5)
    # frames 3..5 are computed but nobody reads them; the old sink is read
    moved = frames.copy()
    moved[:, :3] += 5.0
    again = recache(tiny_cfg, LONGLIVE, tiny_params, texts[1], jnp.asarray(moved), jnp.int32(15), cache)
    np.testing.assert_allclose(np.asarray(again.k), np.asarray(new.k), atol=1e-6)
    poked = cache._replace(k=cache.k.at[:, :, :3 * p].multiply(1.5))
    third = recache(tiny_cfg, LONGLIVE, tiny_params, texts[1], jnp.asarray(frames), jnp.int32(15), poked)
    assert np.abs(_frame_kv(third, 12)[1] - _frame_kv(new, 12)[1]).max() > 1e-4


def test_inside_the_window_everything_is_rewritten(tiny_cfg, tiny_params, texts):
    """s = 9 <= 12: frames 0..8 re-run together, the sink included, no old K/V read."""
    pipe = shared.runner(tiny_cfg, LONGLIVE, HW, program="block")
    cache, blocks = _generate(pipe, tiny_params, texts[0], jax.random.key(2), 3)
    new, frames = _recached(tiny_cfg, tiny_params, LONGLIVE, texts[1], blocks, cache, 9)
    _, kv = forward(tiny_cfg, tiny_params, jnp.asarray(frames[:, 3:]), jnp.zeros((1, 9)), texts[1], jnp.arange(9))
    p = cache.tokens_per_frame
    for f in range(9):
        if f in (3, 4, 5):
            continue  # evicted by the ring (sink 3 + 6 rolling slots), as LongLive's next roll evicts them
        np.testing.assert_allclose(_frame_kv(new, f)[0], np.asarray(kv.k[:, :, f * p:(f + 1) * p]), atol=2e-5)
    assert np.abs(_frame_kv(new, 0)[0] - _frame_kv(cache, 0)[0]).max() > 1e-3  # the sink is new


def test_the_pass_has_no_causal_mask(tiny_cfg, tiny_params, texts):
    """Moving the newest frame changes an older frame's recached K/V under "recache", not under
    "recache-causal"."""
    pipe = shared.runner(tiny_cfg, LONGLIVE, HW, program="block")
    cache, blocks = _generate(pipe, tiny_params, texts[0], jax.random.key(3), 5)
    frames = gather_frames(blocks, 15, 12, 3, blocks[0])
    moved = frames.copy()
    moved[:, -3:] += 1.0
    for causal, changes in ((False, True), (True, False)):
        a = recache(tiny_cfg, LONGLIVE, tiny_params, texts[1], jnp.asarray(frames), jnp.int32(15), cache, causal=causal)
        b = recache(tiny_cfg, LONGLIVE, tiny_params, texts[1], jnp.asarray(moved), jnp.int32(15), cache, causal=causal)
        delta = np.abs(_frame_kv(a, 9)[0] - _frame_kv(b, 9)[0]).max()
        assert (delta > 1e-4) == changes, (causal, delta)


def test_causal_recache_with_the_same_prompt_rebuilds_the_cache(tiny_cfg, tiny_params, texts):
    """The block-causal variant re-derives what the clean passes wrote (inside the window)."""
    pipe = shared.runner(tiny_cfg, LONGLIVE, HW, program="block")
    cache, blocks = _generate(pipe, tiny_params, texts[0], jax.random.key(4), 4)
    again, _ = _recached(tiny_cfg, tiny_params, LONGLIVE, texts[0], blocks, cache, 12, causal=True)
    np.testing.assert_array_equal(np.asarray(again.frame_ids), np.asarray(cache.frame_ids))
    np.testing.assert_allclose(np.asarray(again.k), np.asarray(cache.k), atol=2e-5)
    np.testing.assert_allclose(np.asarray(again.v), np.asarray(cache.v), atol=2e-5)
    bidir, _ = _recached(tiny_cfg, tiny_params, LONGLIVE, texts[0], blocks, cache, 12)
    assert np.abs(np.asarray(bidir.k) - np.asarray(cache.k)).max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("pcfg,switch_at", [(LONGLIVE, 5), (LONGLIVE, 2), (NO_SINK, 5)],
                         ids=["s15", "s6", "nosink-s15"])
def test_stream_equals_longlive_bookkeeping(tiny_cfg, tiny_params, texts, pcfg, switch_at):
    key = jax.random.key(5)
    pipe = shared.runner(tiny_cfg, pcfg, HW, program="block")
    n = 8
    plain = np.concatenate([e.x0 for e in stream(pipe, tiny_params, [(0, texts[0])], key, n)], axis=1)
    ref_plain = interactive(tiny_cfg, tiny_params, pcfg, texts, {}, key, n, HW)
    np.testing.assert_allclose(plain, ref_plain, atol=2e-5)  # the restatement is the plain pipeline too
    sched = [(0, texts[0]), (switch_at, texts[1])]
    got = np.concatenate([e.x0 for e in stream(pipe, tiny_params, sched, key, n, policy="recache")], axis=1)
    ref = interactive(tiny_cfg, tiny_params, pcfg, texts, {switch_at: 1}, key, n, HW)
    err = np.abs(got - ref).max()
    print(f"recache vs LongLive bookkeeping, switch at block {switch_at}: max abs {err:.2e}")
    assert err < 2e-5
    # the old policy's difference (cache-held frames only, block-causal, sink recomputed) was ~1e-2
    causal = np.concatenate([e.x0 for e in stream(pipe, tiny_params, sched, key, n, policy="recache-causal")], axis=1)
    assert np.abs(causal - ref).max() > 1e-4
