"""`bcjax serve --checkpoint`: a converted real model's folder (a tiny random one here) behind the
same page protocol: free-text prompts through the tokenizer and umT5, VAE-decoded JPEG frames."""

import json

import jax
import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("websockets")

from serve_helpers import connect, read, start, start_server, until  # noqa: E402

SENTENCES = ["a red fox runs through the snow", "the cat sits on a warm mat", "waves crash on a rocky shore"]


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A bcjax checkpoint folder with random tiny dit + umT5 + VAE and a trained tokenizer."""
    import sentencepiece as spm

    from bcjax import checkpoint
    from bcjax.model import WanConfig, param_shapes
    from bcjax.text import umt5
    from bcjax.vae import wan_vae

    folder = tmp_path_factory.mktemp("real")
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_prefix=str(folder / "spiece"),
                                   vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    cfg = WanConfig.preset("tiny")
    tcfg, vcfg = umt5.UMT5Config.preset("tiny"), wan_vae.VAEConfig.preset("tiny")
    rng = np.random.default_rng(0)

    def random(shapes):  # small random weights without compiling the initialisers
        return jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)

    parts = {"dit": (cfg, random(param_shapes(cfg))), "text": (tcfg, random(umt5.param_shapes(tcfg))),
             "vae": (vcfg, random(wan_vae.param_shapes(vcfg)))}
    dst = folder / "ckpt"
    checkpoint.save(str(dst), parts, {"source": "tests"}, files={"tokenizer/spiece.model": str(folder / "spiece.model")})
    return str(dst)


def test_a_real_checkpoint_streams_jpeg_frames_and_switches_free_text(checkpoint_dir):
    from bcjax.serve import CheckpointBackend

    s = start_server(CheckpointBackend(checkpoint_dir, video_hw=(32, 48)))
    assert s.backend.describe()["kind"] == "text"
    with pytest.raises(ValueError, match="tokens long; the text encoder reads at most 16"):
        s.backend.check("the cat sits on a warm mat " * 3)
    with connect(s) as ws:
        start(ws, prompt="a red fox runs", schedule="P2", window="causal")
        blocks, _ = read(ws, 2, timeout=120)
        header, images = blocks[0]
        assert header["mime"] == "image/jpeg" and len(images) == 9  # 3 latent frames -> 1 + 4 * 2 video frames
        assert all(img[:2] == b"\xff\xd8" for img in images)  # JPEG start-of-image
        assert len(blocks[1][1]) == 12
        ws.send(json.dumps({"type": "prompt", "prompt": "waves crash on a rocky shore " * 4}))
        err = until(ws, lambda j: j["type"] in ("error", "prompt"))
        assert err["what"] == "prompt" and "tokens long" in err["message"]
        ws.send(json.dumps({"type": "prompt", "prompt": "a cat on a mat"}))
        assert until(ws, lambda j: j["type"] in ("error", "prompt"))["index"] == 1
        after, _ = read(ws, 6, timeout=120)
        assert any(h["block_prompt"] == 1 and "switch_ms" in h for h, _ in after)
