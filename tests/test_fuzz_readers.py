"""No traceback from any file (issue 32, finding 5). Every reader of a file a user hands bcjax is fed
a few hundred mutated inputs (truncations, byte flips, crafted headers and JSON); each returns a valid
result or raises BadFileError whose one line names the file, never another exception. The crafted
files of the issue are pinned by name."""

import json
import os
import shutil
import struct

import jax
import numpy as np
import pytest

from bcjax import checkpoint
from bcjax.errors import BadFileError
from checkpoints_conv import io

SEED = 32


def _safetensors(tensors: dict, header: object = ...) -> bytes:
    """A .safetensors file of numpy `tensors` (or of the given raw `header` and no data)."""
    tags = {v: k for k, v in io._SAFETENSORS_DTYPES.items()}
    data, entries = b"", {"__metadata__": {"format": "np"}}
    for name, a in tensors.items():
        entries[name] = {"dtype": tags[a.dtype], "shape": list(a.shape),
                         "data_offsets": [len(data), len(data) + a.nbytes]}
        data += a.tobytes()
    text = json.dumps(entries if header is ... else header).encode()
    return struct.pack("<Q", len(text)) + text + data


def _mutants(raw: bytes, rng, n: int, head: int):
    """n mutations of `raw`: truncations (a third), byte flips anywhere (a third), and byte flips
    within the first `head` bytes, where a format's header lives (a third)."""
    for i in range(n):
        kind = i % 3
        if kind == 0:
            yield raw[: int(rng.integers(0, len(raw)))]
            continue
        out = bytearray(raw)
        span = head if kind == 2 else len(raw)
        for at in rng.integers(0, span, size=int(rng.integers(1, 9))):
            out[at] = int(rng.integers(0, 256))
        yield bytes(out)


def _read(reader, path):
    """reader(path), or None when it raised BadFileError: one line that names the file."""
    try:
        return reader(path)
    except BadFileError as e:
        assert "\n" not in str(e) and str(path) in str(e), str(e)
        return None


def _fuzz(reader, path, raw: bytes, n: int, head: int) -> tuple[int, int]:
    """(valid results, one-line errors) over n mutants of `raw` written to `path`."""
    rng = np.random.default_rng(SEED)
    valid = refused = 0
    for mutant in _mutants(raw, rng, n, head):
        path.write_bytes(mutant)
        if _read(reader, path) is None:
            refused += 1
        else:
            valid += 1
    return valid, refused


# ---- safetensors -----------------------------------------------------------------------------

_TENSORS = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.ones((2, 2), np.dtype("bfloat16")),
            "c": np.arange(3, dtype=np.int64), "d": np.zeros((0, 4), np.float16)}

_CRAFTED = {  # the files first: each is refused with what is wrong
    "header is a list": ([], "is a JSON list"),
    "entry is not an object": ({"a": 5}, "tensor a is a JSON int"),
    "string offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": ["0", "4"]}}, "has data_offsets"),
    "no shape": ({"a": {"dtype": "F32", "data_offsets": [0, 4]}}, "tensor a has no shape"),
    "negative shape": ({"a": {"dtype": "F32", "shape": [-1, 4], "data_offsets": [16, 0]}}, "has shape [-1, 4]"),
    "huge shape": ({"a": {"dtype": "F32", "shape": [2**62, 4], "data_offsets": [0, 16]}},
                   "expected 73786976294838206464"),
    "unknown dtype": ({"a": {"dtype": "F33", "shape": [1], "data_offsets": [0, 4]}}, "dtype 'F33'"),
    "dtype not text": ({"a": {"dtype": 4, "shape": [1], "data_offsets": [0, 4]}}, "dtype 4"),
    "float shape": ({"a": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}}, "has shape [1.5]"),
    "bool shape": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, "has shape [true]"),
    "shape not a list": ({"a": {"dtype": "F32", "shape": "x", "data_offsets": [0, 4]}}, "has shape"),
    "one offset": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, "has data_offsets [0]"),
    "reversed offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 0]}}, "has data_offsets [4, 0]"),
    "offsets past the end": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [2**70, 2**70 + 4]}},
                             "has data_offsets"),
    "null header": (None, "is a JSON NoneType"),
    "text header": ("x", "is a JSON str"),
}


