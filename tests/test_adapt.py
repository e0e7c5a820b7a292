"""Cascade adaptation (bcjax.adapt, issue 36): the adapter's forward, the teacher-forced loss, the
training loop's resume and atomic finish, the mismatch refusals and the CLI's bad input."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.adapt import AdaptConfig, adapt, load, store, teacher_trajectory
from bcjax.adapt.toy import read_prompts, toy_source
from bcjax.adapt.train import batch_for_step, init_state, make_eval
from bcjax.model import WanConfig, init_params, lora, text_kv
from bcjax.model.kv_cache import init_cache
from bcjax.runners import make_runner
from bcjax.schedule.config import PipelineConfig

CFG = WanConfig.preset("tiny", in_channels=4, out_channels=4, text_len=4)
PCFG = PipelineConfig(block_frames=1, window_frames=3)
HW = (4, 4)
ACFG = AdaptConfig(stagger="P4", mask="bidirectional", rank=4, batch=2, blocks=6, lr=1e-2, warmup=3, steps=20,
                   save_every=5)


@pytest.fixture(scope="module")
def model():
    params = init_params(CFG, jax.random.key(0), HW)
    emb = np.asarray(jax.random.normal(jax.random.key(1), (2, CFG.text_len, CFG.text_dim)))
    return params, emb


def _source(emb):
    return lambda rng: (emb, None)


def _adapter(params, factors, **over) -> store.Adapter:
    meta = store.describe(CFG, PCFG, params, lora.rank(factors), over.pop("stagger", "P4"),
                          over.pop("mask", "bidirectional"))
    return store.Adapter(factors, {**meta, **over, "complete": True})


def _random_b(factors, scale=0.2):
    leaves, tree = jax.tree_util.tree_flatten(factors)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    noise = [scale * jax.random.normal(k, a.shape) for k, a in zip(keys, leaves, strict=True)]
    return jax.tree_util.tree_unflatten(tree, noise)


def _generate(params, emb, stagger, adapter=None, program=None):
    runner = make_runner(CFG, PCFG, HW, stagger, "bidirectional", program=program, adapter=adapter)
    return np.asarray(runner.generate(params, text_kv(CFG, params, jnp.asarray(emb)), jax.random.key(3),
                                      num_blocks=6))


def test_untrained_adapter_is_the_identity(model):
    """B = 0: the cascade's output is bit-identical to the base model's; a trained-looking one
    (random B) changes it."""
    params, emb = model
    zero = _adapter(params, lora.init(CFG, jax.random.key(2), 4))
    base = _generate(params, emb, "P4")
    np.testing.assert_array_equal(_generate(params, emb, "P4", zero), base)
    assert np.abs(_generate(params, emb, "P4", _adapter(params, _random_b(zero.lora))) - base).max() > 1e-3


def test_sequential_is_unchanged_by_an_adapter(model):
    """The sequential stagger is the teacher: an adapter never runs there (fused block and tick
    programs alike), and the teacher trajectory's last x0s are the sequential output."""
    params, emb = model
    adapter = _adapter(params, _random_b(lora.init(CFG, jax.random.key(2), 4)))
    seq = _generate(params, emb, "sequential")
    np.testing.assert_array_equal(_generate(params, emb, "sequential", adapter), seq)
    np.testing.assert_array_equal(_generate(params, emb, "sequential", adapter, program="tick"),
                                  _generate(params, emb, "sequential", program="tick"))
    text = text_kv(CFG, params, jnp.asarray(emb))
    cache = init_cache(CFG, 2, PCFG.cache_frames, CFG.tokens_per_frame(*HW))
    traj = jax.jit(teacher_trajectory, static_argnums=(0, 1, 5, 6))(CFG, PCFG, params, text, jax.random.key(3), 6,
                                                                    HW, cache)
    x0 = np.concatenate(list(np.asarray(traj.x0[:, -1])), axis=1)  # [B, K * bf, H, W, C]
    np.testing.assert_allclose(x0, seq, atol=1e-5)


def test_mismatched_adapter_is_refused_naming_the_field(model):
    params, _ = model
    factors = lora.init(CFG, jax.random.key(2), 4)
    cases = [(_adapter(params, factors, stagger="P2"), "stagger P2"),
             (_adapter(params, factors, mask="causal"), "mask causal"),
             (_adapter(params, factors, model="0" * 16), "another model"),
             (_adapter(params, factors, sampler={**store.sampler_dict(PCFG), "shift": 3.0}), "shift=3.0")]
    for adapter, words in cases:
        with pytest.raises(ValueError, match=words):
            make_runner(CFG, PCFG, HW, "P4", "bidirectional", adapter=adapter)
    with pytest.raises(ValueError, match="rank 4; rank 16"):
        _adapter(params, factors).check(CFG, PCFG, "P4", "bidirectional", rank=16)
    other = jax.tree_util.tree_map(lambda a: a + 1, params)
    with pytest.raises(ValueError, match="other weights"):
        _adapter(params, factors).check_model(CFG, other)
    with pytest.raises(ValueError, match="teacher"):
        AdaptConfig(stagger="sequential")


