"""Checkpoints under faults (issue 32, findings 1-4): relative paths, `--overwrite` that replaces only a
checkpoint and swaps it in atomically (a kill at any moment keeps the old or the new one whole), and
a manifest that refuses corrupt, incomplete or NaN weights on restore with one line naming the array."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from cli_helpers import one_line

from bcjax import checkpoint, manifest, paths
from bcjax.cli import main
from bcjax.errors import BadFileError

HERE = os.path.dirname(os.path.abspath(__file__))
# orbax leaves the reads of a failed restore's other arrays as un-awaited coroutines
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


def _save(dst, tiny_cfg, tiny_params, **kwargs):
    checkpoint.save(str(dst), {"dit": (tiny_cfg, tiny_params)}, {"layout": "test", **kwargs.pop("prov", {})},
                    **kwargs)
    return dst


def _same(a, b) -> bool:
    return all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
        lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


class _Reached(Exception):
    """Raised by a patched step after the checkpoint was loaded: the run got that far."""


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    pytest.importorskip("sentencepiece")
    from serve_helpers import tiny_checkpoint

    return tiny_checkpoint(tmp_path_factory.mktemp("full"))


# ---- finding 1: a relative --checkpoint ------------------------------------------------------


def test_relative_and_home_paths_restore(tmp_path, tiny_cfg, tiny_params, monkeypatch):
    _save(tmp_path / "ckpt", tiny_cfg, tiny_params)
    monkeypatch.chdir(tmp_path)
    for path in ("ckpt", "./ckpt/", "../" + tmp_path.name + "/ckpt"):
        assert checkpoint.stored_dtype(path, "dit") == "float32"
        _, params = checkpoint.restore(path, "dit")
        assert _same(params, tiny_params)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert _same(checkpoint.restore("~/ckpt", "dit")[1], tiny_params)


def test_generate_and_serve_take_a_relative_checkpoint(full_checkpoint, tmp_path, monkeypatch):
    """Run from the checkpoint's parent with `ckpt` and `./ckpt/`: every part loads (then a patched
    step stops the run before anything compiles)."""
    from bcjax.app import t2v

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.chdir(os.path.dirname(full_checkpoint))
    monkeypatch.setattr(t2v.TextToVideo, "write_mp4", reached)
    with pytest.raises(_Reached):
        main(["generate", "--checkpoint", "ckpt", "--prompt", "a fox", "--size", "32", "48",
              "--out", str(tmp_path / "a.mp4")])
    pytest.importorskip("uvicorn")
    import bcjax.serve

    monkeypatch.setattr(bcjax.serve, "server", reached)
    with pytest.raises(_Reached):
        main(["serve", "--checkpoint", "./ckpt/", "--size", "32", "48", "--port", "0"])


def test_stream_takes_a_relative_checkpoint(tmp_path, monkeypatch):
    import bcjax.runners
    from bcjax.toyworld.evaluate import SHIPPED

    shutil.copytree(SHIPPED, tmp_path / "toy")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(bcjax.runners, "make_runner", reached)
    with pytest.raises(_Reached):
        main(["stream", "--prompts", "red east fast", "--checkpoint", "../toy", "--out", "s.mp4"])


# ---- finding 2: --overwrite replaces only a checkpoint ---------------------------------------


def test_overwrite_refuses_what_is_not_a_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes" / "sub").mkdir(parents=True)
    (tmp_path / "notes" / "precious.txt").write_text("keep me")
    (tmp_path / "notes" / "sub" / "notes.md").write_text("and me")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "model.safetensors").write_bytes(b"source weights")
    (tmp_path / "a-file").write_text("x")
    cases = [
        (["out/model.safetensors", "notes"], "notes is not a bcjax checkpoint"),  # a folder of other files
        (["out/model.safetensors", "out"], "out holds the source out/model.safetensors"),
        (["out/model.safetensors", "."], ". is the working folder"),
        (["out/model.safetensors", ".."], ".. is the working folder or holds it"),
        (["out/model.safetensors", "a-file"], "a-file is a file"),
    ]
    for (src, dst), words in cases:
        assert main(["convert", "--from", "wan", src, dst, "--overwrite"]) == 2
        one_line(capsys, words)
    assert (tmp_path / "notes" / "precious.txt").read_text() == "keep me"
    assert (tmp_path / "notes" / "sub" / "notes.md").read_text() == "and me"
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == b"source weights"
    assert (tmp_path / "a-file").read_text() == "x"
    assert sorted(os.listdir(tmp_path)) == ["a-file", "notes", "out"]  # nothing else written


def test_overwrite_replaces_a_checkpoint_or_an_empty_folder(tmp_path, tiny_cfg, tiny_params):
    (tmp_path / "empty").mkdir()
    _save(tmp_path / "empty", tiny_cfg, tiny_params, overwrite=True)
    _save(tmp_path / "ckpt", tiny_cfg, tiny_params, prov={"run": "old"})
    twice = jax.tree_util.tree_map(lambda a: 2 * a, tiny_params)
    _save(tmp_path / "ckpt", tiny_cfg, twice, prov={"run": "new"}, overwrite=True)
    assert checkpoint.read_config(str(tmp_path / "ckpt"))["provenance"]["run"] == "new"
    assert _same(checkpoint.restore(str(tmp_path / "ckpt"))[1], twice)
    assert sorted(os.listdir(tmp_path)) == ["ckpt", "empty"]  # no temporary folder left


def test_replace_without_an_atomic_exchange_restores_the_old_one_on_failure(tmp_path, monkeypatch):
    for name in ("old", "new"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(name)
    monkeypatch.setattr(paths, "_exchange", lambda a, b: False)
    real = os.rename

    def failing(a, b):
        if str(a).endswith("new"):
            raise OSError("disk gone")
        real(a, b)

    monkeypatch.setattr(os, "rename", failing)
    with pytest.raises(OSError, match="disk gone"):
        checkpoint.replace(str(tmp_path / "new"), str(tmp_path / "old"))
    assert (tmp_path / "old" / "config.json").read_text() == "old"
    monkeypatch.setattr(os, "rename", real)
    checkpoint.replace(str(tmp_path / "new"), str(tmp_path / "old"))
    assert (tmp_path / "old" / "config.json").read_text() == "new" and os.listdir(tmp_path) == ["old"]


# ---- finding 3: a killed --overwrite ---------------------------------------------------------

_KILLED = textwrap.dedent("""
    import os, shutil, sys
    import jax, numpy as np
    from bcjax import checkpoint
    from bcjax.model import WanConfig, param_shapes
    cfg = WanConfig.preset("tiny")
    params = jax.tree_util.tree_map(lambda s: np.full(s.shape, 0.5, s.dtype), param_shapes(cfg))
    where = sys.argv[2]
    if where == "write":  # killed while orbax writes the new checkpoint
        import orbax.checkpoint as ocp
        ocp.StandardCheckpointer.wait_until_finished = lambda self: os._exit(9)
    else:  # killed while the old checkpoint, swapped out, is being removed
        rmtree = shutil.rmtree
        def killed(path, *a, **k):
            rmtree(os.path.join(path, "dit"))
            os._exit(9)
        shutil.rmtree = killed
    checkpoint.save(sys.argv[1], {"dit": (cfg, params)}, {"run": "new"}, overwrite=True)
