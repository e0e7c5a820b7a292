"""TAEHV checkpoints (madebyollin/taehv `taew2_1.pth` / `taew2_1.safetensors`) -> bcjax.

Upstream keeps encoder and decoder as flat `nn.Sequential`s, so a key is its layer's position:

    encoder: 0 conv, 1 ReLU, then per stage i: 2+5i TPool, 3+5i strided conv, 4+5i.. MemBlocks; 17 conv
    decoder: 0 Clamp, 1 conv, 2 ReLU, then per stage i: 3+6i.. MemBlocks, 6+6i Upsample, 7+6i TGrow,
             8+6i conv; 21 ReLU, 22 conv

A MemBlock's convs are its `conv.0`, `conv.2`, `conv.4` (ReLUs between). The rename table is built
from the TAEHVConfig and the full key set and every shape are checked against `param_shapes(cfg)`
before anything is returned. A file for another latent space (taew2_2: 48 channels, patch size 2;
taehv1_5; the `_super` decoders) is refused with the channel count it was made for.

Upstream's `TAEHV.patch_tgrow_layers`: a checkpoint's first decoder TGrow may have been trained
with time upsampling (2C output channels) while taew2_1 runs it without (C); upstream then keeps
the last C output channels (the later frame), and so does this converter.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from bcjax.errors import naming
from bcjax.vae.taehv import TAEHVConfig, param_shapes
from checkpoints_conv import io


class _Rule(NamedTuple):
    torch_shape: Callable[[tuple], tuple]  # the source shape that becomes a given bcjax shape
    to_bcjax: Callable[[np.ndarray], np.ndarray]


_CONV2D = _Rule(lambda s: (s[3], s[2], s[0], s[1]), lambda w: w.transpose(2, 3, 1, 0))  # [O,I,h,w]
_POINT2D = _Rule(lambda s: (s[1], s[0], 1, 1), lambda w: w.reshape(w.shape[:2]).T)  # 1x1 conv -> Dense
_VECTOR = _Rule(lambda s: s, lambda w: w)

_CONV = [("kernel", "weight", _CONV2D), ("bias", "bias", _VECTOR)]
_CONV_NO_BIAS = [("kernel", "weight", _CONV2D)]
_POINT = [("kernel", "conv.weight", _POINT2D)]  # TPool / TGrow hold their 1x1 conv as `.conv`
_MEM = [(f"conv_{k}/{leaf}", f"conv.{2 * k}.{src}", rule) for k in range(3) for leaf, src, rule in _CONV]


def _modules(cfg: TAEHVConfig) -> Iterator[tuple[str, str, list]]:
    """(bcjax path, upstream prefix, leaves) of every parameterised layer."""
    m = cfg.mem_blocks
    yield "encoder/conv_in", "encoder.0.", _CONV
    for i in range(cfg.stages):
        base = 2 + (m + 2) * i
        yield f"encoder/stage_{i}_tpool", f"encoder.{base}.", _POINT
        yield f"encoder/stage_{i}_conv", f"encoder.{base + 1}.", _CONV_NO_BIAS
        for j in range(m):
            yield f"encoder/stage_{i}_mem_{j}", f"encoder.{base + 2 + j}.", _MEM
    yield "encoder/conv_out", f"encoder.{2 + (m + 2) * cfg.stages}.", _CONV
    yield "decoder/conv_in", "decoder.1.", _CONV
    for i in range(cfg.stages):
        base = 3 + (m + 3) * i
        for j in range(m):
            yield f"decoder/stage_{i}_mem_{j}", f"decoder.{base + j}.", _MEM
        yield f"decoder/stage_{i}_tgrow", f"decoder.{base + m + 1}.", _POINT
        yield f"decoder/stage_{i}_conv", f"decoder.{base + m + 2}.", _CONV_NO_BIAS
    yield "decoder/conv_out", f"decoder.{3 + (m + 3) * cfg.stages + 1}.", _CONV


def _flat_expected(cfg: TAEHVConfig) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def rename_table(cfg: TAEHVConfig) -> dict[str, tuple[str, _Rule]]:
    """{upstream key: (bcjax path, rule)} covering exactly the parameters of `cfg`."""
    expected = _flat_expected(cfg)
    table = {prefix + src: (f"{path}/{leaf}", rule)
             for path, prefix, leaves in _modules(cfg) for leaf, src, rule in leaves}
    missing = set(expected) ^ {p for p, _ in table.values()}
    if missing:  # the table above is out of step with the Flax modules: a bug here, not in the checkpoint
        raise RuntimeError(f"TAEHV rename table and Flax modules disagree on {sorted(missing)}")
    return table


def upstream_shapes(cfg: TAEHVConfig) -> dict[str, tuple[int, ...]]:
    """{upstream key: torch shape}: the state dict upstream's `TAEHV` has for `cfg` (tests build random
    upstream-layout weights from it)."""
    expected = _flat_expected(cfg)
    return {key: rule.torch_shape(expected[path]) for key, (path, rule) in rename_table(cfg).items()}


def _describe(cfg: TAEHVConfig) -> str:
    return (f"TAEHVConfig(latent_channels={cfg.latent_channels}, image_channels={cfg.image_channels}, "
            f"decoder_widths={cfg.decoder_widths}, mem_blocks={cfg.mem_blocks})")


def _latent_space(state_dict: Mapping[str, Any], cfg: TAEHVConfig) -> str | None:
    """A one-line diagnosis when the file's first decoder conv reads another number of latent channels."""
    shape = tuple(np.shape(state_dict["decoder.1.weight"])) if "decoder.1.weight" in state_dict else None
    if shape is None or len(shape) != 4 or shape[1] == cfg.latent_channels:
        return None
    known = {48: "taew2_2 (Wan2.2-5B)", 32: "taehv1_5", 128: "taeltx", 24: "taeh3", 16: "taew2_1 / taehv"}
    name = known.get(shape[1], "another model")
    return (f"this TAEHV file decodes {shape[1]}-channel latents (decoder.1.weight has shape {shape}; looks like "
            f"{name}); bcjax's TAEHV is taew2_1, for {cfg.latent_channels}-channel Wan2.1 latents")


