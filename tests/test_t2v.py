"""Text to video end to end on a tiny checkpoint: the CLI writes a playable mp4 of the right size."""

import dataclasses

import jax
import numpy as np
import pytest

from bcjax import checkpoint
from bcjax.app.video import read_mp4
from bcjax.cli import main
from bcjax.text.umt5 import UMT5Config
from bcjax.vae.wan_vae import VAEConfig

SENTENCES = ["a red fox runs through the snow", "the cat sits on a warm mat", "waves crash on a rocky shore",
             "a small boat drifts at sunset", "two birds sing in a green tree"]


@pytest.fixture(scope="module")
def sources(tmp_path_factory, tiny_cfg, wan_sd):
    """Tiny upstream-layout files: a Self-Forcing .pt DiT, a transformers umT5, a diffusers VAE, a tokenizer."""
    spm = pytest.importorskip("sentencepiece")
    import torch
    import transformers
    from diffusers import AutoencoderKLWan
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("sources")
    prefix = folder / "spiece"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_prefix=str(prefix), vocab_size=60,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    torch.save({"generator_ema": {"model." + k: v for k, v in wan_sd.items()}}, folder / "self_forcing.pt")
    t = UMT5Config.preset("tiny")
    torch.manual_seed(0)
    umt5 = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=t.vocab_size, d_model=t.d_model, num_layers=t.num_layers, num_heads=t.num_heads, d_kv=t.d_kv,
        d_ff=t.d_ff, feed_forward_proj="gated-gelu", relative_attention_num_buckets=t.num_buckets,
        relative_attention_max_distance=t.max_distance, layer_norm_epsilon=t.eps))
    save_file({k: v.contiguous() for k, v in umt5.state_dict().items() if k != "encoder.embed_tokens.weight"},
              folder / "umt5.safetensors")
    v = VAEConfig.preset("tiny")
    vae = AutoencoderKLWan(base_dim=v.base_dim, z_dim=v.z_dim, dim_mult=list(v.dim_mult),
                           num_res_blocks=v.num_res_blocks,
                           temperal_downsample=list(v.temperal_downsample), latents_mean=list(v.latents_mean),
                           latents_std=list(v.latents_std))
    save_file({k: v.contiguous() for k, v in vae.state_dict().items()}, folder / "vae.safetensors")
    from test_taehv import upstream_random_state_dict

    torch.save({k: torch.from_numpy(v) for k, v in upstream_random_state_dict().items()}, folder / "taew2_1.pth")
    return folder


@pytest.fixture(scope="module")
def tiny_checkpoint(sources, tiny_cfg, torch_tiny_params):
    dst = sources / "ckpt"
    rc = main(["convert", "--from", "self-forcing", str(sources / "self_forcing.pt"), str(dst), "--num-heads", "2",
               "--text-encoder", str(sources / "umt5.safetensors"), "--text-layout", "transformers",
               "--text-preset", "tiny", "--tokenizer", str(sources), "--vae", str(sources / "vae.safetensors"),
               "--vae-preset", "tiny", "--taehv", str(sources / "taew2_1.pth")])
    assert rc == 0
    meta = checkpoint.read_config(str(dst))
    assert meta["configs"]["dit"] == dataclasses.replace(tiny_cfg, attention="auto")
    assert meta["provenance"]["layout"] == "self-forcing" and set(meta["configs"]) == {"dit", "text", "vae", "taehv"}
    _, dit = checkpoint.restore(str(dst), "dit")
    same = jax.tree_util.tree_map(lambda a, b: bool(np.array_equal(np.asarray(a), np.asarray(b))), dit,
                                  torch_tiny_params)
    assert all(jax.tree_util.tree_leaves(same))
    return dst


def test_convert_stores_the_dit_quantized(sources, tmp_path, torch_tiny_params):
    from bcjax.model import quant

    dst = tmp_path / "q"
    assert main(["convert", "--from", "self-forcing", str(sources / "self_forcing.pt"), str(dst), "--num-heads", "2",
                 "--quant", "int8-weight"]) == 0
    meta = checkpoint.read_config(str(dst))
    assert meta["stored_quant"] == {"dit": "int8"} and meta["provenance"]["options"]["quant"] == "int8-weight"
    cfg, dit = checkpoint.restore(str(dst), "dit")
    assert cfg.quant == "int8-weight"
    jax.tree_util.tree_map(np.testing.assert_array_equal, dit, quant.quantize(torch_tiny_params, "int8-weight"))


def _probe(path):
    frames = read_mp4(str(path))  # not imageio_ffmpeg.read_frames: its pre-exec hook forks under JAX
    return (frames.shape[2], frames.shape[1]), len(frames)


