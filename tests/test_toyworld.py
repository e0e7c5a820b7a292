"""The toy world (ground truth, prompts, readout) and its block-causal training recipe."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.model import init_params, text_kv
from bcjax.model.kv_cache import write_frames
from bcjax.pipeline import PipelineConfig
from bcjax.runners import make_runner
from bcjax.sampler import cached_pass
from bcjax.toyworld import train as tw
from bcjax.toyworld.png import line_plot, read_png, write_png
from bcjax.toyworld.world import (
    SPEEDS,
    WorldConfig,
    parse_prompt,
    positions,
    prompt_embedding,
    prompt_text,
    read_positions,
    render,
    sample_batch,
    sample_scene,
)

WORLD = WorldConfig(size=16, sprite=4, frames_per_step=1)  # a world step every frame
# The tests' world: 8x8 canvas (walls included), 2x2 sprites -> 16 tokens per frame, so the model tests stay fast.
SMALL = WorldConfig(size=8, sprite=2)
# Two layers: a clean block's layer-2 K/V depend on what its layer-1 queries were allowed to see.
SMALL_CFG = tw.toy_model_config(SMALL, dim=32, ffn_dim=64, num_heads=2, num_layers=2)
SMALL_TCFG = tw.TrainConfig(steps=40, batch=2, context_blocks=2, lr=3e-3, warmup=2, checkpoint_every=2)
# The later stages of the same run (one compiled step each, shared by the tests).
STAGE_TCFG = {stage: dataclasses.replace(SMALL_TCFG, stage=stage, in_flight=2, rollout_blocks=2)
              for stage in ("diffusion-forcing", "self-rollout")}
# diffusion forcing on P4's own ticks (5 blocks in flight, newer ones visible)
STAGE_TCFG["diffusion-forcing-P4"] = dataclasses.replace(STAGE_TCFG["diffusion-forcing"], cascade="P4",
                                                         bidirectional_prob=1.0, cascade_prob=0.5)
_cached_pass = jax.jit(cached_pass, static_argnums=0)


def test_the_prompt_and_first_block_determine_the_video():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = sample_scene(rng, WORLD)
        starts = [(s.row, s.col) for s in scene]
        again = parse_prompt(prompt_text(scene), WORLD, starts)
        assert again == scene
        frames = render(scene, 12, WORLD)
        np.testing.assert_array_equal(frames, render(again, 12, WORLD))
        np.testing.assert_array_equal(frames[6:], render(scene, 6, WORLD, start_frame=6))
        # the first block is the still image; the motion starts right after it
        np.testing.assert_array_equal(frames[0], frames[WORLD.still_frames - 1])
        assert (positions(scene, 12, WORLD)[WORLD.still_frames] != positions(scene, 1, WORLD)[0]).any()
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        parse_prompt("purple east fast", WORLD)
    with pytest.raises(ValueError, match="repeat"):
        parse_prompt("red east fast, red west slow", WORLD, [(1, 1), (5, 5)])
    with pytest.raises(ValueError, match="corners must lie in"):
        parse_prompt("red east fast", WORLD, [(0, 3)])


def test_the_default_world_steps_once_per_block():
    world = WorldConfig()
    scene = parse_prompt("red north-west slow, blue east slow", world, [(5, 5), (2, 2)])
    pos = positions(scene, 15, world)
    assert pos[:, 0, 0].tolist() == [5, 5, 5, 3, 3, 3, 1, 1, 1, 3, 3, 3, 5, 5, 5]  # 2 px a block, off the wall
    frames = render(scene, 15, world).reshape(5, 3, *render(scene, 1, world).shape[1:])
    assert (frames == frames[:, :1]).all()  # a block's three frames show one world state
    assert all((frames[b] != frames[b + 1]).any() for b in range(4))


def test_bounces_stay_inside_the_walls_and_keep_speed():
    scene = parse_prompt("red north-west fast", WORLD, [(5, 5)])
    pos = positions(scene, 14, WORLD)[:, 0]
    # still for the first block, then 4 px/frame up-left, off the wall at 1, back down
    assert pos[:10, 0].tolist() == [5, 5, 5, 1, 5, 9, 9, 5, 1, 5]
    np.testing.assert_array_equal(pos[:, 0], pos[:, 1])
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = sample_scene(rng, WORLD)
        p = positions(scene, 60, WORLD)
        assert p.min() >= WORLD.lo and p.max() <= WORLD.hi
        step = np.abs(np.diff(p, axis=0))  # a bounce folds the step but never lengthens it
        speeds = np.asarray([SPEEDS[s.speed] for s in scene])
        assert (np.diff(p, axis=0) % 2 == 0).all()  # even steps, bounces included: whole patches
        assert (step <= speeds[None, :, None]).all()
        frames = render(scene, 60, WORLD)
        assert np.isfinite(frames).all() and frames.shape == (60, 16, 16, 3)
        np.testing.assert_array_equal(frames[:, 0], WORLD.amplitude)  # the wall rim never moves
        np.testing.assert_array_equal(frames[:, :, -1], WORLD.amplitude)


def test_later_sprites_cover_earlier_ones():
    a = render(parse_prompt("red east slow, blue east slow", WORLD, [(6, 6), (6, 6)]), 6, WORLD)
    b = render(parse_prompt("blue east slow, red east slow", WORLD, [(6, 6), (6, 6)]), 6, WORLD)
    on = np.abs(a[:, 1:-1, 1:-1]).sum(-1) > 0
    assert on.sum() == 6 * 16  # both sprites on the same 4x4 pixels every frame
    np.testing.assert_array_equal(a[:, 1:-1, 1:-1][on], np.tile(WORLD.amplitude * np.float32([-1, -1, 1]), (6 * 16, 1)))
    np.testing.assert_array_equal(b[:, 1:-1, 1:-1][on], np.tile(WORLD.amplitude * np.float32([1, -1, -1]), (6 * 16, 1)))


def test_prompt_embedding_one_token_per_sprite_and_padding():
    scene = parse_prompt("red east fast, blue west slow", WORLD, [(1, 1), (9, 9)])
    emb = prompt_embedding(scene, WORLD)
    assert emb.shape == (WORLD.text_len, WORLD.text_dim) and emb.dtype == np.float32
    assert np.abs(emb[2:]).max() == 0  # two phrases, then zero padding like Wan's umT5
    np.testing.assert_allclose(np.linalg.norm(emb[:2], axis=-1), np.sqrt(WORLD.text_dim), rtol=1e-5)
    swapped = prompt_embedding(parse_prompt("blue west slow, red east fast", WORLD, [(9, 9), (1, 1)]), WORLD)
    assert not np.allclose(emb[::-1][2:], swapped[:2])  # drawing order (occlusion) is visible to the model
    other = prompt_embedding(parse_prompt("red east slow, blue west slow", WORLD, [(1, 1), (9, 9)]), WORLD)
    assert not np.allclose(emb[0], other[0]) and np.allclose(emb[1], other[1])
    x0, ctx = sample_batch(np.random.default_rng(0), WORLD, 3, 9, max_start_block=4)
    assert x0.shape == (3, 9, 16, 16, 3) and ctx.shape == (3, WORLD.text_len, WORLD.text_dim)
    assert 0.4 < x0.std() < 1.8


def test_position_readout_recovers_rendered_positions():
    rng = np.random.default_rng(2)
    found = total = 0
    for _ in range(40):
        scene = sample_scene(rng, WORLD)
        truth = positions(scene, 18, WORLD)
        frames = render(scene, 18, WORLD)
        got = read_positions(frames, scene, WORLD)
        ok = np.all(got == truth, axis=-1)
        found, total = found + ok.sum(), total + ok.size
        # the sprite drawn last is never covered: always exact, even with noise on the frames
        noisy = frames + 0.3 * rng.standard_normal(frames.shape).astype(np.float32)
        np.testing.assert_array_equal(read_positions(noisy, scene, WORLD)[:, -1], truth[:, -1])
    assert found / total > 0.95, (found, total)  # the rest: sprites covered from two sides
    walls_only = render(scene, 2, WORLD)
    walls_only[:, 1:-1, 1:-1] = 0
    blank = read_positions(walls_only, scene, WORLD)
    assert np.isnan(blank).all()


def test_context_mask_is_the_samplers_view():
    k, p = 3, 2
    mask = np.asarray(tw.context_mask(k, np.asarray([3, 1]), p))
    assert mask.shape == (2, k + 1, (k + 1) * p)
    blocks = np.arange((k + 1) * p) // p
    for q in range(k + 1):  # all context visible: block-causal clean blocks, the noisy one sees all
        np.testing.assert_array_equal(mask[0, q], blocks <= q, err_msg=f"query block {q}")
    # one visible context block (the newest, block 2): it sees itself; the noisy block sees it and itself
    np.testing.assert_array_equal(mask[1, 2], blocks == 2)
    np.testing.assert_array_equal(mask[1, 3], blocks >= 2)
    for q in (0, 1):
        np.testing.assert_array_equal(mask[1, q], blocks == q)  # hidden blocks: themselves only


@pytest.mark.slow
@pytest.mark.parametrize("visible", [2, 1])
def test_training_forward_equals_kv_cached_passes(visible):
    """The noisy block of the one [clean context | noisy] training forward gets exactly the flow
    the KV-cached sampler's pass computes for it over the cache of its visible context blocks
    (written by clean passes at t = context_noise), for every window fill."""
    cfg, world, tcfg = SMALL_CFG, SMALL, SMALL_TCFG
    pcfg = tw.toy_pipeline_config(tcfg)
    params = init_params(cfg, jax.random.key(0))
    bf, k = pcfg.block_frames, tcfg.context_blocks
    clips, _, ctx = tw.sample_clips(np.random.default_rng(3), world, tw.TrainConfig(batch=2, context_blocks=2))
    clips, ctx = jnp.asarray(clips), jnp.asarray(ctx)
    x_t = jnp.asarray(np.random.default_rng(4).standard_normal(clips[:, -bf:].shape), jnp.float32)
    t = jnp.asarray([900.0, 250.0])
    text = text_kv(cfg, params, ctx)
    flow = jax.jit(tw.context_flow, static_argnums=0)(cfg, params, clips[:, :-bf], x_t, t, jnp.full((2,), visible),
                                                      text)

    pipe = make_runner(cfg, pcfg, (world.size, world.size), program="block")
    first = k - visible  # the sampler's view: visible context blocks, then the block at index k
    cache = pipe.block_program.prefill(params, text, clips[:, first * bf:k * bf], first_block=first)
    ids = k * bf + jnp.arange(bf)
    got, _ = _cached_pass(cfg, params, x_t, jnp.repeat(t[:, None], bf, 1), text, cache, ids)
    np.testing.assert_allclose(np.asarray(flow), np.asarray(got), atol=2e-5)
    cache2 = pipe.block_program.init_cache(2)  # prefill == the clean passes the sampler runs after each block
    for b in range(first, k):
        sl = slice(b * bf, (b + 1) * bf)
        _, kv = _cached_pass(cfg, params, clips[:, sl], jnp.zeros((2, bf)), text, cache2, b * bf + jnp.arange(bf))
        cache2 = write_frames(cache2, kv, b * bf + jnp.arange(bf), pcfg.sink_frames)
    np.testing.assert_allclose(np.asarray(cache.k), np.asarray(cache2.k), atol=1e-5)


def test_training_clips_cover_the_first_block_and_the_stream():
    tcfg = tw.TrainConfig(batch=400, context_blocks=2)
    clips, visible, ctx = tw.sample_clips(np.random.default_rng(5), WORLD, tcfg)
    assert clips.shape == (400, 9, 16, 16, 3) and ctx.shape == (400, WORLD.text_len, WORLD.text_dim)
    assert set(np.unique(visible)) == {1, 2}
    # a clip whose last context block is the still image: its three frames are equal
    still = np.all(clips[:, 3] == clips[:, 5], axis=(1, 2, 3)) & (visible == 1)
    assert 0.25 < still.mean() < 0.45  # first_prob = 1/3 (plus rare sprites that bounce in place)


def test_sigmas_come_from_the_sampler_table():
    pcfg = PipelineConfig()
    s, t = jax.jit(tw.sample_sigmas, static_argnums=(1, 2, 3))(jax.random.key(0), (4000,), pcfg, 0.75)
    s, t = np.asarray(s), np.asarray(t)
    on_table = np.isin(s, pcfg.sigmas)
    assert 0.7 < on_table.mean() < 0.8
    np.testing.assert_allclose(t, 1000 * s, rtol=1e-5)
    assert s.min() >= 0 and s.max() <= 1


@pytest.mark.slow
def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    cfg, tcfg = SMALL_CFG, SMALL_TCFG
    pcfg = tw.toy_pipeline_config(tcfg)
    batch = tw.batch_for_step(SMALL, pcfg, tcfg, 0)
    state = jax.device_put(tw.init_state(cfg, tcfg), jax.devices()[0])  # as `train` does: one compile
    step = tw.make_train_step(cfg, pcfg, tcfg)
    losses = []
    for _ in range(26):  # a step returns the loss of the parameters it starts from
        state, loss = step(state, *batch)
        losses.append(float(loss))
    assert int(state.step) == 26
    assert losses[-1] < 0.7 * losses[0], losses


def test_checkpoint_resume_continues_the_same_run(tmp_path):
    """2 steps, stop, resume to 4 == 4 steps in one go (data and noise depend only on the step)."""
    cfg, tcfg = SMALL_CFG, SMALL_TCFG  # the same compiled step as above
    pcfg = tw.toy_pipeline_config(tcfg)
    whole = tw.train(str(tmp_path / "whole"), SMALL, cfg, pcfg, tcfg, progress=False, until=4)
    split = tmp_path / "split"
    tw.train(str(split), SMALL, cfg, pcfg, tcfg, progress=False, until=2)
    resumed = tw.train(str(split), SMALL, cfg, pcfg, tcfg, progress=False, until=4)
    assert whole["steps"] == resumed["steps"] == 4 and resumed["resumed_from"] == 2

    mngr = tw._checkpoint_manager(str(split))
    state, meta = tw.restore_state(mngr, cfg, tcfg)
    assert int(state.step) == 4 and len(meta["losses"]) == 4
    ref, ref_meta = tw.restore_state(tw._checkpoint_manager(str(tmp_path / "whole")), cfg, tcfg)
    np.testing.assert_allclose(meta["losses"], ref_meta["losses"], rtol=1e-5)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), state.params, ref.params)

    from bcjax.checkpoint import restore
    from bcjax.toyworld.evaluate import load_model

    model = load_model(str(split))
    assert model.world == SMALL and model.cfg == cfg and model.pcfg == pcfg
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), model.params,
                           restore(str(split / "model"))[1])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), model.params, state.params)
    assert read_png(str(split / "loss.png")).shape[2] == 3
    assert tw.load_run(str(split)) == (SMALL, cfg, pcfg, tcfg)


def test_png_round_trip(tmp_path):
    img = line_plot({"a": np.exp(-np.arange(50) / 10.0)})
    write_png(str(tmp_path / "x.png"), img)
    np.testing.assert_array_equal(read_png(str(tmp_path / "x.png")), img)
    assert (img != 255).any()


# -- diffusion forcing and self-rollout -------------------------------------------------------

@pytest.mark.parametrize("mask", ["causal", "bidirectional"])
def test_diffusion_forcing_mask_is_a_cascade_ticks(mask):
    """In-flight blocks of a training layout see exactly what a P4 tick shows them: the clean
    cache inside their window, older in-flight blocks inside it, newer ones when bidirectional."""
    from bcjax.cascade.masks import tick_key_mask
    from bcjax.schedule.stagger import make_stagger

    bf, k = 3, 2  # window: the block + 2 blocks of cache
    st = make_stagger("P4", 4)
    blocks = np.arange(4, 4 + st.num_slots)  # blocks 4..8 in flight, 2 and 3 finished in the cache
    slot_blocks = np.zeros(st.num_slots, int)
    slot_blocks[blocks % st.num_slots] = blocks
    cache_ids = np.arange(2 * bf, 4 * bf)
    tick = np.asarray(tick_key_mask(jnp.arange(st.num_slots), jnp.asarray(slot_blocks), jnp.ones(st.num_slots, bool),
                                    jnp.asarray(cache_ids), block_frames=bf, tokens_per_frame=1, sink=0,
                                    rolling=k * bf, mask=mask))[0]
    index = np.arange(2, 9)
    kind = np.asarray([tw.CLEAN] * 2 + [tw.FLIGHT] * 5)
    ours = np.asarray(tw.layout_mask(index, kind, jnp.ones((1, 7), bool), jnp.asarray([mask == "bidirectional"]), k,
                                     bf))[0]
    for qi, qb in enumerate(index):
        if kind[qi] != tw.FLIGHT:
            continue
        for ki, kb in enumerate(index):
            col = (list(cache_ids).index(kb * bf) if kb < 4 else len(cache_ids) + (kb % st.num_slots) * bf)
            assert ours[qi, ki * bf] == tick[qb % st.num_slots, col], (mask, qb, kb)
    # a clean block's view is its clean pass's: the clean blocks before it in the window, itself
    np.testing.assert_array_equal(ours[1, ::bf], [True, True, False, False, False, False, False])


@pytest.mark.parametrize("stagger", ["P4", "P2", "P4-no-clean"])
def test_cascade_layouts_are_the_staggers_ticks(stagger):
    """`--cascade`: every drawn clip is a tick of the stagger's table (the in-flight blocks
    oldest first at their stages, the cache a generation has before them), fill, steady state and
    drain all occur, and the stages' sigmas are the sampler's table (the clean stage: sigma 0)."""
    from bcjax.schedule.stagger import make_stagger, stagger_table

    tcfg = dataclasses.replace(SMALL_TCFG, stage="diffusion-forcing", cascade=stagger, cascade_prob=1.0, batch=96,
                               max_block=6)
    pcfg = tw.toy_pipeline_config(tcfg)
    st = make_stagger(stagger, pcfg.num_steps)
    assert tcfg.flight_blocks(pcfg) == st.in_flight
    clips, visible, flying, stages, _ = tw.tick_layouts(np.random.default_rng(0), SMALL, pcfg, tcfg)
    k, m, bf = tcfg.context_blocks, st.in_flight, SMALL.block_frames
    assert clips.shape[1] == (k + m) * bf and stages.shape == (96, m)
    table = stagger_table(st, tcfg.max_block)
    ticks = set()
    for busy, block, stage in zip(table["busy"], table["block"], table["stage"], strict=True):
        order = np.argsort(block[busy])
        ticks.add((int(block[busy][order][0]) + 1, tuple(int(v) for v in stage[busy][order])))
    drawn = set()
    for i in range(96):
        f = int(flying[i])
        assert (stages[i, f:] == -1).all()
        # the oldest in-flight block is video block j: find j by matching the rendered clip
        j = next(j for j, s in ticks if s == tuple(stages[i, :f]) and visible[i] == min(k, j))
        drawn.add((j, tuple(int(v) for v in stages[i, :f])))
    assert drawn <= ticks
    full = tuple(range(st.num_stages - 1, -1, -st.stride))
    kinds = {s for _, s in drawn}
    assert full in kinds and (0,) in kinds and any(s[0] == st.num_stages - 1 and len(s) < m for s in kinds)
    sigma, t = tw.stage_sigmas(jnp.arange(st.num_stages), pcfg)
    want = list(pcfg.sigmas) + ([0.0] if st.clean_pass else [])
    np.testing.assert_allclose(np.asarray(sigma), want, rtol=1e-6)
    assert float(t[0]) == pcfg.timesteps[0]

    seq = dataclasses.replace(tcfg, cascade_prob=0.0, batch=8)
    _, _, flying, stages, _ = tw.tick_layouts(np.random.default_rng(1), SMALL, pcfg, seq)
    assert (flying == 1).all() and (stages == -1).all()  # the sequential pass, its sigma drawn


def test_cascade_option_refuses_what_it_cannot_train():
    with pytest.raises(ValueError, match="stagger 'P4x'"):
        tw.TrainConfig(stage="diffusion-forcing", cascade="P4x")
    with pytest.raises(ValueError, match="diffusion-forcing stage; stage is 'self-rollout'"):
        tw.TrainConfig(stage="self-rollout", cascade="P4")


@pytest.mark.slow
def test_rollout_is_the_sequential_pipeline():
    """The self-rollout's sampler through its KV buffer generates what the sequential runner does
    (same noise per block and step), and the training layout recomputes its passes exactly."""
    world, cfg = SMALL, SMALL_CFG
    tcfg = tw.TrainConfig(batch=2, context_blocks=1, rollout_blocks=2, stage="self-rollout")
    pcfg = tw.toy_pipeline_config(tcfg)
    params = init_params(cfg, jax.random.key(1))
    bf = pcfg.block_frames
    clips, visible, ctx = tw.sample_clips(np.random.default_rng(6), world, tcfg, targets=2)
    clips, ctx = jnp.asarray(clips), jnp.asarray(ctx)
    key = jax.random.key(7)
    text = text_kv(cfg, params, ctx)
    want = make_runner(cfg, pcfg, (world.size, world.size), program="block").generate(params, text, key, num_blocks=2,
                                                                                      context=clips[:, :bf])
    last = jnp.full((2, 2), pcfg.num_steps - 1)
    x0, gen = jax.jit(tw.self_rollout_x0, static_argnums=(0, 1, 2))(cfg, pcfg, tcfg, params, clips,
                                                                   jnp.asarray(visible), ctx, key, last)
    np.testing.assert_allclose(np.asarray(gen), np.asarray(want), atol=1e-4)
    np.testing.assert_allclose(np.asarray(x0), np.asarray(gen), atol=1e-4)  # the last step's pass, with gradient


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["diffusion-forcing", "diffusion-forcing-P4", "self-rollout"])
def test_a_few_steps_of_each_stage_reduce_the_loss(stage):
    tcfg = STAGE_TCFG[stage]
    pcfg = tw.toy_pipeline_config(tcfg)
    batch = tw.batch_for_step(SMALL, pcfg, tcfg, 0)
    state = jax.device_put(tw.init_state(SMALL_CFG, tcfg), jax.devices()[0])
    step = tw.make_train_step(SMALL_CFG, pcfg, tcfg)
    losses = []
    for _ in range(12):
        state, loss = step(state, *batch)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < 0.8 * losses[0], losses


def test_stages_resume_one_run_and_record_their_minutes(tmp_path):
    """clean -> diffusion-forcing on one run folder: the second session continues the first's
    state, the stage history has both (steps, wall and CPU seconds), each stage's model stays."""
    out = str(tmp_path / "run")
    pcfg = tw.toy_pipeline_config(SMALL_TCFG)
    tw.train(out, SMALL, SMALL_CFG, pcfg, SMALL_TCFG, progress=False, until=2)
    df = STAGE_TCFG["diffusion-forcing"]
    summary = tw.train(out, SMALL, SMALL_CFG, pcfg, df, progress=False, until=3)
    assert summary["steps"] == 3 and summary["resumed_from"] == 2
    assert [(s["stage"], s["from_step"], s["to_step"]) for s in summary["stages"]] == [("clean", 0, 2),
                                                                                       ("diffusion-forcing", 2, 3)]
    assert all(s["cpu_s"] > 0 and s["wall_s"] > 0 for s in summary["stages"])
    assert (os.path.isdir(os.path.join(out, "model-clean"))
            and os.path.isdir(os.path.join(out, "model-diffusion-forcing")))
    with pytest.raises(ValueError, match="training stage 'dmd'"):
        tw.TrainConfig(stage="dmd")


