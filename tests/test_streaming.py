"""Decode/write off the critical path: order, overlap, errors, and a playable file after an interrupt."""

import threading
import time

import numpy as np
import pytest

from bcjax.app.streaming import drain, overlapped
from bcjax.app.video import Mp4Writer, read_mp4


def _slow_items(n, seconds, fail_at=None):
    for i in range(n):
        time.sleep(seconds)  # a block denoising
        if i == fail_at:
            raise KeyboardInterrupt
        yield i


def test_results_in_order_and_on_another_thread():
    main = threading.get_ident()
    out = list(overlapped(range(20), lambda i: (i * i, threading.get_ident())))
    assert [r for r, _ in out] == [i * i for i in range(20)]
    assert {t for _, t in out} != {main} and len({t for _, t in out}) == 1  # one worker keeps sink state ordered


def test_sink_overlaps_the_producer():
    n, s = 8, 0.1
    t0 = time.perf_counter()
    drain(overlapped(_slow_items(n, s), lambda i: time.sleep(s)))
    overlapped_s = time.perf_counter() - t0
    # serial: 2 n s = 1.6 s; overlapped: ~ (n + 1) s = 0.9 s
    assert overlapped_s < 1.5 * n * s, overlapped_s


def test_sink_error_surfaces_at_its_item_after_earlier_results():
    def sink(i):
        if i == 3:
            raise ValueError("bad block 3")
        return i

    got = []
    with pytest.raises(ValueError, match="bad block 3"):
        for r in overlapped(range(10), sink):
            got.append(r)
    assert got == [0, 1, 2]


def test_interrupted_stream_keeps_every_finished_block_playable(tmp_path):
    path = tmp_path / "stream.mp4"
    frames = np.zeros((4, 16, 16, 3), np.uint8)
    with pytest.raises(KeyboardInterrupt), Mp4Writer(str(path), fps=8) as w:
        drain(overlapped(_slow_items(10, 0.01, fail_at=5), lambda i: w.write(frames + 20 * i)))
    frames = read_mp4(str(path))
    assert frames.shape[1:3] == (16, 16)
    assert len(frames) == w.frames == 5 * 4  # blocks 0-4 written, none lost, none torn
