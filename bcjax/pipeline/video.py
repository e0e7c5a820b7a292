"""An mp4 writer that appends frames as they arrive and never leaves a corrupt file.

Frames go to a temporary file beside the target through ffmpeg (imageio-ffmpeg ships the
binary); `close()` finalises the container and renames it into place. If the stream dies
(exception, Ctrl-C) the frames written so far are still finalised and renamed, so what was
produced stays playable.
"""

from __future__ import annotations

import os
import tempfile

import numpy as np


def to_uint8(frames) -> np.ndarray:
    """Video in [-1, 1] (the VAE's range), [T, H, W, 3] -> uint8."""
    return np.clip((np.asarray(frames, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


class Mp4Writer:
    """with Mp4Writer("out.mp4", fps=16) as w: w.write(frames [T, H, W, 3] uint8 or [-1, 1] floats)."""

    def __init__(self, path: str, fps: float = 16.0, quality: int = 8):
        if not path.lower().endswith(".mp4"):
            raise ValueError(f"output {path!r} must end in .mp4")
        self.path = os.path.abspath(path)
        folder = os.path.dirname(self.path)
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"output folder {folder} does not exist")
        self.fps, self.quality = fps, quality
        self.frames = 0
        self._gen = None
        fd, self._tmp = tempfile.mkstemp(prefix=".bcjax-", suffix=".mp4", dir=folder)
        os.close(fd)
        self._size = None

    def write(self, frames) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3]; got shape {frames.shape}")
        if frames.dtype != np.uint8:
            frames = to_uint8(frames)
        if self._gen is None:
            import imageio_ffmpeg

            self._size = (frames.shape[2], frames.shape[1])
            self._gen = imageio_ffmpeg.write_frames(self._tmp, self._size, fps=self.fps, quality=self.quality,
                                                    macro_block_size=1, ffmpeg_log_level="error")
            self._gen.send(None)
        elif (frames.shape[2], frames.shape[1]) != self._size:
            raise ValueError(f"frame size {frames.shape[2]}x{frames.shape[1]} differs from the stream's "
                             f"{self._size[0]}x{self._size[1]}")
        for frame in frames:
            self._gen.send(np.ascontiguousarray(frame).tobytes())
        self.frames += len(frames)

    def close(self) -> None:
        if self._gen is not None:
            self._gen.close()
            self._gen = None
            os.replace(self._tmp, self.path)
        elif os.path.exists(self._tmp):
            os.remove(self._tmp)  # nothing was written: no empty file left behind

    def __enter__(self) -> "Mp4Writer":
        return self

    def __exit__(self, *exc) -> bool:
        self.close()
        return False


class NullWriter:
    """Mp4Writer's interface, writing nothing: the processes of a multi-host job other than 0."""

    path = None

    def __init__(self):
        self.frames = 0

    def write(self, frames) -> None:
        self.frames += len(frames)

    def __enter__(self) -> "NullWriter":
        return self

    def __exit__(self, *exc) -> bool:
        return False
