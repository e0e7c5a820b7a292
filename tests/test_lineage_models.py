"""The embedded lineage models: `lineage-3f` (the block-causal few-step student) and its teacher
`lineage-base` (the bidirectional many-step base) load by name, are shaped as the real models
(3-frame blocks, LongLive's 12-frame window with a 3-frame sink), were trained in the lineage's
order, and re-evaluated give the metrics recorded when they shipped."""

import json
import os

import numpy as np
import pytest

from bcjax.names import TOY_MODELS
from bcjax.schedule.config import PipelineConfig
from bcjax.toyworld import evaluate as ev
from bcjax.toyworld import lineage


def _recorded(name: str) -> dict:
    with open(os.path.join(ev.model_path(name), "metrics.json")) as f:
        return json.load(f)


def test_lineage_student_is_shaped_and_made_as_the_real_models():
    assert "lineage-3f" in TOY_MODELS
    model = ev.load_model("lineage-3f")
    assert (model.world.block_frames, model.pcfg.block_frames) == (3, 3)
    assert (model.pcfg.window_frames, model.pcfg.sink_frames) == (12, 3)  # LongLive's window and sink
    assert model.pcfg.denoising_steps == (1000, 750, 500, 250) and model.pcfg.warp_denoising_step
    stages = [s["stage"] for s in model.provenance["stages"]]
    # the lineage in order: the bidirectional base first, then the few-step student from it
    assert stages[0] == "base" and "ode-init" in stages and stages[-1] in ("stream-teacher", "stream-rollout")
    order = list(dict.fromkeys(stages))  # each stage once, in the order they ran
    assert order == sorted(order, key=["base", "ode-init", "stream-teacher", "stream-rollout"].index)
    base = ev.load_model("lineage-base")
    assert base.cfg == model.cfg and base.world == model.world  # the student is the base's architecture
    assert base.provenance["train"]["clip_blocks"] * 3 >= model.pcfg.window_frames  # clips >= the window
    with pytest.raises(ValueError, match="window_frames=12.*window_frames=21"):
        ev.load_model("lineage-3f", pipeline=PipelineConfig(block_frames=3, window_frames=21, sink_frames=3))


@pytest.mark.slow
def test_lineage_student_reproduces_its_recorded_metrics():
    """Re-evaluated as it was when shipped, the student gives its recorded metrics, and sequentially
    it tracks the sprite far better than holding the image still."""
    recorded = _recorded("lineage-3f")
    model = ev.load_model("lineage-3f")
    metrics, got = ev.rerun_recorded(model, recorded)
    for name in got:
        want = recorded["summary"][name]
        assert got[name]["mse"] == pytest.approx(want["mse"], rel=0.05), name
        assert got[name]["pos_err"] == pytest.approx(want["pos_err"], abs=0.25), name
    assert metrics["P1-causal"]["div_seq"].max() < 1e-9  # P1-causal is the sequential pipeline
    seq, still = got["sequential"], recorded["summary"]["still"]
    assert seq["pos_err"] < 0.6 * still["pos_err"] and seq["psnr"] > still["psnr"] + 3, (seq, still)


@pytest.mark.slow
def test_lineage_base_reproduces_its_recorded_metrics():
    """The teacher's own 20-step samples over its 5-block clip score as recorded."""
    recorded = _recorded("lineage-base")
    m = lineage.evaluate_base("lineage-base", recorded["prompts"], recorded["seeds"])
    got = lineage.base_summary(m)
    assert got["pos_err"][0] == pytest.approx(recorded["summary"]["pos_err"][0], abs=0.25)
    assert got["psnr"][0] == pytest.approx(recorded["summary"]["psnr"][0], abs=0.5)
    np.testing.assert_allclose(m["pos_err"].mean((0, 1)), recorded["pos_err_per_block"], atol=0.5)
