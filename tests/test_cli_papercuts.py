"""The command line as a new user meets it (issue 33, "CLI papercuts"): quiet start-up on a machine
without accelerators, refusals that say what is missing, flag names that mean one thing, help and
errors that name the command, and demo / stream outputs laid out and labelled like the demo's video."""

import os
import subprocess
import sys

import numpy as np
import pytest
from cli_helpers import one_line

from bcjax import cli
from bcjax.cli import build_parser, main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env(**changes) -> dict:
    """This environment without JAX_PLATFORMS and TPU_LIBRARY_PATH (a new user sets neither)."""
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "TPU_LIBRARY_PATH")}
    env.update(changes)
    return env


def test_startup_is_quiet_without_accelerators():
    """JAX_PLATFORMS unset, the CUDA plugin and libtpu installed (`pip install ".[test]"`), no GPU
    or TPU here: no cuPTI traceback, no libtpu warnings before the command's own output."""
    if cli._accelerators():
        pytest.skip("this machine has an accelerator: its plugin is meant to start")
    r = subprocess.run([sys.executable, "-m", "bcjax.cli", "--no-compile-cache", "info"], env=_env(), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    for noise in ("cuPTI", "TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "Traceback"):
        assert noise not in r.stderr, r.stderr
    assert "backend: cpu" in r.stdout


def test_accelerators_keep_their_platforms(tmp_path, monkeypatch):
    """A machine showing a GPU or a TPU is left to jax's own choice (its plugin starts); a bare one
    gets jax_platforms = cpu; JAX_PLATFORMS set by the user always wins."""
    import jax

    assert cli._accelerators(str(tmp_path)) == []
    (tmp_path / "dev").mkdir()
    (tmp_path / "dev" / "nvidiactl").touch()
    assert cli._accelerators(str(tmp_path)) == ["gpu"]
    chip = tmp_path / "sys" / "bus" / "pci" / "devices" / "0000:00:04.0"
    chip.mkdir(parents=True)
    (chip / "vendor").write_text("0x1ae0\n")  # Google: a TPU chip
    assert cli._accelerators(str(tmp_path)) == ["gpu", "tpu"]

    updates = []
    monkeypatch.setattr(jax.config, "update", lambda name, value: updates.append((name, value)))
    monkeypatch.setitem(jax.config.values, "jax_platforms", None)  # as in a fresh `bcjax` process
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(cli, "_accelerators", lambda root="/": ["tpu"])
    monkeypatch.delenv("JAX_PLATFORMS", raising=False)
    cli._cpu_unless_accelerated()
    assert updates == []
    monkeypatch.setattr(cli, "_accelerators", lambda root="/": [])
    monkeypatch.setenv("JAX_PLATFORMS", "")
    cli._cpu_unless_accelerated()
    assert updates == []
    monkeypatch.delenv("JAX_PLATFORMS")
    cli._cpu_unless_accelerated()
    assert updates in ([], [("jax_platforms", "cpu")])  # [] only where a non-CUDA plugin is installed


def test_generate_without_checkpoint_refuses_an_mp4_and_a_prompt(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "_setup", lambda args: pytest.fail("computed before refusing"))
    assert main(["generate", "--out", str(tmp_path / "x.mp4")]) == 2
    one_line(capsys, "--out", "x.mp4", "latents (.npy)", "--checkpoint")
    assert main(["generate", "--prompt", "a fox"]) == 2
    one_line(capsys, "--prompt needs --checkpoint", "no text encoder")
    assert os.listdir(tmp_path) == []


def test_a_count_is_num_prompts_and_bad_counts_name_the_flag(capsys):
    assert build_parser().parse_args(["demo", "--num-prompts", "2"]).prompts == 2
    assert capsys.readouterr().err == ""
    assert build_parser().parse_args(["demo", "--prompts", "2"]).prompts == 2  # the old spelling, for a release
    one_line(capsys, "--prompts is deprecated", "--num-prompts")
    assert build_parser().parse_args(["stream", "--prompts", "red east fast@0"]).prompts == "red east fast@0"
    for argv in (["demo", "--num-prompts", "x"], ["demo", "--blocks", "0"],
                 ["eval", "toyworld", "--num-prompts", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"argument {argv[-2]}" in err and "expected a positive integer" in err, err
        assert "_positive" not in err and "invalid" not in err, err


def test_eval_errors_take_the_cli_prefix(capsys, monkeypatch):
    assert main(["eval", "toyworld", "--staggers", "P9"]) == 2
    one_line(capsys, "bcjax eval: error: --staggers: unknown stagger 'P9'")
    from bcjax.toyworld import evaluate

    def refuse(*args, **kwargs):
        raise ValueError("no such checkpoint")

    monkeypatch.setattr(evaluate, "load_model", refuse)
    assert main(["eval", "toyworld", "--prompts", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--prompts is deprecated" in err[0] and "--num-prompts" in err[0], err
    assert err[1] == "bcjax eval: error: no such checkpoint", err


def test_every_bench_help_names_its_command(capsys):
    for name in cli.BENCHES:
        with pytest.raises(SystemExit) as e:
            main(["--no-compile-cache", "bench", name, "--help"])
        assert e.value.code == 0
        assert capsys.readouterr().out.startswith(f"usage: bcjax bench {name} "), name


def test_bench_memory_is_not_listed_and_points_to_its_replacement(capsys):
    for argv, code in ((["bench", "--help"], 0), (["bench", "memory"], 2)):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == code
    listing, err = capsys.readouterr()
    assert "compile" in listing and "memory" not in listing, listing
    assert "bcjax bench compile --target cpu" in err, err


def test_bench_compile_without_libtpu_isone_line(tmp_path):
    (tmp_path / "sitecustomize.py").write_text(
        "import sys\n"
        "class _NoLibtpu:\n"
        "    @staticmethod\n"
        "    def find_spec(name, path=None, target=None):\n"
        "        if name.partition('.')[0] == 'libtpu':\n"
        "            raise ModuleNotFoundError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, _NoLibtpu())\n")
    path = os.pathsep.join(p for p in (str(tmp_path), os.environ.get("PYTHONPATH")) if p)
    r = subprocess.run([sys.executable, "-m", "bcjax.cli", "--no-compile-cache", "bench", "compile", "--target",
                        "v5e-8"], env=_env(PYTHONPATH=path, JAX_PLATFORMS="cpu"), cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
    err = r.stderr.strip()
    assert r.returncode == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("bcjax bench: error: target 'v5e-8' needs libtpu") and "pip install 'jax[tpu]==" in err


def test_bench_convert_is_small_by_default_and_says_what_it_needs(capsys, monkeypatch):
    from bcjax.bench import convert
    from bcjax.model.config import WanConfig

    def stop(*args, **kwargs):
        raise ValueError("stopped before writing")

    monkeypatch.setattr(convert, "write_random", stop)
    assert main(["bench", "convert"]) == 2
    out = capsys.readouterr().out
    assert out.startswith("bcjax bench convert: tiny (bfloat16) needs about") and "MB of disk" in out, out
    disk, memory = convert.needs(WanConfig.preset("wan2.1-1.3b"), "bfloat16")
    assert 5e9 < disk < 6.5e9 and 8e9 < memory < 10e9, (disk, memory)  # measured: 5 GB, 8.3 GB


def _toy(n_prompts: int):
    from bcjax.toyworld.evaluate import eval_scenes, load_model

    model = load_model()
    return model, eval_scenes(model.world, n_prompts)


def test_demo_prints_a_summary_and_the_report_keeps_the_table(tmp_path, capsys, monkeypatch):
    from bcjax.toyworld import demo
    from bcjax.toyworld.world import render

    def fake_stream(model, scenes, num_blocks, key, schedule, window, mesh=None):
        f = (1 + num_blocks) * model.world.block_frames
        return np.stack([render(s, f, model.world) for s in scenes]), 0.5, 2.0

    monkeypatch.setattr(demo, "timed_stream", fake_stream)
    assert main(["demo", "--num-prompts", "1", "--blocks", "2", "--out", str(tmp_path / "d.mp4")]) == 0
    out = capsys.readouterr().out
    assert "|" not in out and len(out.splitlines()) <= 10, out
    assert "| setting | MSE vs truth |" in (tmp_path / "d.md").read_text()


def _colour_boxes(img: np.ndarray, colours: dict) -> dict:
    """{key: (row centre, column centre)} of the pixels of each colour."""
    boxes = {}
    for key, c in colours.items():
        rows, cols = np.nonzero(np.all(img == np.asarray(c, np.uint8), axis=-1))
        assert rows.size, key
        boxes[key] = ((rows.min() + rows.max()) / 2, (cols.min() + cols.max()) / 2)
    return boxes


def test_the_frames_png_is_laid_out_as_the_video(tmp_path):
    """Every (prompt, setting) panel painted its own colour: in the PNG as in the video, settings
    run left to right and prompts top to bottom."""
    from bcjax.toyworld.demo import compose, frames_png
    from bcjax.toyworld.world import to_rgb

    model, scenes = _toy(2)
    world = model.world
    a, f = world.amplitude, 3 * world.block_frames
    signs = [(1, -1, -1), (-1, 1, -1), (-1, -1, 1)]  # one hue per setting, one brightness per prompt
    lat = [np.stack([np.broadcast_to(np.multiply(s, (0.3 + 0.3 * i) * a), (f, world.size, world.size, 3))
                     for i in range(len(scenes))]).astype(np.float32) for s in signs]
    colours = {(i, j): tuple(to_rgb(lat[j][i, 0, 0, 0], world)) for i in range(len(scenes)) for j in range(len(signs))}
    video = _colour_boxes(compose(lat, scenes, model)[0], colours)
    png = _colour_boxes(frames_png(str(tmp_path / "f.png"), lat, scenes, model), colours)
    for boxes in (video, png):
        for i in range(len(scenes)):
            xs = [boxes[i, j][1] for j in range(len(signs))]
            assert xs == sorted(xs) and len(set(xs)) == len(xs), boxes  # settings: columns
        for j in range(len(signs)):
            assert boxes[0, j][0] < boxes[1, j][0], boxes  # prompts: rows


def test_stream_frames_are_labelled_and_watchable():
    from bcjax.toyworld.demo import stream_frames
    from bcjax.toyworld.world import render, to_rgb

    model, scenes = _toy(1)
    world = model.world
    frames = render(scenes[0], 2, world)
    a = stream_frames(frames, world, "P4-causal no-recache", "red east fast", 0)
    b = stream_frames(frames, world, "P4-causal no-recache", "blue west slow", 0)
    assert a.shape[0] == 2 and a.shape[1] >= 256 and a.shape[2] >= 256, a.shape
    assert a.shape[1] % 16 == 0 and a.shape[2] % 16 == 0, a.shape
    head = a[0, :30]
    assert (head == 255).all(-1).any() and not np.array_equal(head, b[0, :30])  # the title and the prompt
    big = np.repeat(np.repeat(to_rgb(frames, world), 24, 1), 24, 2)
    assert any(np.array_equal(a[:, y:y + big.shape[1], x:x + big.shape[2]], big)
               for y in range(30, 36) for x in range(8))  # the panel itself, under the header
