"""Wan2.1 VAE checkpoints -> bcjax, from two layouts:

- diffusers (`AutoencoderKLWan.state_dict()`): `decoder.up_blocks.1.resnets.0.conv1.weight`, ...
- Wan's own `.pth` (`wan/modules/vae.py`, e.g. Wan2.1_VAE.pth): `decoder.upsamples.4.residual.2.weight`,
  `decoder.middle.1.to_qkv.weight`, `conv1`/`conv2` for quant/post-quant, ... Wan keeps the decoder's
  resnets and resamples in one flat list, num_res_blocks + 2 entries per level.

Both rename tables are built from the VAEConfig out of small per-module leaf tables, and the full
key set and every shape are checked against `param_shapes(cfg)` before anything is returned. torch
tensors must be turned into numpy first (`t.float().numpy()`); bf16 numpy (ml_dtypes) is fine.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import NamedTuple

import jax
import numpy as np

from bcjax.vae.wan_vae import VAEConfig, param_shapes
from checkpoints_conv import io


class _Rule(NamedTuple):
    torch_shape: Callable[[tuple], tuple]  # the source shape that becomes a given bcjax shape
    to_bcjax: Callable[[np.ndarray], np.ndarray]


_CONV3D = _Rule(lambda s: (s[4], s[3], s[0], s[1], s[2]), lambda w: w.transpose(2, 3, 4, 1, 0))  # [O,I,t,h,w]
_CONV2D = _Rule(lambda s: (s[3], s[2], s[0], s[1]), lambda w: w.transpose(2, 3, 1, 0))  # [O,I,h,w]
_POINT3D = _Rule(lambda s: (s[1], s[0], 1, 1, 1), lambda w: w.reshape(w.shape[:2]).T)  # 1x1x1 conv -> Dense
_POINT2D = _Rule(lambda s: (s[1], s[0], 1, 1), lambda w: w.reshape(w.shape[:2]).T)  # 1x1 conv -> Dense
_GAMMA3D = _Rule(lambda s: (s[0], 1, 1, 1), lambda w: w.reshape(-1))  # RMS_norm(images=False)
_GAMMA2D = _Rule(lambda s: (s[0], 1, 1), lambda w: w.reshape(-1))  # RMS_norm(images=True)
_VECTOR = _Rule(lambda s: s, lambda w: w)

# Per module: (bcjax leaf, diffusers leaf, Wan leaf, rule). Leaves the config lacks (a shortcut
# between equal widths, the time_conv of a 2D resample) drop out against param_shapes.
_Leaves = list[tuple[str, str, str, _Rule]]
_RESNET: _Leaves = [
    ("norm1/scale", "norm1.gamma", "residual.0.gamma", _GAMMA3D),
    ("conv1/kernel", "conv1.weight", "residual.2.weight", _CONV3D),
    ("conv1/bias", "conv1.bias", "residual.2.bias", _VECTOR),
    ("norm2/scale", "norm2.gamma", "residual.3.gamma", _GAMMA3D),
    ("conv2/kernel", "conv2.weight", "residual.6.weight", _CONV3D),
    ("conv2/bias", "conv2.bias", "residual.6.bias", _VECTOR),
    ("conv_shortcut/kernel", "conv_shortcut.weight", "shortcut.weight", _POINT3D),
    ("conv_shortcut/bias", "conv_shortcut.bias", "shortcut.bias", _VECTOR),
]
_ATTENTION: _Leaves = [
    ("norm/scale", "norm.gamma", "norm.gamma", _GAMMA2D),
    ("to_qkv/kernel", "to_qkv.weight", "to_qkv.weight", _POINT2D),
    ("to_qkv/bias", "to_qkv.bias", "to_qkv.bias", _VECTOR),
    ("proj/kernel", "proj.weight", "proj.weight", _POINT2D),
    ("proj/bias", "proj.bias", "proj.bias", _VECTOR),
]
_RESAMPLE: _Leaves = [
    # resample = Sequential(Upsample | ZeroPad2d, Conv2d): the conv is entry 1 in both layouts
    ("resample/kernel", "resample.1.weight", "resample.1.weight", _CONV2D),
    ("resample/bias", "resample.1.bias", "resample.1.bias", _VECTOR),
    ("time_conv/kernel", "time_conv.weight", "time_conv.weight", _CONV3D),
    ("time_conv/bias", "time_conv.bias", "time_conv.bias", _VECTOR),
]
_CONV: _Leaves = [("kernel", "weight", "weight", _CONV3D), ("bias", "bias", "bias", _VECTOR)]
_POINT: _Leaves = [("kernel", "weight", "weight", _POINT3D), ("bias", "bias", "bias", _VECTOR)]
_NORM: _Leaves = [("scale", "gamma", "gamma", _GAMMA3D)]

LAYOUTS = ("diffusers", "wan")


def _modules(cfg: VAEConfig) -> Iterator[tuple[str, str, str, _Leaves]]:
    """(bcjax path, diffusers prefix, Wan prefix, leaves) of every parameterised module."""
    yield "quant_conv", "quant_conv.", "conv1.", _POINT
    yield "post_quant_conv", "post_quant_conv.", "conv2.", _POINT
    for part in ("encoder", "decoder"):
        yield f"{part}/conv_in", f"{part}.conv_in.", f"{part}.conv1.", _CONV
        yield f"{part}/mid_block/resnets_0", f"{part}.mid_block.resnets.0.", f"{part}.middle.0.", _RESNET
        yield f"{part}/mid_block/attentions_0", f"{part}.mid_block.attentions.0.", f"{part}.middle.1.", _ATTENTION
        yield f"{part}/mid_block/resnets_1", f"{part}.mid_block.resnets.1.", f"{part}.middle.2.", _RESNET
        yield f"{part}/norm_out", f"{part}.norm_out.", f"{part}.head.0.", _NORM
        yield f"{part}/conv_out", f"{part}.conv_out.", f"{part}.head.2.", _CONV
    levels = len(cfg.dim_mult)
    idx = 0  # the encoder is one flat list in both layouts
    for i in range(levels):
        for _ in range(cfg.num_res_blocks):
            yield f"encoder/down_blocks_{idx}", f"encoder.down_blocks.{idx}.", f"encoder.downsamples.{idx}.", _RESNET
            idx += 1
        if i != levels - 1:
            yield f"encoder/down_blocks_{idx}", f"encoder.down_blocks.{idx}.", f"encoder.downsamples.{idx}.", _RESAMPLE
            idx += 1
    flat = 0  # diffusers groups the decoder by level; Wan keeps one flat list
    for i in range(levels):
        for j in range(cfg.num_res_blocks + 1):
            yield (f"decoder/up_blocks_{i}/resnets_{j}", f"decoder.up_blocks.{i}.resnets.{j}.",
                   f"decoder.upsamples.{flat}.", _RESNET)
            flat += 1
        if i != levels - 1:
            yield (f"decoder/up_blocks_{i}/upsampler", f"decoder.up_blocks.{i}.upsamplers.0.",
                   f"decoder.upsamples.{flat}.", _RESAMPLE)
            flat += 1


def _flat_expected(cfg: VAEConfig) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def rename_table(cfg: VAEConfig, layout: str) -> dict[str, tuple[str, _Rule]]:
    """{source key: (bcjax path, rule)} covering exactly the parameters of `cfg`."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown VAE checkpoint layout {layout!r}; known: {LAYOUTS}")
    expected = _flat_expected(cfg)
    table = {}
    for path, diffusers_prefix, wan_prefix, leaves in _modules(cfg):
        prefix = diffusers_prefix if layout == "diffusers" else wan_prefix
        for leaf, diffusers_leaf, wan_leaf, rule in leaves:
            if f"{path}/{leaf}" in expected:
                table[prefix + (diffusers_leaf if layout == "diffusers" else wan_leaf)] = (f"{path}/{leaf}", rule)
    uncovered = set(expected) - {p for p, _ in table.values()}
    if uncovered:  # the tables above are out of step with the Flax modules: a bug here, not in the checkpoint
        raise RuntimeError(f"no {layout} source for bcjax parameters {sorted(uncovered)}")
    return table