def test_training_lowers_the_loss_resumes_and_finishes_atomically(model, tmp_path):
    """20 steps lower the teacher-forced loss on a held-out batch below 0.8 x; a run stopped at
    step 10 leaves no adapter that loads, resumes at step 11, and ends where an uninterrupted run
    ends."""
    params, emb = model
    source = _source(emb)
    loss = make_eval(CFG, PCFG, HW, ACFG)
    held = batch_for_step(source, ACFG, 10_000)
    before = float(loss(init_state(CFG, ACFG).lora, params, *held))

    out = str(tmp_path / "stopped")
    steps: list[int] = []

    def stop_at_10(step, _):
        steps.append(step)
        if step == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        adapt(out, CFG, PCFG, params, HW, source, ACFG, progress=False, callback=stop_at_10)
    with open(os.path.join(out, "adapter.json")) as f:
        meta = json.load(f)
    assert meta["complete"] is False and meta["step"] == 10
    with pytest.raises(ValueError, match="unfinished"):
        load(out)
    with pytest.raises(ValueError, match="rank=4; this run asks for rank=8"):
        adapt(out, CFG, PCFG, params, HW, source, dataclasses.replace(ACFG, rank=8), progress=False)
    steps.clear()
    resumed = adapt(out, CFG, PCFG, params, HW, source, ACFG, progress=False, callback=lambda s, _: steps.append(s))
    assert steps[0] == 11 and resumed.meta["step"] == 20
    straight = adapt(str(tmp_path / "straight"), CFG, PCFG, params, HW, source, ACFG, progress=False)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                           resumed.lora, straight.lora)

    after = float(loss(load(out, CFG, params).lora, params, *held))
    assert after < 0.8 * before, (before, after)
    with pytest.raises(ValueError, match="already holds a finished adapter"):
        adapt(out, CFG, PCFG, params, HW, source, ACFG, progress=False)


def test_prompts_file_errors_name_the_line(tmp_path):
    from bcjax.toyworld.world import WorldConfig

    empty = tmp_path / "empty.txt"
    empty.write_text("\n  \n")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(str(empty))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"red east fast\n\xff\xfe oops\n")
    with pytest.raises(ValueError, match="line 2 is not UTF-8"):
        read_prompts(str(bad))
    unknown = tmp_path / "unknown.txt"
    unknown.write_text("red east fast\n\npurple east fast\n")
    with pytest.raises(ValueError, match="line 3: .*purple"):
        toy_source(WorldConfig(), read_prompts(str(unknown)), 2, str(unknown))


def test_cli_refuses_bad_input_in_one_line(tmp_path, capsys):
    """`bcjax adapt`: the sequential stagger (the teacher), an empty or undecodable prompts file and
    a bad sprite phrase are each one line naming what is wrong, before any training; --adapter
    naming an unfinished run is refused the same way."""
    from cli_helpers import one_line

    from bcjax.cli import main

    good = tmp_path / "prompts.txt"
    good.write_text("red east fast\n")
    out = str(tmp_path / "adapter")
    assert main(["adapt", "--prompts", str(good), "--out", out, "--stagger", "sequential"]) == 2
    one_line(capsys, "sequential", "teacher")
    assert main(["adapt", "--prompts", str(good), "--out", out, "--schedule", "sequential"]) == 2
    assert "teacher" in capsys.readouterr().err
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert main(["adapt", "--prompts", str(empty), "--out", out]) == 2
    one_line(capsys, str(empty), "no prompts")
    bad = tmp_path / "bad.txt"
    bad.write_text("red east fast\nred sideways fast\n")
    assert main(["adapt", "--prompts", str(bad), "--out", out]) == 2
    one_line(capsys, "line 2", "sideways")
    assert not os.path.exists(out)
    os.makedirs(out)
    store.write_meta(out, {"format": store.FORMAT, "complete": False, "step": 3})
    assert main(["stream", "--prompts", "red east fast@0", "--out", str(tmp_path / "s.mp4"), "--blocks", "2",
                 "--adapter", out]) == 2
    one_line(capsys, "unfinished", "step 3")