def convert(state_dict: Mapping[str, np.ndarray], cfg: TAEHVConfig | None = None, *, prefix: str = "",
            decoder_only: bool = False):
    """Map a TAEHV state dict (upstream key layout) to the bcjax parameter tree.

    state_dict: {name: array-like} (torch tensors turned into numpy first; `io.read_state_dict`
    reads .pth and .safetensors). `prefix` is stripped from every key first. decoder_only: keep
    only the decoder (encoder keys are recognised and skipped). Raises ValueError naming the latent
    channels the file was made for and every missing, unexpected or mis-shaped key; returns
    nothing partial.
    """
    cfg = cfg or TAEHVConfig.preset("taew2_1")
    table = rename_table(cfg)
    expected = _flat_expected(cfg)
    stripped = {(k[len(prefix):] if prefix and k.startswith(prefix) else k): v for k, v in state_dict.items()}
    out: dict[str, np.ndarray] = {}
    errors: list[str] = []
    diagnosis = _latent_space(stripped, cfg)
    for key, value in stripped.items():
        if key not in table:
            errors.append(f"unexpected key {prefix}{key} (shape {tuple(np.shape(value))})")
            continue
        path, rule = table[key]
        if decoder_only and not path.startswith("decoder/"):
            continue
        got, want = tuple(np.shape(value)), rule.torch_shape(expected[path])
        value = np.asarray(value)
        if path.endswith("_tgrow/kernel") and got != want and got[1:] == want[1:] and got[0] % want[0] == 0:
            value, got = value[-want[0]:], want  # patch_tgrow_layers: the last frame's output channels
        if got != want:
            errors.append(f"key {prefix}{key} has shape {got}; expected {want} for {_describe(cfg)}")
            continue
        out[path] = np.ascontiguousarray(rule.to_bcjax(value)).astype(cfg.params_dtype)
    for key, (path, rule) in table.items():
        if key not in stripped and not (decoder_only and not path.startswith("decoder/")):
            errors.append(f"missing key {prefix}{key} (shape {rule.torch_shape(expected[path])})")
    if errors:
        head = "; ".join(errors[:20])
        more = f"; ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        lead = f"{diagnosis}; " if diagnosis else ""
        raise ValueError(f"{lead}TAEHV checkpoint does not match {_describe(cfg)} "
                         f"({len(errors)} problems): {head}{more}")
    return io.unflatten(out)


def convert_file(path: str, cfg: TAEHVConfig | None = None, **kwargs):
    """A taew2_1 `.pth` or `.safetensors` file -> bcjax tree (see `convert`); a malformed file or one
    that does not fit `cfg` raises BadFileError naming it."""
    with naming(path):
        return convert(io.read_state_dict(path), cfg, **kwargs)
