"""`bcjax bench memory` compiles the real programs abstractly and the chunked backend's
temporaries are a fraction of the dense backend's (here at a tiny size with small chunks)."""

import re

from bcjax.bench import memory
from bcjax.model import attention


def test_bench_memory_chunked_needs_far_less_than_dense(capsys, monkeypatch):
    monkeypatch.setattr(attention, "CHUNK_LOGITS_BYTES", 1)  # -> MIN_CHUNK keys per chunk
    monkeypatch.setattr(attention, "MIN_CHUNK", 128)
    assert memory.main(["--preset", "tiny", "--latent-hw", "32", "32", "--backends", "dense", "chunked",
                        "--cases", "sequential", "p4-mesh", "--layers", "1", "--dtype", "float32"]) == 0
    out = capsys.readouterr().out
    temps = {(m[1], m[2]): float(m[3]) for m in re.finditer(r"\| tiny \| (\S+) \| (\w+) \| 1 \| ([\d.e+-]+) \|", out)}
    assert set(temps) == {(c, b) for c in ("sequential", "p4-mesh:5x1") for b in ("dense", "chunked")}, out
    for case in ("sequential", "p4-mesh:5x1"):
        assert temps[case, "chunked"] * 3 < temps[case, "dense"], (case, temps)