@pytest.mark.parametrize("case", sorted(_CRAFTED))
def test_crafted_safetensors_headers_are_named(tmp_path, case):
    header, words = _CRAFTED[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(_safetensors({}, header))
    with pytest.raises(BadFileError, match=None) as e:
        io.load(path)
    assert str(path) in str(e.value) and words in str(e.value), str(e.value)


def test_safetensors_reader_fuzz(tmp_path):
    path = tmp_path / "model.safetensors"
    raw = _safetensors(_TENSORS)
    path.write_bytes(raw)
    back = io.load(path)
    assert all(np.array_equal(back[k], v) for k, v in _TENSORS.items())
    valid, refused = _fuzz(io.load, path, raw, 300, head=len(raw) - 64)
    # odd byte sequences in the raw header text, deep nesting, an absurd length
    for blob in (b"\xff\xfe" * 8, b"[" * 100_000, b'{"a": ' * 50_000, b"{}"):
        path.write_bytes(struct.pack("<Q", len(blob)) + blob)
        refused += _read(io.load, path) is None
    path.write_bytes(struct.pack("<Q", 2**64 - 1) + b"{}")
    assert _read(io.load, path) is None
    assert valid > 0 and refused > 100, (valid, refused)


def test_sharded_safetensors_index_is_checked(tmp_path):
    (tmp_path / "a.safetensors").write_bytes(_safetensors({"x": np.ones(2, np.float32)}))
    index = tmp_path / "model.safetensors.index.json"
    for text, words in [(b"\x80not json", "is not JSON"), (b"[1]", "no 'weight_map'"),
                        (json.dumps({"weight_map": {"x": "../a.safetensors"}}).encode(), "expected shard file names"),
                        (json.dumps({"weight_map": {"x": 3}}).encode(), "expected shard file names")]:
        index.write_bytes(text)
        with pytest.raises(BadFileError, match=words):
            io.load(tmp_path)


# ---- .pt / .pth ------------------------------------------------------------------------------


def test_torch_reader_fuzz(tmp_path):
    torch = pytest.importorskip("torch")
    path = tmp_path / "model.pt"
    torch.save({"generator": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4, dtype=torch.bfloat16)},
                "step": 3}, path)
    raw = path.read_bytes()
    valid, refused = _fuzz(io.load, path, raw, 300, head=len(raw))
    assert valid > 0 and refused > 100, (valid, refused)


