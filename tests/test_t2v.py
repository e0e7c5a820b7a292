"""Text to video end to end on a tiny checkpoint: the CLI writes a playable mp4 of the right size."""

import imageio_ffmpeg
import jax
import pytest

from bcjax import checkpoint
from bcjax.cli import main
from bcjax.text.umt5 import UMT5Config
from bcjax.text.umt5 import init_params as text_init
from bcjax.vae.wan_vae import VAEConfig
from bcjax.vae.wan_vae import init_params as vae_init

SENTENCES = ["a red fox runs through the snow", "the cat sits on a warm mat", "waves crash on a rocky shore",
             "a small boat drifts at sunset", "two birds sing in a green tree"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory, tiny_cfg, tiny_params):
    spm = pytest.importorskip("sentencepiece")
    folder = tmp_path_factory.mktemp("t2v")
    prefix = folder / "spiece"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_prefix=str(prefix), vocab_size=60,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    tcfg, vcfg = UMT5Config.preset("tiny"), VAEConfig.preset("tiny")
    parts = {"dit": (tiny_cfg, tiny_params), "text": (tcfg, text_init(tcfg, jax.random.key(1))),
             "vae": (vcfg, vae_init(vcfg, jax.random.key(2)))}
    dst = folder / "ckpt"
    checkpoint.save(str(dst), parts, {"layout": "test"}, files={"tokenizer/spiece.model": str(prefix) + ".model"})
    return dst


def _probe(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    return meta["size"], sum(1 for _ in reader)


@pytest.mark.parametrize("schedule", ["sequential", "P4"])
def test_cli_writes_a_playable_mp4(tiny_checkpoint, tmp_path, capsys, schedule):
    out = tmp_path / "fox.mp4"
    rc = main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a red fox in the snow",
               "--num-blocks", "2", "--size", "32", "48", "--schedule", schedule, "--out", str(out), "--seed", "3"])
    assert rc == 0
    # 2 blocks = 6 latent frames -> 1 + 4 * 5 = 21 video frames of 48x32
    assert _probe(out) == ((48, 32), 21)
    line = capsys.readouterr().out.strip().splitlines()[-1]
    for word in ("denoise", "FPS", "decode", "end-to-end", "first frame"):
        assert word in line


def test_bad_paths_and_flags_are_named(tiny_checkpoint, tmp_path, capsys):
    cases = [
        (["--checkpoint", str(tmp_path / "nope"), "--prompt", "x", "--out", str(tmp_path / "a.mp4")], "no such folder"),
        (["--checkpoint", str(tiny_checkpoint), "--out", str(tmp_path / "a.mp4")], "needs --prompt"),
        (["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--out", str(tmp_path / "a.avi")], "must name an .mp4"),
        (["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--out", str(tmp_path / "a.mp4"), "--size", "40", "48"],
         "multiple of 16"),
        (["--checkpoint", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "a.mp4")], "no config.json"),
    ]
    for args, message in cases:
        assert main(["generate", *args]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4"))
    with pytest.raises(SystemExit):
        main(["generate", "--schedule", "P3"])