""")


def test_a_killed_overwrite_keeps_a_whole_checkpoint(tmp_path, tiny_cfg, tiny_params, caplog):
    """kill -9 while the new checkpoint is written, and while the old one is removed after the swap
    (two processes at once): the output is the whole old, resp. new, checkpoint; the next write
    removes the temporary folder the kill left."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.dirname(HERE), os.environ.get("PYTHONPATH", "")]),
           "JAX_PLATFORMS": "cpu"}
    runs = {}
    for where in ("write", "remove-old"):
        (tmp_path / where).mkdir()
        dst = _save(tmp_path / where / "ckpt", tiny_cfg, tiny_params, prov={"run": "old"})
        runs[where] = (dst, subprocess.Popen([sys.executable, "-c", _KILLED, str(dst), where], env=env))
    for where, (dst, proc) in runs.items():
        assert proc.wait(timeout=120) == 9
        left = [e for e in os.listdir(dst.parent) if e.startswith(".bcjax-")]
        assert len(left) == 1  # the killed run's temporary folder
        run = "old" if where == "write" else "new"
        assert checkpoint.read_config(str(dst))["provenance"]["run"] == run
        _, params = checkpoint.restore(str(dst))  # whole: every array matches its manifest
        assert _same(params, tiny_params) == (run == "old")
        with caplog.at_level("WARNING", logger="bcjax"):
            assert checkpoint.clean_stale(str(dst)) == [str(dst.parent / left[0])]
        assert "interrupted" in caplog.text and os.listdir(dst.parent) == ["ckpt"]


def test_a_foreign_temporary_folder_is_reported_not_removed(tmp_path, caplog):
    (tmp_path / ".bcjax-abc123xy").mkdir()  # what bcjax before the fix left: its writer cannot be told
    with caplog.at_level("WARNING", logger="bcjax"):
        assert checkpoint.clean_stale(str(tmp_path / "ckpt")) == []
    assert ".bcjax-abc123xy" in caplog.text and (tmp_path / ".bcjax-abc123xy").is_dir()


# ---- finding 4: integrity on restore ---------------------------------------------------------


def _data_files(part_dir):
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(part_dir) for f in fs
                  if os.sep + "d" + os.sep in os.path.join(d, f))


