"""Krea's interactive features: prompt interpolation over N blocks (combinable
with the cascade) and video-to-video strength."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shared

import ports
from bcjax.app.interactive import stream
from bcjax.app.prompts import interpolate_prompt_schedule, with_strength
from bcjax.compile_count import CompileCounter
from bcjax.model import text_kv
from bcjax.pipeline import PipelineConfig
from bcjax.runners import make_runner

HW = (4, 6)


def test_interpolation_ramps_like_torch_lerp():
    a, b, c = (np.full((1, 2, 3), v, np.float32) for v in (0.0, 3.0, 9.0))
    got = interpolate_prompt_schedule([(0, a), (3, b)], 4)
    assert [s for s, _ in got] == [0, 3, 4, 5, 6]
    np.testing.assert_allclose([e[0, 0, 0] for _, e in got], [0.0, 0.0, 1.0, 2.0, 3.0], atol=1e-6)
    # a switch during a ramp starts from the embedding in force there, and cuts the ramp
    got = interpolate_prompt_schedule([(0, a), (3, b), (5, c)], 4)
    assert [s for s, _ in got] == [0, 3, 4, 5, 6, 7, 8]
    np.testing.assert_allclose([e[0, 0, 0] for _, e in got], [0, 0, 1, 1, 1 + 8 / 3, 1 + 16 / 3, 9], atol=1e-5)
    with pytest.raises(ValueError, match="need >= 2"):
        interpolate_prompt_schedule([(0, a), (3, b)], 1)


@pytest.mark.slow
def test_interpolated_stream_in_sequential_and_cascade(tiny_cfg, tiny_params):
    rng = np.random.default_rng(7)
    embs = [rng.standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)).astype(np.float32) for _ in range(2)]
    ramp = interpolate_prompt_schedule([(0, embs[0]), (2, embs[1])], 3)
    sched = [(s, text_kv(tiny_cfg, tiny_params, jnp.asarray(e))) for s, e in ramp]
    pcfg = PipelineConfig(window_frames=9)
    key = jax.random.key(1)
    seq = list(stream(shared.runner(tiny_cfg, pcfg, HW, program="block"), tiny_params, sched, key, 6))
    assert [e.prompt for e in seq] == [0, 0, 1, 2, 3, 3]  # blocks 2, 3, 4 ramp (w = 0, 1/2, 1)
    # P1-causal == sequential up to the first block with weight > 0 (a cascade tick has one
    # text, the entering block's, so later its predecessor's clean pass already sees the next one)
    p1 = list(stream(shared.runner(tiny_cfg, pcfg, HW, "P1", "causal", program="tick"), tiny_params, sched, key, 6))
    np.testing.assert_allclose(np.concatenate([e.x0 for e in p1[:3]], 1), np.concatenate([e.x0 for e in seq[:3]], 1),
                               atol=1e-5)
    cas = shared.runner(tiny_cfg, pcfg, HW, "P4", "bidirectional", program="tick")
    plain = np.concatenate([e.x0 for e in stream(cas, tiny_params, sched[:1], key, 6)], 1)
    with CompileCounter() as cc:  # every ramp block's K/V go through the same compiled tick
        p4 = list(stream(cas, tiny_params, sched, key, 6))
    assert cc.count == 0 and [e.block for e in p4] == list(range(6))
    assert np.abs(np.concatenate([e.x0 for e in p4], 1)[:, 12:] - plain[:, 12:]).max() > 1e-3


def test_strength_spreads_the_steps_as_krea_does():
    krea = ports.get("krea_14b").pipeline
    assert with_strength(krea, 1.0).denoising_steps == krea.denoising_steps
    half = with_strength(krea, 0.6)
    assert half.denoising_steps == (600, 450, 300, 150, 0) and half.num_steps == 5
    np.testing.assert_allclose(half.timesteps[0], 1000 * 5 * 0.6 / (1 + 4 * 0.6), rtol=1e-6)  # warped
    sf = ports.get("self_forcing").pipeline
    assert with_strength(sf, 1.0).denoising_steps == tuple(sf.denoising_steps)
    assert with_strength(sf, 0.6).denoising_steps == (600, 450, 300, 150)  # the 0 stays the end point
    assert with_strength(ports.get("causvid").pipeline, 0.8).denoising_steps == (757, 522)  # un-warped: cut
    with pytest.raises(ValueError, match="must lie in"):
        with_strength(sf, 0.0)


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["sequential", "krea"])
def test_video_to_video_follows_the_source_as_strength_drops(tiny_cfg, tiny_params, runner):
    text = text_kv(tiny_cfg, tiny_params, jnp.asarray(
        np.random.default_rng(8).standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)), jnp.float32))
    source = jax.random.normal(jax.random.key(9), (1, 6, *HW, tiny_cfg.in_channels))
    base = ports.get("krea_14b").pipeline if runner == "krea" else PipelineConfig(window_frames=9)
    errs = []
    for strength in (1.0, 0.5, 0.05):
        pcfg = with_strength(base, strength)
        pipe = shared.runner(tiny_cfg, pcfg, HW, program="krea" if runner == "krea" else "block")
        out = pipe.generate(tiny_params, text, jax.random.key(3), num_blocks=2,
                            source=source) if runner == "krea" else \
            jnp.concatenate([x for _, x in pipe.blocks(tiny_params, text, jax.random.key(3), num_blocks=2,
                                                       source=source)], axis=1)
        errs.append(float(jnp.sqrt(jnp.mean((out - source) ** 2))))
    assert errs[0] > errs[1] > errs[2] and errs[2] < 0.5 * errs[0], errs
    with pytest.raises(ValueError, match="source latents must be"):
        next(shared.runner(tiny_cfg, PipelineConfig(window_frames=9), HW, program="block").blocks(
            tiny_params, text, jax.random.key(3), num_blocks=3, source=source))


def test_krea_steps_like_the_other_runners(tiny_cfg, tiny_params):
    """Krea's loop has the shared stepping interface: a stream (with a prompt switch and a
    given first block) equals its own block loop; a recache policy is refused by name."""
    rng = np.random.default_rng(11)
    texts = [text_kv(tiny_cfg, tiny_params,
                         jnp.asarray(rng.standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)), jnp.float32))
             for _ in range(2)]
    # its own runner, not the run's shared one: its program's start is replaced below
    pipe = make_runner(tiny_cfg, ports.get("krea_14b").pipeline, HW, program="krea")
    key = jax.random.key(4)
    ref = np.asarray(pipe.generate(tiny_params, texts[0], key, num_blocks=4))
    got = np.concatenate([e.x0 for e in stream(pipe, tiny_params, [(0, texts[0])], key, 4)], axis=1)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    cont = list(stream(pipe, tiny_params, [(0, texts[0]), (2, texts[1])], key, 3, context=jnp.asarray(ref[:, :3])))
    assert [e.block for e in cont] == [1, 2, 3] and [e.prompt for e in cont] == [0, 1, 1]
    np.testing.assert_allclose(cont[0].x0, ref[:, 3:6], atol=1e-6)  # block 1 from the given block 0
    assert np.abs(cont[1].x0 - ref[:, 6:9]).max() > 1e-3  # the switch takes effect at block 2
    # a recache policy is refused when the stream starts, before any block is computed
    started = []
    pipe.program.start = lambda *a, **k: started.append(1)
    with pytest.raises(ValueError, match="keeps no cache"):
        next(stream(pipe, tiny_params, [(0, texts[0]), (1, texts[1])], key, 3, policy="recache"))
    assert not started


@pytest.mark.parametrize("keep_first_frame", [False, True])
def test_krea_stream_takes_the_vae_round_trip_like_its_block_loop(tiny_cfg, tiny_params, keep_first_frame):
    """start/step follow Krea's loop from block 2 on as `blocks(reencode=)` does: R comes from the
    round trip (a stand-in here: any function of the block's x0), called once per block in order,
    given blocks first; a runner without Krea's loop refuses a round trip by name."""
    import dataclasses

    from bcjax.app.interactive import PromptSchedule, steps

    rng = np.random.default_rng(12)
    text = text_kv(tiny_cfg, tiny_params,
                       jnp.asarray(rng.standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)), jnp.float32))
    pcfg = dataclasses.replace(ports.get("krea_14b").pipeline, keep_first_frame=keep_first_frame)
    pipe = shared.runner(tiny_cfg, pcfg, HW, program="krea")
    key = jax.random.key(5)

    def trip(seen):
        def reencode(x0):  # a stand-in for decode + encode: depends on the whole block, not frame 0 alone
            seen.append(np.asarray(x0))
            return jnp.tanh(x0[:, :1] * 0.7 + x0[:, -1:] * 0.3)
        return reencode

    ref_seen, got_seen = [], []
    ref = np.asarray(pipe.generate(tiny_params, text, key, num_blocks=4, reencode=trip(ref_seen)))
    plain = np.asarray(pipe.generate(tiny_params, text, key, num_blocks=4))
    if keep_first_frame:  # frame 0 stands where R would: the round trip changes nothing
        np.testing.assert_array_equal(ref, plain)
    else:
        assert np.abs(ref[:, 6:] - plain[:, 6:]).max() > 1e-3  # R matters from block 2 on
    np.testing.assert_array_equal(ref[:, :6], plain[:, :6])
    ticks = steps(pipe, tiny_params, PromptSchedule([(0, text)]), key, 4, reencode=trip(got_seen))
    got = np.concatenate([np.asarray(t.event.x0) for t in ticks], axis=1)
    np.testing.assert_allclose(got, ref, atol=1e-6)
    assert len(got_seen) == len(ref_seen) == 4
    # a given first block goes through the round trip too, then generation continues from it
    cont_seen = []
    cont = [t.event for t in steps(pipe, tiny_params, PromptSchedule([(0, text)]), key, 3,
                                   context=jnp.asarray(ref[:, :3]), reencode=trip(cont_seen))]
    np.testing.assert_allclose(np.concatenate([e.x0 for e in cont], axis=1), ref[:, 3:], atol=1e-6)
    assert len(cont_seen) == 4
    seq = shared.runner(tiny_cfg, PipelineConfig(window_frames=6), HW, program="block")
    with pytest.raises(ValueError, match="VAE round trip for R. is Krea's loop's"):
        seq.start(tiny_params, text, key, num_blocks=2, reencode=trip([]))


