"""`bcjax bench gpu` runs end to end on CPU at the tiny size, so a GPU session can trust it."""

import re

import pytest

from bcjax.bench import gpu


@pytest.mark.slow
def test_bench_gpu_smoke_run_prints_every_figure(capsys):
    assert gpu.main(["--preset", "tiny", "--latent-hw", "8", "8", "--dtype", "float32", "--blocks", "1",
                     "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    for figure in ("sequential denoise FPS", "sequential + streamed VAE decode FPS", "time to first frame",
                   "P4 batched on one device FPS", "P4 one block's share of a tick",
                   "P4 all-gather per tick per device",
                   "modelled P4 on 5 devices FPS (all-gather serial)", "peak device memory"):
        assert re.search(rf"\| {re.escape(figure)} \| \S", out), (figure, out)
    for backend in ("chunked", "dense"):  # the CPU's backends, each timed on a full and an empty cache
        assert re.search(rf"{backend} +full cache +\d+\.\d+ ms \| empty cache +\d+\.\d+ ms", out), out