def test_save_writes_a_manifest(tmp_path, tiny_cfg, tiny_params):
    dst = _save(tmp_path / "ckpt", tiny_cfg, tiny_params)
    recorded = json.loads((dst / "config.json").read_text())["manifest"]["dit"]
    flat = manifest.leaves(tiny_params)
    assert set(recorded) == set(flat)
    for name, a in flat.items():
        assert recorded[name] == {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": manifest.checksum(a)}


def test_corrupt_bytes_are_refused_naming_part_and_array(tmp_path, tiny_cfg, tiny_params):
    dst = _save(tmp_path / "ckpt", tiny_cfg, tiny_params)
    biggest = max(_data_files(dst / "dit"), key=os.path.getsize)
    middle = os.path.getsize(biggest) // 2
    with open(biggest, "r+b") as f:  # one flipped bit: orbax reads it without a complaint
        f.seek(middle)
        byte = f.read(1)[0]
        f.seek(middle)
        f.write(bytes([byte ^ 0x10]))
    _, params = checkpoint.restore(str(dst), "dit", verify=False)  # what loaded silently before the manifest
    assert not _same(params, tiny_params)
    with pytest.raises(BadFileError, match=rf"^{dst}/dit: array \S+ does not match its checksum; the checkpoint is "
                                           r"corrupt \(convert it again\)$"):
        checkpoint.restore(str(dst), "dit")
    with open(biggest, "r+b") as f:
        f.seek(middle)
        f.write(bytes(64))  # 64 bytes overwritten, as in the issue: orbax or the checksum refuses
    with pytest.raises(BadFileError, match=rf"{dst}/dit: (array \S+ does not match its checksum|orbax cannot read)"):
        checkpoint.restore(str(dst), "dit")


@pytest.mark.parametrize("damage", ["truncate", "delete-data", "_METADATA", "manifest.ocdbt", "part"])
def test_incomplete_checkpoints_areone_line(tmp_path, tiny_cfg, tiny_params, capsys, damage):
    dst = _save(tmp_path / "ckpt", tiny_cfg, tiny_params)
    biggest = max(_data_files(dst / "dit"), key=os.path.getsize)
    if damage == "truncate":
        os.truncate(biggest, os.path.getsize(biggest) // 3)
    elif damage == "delete-data":
        os.remove(biggest)
    elif damage == "part":
        shutil.rmtree(dst / "dit")
    else:
        found = [os.path.join(d, f) for d, _, fs in os.walk(dst / "dit") for f in fs if f == damage]
        assert found
        for f in found:
            os.remove(f)
    if damage == "_METADATA":  # the manifest knows every array: the weights load, verified whole
        assert _same(checkpoint.restore(str(dst), "dit")[1], tiny_params)
        meta = json.loads((dst / "config.json").read_text())
        del meta["manifest"]  # as a checkpoint written before manifests
        (dst / "config.json").write_text(json.dumps(meta))
    with pytest.raises(BadFileError, match=f"{dst}" + r"(/dit: |: part 'dit' )") as e:
        checkpoint.restore(str(dst), "dit")
    assert "several dtypes" not in str(e.value) and "\n" not in str(e.value)
    if damage == "_METADATA":
        assert "_METADATA missing or damaged" in str(e.value)


def test_nan_weights_are_refused(tmp_path, tiny_cfg, tiny_params, monkeypatch):
    bad = jax.tree_util.tree_map(lambda a: a, tiny_params)
    bad["head"]["head"]["kernel"] = bad["head"]["head"]["kernel"].at[0, 0].set(np.nan)
    with pytest.raises(BadFileError, match="part 'dit': array head/head/kernel holds NaN or Inf"):
        _save(tmp_path / "ckpt", tiny_cfg, bad)
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(manifest, "check_finite", lambda tree, where: None)  # as a file written elsewhere could be
    _save(tmp_path / "ckpt", tiny_cfg, bad)
    monkeypatch.undo()
    with pytest.raises(BadFileError, match=f"{tmp_path}/ckpt/dit: array head/head/kernel holds NaN or Inf"):
        checkpoint.restore(str(tmp_path / "ckpt"))
    checkpoint.restore(str(tmp_path / "ckpt"), verify=False)  # --no-verify: loaded as it is


def test_generate_names_a_corrupt_checkpoint_and_no_verify_skips(full_checkpoint, tmp_path, capsys, monkeypatch):
    from bcjax.app import t2v

    dst = tmp_path / "ckpt"
    shutil.copytree(full_checkpoint, dst)
    meta = json.loads((dst / "config.json").read_text())
    entry = next(iter(meta["manifest"]["vae"].values()))
    entry["sha256"] = "0" * 64  # as if the stored bytes had changed
    (dst / "config.json").write_text(json.dumps(meta))
    args = ["generate", "--checkpoint", str(dst), "--prompt", "a fox", "--size", "32", "48",
            "--out", str(tmp_path / "a.mp4")]
    assert main(args) == 2
    one_line(capsys, f"{dst}/vae: array", "does not match its checksum")

    def reached(*args, **kwargs):
        raise _Reached

    monkeypatch.setattr(t2v.TextToVideo, "write_mp4", reached)
    with pytest.raises(_Reached):
        main([*args, "--no-verify"])
