"""An mp4 writer that appends frames as they arrive and never leaves a corrupt file.

Frames go to a temporary file beside the target through ffmpeg (imageio-ffmpeg ships the
binary); `close()` finalises the container and renames it into place. If the stream dies
(exception, Ctrl-C) the frames written so far are still finalised and renamed, so what was
produced stays playable.

ffmpeg is started here, not by `imageio_ffmpeg.write_frames`: that passes
`preexec_fn=os.setpgrp` (to keep Ctrl-C away from ffmpeg), and a Python pre-exec hook forces
CPython's subprocess to fork() and run the at-fork handlers -- where JAX warns "os.fork() was
called ... JAX is multithreaded" once a backend is up. `process_group=0` puts ffmpeg in its own
process group just the same, inside the child's C code, so subprocess can vfork/exec without any
Python fork handler (and the child never runs Python in a copy of a multithreaded process).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from fractions import Fraction
from typing import Literal

import numpy as np


def publish(tmp: str, path: str) -> None:
    """Move a finished temporary file into place with the permissions a plain open() would have
    given it (mkstemp makes it 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def read_mp4(path: str) -> np.ndarray:
    """uint8 frames [T, H, W, 3] of a video file, decoded by imageio-ffmpeg's ffmpeg through a plain
    subprocess (not `imageio_ffmpeg.read_frames`, whose pre-exec hook would fork() under JAX's
    threads; see the module docstring)."""
    import re

    import imageio_ffmpeg

    if not os.path.isfile(path):
        raise ValueError(f"{path}: no such video file")
    run = subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-nostdin", "-i", str(path), "-f", "rawvideo", "-pix_fmt",
                          "rgb24", "-"], capture_output=True, check=False)
    size = re.search(rb"Video: .*?(\d{2,5})x(\d{2,5})", run.stderr)
    if run.returncode or size is None:
        raise ValueError(f"{path}: ffmpeg cannot read it ({run.stderr.decode(errors='replace')[-300:]})")
    w, h = int(size.group(1)), int(size.group(2))
    return np.frombuffer(run.stdout, np.uint8).reshape(-1, h, w, 3)


def to_uint8(frames) -> np.ndarray:
    """Video in [-1, 1] (the VAE's range), [T, H, W, 3] -> uint8."""
    return np.clip((np.asarray(frames, np.float32) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8)


def block_to_uint8(video, first: bool, padding: int) -> np.ndarray:
    """One decoded block [1, T, H, W, 3] in [-1, 1] -> uint8 frames [T', H, W, 3]; the stream's first
    block drops the decoder's `padding` frames (a causal VAE's first chunk starts with them)."""
    return to_uint8(video[0, padding:] if first else video[0])


def frames_per_block(block_frames: int, temporal_scale: int) -> int:
    """Video frames one block of `block_frames` latent frames becomes (in steady state): times the
    decoder's temporal scale. Wan VAE / TAEHV: 4, so a 3-frame block is 12 frames (the paper's FPS);
    the toy world has no VAE (its latents are its frames): scale 1, a 1-frame block is 1 frame."""
    return block_frames * temporal_scale


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
        self._proc: subprocess.Popen | None = None
        fd, self._tmp = tempfile.mkstemp(prefix=".bcjax-", suffix=".mp4", dir=folder)
        os.close(fd)
        self._size: tuple[int, int] = (0, 0)  # set with _proc, by the first write

    def write(self, frames) -> None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3:
            raise ValueError(f"frames must be [T, H, W, 3]; got shape {frames.shape}")
        if frames.dtype != np.uint8:
            frames = to_uint8(frames)
        if self._proc is None:
            self._size = (frames.shape[2], frames.shape[1])
            self._proc = _start_ffmpeg(self._tmp, self._size, self.fps, self.quality)
        elif (frames.shape[2], frames.shape[1]) != self._size:
            raise ValueError(f"frame size {frames.shape[2]}x{frames.shape[1]} differs from the stream's "
                             f"{self._size[0]}x{self._size[1]}")
        assert self._proc.stdin is not None  # opened with stdin=PIPE
        try:
            self._proc.stdin.write(np.ascontiguousarray(frames).tobytes())
        except BrokenPipeError as e:
            raise OSError(f"ffmpeg writing {self._tmp} exited with code {self._proc.poll()}") from e
        self.frames += len(frames)

    def close(self) -> None:
        if self._proc is not None:
            proc, self._proc = self._proc, None
            assert proc.stdin is not None  # opened with stdin=PIPE
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
            if proc.wait() != 0:
                raise OSError(f"ffmpeg writing {self._tmp} exited with code {proc.returncode}")
            publish(self._tmp, self.path)
        elif os.path.exists(self._tmp):
            os.remove(self._tmp)  # nothing was written: no empty file left behind

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, *exc) -> Literal[False]:
        self.close()
        return False


def ffmpeg_command(path: str, size: tuple[int, int], fps: float, quality: int) -> list[str]:
    """imageio-ffmpeg's `write_frames` command for rgb24 frames of size (width, height) -> H.264
    yuv420p at the given quality (0-10, crf = int((1 - quality / 10) * 51)), no resizing."""
    import imageio_ffmpeg

    rate = str(Fraction(fps).limit_denominator())
    return [imageio_ffmpeg.get_ffmpeg_exe(), "-y", "-f", "rawvideo", "-vcodec", "rawvideo",
            "-s", f"{size[0]}x{size[1]}", "-pix_fmt", "rgb24", "-r", rate, "-i", "-", "-an",
            "-vcodec", "libx264", "-pix_fmt", "yuv420p",
            "-crf", str(int((1 - quality / 10.0) * 51)), "-v", "error", path]


def _start_ffmpeg(path: str, size: tuple[int, int], fps: float, quality: int) -> subprocess.Popen:
    # No preexec_fn (see the module docstring): the process group is set by the C child code.
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    return subprocess.Popen(ffmpeg_command(path, size, fps, quality), stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            close_fds=True, **group)


class NullWriter:
    """Mp4Writer's interface, writing nothing: the processes of a multi-host job other than 0."""

    path = None

    def __init__(self):
        self.frames = 0

    def write(self, frames) -> None:
        self.frames += len(frames)

    def __enter__(self) -> NullWriter:
        return self

    def __exit__(self, *exc) -> Literal[False]:
        return False
