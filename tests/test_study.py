"""The quality study's driver: settings picked by name, paired differences to sequential."""

import json

import numpy as np
import pytest

from bcjax.toyworld import study
from bcjax.toyworld.evaluate import SHIPPED


@pytest.mark.slow  # about a minute: three settings compiled for each seed
def test_study_runs_the_named_settings_and_pairs_them_with_sequential(tmp_path):
    out = tmp_path / "study"
    res = study.main(["--model", "shipped=" + SHIPPED, "--prompts", "2",
                      "--seeds", "2", "--blocks", "2", "--setting", "P4:bidirectional-windowed",
                      "--setting", "P4-no-clean:causal", "--out", str(out)])["results"]["shipped"]
    assert set(res) == {"sequential", "P4-bidirectional-windowed", "P4-no-clean-causal", "still", "init"}
    assert res["sequential"]["pos_err"].shape == (2, 2, 2)  # seeds, prompts, blocks
    text = (out / "study.md").read_text()
    row = next(line for line in text.splitlines() if line.startswith("| P4-no-clean-causal |"))
    assert "[" in row  # the paired difference to sequential
    cells = json.loads((out / "study.json").read_text())
    assert cells["settings"] == ["P4-bidirectional-windowed", "P4-no-clean-causal"]
    pos = cells["cells"]["shipped"]["pos_err"]
    diff = res["P4-no-clean-causal"]["pos_err"].mean(-1) - res["sequential"]["pos_err"].mean(-1)
    np.testing.assert_allclose(pos["P4-no-clean-causal"]["diff"], diff.mean(), atol=1e-9)


@pytest.mark.parametrize("spec, msg", [("P5x", "stagger 'P5x'"), ("P4:sideways", "mask 'sideways'"),
                                       ("sequential:causal", "sequential has no mask")])
def test_a_bad_setting_names_what_is_wrong(spec, msg):
    with pytest.raises(ValueError, match=msg):
        study.parse_setting(spec)


def _settings_json(path, model, setting, prompts=16):
    rng = np.random.default_rng(len(model))
    runs = {name: {f: rng.normal(size=(3, 4, 5)) for f in ("pos_err", "psnr", "crisp", "mse")}
            for name in ("sequential", "P4-causal")}
    summary = study.settings_cells({model: {setting: runs}})
    path.write_text(json.dumps({"models": {model: "x"}, "prompts": prompts, "seeds": 3, "cells": summary}))
    return runs


def test_separate_study_runs_merge_into_one_table_with_the_same_cells(tmp_path):
    a = _settings_json(tmp_path / "a.json", "causal-1f", "short")
    _settings_json(tmp_path / "b.json", "lineage-3f", "long")
    res = study.main(["--merge", f"{tmp_path / 'a.json'},{tmp_path / 'b.json'}", "--out", str(tmp_path / "m")])
    merged = res["merged"]["cells"]
    assert set(merged) == {"causal-1f", "lineage-3f"}
    diff = (a["P4-causal"]["pos_err"] - a["sequential"]["pos_err"]).mean(-1)
    np.testing.assert_allclose(merged["causal-1f"]["short"]["pos_err"]["P4-causal"]["diff"], diff.mean(), atol=1e-12)
    text = (tmp_path / "m" / "settings.md").read_text()
    assert "### short" in text and "### long" in text and "lineage-3f: pos px" in text
    _settings_json(tmp_path / "c.json", "other", "short", prompts=8)
    with pytest.raises(ValueError, match="prompts 8 differs"):
        study.merge_settings([str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    with pytest.raises(SystemExit, match="--merge: .*prompts 8 differs"):
        study.main(["--merge", f"{tmp_path / 'a.json'},{tmp_path / 'c.json'}", "--out", str(tmp_path / "m2")])
