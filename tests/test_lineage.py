"""The lineage toy world: switched streams' truth, switch adherence, the base's sampler, the
student's training layouts against the inference pipeline, and the newer-frames masks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.model.wan import init_params, text_kv
from bcjax.toyworld import lineage, lookahead
from bcjax.toyworld.evaluate import (
    block_metrics,
    check_pipeline,
    eval_streams,
    load_model,
    model_path,
    switch_metrics,
)
from bcjax.toyworld.train import TrainConfig, toy_model_config, toy_pipeline_config
from bcjax.toyworld.world import (
    DIRECTIONS,
    SPEEDS,
    Sprite,
    WorldConfig,
    check_switch,
    parse_prompt,
    positions,
    prompt_embedding,
    render,
    render_stream,
    sample_scene,
    switch_positions,
    switch_scene,
)

WORLD = WorldConfig(size=12, max_sprites=1)  # lineage-3f's world: 3-frame blocks, one step per block


def test_a_switched_stream_continues_from_where_the_sprite_was():
    scene = (Sprite("red", "east", "slow", 4, 2),)
    new = (Sprite("blue", "south", "fast", 0, 0),)  # corners ignored: the motion continues
    pos = switch_positions([(0, scene), (3, new)], 7 * 3, WORLD)
    np.testing.assert_array_equal(pos[:9], positions(scene, 9, WORLD))
    last = pos[8, 0]
    np.testing.assert_array_equal(pos[9, 0], last + np.array([SPEEDS["fast"], 0]))  # one world step at block 3
    np.testing.assert_array_equal(pos[9:12], np.repeat(pos[9:10], 3, axis=0))  # static inside a block
    frames = render_stream([(0, scene), (3, new)], 21, WORLD)
    assert (frames[8][pos[8, 0, 0], pos[8, 0, 1]] == 2.0 * np.array([1, -1, -1])).all()  # red before
    assert (frames[9][pos[9, 0, 0], pos[9, 0, 1]] == 2.0 * np.array([-1, -1, 1])).all()  # blue from block 3
    np.testing.assert_array_equal(render_stream([(0, scene)], 21, WORLD), render(scene, 21, WORLD))


def test_every_switch_shows_a_new_colour_and_a_move_the_old_prompt_would_not_make():
    for i in range(300):
        rng = np.random.default_rng(i)
        scene = sample_scene(rng, WORLD)
        at = int(rng.integers(1, 12))
        new = switch_scene(rng, scene, at, WORLD)
        assert new[0].colour != scene[0].colour
        old = switch_positions([(0, scene)], at * 3 + 1, WORLD)
        now = switch_positions([(0, scene), (at, new)], at * 3 + 1, WORLD)
        assert tuple(now[-1, 0]) != tuple(old[-1, 0]), (scene, new, at)
        assert new[0].direction in DIRECTIONS and isinstance(new[0].colour, str)


def test_a_switch_the_world_cannot_render_names_the_word_or_the_count():
    with pytest.raises(ValueError, match="'purple'"):
        parse_prompt("purple east fast", WORLD)
    with pytest.raises(ValueError, match="1 sprite"):
        check_switch(parse_prompt("red east fast", WORLD), parse_prompt("blue west slow, green east fast",
                                                                        WorldConfig(max_sprites=2)))


def test_switch_adherence_counts_the_blocks_until_the_new_prompt_shows():
    streams = eval_streams(WORLD, 3, every=4, num_blocks=10)
    assert [b for b, _ in streams[0]] == [0, 4, 8]
    truth = np.stack([render_stream(s, 11 * 3, WORLD) for s in streams])
    m = switch_metrics(truth, streams, WORLD)
    np.testing.assert_array_equal(m["adherence"], 0)
    np.testing.assert_array_equal(m["switch_colour"], 1)
    assert block_metrics(truth, streams, WORLD)["pos_err"].max() == 0
    # one block late: the first block after each switch still shows the old prompt's continuation
    late = truth.copy()
    for i, s in enumerate(streams):
        before = render_stream(s[:1], 11 * 3, WORLD)
        for at in (4, 8):
            late[i, at * 3:(at + 1) * 3] = before[at * 3:(at + 1) * 3] if at == 4 else render_stream(
                s[:2], 11 * 3, WORLD)[at * 3:(at + 1) * 3]
    m = switch_metrics(late, streams, WORLD)
    np.testing.assert_array_equal(m["adherence"], 1)
    # ignoring the switches: never follows (censored at the segment's length), colour always wrong
    still = np.stack([render_stream(s[:1], 11 * 3, WORLD) for s in streams])
    m = switch_metrics(still, streams, WORLD)
    np.testing.assert_array_equal(m["adherence"], [[4, 3]] * 3)
    np.testing.assert_array_equal(m["switch_colour"], 0)


def test_the_base_grid_threads_the_students_sigmas():
    pcfg = toy_pipeline_config(TrainConfig(context_blocks=2, sink_blocks=1), WORLD)
    grid = lineage.base_sigmas(20, pcfg.shift, pcfg.sigmas)
    assert grid[0] == 1.0 and grid[-1] == 0.0 and (np.diff(grid) < 0).all()
    for s in pcfg.sigmas:
        assert np.min(np.abs(grid - s)) < 1e-9


@pytest.fixture(scope="module")
def tiny():
    cfg = toy_model_config(WORLD, dim=32, ffn_dim=64, num_heads=1, num_layers=2)
    tcfg = TrainConfig(context_blocks=2, sink_blocks=1)
    pcfg = toy_pipeline_config(tcfg, WORLD)
    params = init_params(cfg, jax.random.key(3))
    return cfg, pcfg, params


def test_the_base_sampler_is_euler_on_the_flow_through_the_grid(tiny):
    cfg, pcfg, params = tiny
    scenes = [sample_scene(np.random.default_rng(i), WORLD) for i in range(2)]
    first = jnp.asarray(np.stack([render(s, 3, WORLD) for s in scenes]))
    text = text_kv(cfg, params, jnp.asarray(np.stack([prompt_embedding(s, WORLD) for s in scenes])))
    x0, states = lineage.base_sample(cfg, pcfg, params, text, first, 2, jax.random.key(0), 3)
    grid = lineage.base_sigmas(3, pcfg.shift, pcfg.sigmas)
    x = jax.random.normal(jax.random.key(0), (2, 6, 12, 12, 3), jnp.float32)
    seen = {}
    for s_now, s_next in zip(grid[:-1], grid[1:], strict=True):  # the restatement: a plain loop
        seen[round(float(s_now), 9)] = x
        x = x + (s_next - s_now) * lineage.base_flow(cfg, params, first, x, jnp.full((2,), s_now), text)
    np.testing.assert_allclose(x0, x, atol=1e-5)
    for i, s in enumerate(pcfg.sigmas):
        np.testing.assert_allclose(states[:, i], seen[round(float(s), 9)], atol=1e-5)


def test_the_students_training_mask_is_its_window_with_a_sink():
    m = np.asarray(lineage.causal_block_mask(6, 2, 1, 1))[0]
    want = np.array([[1, 0, 0, 0, 0, 0],
                     [1, 1, 0, 0, 0, 0],
                     [1, 1, 1, 0, 0, 0],
                     [1, 1, 1, 1, 0, 0],
                     [1, 0, 1, 1, 1, 0],
                     [1, 0, 0, 1, 1, 1]], bool)
    np.testing.assert_array_equal(m, want)


@pytest.mark.parametrize("j", [1, 3])
def test_the_stream_rollout_generates_what_the_pipeline_generates(tiny, j):
    """The trainer's rollout (one masked forward per pass, the cache spelled out as clean blocks)
    is the inference pipeline's sequential sampler with its KV cache, sink and rolling window
    (exactly while the context has evicted nothing, j <= rolling + 1)."""
    from bcjax.runners import make_runner

    cfg, pcfg, params = tiny
    clips, exists, jj, ctx = lineage.stream_clips(np.random.default_rng(7), WORLD, pcfg, 2, 2, 9, 0.0, 0.0, block=j)
    key = jax.random.key(11)
    _, gen = lineage.stream_rollout_x0(cfg, pcfg, 2, params, jnp.asarray(clips), jnp.asarray(exists), jnp.asarray(jj),
                                       jnp.asarray(ctx), key, jnp.zeros((2, 2), jnp.int32))
    # the pipeline: the truth's blocks 0 .. j-1 given (the sink, then the rolling blocks), two generated
    context = np.concatenate([clips[:, :3], clips[:, 3 + 3 * (3 - j):9]], axis=1)
    assert context.shape[1] == 3 * j and exists.tolist() == [[True, j >= 3, j >= 2]] * 2
    runner = make_runner(cfg, pcfg, (12, 12), "sequential")
    out = runner.generate(params, text_kv(cfg, params, jnp.asarray(ctx)), key, num_blocks=2,
                          context=jnp.asarray(context))
    np.testing.assert_allclose(np.asarray(out), np.asarray(gen), atol=2e-4)


@pytest.mark.parametrize("j", [1, 4])
def test_the_teacher_forced_targets_in_one_forward_do_not_see_each_other(tiny, j):
    """stream_targets_x0 with 3 targets in one forward: target r's prediction is the one it gets as
    the last of r + 1 targets (so targets see only the clean blocks before them, not each other);
    at j = 1 (no context yet) it is a single-target pass after the sink and the truth blocks before
    it, whose RoPE positions the forward keeps."""
    cfg, pcfg, params = tiny
    clips, exists, jj, ctx = lineage.stream_clips(np.random.default_rng(5), WORLD, pcfg, 2, 3, 9, 0.0, 0.0, block=j)
    clips, text, exists = jnp.asarray(clips), text_kv(cfg, params, jnp.asarray(ctx)), jnp.asarray(exists)
    record = jnp.asarray([[0, 2, 3], [1, 3, 0]], jnp.int32)
    x_in = clips[:, 9:] + 0.7 * jax.random.normal(jax.random.key(2), clips[:, 9:].shape)
    multi = lineage.stream_targets_x0(cfg, pcfg, params, text, clips[:, :9], clips[:, 9:15], x_in, record, exists,
                                      jnp.asarray(jj))
    for r in range(3):  # clip blocks: 0 the sink, 1-2 video j-2, j-1, 3-5 video j, j+1, j+2
        prefix = lineage.stream_targets_x0(cfg, pcfg, params, text, clips[:, :9], clips[:, 9:9 + 3 * r],
                                           x_in[:, :3 * (r + 1)], record[:, :r + 1], exists, jnp.asarray(jj))
        np.testing.assert_allclose(np.asarray(multi[:, 3 * r:3 * (r + 1)]), np.asarray(prefix[:, -3:]), atol=2e-5)
        if j == 1:
            context = jnp.concatenate([clips[:, :3], clips[:, 3 * (1 + r):3 * (3 + r)]], axis=1)
            one = lineage.stream_targets_x0(cfg, pcfg, params, text, context, x_in[:, :0],
                                            x_in[:, 3 * r:3 * (r + 1)], record[:, r:r + 1],
                                            jnp.asarray([[True, r >= 2, r >= 1]] * 2), jnp.asarray(1 + r, jnp.int32))
            np.testing.assert_allclose(np.asarray(multi[:, 3 * r:3 * (r + 1)]), np.asarray(one), atol=2e-5)
    assert float(jnp.abs(multi[:, :3] - multi[:, 3:6]).max()) > 1e-3  # the targets differ


def test_a_rollout_block_is_trained_on_the_truth_only_after_a_context_that_was_the_truth():
    """The gate of the stream-rollout loss: block k counts while every generated block before it
    is the world's (a sprite one patch off is not; a block's own error does not gate itself)."""
    scene = (Sprite("red", "east", "slow", 4, 2),)
    truth = render(scene, 9, WORLD)[None]  # three blocks of three frames
    off = render((Sprite("red", "east", "slow", 4, 4),), 9, WORLD)[None]  # the sprite one patch east
    gen = np.concatenate([truth[:, :3], off[:, 3:6], truth[:, 6:]], axis=1)  # block 1 drifted
    w = np.asarray(lineage.consistent_blocks(jnp.asarray(gen), jnp.asarray(truth), 3))
    assert w.tolist() == [[1.0, 1.0, 0.0]]
    err = float(np.mean((off[:, 3:6] - truth[:, 3:6]) ** 2))
    assert err > lineage.CONSISTENT_MSE > float(np.mean((0.05 * np.ones_like(truth)) ** 2))
    gen0 = np.concatenate([off[:, :3], truth[:, 3:]], axis=1)  # the first block drifted: nothing after counts
    w0 = np.asarray(lineage.consistent_blocks(jnp.asarray(gen0), jnp.asarray(truth), 3))
    assert w0.tolist() == [[1.0, 0.0, 0.0]]


def test_the_newer_frames_masks_differ_only_by_newer_in_flight_blocks():
    video = np.array([0, 4, 5, 6, 7, 8, 9, 10])
    is_cache = np.array([True, True, True, False, False, False, False, False])
    hidden = lookahead.block_mask(video, is_cache, 2, 1, False)
    visible = lookahead.block_mask(video, is_cache, 2, 1, True)
    extra = visible & ~hidden
    q, k = np.nonzero(extra)
    assert (~is_cache[q]).all() and (~is_cache[k]).all() and (video[k] > video[q]).all()
    assert extra.sum() == 10  # 5 in flight: 4 + 3 + 2 + 1 newer pairs
    assert hidden[3].tolist() == [True, True, True, True, False, False, False, False]  # sink, j-2, j-1, itself


def test_a_pipeline_that_is_not_the_checkpoints_is_refused_naming_both():
    import dataclasses

    model = load_model("causal-1f")
    with pytest.raises(ValueError, match="block_frames=1; the pipeline config given has block_frames=3"):
        check_pipeline("ckpt", model.pcfg, dataclasses.replace(model.pcfg, block_frames=3, window_frames=9))
    with pytest.raises(ValueError, match="window_frames=3.*window_frames=4"):
        load_model("causal-1f", pipeline=dataclasses.replace(model.pcfg, window_frames=4))
    with pytest.raises(ValueError, match="'lineage-9f': not one of the embedded causal-1f"):
        model_path("lineage-9f")


def test_a_base_with_short_clips_trains_both_clip_lengths(tmp_path):
    """--short-clips: a drawn fraction of the base's steps on 2-block clips (the first move), the
    rest on clip_blocks; the draw depends on (seed, step) only, so a resumed run repeats it."""
    from bcjax.toyworld.train import is_short_step, train

    tcfg = TrainConfig(stage="base", steps=6, batch=2, clip_blocks=3, short_clips=0.5, context_blocks=2,
                       sink_blocks=1, checkpoint_every=6, seed=1)
    draws = [is_short_step(tcfg, s) for s in range(6)]
    assert any(draws) and not all(draws) and draws == [is_short_step(tcfg, s) for s in range(6)]
    assert not any(is_short_step(TrainConfig(stage="ode-init", short_clips=1.0), s) for s in range(6))
    cfg = toy_model_config(WORLD, dim=32, ffn_dim=64, num_heads=1, num_layers=1)
    summary = train(str(tmp_path), WORLD, cfg, toy_pipeline_config(tcfg, WORLD), tcfg, progress=False)
    assert summary["steps"] == 6 and np.isfinite(summary["loss_last50"])
    with pytest.raises(ValueError, match="short_clips 1.5"):
        TrainConfig(short_clips=1.5)

