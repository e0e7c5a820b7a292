"""`bcjax bench compile --target cpu` (what `bench memory` was) compiles the real programs
abstractly, and the chunked backend's temporaries are a fraction of the dense backend's (here at
a tiny size with small chunks); bad input gets one clear line."""

import re

import pytest

from bcjax.bench import compile as bench_compile
from bcjax.model import attention


@pytest.mark.slow
def test_chunked_needs_far_less_than_dense_on_cpu(capsys, monkeypatch):
    monkeypatch.setattr(attention, "CHUNK_LOGITS_BYTES", 1)  # -> MIN_CHUNK keys per chunk
    monkeypatch.setattr(attention, "MIN_CHUNK", 128)
    assert bench_compile.main(["--target", "cpu", "--preset", "tiny", "--latent-hw", "32", "32", "--backends", "dense",
                               "chunked", "--cases", "sequential", "p4", "--meshes", "5x1", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    temps = {(m[1], m[2]): float(m[3]) for m in
             re.finditer(r"\| tiny \| (\w+) \| \d+x\d+ \| (\w+) \| none \| [\d.e+-]+ \| ([\d.e+-]+) \|", out)}
    assert set(temps) == {(c, b) for c in ("sequential", "p4") for b in ("dense", "chunked")}, out
    for case in ("sequential", "p4"):
        assert temps[case, "chunked"] * 3 < temps[case, "dense"], (case, temps)
    assert "tokens 5 ops" in out  # the P4 tick's all-gathers over `tokens`, counted from the optimised HLO


def test_bad_input_names_what_is_wrong():
    with pytest.raises(ValueError, match="unknown compile target 'v4-8'; known: v5e-8, v5e-16, v5e-32"):
        bench_compile.main(["--target", "v4-8"])
    with pytest.raises(ValueError, match=r"mesh 5x4 needs 20 devices; target h100 has 8"):
        bench_compile.main(["--target", "h100", "--preset", "tiny", "--meshes", "5x4"])
    with pytest.raises(ValueError, match="needs a TPU"):
        bench_compile.main(["--target", "h100", "--backends", "splash"])


def test_a_program_that_does_not_fit_is_a_row_not_an_exception():
    row = bench_compile.Row("m", "p", "1x1", "dense", args=10 * 2**30, temp=8 * 2**30)
    ok, text = row.fits(16 * 2**30, 0.1)
    assert not ok and text == "does not fit: 18.00 GiB > 14.40 GiB"
    assert row.fits(24 * 2**30, 0.1) == (True, "yes")
