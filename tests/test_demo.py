"""`bcjax demo`, the README's main job, as a new user runs it: the shipped model, its video,
frames PNG and report; the sequential column shows the sprite crisp in every block."""

import os

import pytest

from bcjax.cli import main
from bcjax.toyworld.png import read_png


@pytest.mark.slow
def test_demo_writes_video_frames_and_report_and_the_sequential_sprite_is_crisp(tmp_path, capsys):
    out = tmp_path / "demo.mp4"
    assert main(["demo", "--out", str(out)]) == 0
    got = capsys.readouterr().out
    report = tmp_path / "demo.md"
    png = tmp_path / "demo-frames.png"
    for f in (out, report, png):
        assert os.path.getsize(f) > 0, f
    import imageio_ffmpeg

    frames, secs = imageio_ffmpeg.count_frames_and_secs(str(out))
    assert frames >= 30 and secs >= 3.0, (frames, secs)  # watchable: not a slideshow of a few frames
    text = report.read_text()
    assert "![truth and every setting" in text and "(demo-frames.png)" in text  # the report embeds the frames
    assert "Crisp frames per generated block" in text and "wrote" in got
    img = read_png(str(png))
    assert img.ndim == 3 and img.shape[0] > img.shape[1] / 8  # 3 prompts x 4 rows of 41 frames
    crisp = text[text.index("Crisp frames per generated block"):].splitlines()
    seq = next(line for line in crisp if line.startswith("| sequential |"))
    per_block = [float(v) for v in seq.strip("| ").split("|")[1:]]
    assert per_block == [100.0] * 40, seq  # every prompt, every block: a clean render of the world


def test_the_frame_counter_sits_on_the_dark_footer():
    """The counter is drawn below the panels, whose walls are white: every pixel of its box is
    the dark background or the counter's own colour, and the glyphs are there."""
    import numpy as np

    from bcjax.toyworld.demo import compose
    from bcjax.toyworld.evaluate import eval_scenes, load_model
    from bcjax.toyworld.world import render

    model = load_model()
    world = model.world
    scenes = eval_scenes(world, 2)
    f = 2 * world.block_frames
    truth = np.stack([render(s, f, world) for s in scenes])
    video = compose([truth, truth], scenes, model)
    for t in (0, f - 1):
        box = video[t, -14:, -32:].reshape(-1, 3)
        colours = {tuple(int(v) for v in c) for c in box}
        ink = (255, 80, 80) if t < world.block_frames else (255, 255, 255)
        assert colours == {(32, 32, 32), ink}, (t, colours)
