"""umT5 encoder: parity with transformers' UMT5EncoderModel, both converters, tokenizer, bad input."""

import re

import jax
import numpy as np
import pytest

from bcjax.text import UMT5Config, clean_prompt, encode, load_tokenizer, param_shapes, prompt_embeddings, tokenize
from bcjax.text.umt5 import relative_position_buckets
from checkpoints_conv import umt5 as umt5_conv

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# transformers name under encoder.block.N. -> Wan2.1 T5Encoder name under blocks.N. (wan/modules/t5.py)
_HF_TO_WAN = {
    "layer.0.layer_norm.weight": "norm1.weight",
    **{f"layer.0.SelfAttention.{p}.weight": f"attn.{p}.weight" for p in "qkvo"},
    "layer.0.SelfAttention.relative_attention_bias.weight": "pos_embedding.embedding.weight",
    "layer.1.layer_norm.weight": "norm2.weight",
    "layer.1.DenseReluDense.wi_0.weight": "ffn.gate.0.weight",
    "layer.1.DenseReluDense.wi_1.weight": "ffn.fc1.weight",
    "layer.1.DenseReluDense.wo.weight": "ffn.fc2.weight",
}
SENTENCES = [
    "a red fox jumps over the lazy dog", "the cat sits on a warm mat in the sun",
    "waves crash on a rocky shore at dusk",
    "a train moves slowly through snowy mountains", "two birds fly over a green field", "the city lights glow at night",
]


@pytest.fixture(scope="module")
def cfg():
    return UMT5Config.preset("tiny")


@pytest.fixture(scope="module")
def hf(cfg):
    """A tiny random transformers umT5 encoder (the oracle) and its state dict as numpy."""
    hf_cfg = transformers.UMT5Config(
        vocab_size=cfg.vocab_size, d_model=cfg.d_model, num_layers=cfg.num_layers, num_heads=cfg.num_heads,
        d_kv=cfg.d_kv, d_ff=cfg.d_ff, feed_forward_proj="gated-gelu", relative_attention_num_buckets=cfg.num_buckets,
        relative_attention_max_distance=cfg.max_distance, layer_norm_epsilon=cfg.eps, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.UMT5EncoderModel(hf_cfg).eval()
    with torch.no_grad():  # larger than HF's init so attention is peaky and the biases matter
        for name, p in model.named_parameters():
            p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else torch.randn_like(p) * (
                1.0 if p.ndim == 1 or "embed" in name or "shared" in name or "bias" in name else p.shape[1] ** -0.5))
    return model, {k: v.numpy().copy() for k, v in model.state_dict().items()}


def _wan_layout(sd):
    out = {"token_embedding.weight": sd["shared.weight"], "norm.weight": sd["encoder.final_layer_norm.weight"]}
    for k, v in sd.items():
        if m := re.fullmatch(r"encoder\.block\.(\d+)\.(.+)", k):
            out[f"blocks.{m[1]}.{_HF_TO_WAN[m[2]]}"] = v
    return out


def _batch(cfg, length=24):
    """Two prompts of 24 and 9 tokens, the second right-padded; lengths past max_exact use log buckets."""
    rng = np.random.default_rng(0)
    ids = rng.integers(3, cfg.vocab_size, (2, length)).astype(np.int32)
    mask = np.arange(length)[None] < np.array([[length], [9]])
    return np.where(mask, ids, 0).astype(np.int32), mask


def test_relative_buckets_match_transformers(hf):
    attn = hf[0].encoder.block[0].layer[0].SelfAttention
    rel = torch.arange(600)[None, :] - torch.arange(600)[:, None]
    np.testing.assert_array_equal(relative_position_buckets(600, 32, 128), attn._relative_position_bucket(rel).numpy())


def test_parity_with_transformers(cfg, hf):
    model, sd = hf
    ids, mask = _batch(cfg)
    with torch.no_grad():
        want = model(input_ids=torch.from_numpy(ids).long(),
                     attention_mask=torch.from_numpy(mask).long()).last_hidden_state.numpy()
    got = np.asarray(encode(cfg, umt5_conv.convert_transformers(sd, cfg), ids, mask))
    err = np.abs(got - want).max()
    print(f"umT5 fp32 max abs error vs transformers: {err:.2e} (output scale {np.abs(want).max():.2f})")
    assert got.shape == (2, 24, cfg.d_model) and got.dtype == np.float32
    assert err <= 1e-4