@pytest.mark.slow
@pytest.mark.parametrize("stagger", ["sequential", "P4"])
def test_cli_writes_a_playable_mp4(tiny_checkpoint, tmp_path, capsys, stagger):
    out = tmp_path / "fox.mp4"
    rc = main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a red fox in the snow",
               "--num-blocks", "2", "--size", "32", "48", "--stagger", stagger, "--out", str(out), "--seed", "3"])
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
        (["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--out", str(tmp_path / "a.avi")],
         "must name an .mp4"),
        (["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--out", str(tmp_path / "a.mp4"),
          "--size", "40", "48"],
         "multiple of 16"),
        (["--checkpoint", str(tmp_path), "--prompt", "x", "--out", str(tmp_path / "a.mp4")], "no config.json"),
    ]
    for args, message in cases:
        assert main(["generate", *args]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.glob("*.mp4"))
    with pytest.raises(SystemExit):
        main(["generate", "--stagger", "P3"])


def test_convert_errors_are_named(sources, tmp_path, capsys):
    pt = str(sources / "self_forcing.pt")
    cases = [
        (["--from", "self-forcing", str(tmp_path / "missing.pt"), str(tmp_path / "o")], "no such file"),
        (["--from", "longlive", pt, str(tmp_path / "o")], "--lora is required"),
        (["--from", "self-forcing", pt, str(tmp_path / "o"), "--text-encoder", str(sources / "umt5.safetensors")],
         "go together"),
        (["--from", "causvid", pt, str(tmp_path / "o")], "generator"),  # CausVid wants 'generator', the file has _ema
        (["--from", "wan", pt, str(tmp_path / "o")], "unexpected key generator_ema"),
    ]
    for args, message in cases:
        assert main(["convert", *args]) == 2, args
        assert message in capsys.readouterr().err, args
    assert not (tmp_path / "o").exists()


def test_a_checkpoint_samples_with_its_own_port_unless_told():
    """Which sampler a checkpoint runs is decided once, below the CLI (`ports.for_checkpoint`), so
    `bcjax generate`, `bcjax serve` and `TextToVideo` agree: Krea's loop for a Krea checkpoint run
    sequentially, its clean-pass variant under a cascade or where each tab picks (the server)."""
    import ports

    krea = {"layout": "krea"}
    assert ports.for_checkpoint(krea, "sequential").name == "krea_14b"
    assert ports.for_checkpoint(krea, "P4").name == ports.for_checkpoint(krea, None).name == "krea_14b_clean_pass"
    assert ports.for_checkpoint({"layout": "self_forcing"}, "sequential").name == "self_forcing"
    assert ports.for_checkpoint({}, "P4").name == "self_forcing"


@pytest.mark.slow
def test_a_krea_checkpoint_runs_krea_s_loop_without_being_told(tiny_checkpoint, tmp_path):
    import json
    import shutil

    import ports
    from bcjax.app.t2v import TextToVideo

    krea = tmp_path / "krea"
    shutil.copytree(tiny_checkpoint, krea)
    config = json.loads((krea / "config.json").read_text())
    config["provenance"]["layout"] = "krea"
    (krea / "config.json").write_text(json.dumps(config))
    assert TextToVideo(str(krea), video_hw=(32, 48)).pcfg == ports.get("krea_14b").pipeline
    assert TextToVideo(str(krea), video_hw=(32, 48), stagger="P4").pcfg == ports.get("krea_14b_clean_pass").pipeline
    assert TextToVideo(str(tiny_checkpoint), video_hw=(32, 48)).pcfg == ports.get("self_forcing").pipeline


@pytest.mark.slow
def test_krea_mode_reencodes_the_first_frame_through_the_vae(tiny_checkpoint, tmp_path):
    """Krea's R: the last pixel frame decoded from latent frame 3b-3, encoded alone as an image;
    the CLI runs the krea_14b port (context rebuilt per block) end to end."""
    import jax.numpy as jnp

    import ports
    from bcjax.app.t2v import TextToVideo, VAERoundTrip
    from bcjax.vae.wan_vae import decode, encode

    t2v = TextToVideo(str(tiny_checkpoint), ports.get("krea_14b").pipeline, video_hw=(32, 48))
    text = t2v.prompt_kv("a red fox in the snow")
    trip = VAERoundTrip(t2v.vae_cfg, t2v.vae, 1, t2v.latent_hw)
    rs = []
    latents = t2v.denoiser.generate(t2v.dit, text, jax.random.key(0), num_blocks=3,
                                    reencode=lambda x0: rs.append(trip(x0)) or rs[-1])
    video = decode(t2v.vae_cfg, t2v.vae, latents)  # whole clip: 1 + 4 * 8 frames
    for b in (1, 2):  # latent frame 3b decodes to pixel frames 4(3b) - 3 .. 4(3b); R is the last of them
        ref = encode(t2v.vae_cfg, t2v.vae, video[:, 12 * b:12 * b + 1])
        np.testing.assert_allclose(np.asarray(rs[b]), np.asarray(ref), atol=1e-4)
    assert float(jnp.abs(rs[1] - latents[:, 3:4]).max()) > 1e-3  # the round trip is not the identity
    out = tmp_path / "krea.mp4"
    rc = main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a red fox", "--port", "krea_14b",
               "--num-blocks", "2", "--size", "32", "48", "--stagger", "sequential", "--out", str(out)])
    assert rc == 0 and _probe(out) == ((48, 32), 21)


