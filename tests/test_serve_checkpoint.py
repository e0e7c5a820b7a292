"""`bcjax serve --checkpoint`: a converted real model's folder (a tiny random one here) behind the
same page protocol: free-text prompts through the tokenizer and umT5, JPEG frames decoded by the
decoder the page picks among the checkpoint's (the Wan VAE, TAEHV), each block's decode time sent."""

import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("websockets")

from serve_helpers import connect, read, start, start_server, tiny_checkpoint, until


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("real"))


@pytest.mark.slow
def test_a_real_checkpoint_streams_jpeg_frames_and_switches_free_text(checkpoint_dir):
    from bcjax.serve import CheckpointBackend

    s = start_server(CheckpointBackend(checkpoint_dir, video_hw=(32, 48), decoder="wan"))
    assert s.backend.describe()["kind"] == "text"
    with pytest.raises(ValueError, match="tokens long; the text encoder reads at most 16"):
        s.backend.check("the cat sits on a warm mat " * 3)
    with connect(s) as ws:
        start(ws, prompt="a red fox runs", stagger="P2", mask="causal")
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


@pytest.mark.slow
def test_the_page_picks_the_decoder_and_hears_each_blocks_decode_time(checkpoint_dir):
    from bcjax.serve import CheckpointBackend

    s = start_server(CheckpointBackend(checkpoint_dir, video_hw=(32, 48)))
    model = s.backend.describe()  # what the hello carries
    assert model["decoders"] == ["wan", "taehv"] and model["decoder"] == "taehv" and model["decode_device"]
    with connect(s) as ws:
        start(ws, prompt="a red fox runs", stagger="sequential", decoder="taehv")
        state = until(ws, lambda j: j["type"] == "state", timeout=120)
        assert state["settings"]["decoder"] == "taehv"
        (header, images), = read(ws, 1, timeout=120)[0]
        assert header["decoder"] == "taehv" and header["decode_ms"] > 0 and len(images) == 9  # TAEHV keeps Wan's frames
        start(ws, prompt="a red fox runs", stagger="sequential", decoder="wan")  # another decoder: a new stream
        state = until(ws, lambda j: j["type"] == "state" and j["state"] == "compiling")
        assert state["settings"]["decoder"] == "wan"
        header = None
        while header is None or header["stream"] != state["stream"]:  # blocks of the old stream may still come
            (header, _), = read(ws, 1, timeout=120)[0]
        assert header["decoder"] == "wan" and header["decode_ms"] > 0


def test_the_toy_world_offers_no_decoder_and_says_why():
    from serve_helpers import served

    s = served()
    model = s.backend.describe()
    assert model["decoders"] == [] and model["decoder"] is None and "no VAE" in model["decoder_note"]
    with connect(s) as ws:
        start(ws, decoder="taehv")
        err = until(ws, lambda j: j["type"] == "error")
        assert err["what"] == "decoder" and "the toy world has no VAE" in err["message"]


def test_a_decoder_the_checkpoint_lacks_is_refused_by_name(checkpoint_dir):
    import ports
    from bcjax.app.t2v import TextToVideo

    t2v = TextToVideo(checkpoint_dir, ports.get("krea_14b").pipeline, (32, 48))
    assert t2v.decoders() == ["wan"]  # Krea's round trip decodes with the Wan VAE already
    with pytest.raises(ValueError, match="--decoder taehv: with Krea's loop, its VAE round trip"):
        t2v.pixel_decoder("taehv")


@pytest.mark.slow
def test_overlapped_decode_sends_the_frames_of_decoding_each_block_in_turn(checkpoint_dir):
    """The server dispatches a block's TAEHV decode, then the next step, then fetches the pixels:
    its JPEGs are those of decoding the same blocks one after another before each next step (the
    decoder's carried state and the first block's trimmed frames included)."""
    import jax

    from bcjax.app.interactive import LivePrompts, steps
    from bcjax.serve import CheckpointBackend

    s = start_server(CheckpointBackend(checkpoint_dir, video_hw=(32, 48)), ack_window=100)
    with connect(s) as ws:
        start(ws, prompt="a red fox runs", stagger="sequential", decoder="taehv", seed=3)
        got, _ = read(ws, 3, timeout=120)
    b, encode, ref = s.backend, s.backend.frame_encoder("taehv"), []
    ticks = steps(s.app.state.runners.get("sequential", "bidirectional"), b.params,
                  LivePrompts(b.prompt_kv("a red fox runs")), jax.random.key(3), None)
    while len(ref) < len(got):
        if (e := next(ticks).event) is not None:
            ref.append((e.block, encode(e.x0)()[0]))  # decoded and fetched before the next step
    ticks.close()
    assert [len(imgs) for _, imgs in ref] == [9, 12, 12]
    assert [(h["block"], imgs) for h, imgs in got] == ref


@pytest.mark.slow
def test_a_krea_stream_follows_krea_s_loop_with_the_vae_round_trip(checkpoint_dir):
    """Served with Krea's loop, a stream takes R from the VAE round trip from block 2 on (as
    `bcjax generate` does), and the frames sent are the round trip's own decode of each block:
    the same JPEGs as TextToVideo's Krea blocks. A recache policy is refused at start."""
    import jax

    from bcjax.app.video import to_uint8
    from bcjax.serve import CheckpointBackend
    from bcjax.serve.models import _images

    s = start_server(CheckpointBackend(checkpoint_dir, port="krea_14b", video_hw=(32, 48)), ack_window=100)
    assert s.backend.describe()["decoder"] == "wan"
    with connect(s) as ws:
        start(ws, prompt="a red fox runs", stagger="sequential", policy="recache", seed=3)
        err = until(ws, lambda j: j["type"] == "error")
        assert "keeps no cache" in err["message"], err
        start(ws, prompt="a red fox runs", stagger="sequential", seed=3)
        got, _ = read(ws, 3, timeout=180)
    b = s.backend
    t2v, pad = b.t2v, b.t2v.vae_cfg.first_chunk_padding
    ref = []
    for i, (_, video) in enumerate(t2v._latent_blocks(b.prompt_kv("a red fox runs"), 3, jax.random.key(3))):
        video = video[:, pad:] if i == 0 else video
        ref.append(_images(to_uint8(video[0]), "JPEG", quality=b.quality))
    assert [len(imgs) for imgs in ref] == [9, 12, 12]
    assert [imgs for _, imgs in got] == ref