def test_wan_layout_gives_identical_params_and_output(cfg, hf, tmp_path):
    sd = hf[1]
    p_hf = umt5_conv.convert_transformers(sd, cfg)
    torch.save({k: torch.from_numpy(v) for k, v in _wan_layout(sd).items()}, tmp_path / "t5.pth")
    p_wan = umt5_conv.load_wan(tmp_path / "t5.pth", cfg)  # through torch.load, as from Wan's .pth
    jax.tree_util.tree_map(np.testing.assert_array_equal, p_hf, p_wan)
    ids, mask = _batch(cfg)
    np.testing.assert_array_equal(encode(cfg, p_hf, ids, mask), encode(cfg, p_wan, ids, mask))


def test_bf16_params_and_compute(cfg, hf, tmp_path):
    cfg16 = UMT5Config.preset("tiny", dtype="bfloat16", param_dtype="bfloat16")
    params = umt5_conv.convert_transformers(hf[1], cfg16)
    assert params["blocks"]["attn"]["q"]["kernel"].dtype == np.dtype("bfloat16")
    ids, mask = _batch(cfg)
    ref = np.asarray(encode(cfg, umt5_conv.convert_transformers(hf[1], cfg), ids, mask))
    torch.save({"w": torch.arange(4.0).to(torch.bfloat16)}, tmp_path / "bf16.pth")  # Wan ships bf16
    w = umt5_conv.read_pth(tmp_path / "bf16.pth")["w"]
    assert w.dtype == np.dtype("bfloat16") and w.astype(np.float32).tolist() == [0, 1, 2, 3]
    got = np.asarray(encode(cfg16, params, ids, mask))
    assert got.dtype == np.float32
    assert np.abs(got - ref).max() <= 0.1 * np.abs(ref).max()


def test_xxl_preset_shapes():
    shapes = jax.tree_util.tree_map(lambda s: s.shape, param_shapes(UMT5Config.preset("umt5-xxl")))
    assert shapes["token_embedding"]["embedding"] == (256384, 4096)
    assert shapes["blocks"]["pos_embedding"]["embedding"] == (24, 32, 64)  # one bias table per layer
    assert shapes["blocks"]["ffn"]["gate"]["kernel"] == (24, 4096, 10240)
    assert shapes["blocks"]["attn"]["o"]["kernel"] == (24, 4096, 4096)


# --- tokenizer and Wan's prompt embeddings -------------------------------------------------------


@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    spm = pytest.importorskip("sentencepiece")
    prefix = tmp_path_factory.mktemp("spm") / "spiece"
    # T5's special ids: pad 0, eos 1, unk 2, no bos
    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_prefix=str(prefix), vocab_size=60,
                                   pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False, minloglevel=2)
    return load_tokenizer(prefix.parent)  # a folder holding spiece.model, as in a Wan checkpoint


def test_tokenize_pads_truncates_and_adds_eos(sp):
    ids, mask = tokenize(sp, ["a red fox", "  the cat \n\t sits  "], text_len=16)
    assert ids.shape == mask.shape == (2, 16) and ids.dtype == np.int32 and mask.dtype == bool
    for row, m, text in zip(ids, mask, ["a red fox", "the cat sits"], strict=True):
        pieces = sp.encode(text)
        n = len(pieces) + 1
        assert m.sum() == n and m[:n].all()
        np.testing.assert_array_equal(row[:n], pieces + [1])
        assert (row[n:] == 0).all()
    long_ids, long_mask = tokenize(sp, " ".join(SENTENCES), text_len=16)
    assert long_mask.all() and long_ids[0, -1] == 1  # truncated, still ends in EOS
    np.testing.assert_array_equal(long_ids[0, :15], sp.encode(" ".join(SENTENCES))[:15])


def test_clean_prompt_collapses_whitespace_without_lowercasing():
    assert clean_prompt("  A  Cat&amp;amp;Dog\n\t runs ") == "A Cat&Dog runs"


