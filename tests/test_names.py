"""Names that mean one thing (issue 33): the choice sets are declared once in `bcjax.names`, and the
old spellings of the renamed ones (the `stage` mesh axis, the `window` that was the in-flight mask,
the `schedule` that was the stagger) keep working for one release, saying the new one."""

import typing
import warnings

import jax
import pytest
from cli_helpers import one_line

import bcjax
from bcjax import names
from bcjax.cli import build_parser, main
from bcjax.runners import make_mesh, make_runner
from bcjax.schedule.config import PipelineConfig

HW = (4, 6)


def test_every_choice_set_is_its_literal_type():
    for literal, choices in ((names.StaggerName, names.STAGGERS), (names.Mask, names.MASKS),
                             (names.Policy, names.POLICIES), (names.Positions, names.POSITIONS),
                             (names.Context, names.CONTEXTS), (names.Backend, names.BACKENDS),
                             (names.PortName, names.PORTS), (names.Program, names.PROGRAMS),
                             (names.MeshAxis, names.MESH_AXES)):
        assert choices == typing.get_args(literal)
    assert (names.TOKENS, names.MODEL) == names.MESH_AXES
    assert names.DEFAULT_MASK in names.MASKS and names.SEQUENTIAL in names.STAGGERS
    assert set(names.GRID_STAGGERS) <= set(names.STAGGERS) and set(names.GRID_MASKS) <= set(names.MASKS)
    with pytest.raises(ValueError, match="mask 'sideways': expected one of"):
        names.as_mask("sideways")


def test_the_mesh_axis_is_tokens():
    mesh = make_mesh(1)
    assert mesh.axis_names == ("tokens", "model")


@pytest.mark.parametrize("argv, old, new, dest, value", [
    (["generate", "--schedule", "P2"], "--schedule", "--stagger", "stagger", "P2"),
    (["generate", "--window", "bidirectional"], "--window", "--mask", "mask", "bidirectional"),
    (["stream", "--prompts", "red east fast@0", "--schedule", "sequential"], "--schedule", "--stagger", "stagger",
     "sequential"),
    (["stream", "--prompts", "red east fast@0", "--window", "bidirectional-windowed"], "--window", "--mask", "mask",
     "bidirectional-windowed"),
])
def test_an_old_cli_flag_works_and_says_the_new_one_once(capsys, argv, old, new, dest, value):
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    one_line(capsys, f"{old} is deprecated", new)
    args = build_parser().parse_args([new if a == old else a for a in argv])  # the new spelling: silent
    assert getattr(args, dest) == value and capsys.readouterr().err == ""


def test_an_old_flag_keeps_its_choices(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["generate", "--schedule", "P9"])
    assert "invalid choice: 'P9'" in capsys.readouterr().err


@pytest.mark.parametrize("flag, new, value", [("--schedules", "--staggers", "P4"), ("--stages", "--tokens", "1"),
                                              ("--window", "--mask", "causal")])
def test_bench_comm_old_flags_work(capsys, flag, new, value):
    """`bcjax bench comm`'s bytes table (formula only, no FPS table: cheap) under an old flag."""
    assert main(["bench", "comm", "--staggers", "P4", "--tokens", "1", "--fps-presets", flag, value]) == 0
    out, err = capsys.readouterr()
    assert err.strip().splitlines() == [f"bcjax bench comm: {flag} is deprecated here; it is spelled {new}"], err
    assert "| P4 | (1, 1) |" in out


def test_eval_toyworld_old_flags_work(capsys):
    assert main(["eval", "toyworld", "--schedules", "P9"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--schedules is deprecated" in err[0] and "--staggers" in err[0], err
    assert err[1].startswith("bcjax eval: error: --staggers: unknown stagger 'P9'"), err
    assert main(["eval", "toyworld", "--windows", "sideways"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "--windows is deprecated" in err[0] and "--masks" in err[0], err


def test_old_python_keywords_warn_and_give_the_same_runner(tiny_cfg):
    pcfg = PipelineConfig(block_frames=1, window_frames=3)
    new = make_runner(tiny_cfg, pcfg, HW, stagger="P2", mask="bidirectional")
    with (pytest.warns(DeprecationWarning, match="schedule= is deprecated: it is spelled stagger="),
          pytest.warns(DeprecationWarning, match="window= is deprecated: it is spelled mask=")):
        old = make_runner(tiny_cfg, pcfg, HW, schedule="P2", window="bidirectional")
    assert (old.kind, old.stagger, old.mask, old.plan, old.label) == (new.kind, new.stagger, new.mask, new.plan,
                                                                      new.label)
    with pytest.raises(TypeError, match="both stagger= and its old name schedule="), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        make_runner(tiny_cfg, pcfg, HW, stagger="P4", schedule="P2")
    # bcjax.generate takes them too (refused right after, before anything compiles)
    with pytest.warns(DeprecationWarning, match="window= is deprecated"), pytest.raises(ValueError, match="mask 'x'"):
        bcjax.generate(tiny_cfg, None, None, jax.random.key(0), num_blocks=1, pcfg=pcfg, latent_hw=HW, window="x")


def test_make_mesh_old_keyword_warns_and_gives_the_same_mesh():
    with pytest.warns(DeprecationWarning, match=r"stage= is deprecated: it is spelled tokens="):
        old = make_mesh(stage=1)
    assert old == make_mesh(tokens=1)


def test_stream_run_old_keywords_warn(tmp_path):
    from bcjax.toyworld import demo

    with pytest.warns(DeprecationWarning, match="schedule= is deprecated"), pytest.raises(ValueError, match=".mp4"):
        demo.stream_run("red east fast@0", out=str(tmp_path / "x.avi"), schedule="P4")


def test_a_runner_has_no_old_attribute(tiny_cfg):
    runner = make_runner(tiny_cfg, PipelineConfig(block_frames=1, window_frames=3), HW, "P4", "causal")
    for old in ("schedule", "window"):
        assert not hasattr(runner, old)
    assert isinstance(runner.stagger, str) and runner.plan.in_flight == 5



def test_text_to_video_old_keywords_warn():
    """TextToVideo(schedule=, window=): the old names, read before the checkpoint is (here: missing)."""
    from bcjax.app.t2v import TextToVideo

    with (pytest.warns(DeprecationWarning, match="window= is deprecated: it is spelled mask="),
          pytest.raises(FileNotFoundError)):
        TextToVideo("/nonexistent-checkpoint", PipelineConfig(), window="causal")
