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


@pytest.mark.parametrize("spec, msg", [("P5x", "schedule 'P5x'"), ("P4:sideways", "window 'sideways'"),
                                       ("sequential:causal", "sequential has no window")])
def test_a_bad_setting_names_what_is_wrong(spec, msg):
    with pytest.raises(ValueError, match=msg):
        study.parse_setting(spec)