def test_prompt_embeddings_zero_past_prompt_length(cfg, hf, sp):
    params = umt5_conv.convert_transformers(hf[1], cfg)
    ids, mask = tokenize(sp, ["a red fox jumps", "the city lights glow at night over the sea"], text_len=cfg.text_len)
    emb = np.asarray(prompt_embeddings(cfg, params, ids, mask))
    assert emb.shape == (2, cfg.text_len, cfg.d_model)
    full = np.asarray(encode(cfg, params, ids, mask))
    for b, n in enumerate(mask.sum(1)):
        assert (emb[b, n:] == 0).all() and (np.abs(emb[b, :n]).min(-1) > 0).all()
        np.testing.assert_array_equal(emb[b, :n], full[b, :n])
        # Wan's u[:seq_len]: the prompt encoded alone, unpadded, gives the same embeddings
        alone = np.asarray(encode(cfg, params, ids[b:b + 1, :n], mask[b:b + 1, :n]))[0]
        np.testing.assert_allclose(emb[b, :n], alone, atol=1e-5, rtol=1e-5)
    # shorter ids are zero-padded up to text_len
    short = np.asarray(prompt_embeddings(cfg, params, ids[:, :12], mask[:, :12]))
    assert short.shape == emb.shape and (short[:, 12:] == 0).all()


# --- bad input ---------------------------------------------------------------------------------


def test_missing_key_is_named(cfg, hf):
    sd = dict(hf[1])
    del sd["encoder.block.1.layer.1.DenseReluDense.wi_1.weight"]
    with pytest.raises(ValueError,
                       match=r"missing key encoder\.block\.1\.layer\.1\.DenseReluDense\.wi_1\.weight "
                             r"\(layers \[1\] of 2\)"):
        umt5_conv.convert_transformers(sd, cfg)
    sd = _wan_layout(hf[1])
    del sd["token_embedding.weight"], sd["blocks.0.pos_embedding.embedding.weight"]
    with pytest.raises(ValueError, match=r"2 problems(.|\n)*missing key token_embedding\.weight(.|\n)*"
                                         r"missing key blocks\.0\.pos_embedding\.embedding\.weight"):
        umt5_conv.convert_wan(sd, cfg)


def test_wrong_shape_is_named(cfg, hf):
    sd = _wan_layout(hf[1])
    sd["blocks.0.attn.q.weight"] = np.zeros((7, cfg.d_model), np.float32)
    with pytest.raises(ValueError, match=r"key blocks\.0\.attn\.q\.weight has shape \(7, 32\); expected \(32, 32\)"):
        umt5_conv.convert_wan(sd, cfg)
    # a 2-layer checkpoint for a 3-layer config, and an extra key
    sd = dict(hf[1], **{"encoder.extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected key encoder\.extra\.weight \(shape \(3,\)\)(.|\n)*"
                                         r"missing key encoder\.block\.2\.layer\.0\.layer_norm\.weight "
                                         r"\(layers \[2\] of 3\)"):
        umt5_conv.convert_transformers(sd, UMT5Config.preset("tiny", num_layers=3))


def test_tied_embeddings_and_decoder_keys(cfg, hf):
    sd = dict(hf[1], **{"decoder.block.0.layer.0.SelfAttention.q.weight": np.zeros((4, 4), np.float32)})
    del sd["shared.weight"]  # encoder.embed_tokens.weight alone is enough; decoder keys are skipped
    umt5_conv.convert_transformers(sd, cfg)
    sd["shared.weight"] = sd["encoder.embed_tokens.weight"] + 1
    with pytest.raises(ValueError, match=r"tied keys encoder\.embed_tokens\.weight and shared\.weight differ"):
        umt5_conv.convert_transformers(sd, cfg)


def test_missing_tokenizer_and_bad_tokens_are_named(cfg, tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "nope.model"))):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(FileNotFoundError, match=re.escape(f"no umT5 tokenizer in {tmp_path}")):
        load_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "t5.pth"))):
        umt5_conv.read_pth(tmp_path / "t5.pth")
    ids = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\) does not match token ids shape \(2, 5\)"):
        prompt_embeddings(cfg, None, ids, np.ones((2, 4), bool))