def test_a_pt_of_the_wrong_layout_is_one_line(tmp_path, capsys, wan_sd):
    torch = pytest.importorskip("torch")
    from bcjax.cli import main

    src = tmp_path / "model.pt"
    torch.save({"generator_ema": {"model." + k: v for k, v in wan_sd.items()}}, src)
    for args, words in [(["--from", "wan"], "unexpected key generator_ema"),  # 22 lines before
                        (["--from", "krea"], "model.pt")]:
        assert main(["convert", *args, str(src), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(src) in err and words in err, err
    for key, words in [("blocks.0.self_attn.q.bias", "key blocks.0.self_attn.q.bias has shape"),  # 2 lines before
                       ("head.head.weight", "its head weight has shape (3, 3)")]:  # a ZeroDivisionError before
        bad = dict(wan_sd, **{key: torch.zeros(3, 3)})
        torch.save({"generator_ema": {"model." + k: v for k, v in bad.items()}}, src)
        assert main(["convert", "--from", "self-forcing", str(src), str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(src) in err and words in err, err
    assert sorted(os.listdir(tmp_path)) == ["model.pt"]


# ---- TAEHV -----------------------------------------------------------------------------------


def test_taehv_reader_fuzz(tmp_path):
    from bcjax.vae.taehv import TAEHVConfig
    from checkpoints_conv import taehv as taehv_conv

    cfg = TAEHVConfig(encoder_width=4, decoder_widths=(4, 4), mem_blocks=1, encoder_time_downscale=(True,),
                      decoder_time_upscale=(True,), decoder_space_upscale=(True,))
    rng = np.random.default_rng(SEED)
    sd = {k: rng.standard_normal(s).astype(np.float32) for k, s in taehv_conv.upstream_shapes(cfg).items()}
    path = tmp_path / "taew2_1.safetensors"
    path.write_bytes(_safetensors(sd))
    assert _read(lambda p: taehv_conv.convert_file(p, cfg), path) is not None
    raw = _safetensors(sd)
    valid, refused = _fuzz(lambda p: taehv_conv.convert_file(p, cfg), path, raw, 200,
                           head=raw.index(b"}}") + 2)
    # state dicts of the wrong keys, shapes and kinds
    names = sorted(sd)
    for i in range(60):
        bad = dict(sd)
        key = names[i % len(names)]
        kind = i % 4
        if kind == 0:
            del bad[key]
        elif kind == 1:
            bad[key] = bad[key].reshape(-1)
        elif kind == 2:
            bad[key + ".extra"] = bad[key]
        else:
            bad[key] = np.zeros((7,) * bad[key].ndim, np.int8)
        path.write_bytes(_safetensors(bad))
        refused += _read(lambda p: taehv_conv.convert_file(p, cfg), path) is None
    assert valid > 0 and refused > 100, (valid, refused)


# ---- config.json -----------------------------------------------------------------------------

_VALUES = ["x", -1, 0, 2**70, 1.5, None, [], [1, 2], {}, True, "float32", [1, "a"], {"a": 1}, [[1]], 1e308]


def _config_json() -> dict:
    from bcjax.model import WanConfig
    from bcjax.vae.taehv import TAEHVConfig

    return {"format": "bcjax", "parts": {"dit": checkpoint.config_to_dict(WanConfig.preset("tiny")),
                                         "taehv": checkpoint.config_to_dict(TAEHVConfig.preset("taew2_1"))},
            "provenance": {"layout": "wan"}, "manifest": {}}


def _json_mutants(meta: dict, rng, n: int):
    for i in range(n):
        m = json.loads(json.dumps(meta))
        value = _VALUES[int(rng.integers(len(_VALUES)))]
        part = ("dit", "taehv")[i % 2]
        field = sorted(m["parts"][part])[int(rng.integers(len(m["parts"][part])))]
        kind = i % 6
        if kind in (0, 1):
            m["parts"][part][field] = value
        elif kind == 2:
            del m["parts"][part][field]
        elif kind == 3:
            m["parts"][part] = value
        elif kind == 4:
            m[("parts", "format", "provenance", "manifest")[int(rng.integers(4))]] = value
        else:
            m = value
        yield json.dumps(m).encode()


def test_crafted_config_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"format": "bcjax", "parts": {"dit": {"dim": "x"}}}))
    with pytest.raises(BadFileError, match=r"config.json: part 'dit': WanConfig: field dim is \"x\"; expected int"):
        checkpoint.read_config(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"format": "bcjax", "parts": {"dit": [1, 2]}}))
    with pytest.raises(BadFileError, match="config.json: part 'dit': WanConfig must be a JSON object, got a JSON list"):
        checkpoint.read_config(str(tmp_path))