def test_colour_readout():
    from bcjax.toyworld.world import colour_correct

    scene = parse_prompt("red east slow", WORLD, [(5, 5)])
    frames = render(scene, 3, WORLD)
    assert colour_correct(frames, scene, WORLD).all()
    wrong = render(parse_prompt("magenta east slow", WORLD, [(5, 5)]), 3, WORLD)
    assert not colour_correct(wrong, scene, WORLD).any()  # right place, wrong colour
    smeared = frames.copy()
    smeared[:, 5:9, 5:9] *= 0.3  # faded towards the background
    assert not colour_correct(smeared, scene, WORLD).any()


def test_block_frames_flag_sets_the_world_and_the_sampler(tmp_path):
    """`--block-frames 1` (the shipped model's blocks): the still image is one frame, the world
    steps once per block, and the sampler's blocks and window follow."""
    out = str(tmp_path / "run")
    tw.main(["--out", out, "--size", "8", "--sprite", "2", "--block-frames", "1", "--dim", "32", "--ffn-dim", "64",
             "--heads", "2", "--layers", "2", "--steps", "1", "--batch", "2", "--stage", "diffusion-forcing",
             "--no-progress"])
    world, _, pcfg, tcfg = tw.load_run(out)
    assert (world.block_frames, world.still_frames, world.frames_per_step) == (1, 1, 1)
    assert (pcfg.block_frames, pcfg.window_frames) == (1, tcfg.context_blocks + 1)
    scene = parse_prompt("red east slow", world, [(2, 2)])
    assert positions(scene, 3, world)[:, 0, 1].tolist() == [2, 4, 4]  # block 0 still, then a step a block, a bounce


