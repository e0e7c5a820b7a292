"""The mp4 writer: right frame count and size, playable after an interruption, clear errors."""

import os

import numpy as np
import pytest

from bcjax.app.video import Mp4Writer, read_mp4


def _probe(path):
    """((width, height), frames) of an mp4."""
    frames = read_mp4(str(path))
    return (frames.shape[2], frames.shape[1]), len(frames)


def test_frames_appended_in_chunks(tmp_path):
    out = tmp_path / "v.mp4"
    with Mp4Writer(str(out), fps=16) as w:
        w.write(np.zeros((1, 48, 64, 3), np.float32))  # first latent frame -> 1 video frame
        for _ in range(3):
            w.write(np.random.default_rng(0).uniform(-1, 1, (12, 48, 64, 3)))
    assert _probe(out) == ((64, 48), 37)
    assert [p.name for p in tmp_path.iterdir()] == ["v.mp4"]
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # as open() would make it, not mkstemp's 0600


def test_interrupted_stream_leaves_a_playable_file(tmp_path):
    out = tmp_path / "v.mp4"
    with pytest.raises(KeyboardInterrupt), Mp4Writer(str(out)) as w:
        w.write(np.zeros((12, 32, 32, 3), np.uint8))
        raise KeyboardInterrupt
    assert _probe(out) == ((32, 32), 12)


def test_bad_output_is_named(tmp_path):
    with pytest.raises(ValueError, match="must end in .mp4"):
        Mp4Writer(str(tmp_path / "v.avi"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        Mp4Writer(str(tmp_path / "nope" / "v.mp4"))
    with Mp4Writer(str(tmp_path / "v.mp4")) as w, pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        w.write(np.zeros((2, 8, 8)))
    assert not list(tmp_path.iterdir())  # nothing written, nothing left


_FORK_SCRIPT = """
import sys, numpy as np, jax.numpy as jnp
jnp.zeros(3).block_until_ready()  # a JAX backend is up: its at-fork hook warns on os.fork()
if sys.argv[1] == "imageio":  # how the writer used to start ffmpeg (preexec_fn=os.setpgrp)
    import imageio_ffmpeg
    g = imageio_ffmpeg.write_frames(sys.argv[2], (32, 32), fps=8, macro_block_size=1, ffmpeg_log_level="error")
    g.send(None); g.send(np.zeros((32, 32, 3), np.uint8).tobytes()); g.close()
else:
    from bcjax.app.video import Mp4Writer, read_mp4
    with Mp4Writer(sys.argv[2], fps=8) as w:
        w.write(np.zeros((4, 32, 32, 3), np.uint8))
"""


def test_ffmpeg_starts_without_os_fork_in_a_jax_process(tmp_path):
    """imageio-ffmpeg's preexec_fn makes subprocess fork() through Python's at-fork handlers,
    where JAX warns "os.fork() was called ... JAX is multithreaded"; the writer's own start does not."""
    import subprocess
    import sys

    def run(how):
        out = tmp_path / f"{how}.mp4"
        r = subprocess.run([sys.executable, "-W", "default", "-c", _FORK_SCRIPT, how, str(out)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        return r.stderr, out

    stderr, out = run("imageio")
    assert "os.fork() was called" in stderr  # the check sees the warning where it happens
    stderr, out = run("bcjax")
    assert "os.fork()" not in stderr, stderr
    assert _probe(out) == ((32, 32), 4)


def test_frames_per_block_follows_the_decoder_not_a_constant():
    """FPS = video frames per block / seconds: block_frames x the decoder's temporal scale."""
    from bcjax.app.video import frames_per_block
    from bcjax.cli import _video_frames_per_block
    from bcjax.schedule.config import PipelineConfig
    from bcjax.toyworld import demo
    from bcjax.toyworld.evaluate import load_model

    assert _video_frames_per_block(PipelineConfig()) == 12  # Self-Forcing's 3 latent frames, Wan VAE x4
    toy = load_model("causal-1f")
    assert frames_per_block(toy.pcfg.block_frames, demo.TEMPORAL_SCALE) == 1  # one-frame blocks, no VAE


def test_block_to_uint8_drops_the_first_blocks_padding():
    from bcjax.app.video import block_to_uint8

    video = np.stack([np.full((2, 2, 3), v, np.float32) for v in (-1.0, 0.0, 1.0)])[None]  # [1, 3, 2, 2, 3]
    assert block_to_uint8(video, True, 1)[:, 0, 0, 0].tolist() == [128, 255]
    assert block_to_uint8(video, False, 1)[:, 0, 0, 0].tolist() == [0, 128, 255]
