"""umT5 encoder checkpoints -> bcjax.text.umt5 parameters, from two layouts.

- transformers (`UMT5EncoderModel` / `UMT5ForConditionalGeneration`): `encoder.block.N.layer.0.
  SelfAttention.q.weight`, `...relative_attention_bias.weight` in every layer, `layer.1.
  DenseReluDense.wi_0/wi_1/wo`, `encoder.final_layer_norm.weight`, `shared.weight` (tied to
  `encoder.embed_tokens.weight`). Decoder and LM-head keys are skipped: the encoder is all Wan uses.
- Wan2.1's own `models_t5_umt5-xxl-enc-bf16.pth` (`wan/modules/t5.py` T5Encoder): `token_embedding.
  weight`, `blocks.N.{norm1,attn.q/k/v/o,pos_embedding.embedding,norm2,ffn.gate.0,ffn.fc1,ffn.fc2}`,
  `norm.weight`.

Both check the full key set and every source shape against `param_shapes(cfg)` before converting
anything, and raise one ValueError naming every missing, unexpected or mis-shaped key.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import NamedTuple

import jax
import numpy as np

from bcjax.text.umt5 import UMT5Config, param_shapes
from checkpoints_conv import io
from checkpoints_conv.io import read_state_dict as read_pth  # a .pth -> {name: numpy}, bf16 kept


class _Transform(NamedTuple):
    convert: Callable  # source array -> bcjax array
    source_shape: Callable  # bcjax shape -> the source shape that converts to it


# torch [out, in] -> Dense [in, out]
_LINEAR = _Transform(lambda w: np.ascontiguousarray(np.asarray(w).T), lambda s: s[::-1])
_SAME = _Transform(np.asarray, lambda s: s)

# bcjax path -> (transformers names, Wan names, transform); more than one name = tied aliases.
_TOP: dict[str, tuple[tuple[str, ...], tuple[str, ...], _Transform]] = {
    "token_embedding/embedding": (("shared.weight", "encoder.embed_tokens.weight"), ("token_embedding.weight",), _SAME),
    "norm/scale": (("encoder.final_layer_norm.weight",), ("norm.weight",), _SAME),
}
# bcjax path under blocks/ -> (transformers name under encoder.block.N., Wan name under blocks.N., transform)
_BLOCK: dict[str, tuple[str, str, _Transform]] = {
    "norm1/scale": ("layer.0.layer_norm.weight", "norm1.weight", _SAME),
    **{f"attn/{p}/kernel": (f"layer.0.SelfAttention.{p}.weight", f"attn.{p}.weight", _LINEAR) for p in "qkvo"},
    "pos_embedding/embedding": ("layer.0.SelfAttention.relative_attention_bias.weight",
                                "pos_embedding.embedding.weight", _SAME),
    "norm2/scale": ("layer.1.layer_norm.weight", "norm2.weight", _SAME),
    # HF's wi_0 is the GELU branch, Wan's gate; wi_1 the linear branch, Wan's fc1
    "ffn/gate/kernel": ("layer.1.DenseReluDense.wi_0.weight", "ffn.gate.0.weight", _LINEAR),
    "ffn/fc1/kernel": ("layer.1.DenseReluDense.wi_1.weight", "ffn.fc1.weight", _LINEAR),
    "ffn/fc2/kernel": ("layer.1.DenseReluDense.wo.weight", "ffn.fc2.weight", _LINEAR),
}
# layout -> (column in the tables, block key prefix with {} for the layer, key prefixes to skip)
_LAYOUTS: dict[str, tuple[int, str, tuple[str, ...]]] = {
    "transformers": (0, "encoder.block.{}.", ("decoder.", "lm_head.")),
    "wan": (1, "blocks.{}.", ()),
}


def convert_transformers(state_dict: Mapping[str, np.ndarray], cfg: UMT5Config):
    """transformers-layout umT5 state dict {name: array} -> bcjax.text.umt5 parameter tree."""
    return _convert(state_dict, cfg, "transformers")


def convert_wan(state_dict: Mapping[str, np.ndarray], cfg: UMT5Config):
    """Wan2.1 T5Encoder state dict {name: array} -> bcjax.text.umt5 parameter tree."""
    return _convert(state_dict, cfg, "wan")


def load_wan(path: str | Path, cfg: UMT5Config):
    """Wan2.1's `models_t5_umt5-xxl-enc-bf16.pth` -> parameter tree."""
    return convert_wan(read_pth(path), cfg)


def _convert(state_dict, cfg: UMT5Config, layout: str):
    col, block_fmt, skip = _LAYOUTS[layout]
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    expected = {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}
    top_of = {name: path for path, row in _TOP.items() for name in row[:2][col]}
    block_of = {row[:2][col]: path for path, row in _BLOCK.items()}
    block_re = re.compile(re.escape(block_fmt).replace(r"\{\}", r"(\d+)") + "(.+)")
    n = cfg.num_layers

    top: dict[str, tuple[str, np.ndarray]] = {}
    blocks: dict[str, dict[int, np.ndarray]] = {path: {} for path in _BLOCK}
    errors: list[str] = []
    for key, value in state_dict.items():
        m = block_re.fullmatch(key)
        if key in top_of:
            path = top_of[key]
            if path in top and not np.array_equal(top[path][1], value):
                errors.append(f"tied keys {top[path][0]} and {key} differ")
            top.setdefault(path, (key, value))
        elif m and m.group(2) in block_of and int(m.group(1)) < n:
            blocks[block_of[m.group(2)]][int(m.group(1))] = value
        elif m and m.group(2) in block_of:
            errors.append(f"unexpected key {key}: layer {m.group(1)} but the config has {n} layers")
        elif not (skip and key.startswith(skip)):
            errors.append(f"unexpected key {key} (shape {tuple(np.shape(value))})")

    for path, row in _TOP.items():
        want = row[2].source_shape(expected[path])
        if path not in top:
            errors.append(f"missing key {' or '.join(row[:2][col])}")
        elif (got := tuple(np.shape(top[path][1]))) != want:
            errors.append(f"key {top[path][0]} has shape {got}; expected {want}")
    for path, brow in _BLOCK.items():
        name, want = block_fmt + brow[:2][col], brow[2].source_shape(expected["blocks/" + path][1:])
        absent = [i for i in range(n) if i not in blocks[path]]
        if absent:
            errors.append(f"missing key {name.format(absent[0])} (layers {absent} of {n})")
        errors += [f"key {name.format(i)} has shape {tuple(np.shape(a))}; expected {want}"
                   for i, a in sorted(blocks[path].items()) if tuple(np.shape(a)) != want]
    if errors:
        head = "; ".join(errors[:20])
        more = f"; ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"{layout}-layout umT5 checkpoint does not match the UMT5Config "
                         f"({len(errors)} problems): {head}{more}")

    dtype = cfg.params_dtype
    out = {path: _TOP[path][2].convert(value).astype(dtype) for path, (_, value) in top.items()}
    for path, brow in _BLOCK.items():
        out["blocks/" + path] = np.stack([brow[2].convert(blocks[path][i]) for i in range(n)]).astype(dtype)
    return io.unflatten(out)