@pytest.mark.slow
def test_video_to_video_on_the_toy_world():
    """The shipped toy model continues its still image with a v2v source video in which each
    sprite moves the opposite way to its prompt: at a low strength the output stays on the
    source, at strength 1 it follows the prompt (the model's own generation). (In between, and as
    a floor at low strength, the model's x0 predictions from a partly noised video blur: it is
    trained at the sampler's sigmas, not at sigma < 0.1; the figures are printed, not pinned.)"""
    from bcjax.toyworld.evaluate import eval_scenes, load_model
    from bcjax.toyworld.world import DIRECTIONS, position_error, prompt_embedding, render

    model = load_model("causal-1f")
    world, cfg = model.world, model.cfg
    bf, hw, nb = world.block_frames, (world.size, world.size), 4
    scenes = eval_scenes(world, 4)
    names = list(DIRECTIONS)
    opposite = [tuple(s._replace(direction=names[(names.index(s.direction) + 4) % 8]) for s in sc) for sc in scenes]
    truth = np.stack([render(s, (1 + nb) * bf, world) for s in scenes])
    source = np.stack([render(s, (1 + nb) * bf, world) for s in opposite])
    np.testing.assert_array_equal(source[:, :bf], truth[:, :bf])  # one still image, two motions
    text = text_kv(cfg, model.params, jnp.asarray(np.stack([prompt_embedding(s, world) for s in scenes])))
    to_prompt, to_source, mses = {}, {}, {}
    for strength in (1.0, 0.6, 0.3, 0.02):
        pipe = shared.runner(cfg, with_strength(model.pcfg, strength), hw, program="block")
        out = np.asarray(pipe.generate(model.params, text, jax.random.key(0), num_blocks=nb,
                                       context=jnp.asarray(truth[:, :bf]), source=jnp.asarray(source[:, bf:])))
        out = np.concatenate([truth[:, :bf], out], 1)
        to_prompt[strength] = float(np.mean([position_error(o, s, world)[0][bf:].mean()
                                             for o, s in zip(out, scenes, strict=True)]))
        to_source[strength] = float(np.mean([position_error(o, s, world)[0][bf:].mean()
                                             for o, s in zip(out, opposite, strict=True)]))
        mses[strength] = float(np.mean((out - source) ** 2))
    print("toy-world v2v from the opposite motion: position error px to the prompt's video", to_prompt,
          "to the source", to_source, "MSE to the source", mses)
    assert to_source[0.02] < 0.25 and to_prompt[0.02] > 1.0  # low strength: the source's motion
    assert to_prompt[1.0] < 0.25 and to_source[1.0] > 1.0  # strength 1: the prompt's (the source is noise)
    assert mses[0.02] < mses[1.0]
