"""The mp4 writer: right frame count and size, playable after an interruption, clear errors."""

import imageio_ffmpeg
import numpy as np
import pytest

from bcjax.pipeline.video import Mp4Writer


def _probe(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    return meta["size"], sum(1 for _ in reader)


def test_frames_appended_in_chunks(tmp_path):
    out = tmp_path / "v.mp4"
    with Mp4Writer(str(out), fps=16) as w:
        w.write(np.zeros((1, 48, 64, 3), np.float32))  # first latent frame -> 1 video frame
        for _ in range(3):
            w.write(np.random.default_rng(0).uniform(-1, 1, (12, 48, 64, 3)))
    assert _probe(out) == ((64, 48), 37)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]


def test_interrupted_stream_leaves_a_playable_file(tmp_path):
    out = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt):
        with Mp4Writer(str(out)) as w:
            w.write(np.zeros((12, 32, 32, 3), np.uint8))
            raise KeyboardInterrupt
    assert _probe(out) == ((32, 32), 12)


def test_bad_output_is_named(tmp_path):
    with pytest.raises(ValueError, match="must end in .mp4"):
        Mp4Writer(str(tmp_path / "v.avi"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Mp4Writer(str(tmp_path / "nope" / "v.mp4"))
    with Mp4Writer(str(tmp_path / "v.mp4")) as w:
        with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
            w.write(np.zeros((2, 8, 8)))
    assert not list(tmp_path.iterdir())  # nothing written, nothing left