def detect_layout(state_dict: Mapping[str, object], *, prefix: str = "") -> str:
    keys = [k[len(prefix):] for k in state_dict if k.startswith(prefix)]
    if any(k.startswith(("decoder.up_blocks.", "decoder.mid_block.")) for k in keys):
        return "diffusers"
    if any(k.startswith(("decoder.upsamples.", "decoder.middle.")) for k in keys):
        return "wan"
    raise ValueError(
        f"cannot tell the VAE checkpoint layout: no key starts with {prefix}decoder.up_blocks. (diffusers) "
        f"or {prefix}decoder.upsamples. (Wan); first keys: {list(state_dict)[:5]}"
    )


def _describe(cfg: VAEConfig) -> str:
    return (f"VAEConfig(base_dim={cfg.base_dim}, z_dim={cfg.z_dim}, dim_mult={cfg.dim_mult}, "
            f"num_res_blocks={cfg.num_res_blocks})")


def convert(state_dict: Mapping[str, np.ndarray], cfg: VAEConfig, *, layout: str = "auto", prefix: str = "",
            decoder_only: bool = False):
    """Map a Wan2.1 VAE state dict (diffusers or Wan layout) to the bcjax parameter tree.

    state_dict: {name: array-like}. `prefix` is stripped from every key first (e.g. "vae.").
    layout: "diffusers", "wan" or "auto" (from the key names). decoder_only: keep only
    post_quant_conv and the decoder (encoder keys, if present, are recognised and skipped) for a
    decode-only tree. Raises ValueError naming every missing, unexpected or mis-shaped key; returns
    nothing partial.
    """
    if layout == "auto":
        layout = detect_layout(state_dict, prefix=prefix)
    table = rename_table(cfg, layout)
    expected = _flat_expected(cfg)

    def wanted(path: str) -> bool:
        return not decoder_only or path.startswith(("decoder/", "post_quant_conv/"))

    out: dict[str, np.ndarray] = {}
    seen: set[str] = set()
    errors: list[str] = []
    for raw_key, value in state_dict.items():
        key = raw_key[len(prefix):] if prefix and raw_key.startswith(prefix) else raw_key
        if key not in table:
            errors.append(f"unexpected key {raw_key} (shape {tuple(np.shape(value))})")
            continue
        seen.add(key)
        path, rule = table[key]
        if not wanted(path):
            continue
        got, want = tuple(np.shape(value)), rule.torch_shape(expected[path])
        if got != want:
            errors.append(f"key {raw_key} has shape {got}; expected {want} for {_describe(cfg)}")
            continue
        out[path] = np.ascontiguousarray(rule.to_bcjax(np.asarray(value))).astype(cfg.params_dtype)
    for key, (path, rule) in table.items():
        if key not in seen and wanted(path):
            errors.append(f"missing key {prefix}{key} (shape {rule.torch_shape(expected[path])})")
    if errors:
        head = "; ".join(errors[:20])
        more = f"; ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(
            f"{layout}-layout VAE checkpoint does not match {_describe(cfg)} ({len(errors)} problems): {head}{more}"
        )
    return io.unflatten(out)


def convert_diffusers(state_dict, cfg: VAEConfig, **kwargs):
    """diffusers `AutoencoderKLWan.state_dict()` -> bcjax tree (see `convert`)."""
    return convert(state_dict, cfg, layout="diffusers", **kwargs)


def convert_wan(state_dict, cfg: VAEConfig, **kwargs):
    """Wan's own VAE `.pth` state dict -> bcjax tree (see `convert`)."""
    return convert(state_dict, cfg, layout="wan", **kwargs)

