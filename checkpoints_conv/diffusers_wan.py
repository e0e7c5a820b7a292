"""diffusers' WanTransformer3DModel layout (`Wan-AI/Wan2.1-T2V-1.3B-Diffusers/transformer`) -> bcjax.

The rename table is the inverse of diffusers' `convert_wan_transformer_to_diffusers`
(diffusers/loaders/single_file_utils.py), written out key by key rather than as its chain of
substring replacements. One trap: Wan's `norm3` (the affine LayerNorm before cross-attention) is
diffusers' `norm2`; diffusers' `norm1`/`norm3` carry no weights. Keys are renamed into the
original Wan layout and handed to `checkpoints_conv.wan.convert`; its errors are renamed back, so
they name the diffusers keys of the file.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from bcjax.model.config import WanConfig
from checkpoints_conv import io
from checkpoints_conv import wan as wan_conv

# original Wan module -> diffusers module (".weight"/".bias" follow both)
_TOP_MODULES = {
    "patch_embedding": "patch_embedding",
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.head": "proj_out",
}
_BLOCK_MODULES = {
    **{f"{wan}.{p}": f"{dif}.to_{p}" for wan, dif in (("self_attn", "attn1"), ("cross_attn", "attn2")) for p in "qkv"},
    **{f"{wan}.o": f"{dif}.to_out.0" for wan, dif in (("self_attn", "attn1"), ("cross_attn", "attn2"))},
    **{f"{wan}.{n}": f"{dif}.{n}"
       for wan, dif in (("self_attn", "attn1"), ("cross_attn", "attn2")) for n in ("norm_q", "norm_k")},
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}
# original key -> diffusers key, relative to the model / to `blocks.N.`
_TOP = ({f"{w}.{s}": f"{d}.{s}" for w, d in _TOP_MODULES.items() for s in ("weight", "bias")}
        | {"head.modulation": "scale_shift_table"})
_BLOCK = ({f"{w}.{s}": f"{d}.{s}" for w, d in _BLOCK_MODULES.items() for s in ("weight", "bias")}
          | {"modulation": "scale_shift_table"})
_TOP_INV = {d: w for w, d in _TOP.items()}
_BLOCK_INV = {d: w for w, d in _BLOCK.items()}
_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")


def convert(path_or_state, cfg: WanConfig):
    """A diffusers Wan transformer (folder with `diffusion_pytorch_model*.safetensors` [+ index],
    a pipeline folder with `transformer/`, one file, or a {name: array} dict) -> parameter tree."""
    return convert_state_dict(
        read(path_or_state) if isinstance(path_or_state, (str, Path)) else io.as_numpy(path_or_state), cfg)


def read(path: str | Path) -> dict[str, np.ndarray]:
    """The diffusers transformer state dict at `path` (a pipeline root is searched for transformer/)."""
    path = Path(path)
    if path.is_dir() and not any(path.glob("*.safetensors")) and (path / "transformer").is_dir():
        path = path / "transformer"
    return io.read_state_dict(path)


def convert_state_dict(state_dict, cfg: WanConfig):
    """{diffusers key: array} -> parameter tree; errors name the diffusers keys."""
    stray = sorted(k for k in state_dict if to_original(k) == k and to_diffusers(k) not in (None, k))
    if stray:
        raise ValueError(f"diffusers-layout checkpoint holds original Wan-layout keys {io.shorten(stray)}; "
                         f"convert an original-layout checkpoint with checkpoints_conv.wan.convert")
    try:
        return wan_conv.convert({to_original(k): v for k, v in state_dict.items()}, cfg)
    except ValueError as e:
        msg = re.sub(r"[A-Za-z_][\w.]*", lambda m: to_diffusers(m.group(0)) or m.group(0), str(e))
        raise ValueError(
            msg.replace("checkpoint does not match", "diffusers-layout checkpoint does not match", 1)) from None


def to_original(key: str) -> str:
    """diffusers key -> original Wan key; keys outside the table come back unchanged."""
    if key in _TOP_INV:
        return _TOP_INV[key]
    m = _BLOCK_KEY.fullmatch(key)
    if m and m.group(2) in _BLOCK_INV:
        return f"blocks.{m.group(1)}.{_BLOCK_INV[m.group(2)]}"
    return key


def to_diffusers(key: str) -> str | None:
    """original Wan key -> diffusers key; None if not a Wan DiT key."""
    if key in _TOP:
        return _TOP[key]
    m = _BLOCK_KEY.fullmatch(key)
    if m and m.group(2) in _BLOCK:
        return f"blocks.{m.group(1)}.{_BLOCK[m.group(2)]}"
    return None