def test_ema_is_the_moving_average_of_the_steps_weights():
    """ema = d * ema + (1 - d) * params after every step, starting from the initial weights; with
    ema = 0 it is the live weights. The exported model is the average."""
    tcfg = dataclasses.replace(SMALL_TCFG, ema=0.75)
    pcfg = tw.toy_pipeline_config(tcfg)
    batch = tw.batch_for_step(SMALL, pcfg, tcfg, 0)
    state = jax.device_put(tw.init_state(SMALL_CFG, tcfg), jax.devices()[0])
    step = tw.make_train_step(SMALL_CFG, pcfg, tcfg)
    expect = jax.tree_util.tree_map(np.asarray, state.params)
    for _ in range(3):
        state, _ = step(state, *batch)
        expect = jax.tree_util.tree_map(lambda e, p: 0.75 * e + 0.25 * np.asarray(p), expect, state.params)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), state.ema, expect)
    assert state.export_params(tcfg) is state.ema and state.export_params(SMALL_TCFG) is state.params
    moved = jax.tree_util.tree_leaves(
        jax.tree_util.tree_map(lambda a, b: float(np.abs(a - b).max()), state.ema, state.params))
    assert max(moved) > 1e-4  # the average lags the live weights
    with pytest.raises(ValueError, match="ema decay 1.0"):
        tw.TrainConfig(ema=1.0)