def test_config_json_reader_fuzz(tmp_path):
    meta = _config_json()
    path = tmp_path / "config.json"
    raw = json.dumps(meta, indent=2).encode()
    path.write_bytes(raw)
    assert checkpoint.read_config(str(tmp_path))["configs"]["dit"].dim == 64
    rng = np.random.default_rng(SEED)
    valid = refused = 0

    def reader(p):
        return checkpoint.read_config(str(p.parent))

    for text in _json_mutants(meta, rng, 300):
        path.write_bytes(text)
        if _read(reader, path) is None:
            refused += 1
        else:
            valid += 1
    v, r = _fuzz(reader, path, raw, 150, head=len(raw))
    assert valid + v > 0 and refused + r > 200, (valid + v, refused + r)


def test_config_json_of_impossible_sizes_is_refused_on_restore(tmp_path, tiny_cfg, tiny_params):
    dst = tmp_path / "ckpt"
    checkpoint.save(str(dst), {"dit": (tiny_cfg, tiny_params)}, {})
    good = json.loads((dst / "config.json").read_text())
    for field, value in [("dim", 0), ("num_heads", 3), ("dim", 2**40), ("num_layers", -2), ("patch_size", [0, 0, 0]),
                         ("ffn_dim", 7), ("in_channels", 0)]:
        meta = json.loads(json.dumps(good))
        meta["parts"]["dit"][field] = value
        (dst / "config.json").write_text(json.dumps(meta))
        assert _read(lambda p: checkpoint.restore(str(p), "dit"), dst) is None, (field, value)


# ---- orbax folders ---------------------------------------------------------------------------


# orbax leaves the reads of a failed restore's other arrays as un-awaited coroutines
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_orbax_folder_fuzz(tmp_path):
    """A mutated file in a part's folder: refused, or (a file orbax does not need) the very weights
    written — never weights that differ from them."""
    from bcjax.model import WanConfig, param_shapes

    cfg = WanConfig.preset("tiny")
    rng = np.random.default_rng(SEED)
    params = jax.tree_util.tree_map(lambda s: rng.standard_normal(s.shape).astype(s.dtype), param_shapes(cfg))
    good = tmp_path / "good"
    checkpoint.save(str(good), {"dit": (cfg, params)}, {})
    files = sorted(os.path.relpath(os.path.join(d, f), good) for d, _, fs in os.walk(good / "dit") for f in fs)
    valid = refused = 0
    for i in range(48):
        rel = files[i % len(files)]
        case = tmp_path / f"case{i}"
        shutil.copytree(good, case)
        target = case / rel
        raw = target.read_bytes()
        kind = (i // len(files)) % 4
        if kind == 0:
            target.write_bytes(raw[: int(rng.integers(0, max(len(raw), 1)))])
        elif kind == 1:
            out = bytearray(raw)
            for at in rng.integers(0, max(len(raw), 1), size=4):
                if out:
                    out[at] = (out[at] + 1 + int(rng.integers(255))) % 256
            target.write_bytes(bytes(out))
        elif kind == 2:
            target.unlink()
        else:
            target.write_bytes(b"")
        back = _read(lambda p: checkpoint.restore(str(p), "dit")[1], case)
        if back is None:
            refused += 1
        else:
            assert all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(
                lambda a, b: bool(np.array_equal(np.asarray(a), b)), back, params))), rel
            valid += 1
        shutil.rmtree(case)
    assert refused > 10, (valid, refused)


# ---- tokenizer -------------------------------------------------------------------------------


def test_tokenizer_reader_fuzz(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    from bcjax.text.tokenizer import load_tokenizer, tokenize

    sentences = ["a red fox runs through the snow", "the cat sits on a warm mat", "waves crash on a rocky shore"]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sentences * 4), model_prefix=str(tmp_path / "spiece"),
                                   vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    raw = (tmp_path / "spiece.model").read_bytes()

    def reader(p):
        return tokenize(load_tokenizer(p), "a red fox", 16)

    path = tmp_path / "mutant.model"
    valid, refused = _fuzz(reader, path, raw, 300, head=len(raw))
    assert refused > 100, (valid, refused)
