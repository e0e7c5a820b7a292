"""The toy world (ground truth, prompts, readout) and its block-causal training recipe."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.model import encode_text, init_params
from bcjax.model.kv_cache import write_frames
from bcjax.pipeline import PipelineConfig, SequentialPipeline, cached_pass
from bcjax.toyworld import train as tw
from bcjax.toyworld.png import line_plot, read_png, write_png
from bcjax.toyworld.world import (
    VOCAB,
    WorldConfig,
    parse_prompt,
    positions,
    prompt_embedding,
    prompt_text,
    prompt_tokens,
    read_positions,
    render,
    sample_batch,
    sample_scene,
)

WORLD = WorldConfig()
# The tests' world: 8x8 canvas, 2x2 sprites -> 16 tokens per frame, so the model tests stay fast.
SMALL = WorldConfig(size=8, sprite=2, text_len=12)
# Two layers: a clean block's layer-2 K/V depend on what its layer-1 queries were allowed to see.
SMALL_CFG = tw.toy_model_config(SMALL, dim=32, ffn_dim=64, num_heads=2, num_layers=2)
SMALL_TCFG = tw.TrainConfig(steps=40, batch=2, num_blocks=2, lr=3e-3, warmup=2, checkpoint_every=2)
_teacher_forced_flow = jax.jit(tw.teacher_forced_flow, static_argnums=(0, 1))
_cached_pass = jax.jit(cached_pass, static_argnums=0)


def test_the_prompt_determines_the_video():
    rng = np.random.default_rng(0)
    for _ in range(20):
        scene = sample_scene(rng, WORLD)
        again = parse_prompt(prompt_text(scene), WORLD)
        assert again == scene
        np.testing.assert_array_equal(render(scene, 12, WORLD), render(again, 12, WORLD))
        # a later window of the same video is the same frames
        np.testing.assert_array_equal(render(scene, 12, WORLD)[6:], render(scene, 6, WORLD, start_frame=6))
    with pytest.raises(ValueError, match="unknown word 'purple'"):
        parse_prompt("purple top east fast", WORLD)
    with pytest.raises(ValueError, match="repeat"):
        parse_prompt("red top east fast, red bottom west slow", WORLD)


def test_bounces_stay_in_bounds_and_keep_speed():
    pos = positions(parse_prompt("red top-left north-west fast", WORLD), 20, WORLD)[:, 0]
    assert pos[:8, 0].tolist() == [0, 2, 4, 6, 8, 10, 12, 10]  # off the top wall, then back from the bottom
    np.testing.assert_array_equal(pos[:, 0], pos[:, 1])
    rng = np.random.default_rng(1)
    for _ in range(50):
        scene = sample_scene(rng, WORLD)
        p = positions(scene, 60, WORLD)
        assert p.min() >= 0 and p.max() <= WORLD.free
        step = np.abs(np.diff(p, axis=0))  # a bounce folds the step but never lengthens it
        speeds = np.asarray([{"slow": 1, "fast": 2}[s.speed] for s in scene])
        assert (step <= speeds[None, :, None]).all()
        frames = render(scene, 60, WORLD)
        assert np.isfinite(frames).all() and frames.shape == (60, 16, 16, 3)


def test_later_sprites_cover_earlier_ones():
    a = render(parse_prompt("red centre east slow, blue centre east slow", WORLD), 6, WORLD)
    b = render(parse_prompt("blue centre east slow, red centre east slow", WORLD), 6, WORLD)
    on = np.abs(a).sum(-1) > 0
    assert on.sum() == 6 * 16  # both sprites on the same 4x4 pixels every frame
    np.testing.assert_array_equal(a[on], np.tile(WORLD.amplitude * np.float32([-1, -1, 1]), (6 * 16, 1)))
    np.testing.assert_array_equal(b[on], np.tile(WORLD.amplitude * np.float32([1, -1, -1]), (6 * 16, 1)))


def test_prompt_embedding_shapes_padding_and_slots():
    scene = parse_prompt("red top east fast, blue bottom west slow", WORLD)
    emb = prompt_embedding(scene, WORLD)
    assert emb.shape == (WORLD.text_len, WORLD.text_dim) and emb.dtype == np.float32
    assert np.abs(emb[8:]).max() == 0  # two 4-word phrases, then zero padding like Wan's umT5
    np.testing.assert_allclose(np.linalg.norm(emb[:8], axis=-1), np.sqrt(WORLD.text_dim), rtol=1e-5)
    swapped = prompt_embedding(parse_prompt("blue bottom west slow, red top east fast", WORLD), WORLD)
    assert not np.allclose(emb, swapped)  # drawing order (occlusion) is visible to the model
    tokens = np.stack([prompt_tokens(scene, WORLD), prompt_tokens(scene, WORLD)])
    np.testing.assert_array_equal(prompt_embedding(tokens, WORLD), np.stack([emb, emb]))
    assert len(VOCAB) == 26
    x0, ctx = sample_batch(np.random.default_rng(0), WORLD, 3, 9)
    assert x0.shape == (3, 9, 16, 16, 3) and ctx.shape == (3, WORLD.text_len, WORLD.text_dim)
    assert 0.4 < x0.std() < 1.5


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
    blank = read_positions(np.zeros((2, 16, 16, 3), np.float32), scene, WORLD)
    assert np.isnan(blank).all()


def test_teacher_forcing_mask_is_the_block_causal_rule():
    pcfg, n, p = PipelineConfig(), 3, 5
    mask = tw.teacher_forcing_mask(pcfg, n, p)[0]
    assert mask.shape == (2 * n, 2 * n * 3 * p)
    key_block = np.arange(2 * n * 3 * p) // (3 * p)  # 0..n-1 clean blocks, n..2n-1 noisy blocks
    for q in range(2 * n):
        expect = key_block <= q if q < n else (key_block < q - n) | (key_block == q)
        np.testing.assert_array_equal(mask[q], expect, err_msg=f"query block {q}")


@pytest.mark.parametrize("pcfg,num_blocks", [(PipelineConfig(), 3), (PipelineConfig(window_frames=9, sink_frames=3), 4)],
                         ids=["global", "sink+rolling"])
def test_training_forward_equals_kv_cached_passes(pcfg, num_blocks):
    """The noisy half of the one [clean | noisy] training forward predicts, block for block, the
    flow the KV-cached sampler's pass computes for that noisy block over the cache of the clean
    blocks before it (written by clean passes at t = context_noise)."""
    cfg, world = SMALL_CFG, SMALL
    params = init_params(cfg, jax.random.key(0))
    bf, f = pcfg.block_frames, num_blocks * pcfg.block_frames
    rng = np.random.default_rng(3)
    x0, ctx = (jnp.asarray(a) for a in sample_batch(rng, world, 2, f))
    x_t = jnp.asarray(rng.standard_normal(x0.shape), jnp.float32)
    t_blocks = jnp.asarray(rng.uniform(0, 1000, (2, num_blocks)), jnp.float32)
    t_f = jnp.repeat(t_blocks, bf, axis=1)
    text = encode_text(cfg, params, ctx)
    flow = _teacher_forced_flow(cfg, pcfg, params, x0, x_t, t_f, text)

    pipe = SequentialPipeline(cfg, pcfg, (world.size, world.size))
    cache = pipe.init_cache(2)
    for b in range(num_blocks):
        ids, sl = b * bf + jnp.arange(bf), slice(b * bf, (b + 1) * bf)
        got, _ = _cached_pass(cfg, params, x_t[:, sl], t_f[:, sl], text, cache, ids)
        np.testing.assert_allclose(np.asarray(flow[:, sl]), np.asarray(got), atol=2e-5, err_msg=f"block {b}")
        t_ctx = jnp.full((2, bf), pcfg.context_noise, jnp.float32)
        _, kv = _cached_pass(cfg, params, x0[:, sl], t_ctx, text, cache, ids)
        cache = write_frames(cache, kv, ids, pcfg.sink_frames)


def test_sigmas_come_from_the_sampler_table():
    pcfg = PipelineConfig()
    s, t = jax.jit(tw.sample_sigmas, static_argnums=(1, 2, 3))(jax.random.key(0), (4000,), pcfg, 0.75)
    s, t = np.asarray(s), np.asarray(t)
    on_table = np.isin(s, pcfg.sigmas)
    assert 0.7 < on_table.mean() < 0.8
    np.testing.assert_allclose(t, 1000 * s, rtol=1e-5)
    assert s.min() >= 0 and s.max() <= 1


def test_a_few_steps_reduce_the_loss_on_a_fixed_batch():
    cfg, pcfg, tcfg = SMALL_CFG, PipelineConfig(), SMALL_TCFG
    x0, ctx, key = tw.batch_for_step(SMALL, pcfg, tcfg, 0)
    state = jax.device_put(tw.init_state(cfg, tcfg), jax.devices()[0])  # as `train` does: one compile
    step = tw.make_train_step(cfg, pcfg, tcfg)
    losses = []
    for _ in range(26):  # a step returns the loss of the parameters it starts from
        state, loss = step(state, x0, ctx, key)
        losses.append(float(loss))
    assert int(state.step) == 26
    assert losses[-1] < 0.7 * losses[0], losses


def test_checkpoint_resume_continues_the_same_run(tmp_path):
    """2 steps, stop, resume to 4 == 4 steps in one go (data and noise depend only on the step)."""
    cfg, pcfg, tcfg = SMALL_CFG, PipelineConfig(), SMALL_TCFG  # the same compiled step as above
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

    world, cfg2, params, _ = load_model(str(split))
    assert world == SMALL and cfg2 == cfg
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params, restore(str(split / "model"))[1])
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(a, b), params, state.params)
    assert read_png(str(split / "loss.png")).shape[2] == 3
    assert tw.load_run(str(split)) == (SMALL, cfg, pcfg, tcfg)


def test_png_round_trip(tmp_path):
    img = line_plot({"a": np.exp(-np.arange(50) / 10.0)})
    write_png(str(tmp_path / "x.png"), img)
    np.testing.assert_array_equal(read_png(str(tmp_path / "x.png")), img)
    assert (img != 255).any()