@pytest.mark.slow
def test_init_starts_a_stage_from_an_earlier_model(tmp_path):
    """--init: a new run starts from another run's exported DiT with a fresh optimizer, inherits
    its world, model and stage history (so the training minutes add up), and refuses a mismatch."""
    first = str(tmp_path / "df")
    small = ["--size", "8", "--sprite", "2", "--block-frames", "1", "--dim", "32", "--ffn-dim", "64", "--heads", "2",
             "--layers", "2", "--batch", "2", "--no-progress"]
    tw.main(["--out", first, *small, "--steps", "2", "--stage", "diffusion-forcing"])
    second = str(tmp_path / "sr")
    summary = tw.main(["--out", second, "--init", os.path.join(first, "model-diffusion-forcing"), "--steps", "1",
                       "--batch", "2", "--stage", "self-rollout", "--rollout-blocks", "2", "--no-progress",
                       "--until", "0"])  # 0 steps: the exported model is the init's
    assert [(s["stage"], s["to_step"]) for s in summary["stages"]] == [("diffusion-forcing", 2), ("self-rollout", 0)]
    world, cfg, _, tcfg = tw.load_run(second)
    assert tw.load_run(first)[:2] == (world, cfg) and tcfg.stage == "self-rollout"
    from bcjax.checkpoint import restore

    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), restore(os.path.join(second, "model"))[1],
                           restore(os.path.join(first, "model"))[1])
    with pytest.raises(SystemExit, match="fixes the world and model"):
        tw.main(["--out", str(tmp_path / "bad"), "--init", os.path.join(first, "model"), "--size", "12"])
    with pytest.raises(ValueError, match="different DiT"):
        tw.init_params_from(os.path.join(first, "model"), dataclasses.replace(cfg, dim=64), world)


def test_crisp_frames_are_clean_renders_wherever_the_sprite_is():
    from bcjax.toyworld.world import crisp_frames

    scene = parse_prompt("red east slow, blue south fast", WORLD, [(5, 5), (2, 9)])
    frames = render(scene, 6, WORLD)
    assert crisp_frames(frames, scene, WORLD).all()
    moved = render(parse_prompt("red east slow, blue south fast", WORLD, [(7, 3), (2, 9)]), 6, WORLD)
    assert crisp_frames(moved, scene, WORLD).all()  # wrong place but sharp: position_error's business
    noisy = frames + 0.3 * np.random.default_rng(0).standard_normal(frames.shape).clip(-3, 3).astype(np.float32)
    assert crisp_frames(noisy, scene, WORLD).all()
    smear = 0.5 * (frames + moved)  # two hypotheses averaged
    assert not crisp_frames(smear, scene, WORLD).any()
    ghost = frames.copy()
    ghost[:, 12, 12] = WORLD.amplitude * np.float32([1, -1, -1])  # a stray red pixel
    assert not crisp_frames(ghost, scene, WORLD).any()
    lost = frames.copy()
    lost[:, 1:-1, 1:-1] = 0.0
    assert not crisp_frames(lost, scene, WORLD).any()