@pytest.mark.slow
def test_video_to_video_from_an_mp4(tiny_checkpoint, tmp_path, capsys):
    src, out = tmp_path / "in.mp4", tmp_path / "v2v.mp4"
    base = ["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a red fox", "--num-blocks", "2",
            "--size", "32", "48", "--stagger", "sequential"]
    assert main(base + ["--out", str(src)]) == 0
    assert main(base + ["--video", str(src), "--strength", "0.5", "--out", str(out)]) == 0
    assert _probe(out) == ((48, 32), 21)
    capsys.readouterr()
    assert main(base + ["--video", str(src), "--size", "64", "48", "--out", str(out)]) == 2
    assert "is 32x48; this run makes 64x48" in capsys.readouterr().err


@pytest.mark.slow
def test_krea_mode_decodes_each_block_once(tiny_checkpoint, tmp_path, monkeypatch):
    """Krea's round trip decodes every block with the Wan VAE; those frames go to the writer."""
    import ports
    from bcjax.app import t2v as t2v_module
    from bcjax.vae import wan_vae

    calls = []
    real = wan_vae.decode_step

    def counted(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(wan_vae, "decode_step", counted)
    if hasattr(t2v_module, "decode_step"):
        monkeypatch.setattr(t2v_module, "decode_step", counted)
    t2v = t2v_module.TextToVideo(str(tiny_checkpoint), ports.get("krea_14b").pipeline, video_hw=(32, 48))
    out = tmp_path / "krea.mp4"
    timings = t2v.write_mp4("a red fox", 3, str(out), progress=False)
    print(f"Krea mode: {len(calls)} VAE decodes for 3 blocks")
    assert _probe(out) == ((48, 32), 33)
    assert len(calls) == 3 == timings["decodes"]


@pytest.mark.slow
def test_taehv_decoder_writes_the_same_frame_count(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "taehv.mp4"
    rc = main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a red fox", "--num-blocks", "2",
               "--size", "32", "48", "--stagger", "P4", "--decoder", "taehv", "--out", str(out)])
    assert rc == 0 and _probe(out) == ((48, 32), 21)  # TAEHV's trim keeps Wan's 1 + 4 (F - 1) frames
    assert "decode (taehv on" in capsys.readouterr().out
    rc = main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a red fox", "--num-blocks", "1",
               "--size", "32", "48", "--stagger", "sequential", "--port", "krea_14b", "--decoder", "taehv",
               "--out", str(out)])
    assert rc == 2 and "round trip decodes every block with the Wan VAE" in capsys.readouterr().err


def test_tune_on_a_checkpoint_then_generate_stagger_auto(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    """`bcjax tune --checkpoint` times the checkpoint's architecture in its stored dtype, with its
    own sampler, and the decode placement of its VAE; `generate --checkpoint --stagger auto` at the
    same latent size finds that tuning and says so."""
    monkeypatch.setenv("BCJAX_TUNE_CACHE", str(tmp_path / "tune"))
    rc = main(["tune", "--checkpoint", str(tiny_checkpoint), "--latent-hw", "4", "6", "--staggers", "sequential",
               "P4", "--attention", "dense", "--ticks", "2", "--decoder", "wan"])
    out = capsys.readouterr().out
    assert rc == 0 and "Decode placement (wan" in out
    winner = out.split("winner: ")[1].split(",")[0]
    rc = main(["generate", "--checkpoint", str(tiny_checkpoint), "--prompt", "a red fox", "--num-blocks", "2",
               "--size", "32", "48", "--stagger", "auto", "--out", str(tmp_path / "fox.mp4")])
    out = capsys.readouterr().out
    assert rc == 0 and f"--stagger auto: {winner} (measured by `bcjax tune` on 1 x cpu" in out
    assert "decoding on --decode-device" in out and _probe(tmp_path / "fox.mp4") == ((48, 32), 21)
