"""The command line under careless input: one line naming the flag, file or port, exit code 2,
nothing left behind, and nothing computed first."""

import os
import socket

import pytest
from cli_helpers import one_line

from bcjax.cli import build_parser, main


def test_serve_names_a_bad_port_host_or_checkpoint(tmp_path, capsys):
    pytest.importorskip("uvicorn")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    try:
        assert main(["serve", "--port", str(port)]) == 2
        one_line(capsys, f"--port {port}", "in use")
    finally:
        taken.close()
    assert main(["serve", "--port", "99999"]) == 2
    one_line(capsys, "--port 99999", "0 .. 65535")
    assert main(["serve", "--host", "0.0.0.0.0", "--port", "0"]) == 2
    one_line(capsys, "--host '0.0.0.0.0'")
    plain = tmp_path / "weights.bin"
    plain.write_bytes(b"x")
    assert main(["serve", "--checkpoint", str(plain), "--port", "0"]) == 2
    one_line(capsys, f"--checkpoint {plain}", "is a file")
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "config.json").write_bytes(b"\x9d\x00garbage")
    assert main(["serve", "--checkpoint", str(tmp_path / "ckpt"), "--port", "0"]) == 2
    one_line(capsys, str(tmp_path / "ckpt" / "config.json"), "not a bcjax config.json")


def test_outputs_are_checked_before_anything_is_computed(tmp_path, capsys, monkeypatch):
    import bcjax.cli

    monkeypatch.chdir(tmp_path)
    (tmp_path / "garbage.bin").write_bytes(b"x")
    monkeypatch.setattr(bcjax.cli, "_setup", lambda args: pytest.fail("computed before checking --out"))
    for out, words in [("garbage.bin/x.npy", "garbage.bin is a file, not a folder"),
                       ("/proc/nope.npy", "cannot write in /proc")]:
        assert main(["generate", "--out", out]) == 2
        one_line(capsys, f"--out {out}", words)
    assert main(["stream", "--prompts", "red east fast", "--out", "garbage.bin/x.mp4"]) == 2
    one_line(capsys, "--out garbage.bin/x.mp4", "is a file")
    if os.access("/sys", os.W_OK) and not os.path.ismount("/sys"):
        pytest.skip("/sys is writable here")
    assert main(["stream", "--prompts", "red east fast", "--out", "/sys/s.mp4"]) == 2
    one_line(capsys, "--out /sys/s.mp4", "cannot write in /sys")
    assert sorted(os.listdir(tmp_path)) == ["garbage.bin"]  # nothing partial left


def test_convert_names_a_garbage_source(tmp_path, capsys):
    pytest.importorskip("torch")
    src = tmp_path / "garbage.pt"
    src.write_bytes(os.urandom(256))
    assert main(["convert", "--from", "self-forcing", str(src), str(tmp_path / "out")]) == 2
    err = one_line(capsys, str(src), "not a PyTorch checkpoint")
    assert "weights_only=False" not in err
    assert sorted(os.listdir(tmp_path)) == ["garbage.pt"]


def test_stream_applies_the_serve_prompt_rules(tmp_path, capsys):
    out = str(tmp_path / "s.mp4")
    assert main(["stream", "--prompts", "red east fast@0;purple west slow@3", "--blocks", "6", "--out", out]) == 2
    one_line(capsys, "'purple'")  # a switch the world cannot render names the word
    assert main(["stream", "--prompts", "red east fast@0;red west slow@50", "--blocks", "6", "--out", out]) == 2
    one_line(capsys, "'red west slow'@50", "last block (6)", "--blocks")
    assert os.listdir(tmp_path) == []


def test_stream_ctrl_c_isone_line(tmp_path, capsys, monkeypatch):
    from bcjax.toyworld import demo

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "stream_run", interrupted)
    assert main(["stream", "--prompts", "red east fast", "--out", str(tmp_path / "s.mp4")]) == 130
    one_line(capsys, "interrupted", "s.mp4")


def test_the_sampling_preset_is_sampler_and_port_is_its_old_name(capsys):
    args = build_parser().parse_args(["generate", "--sampler", "causvid"])
    assert args.sampler == "causvid" and capsys.readouterr().err == ""
    args = build_parser().parse_args(["generate", "--port", "causvid"])
    assert args.sampler == "causvid"
    one_line(capsys, "--port is deprecated", "--sampler")
