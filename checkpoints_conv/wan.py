"""Original Wan2.1 DiT layout (`blocks.N.self_attn.q.weight`, `head.modulation`, ...) -> bcjax.

Self-Forcing, CausVid, LongLive and Krea checkpoints all wrap this layout; their converters
strip their prefixes and call `convert` here. The full key set and every shape are checked
against `WanConfig` before anything is returned.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping

import jax
import numpy as np

from bcjax.model.config import WanConfig
from bcjax.model.wan import param_shapes
from checkpoints_conv import io


def _linear(w):  # torch Linear [out, in] -> Dense kernel [in, out]
    return np.ascontiguousarray(np.asarray(w).T)


def _same(w):
    return np.asarray(w)


def _squeeze0(w):  # [1, n, dim] -> [n, dim]
    w = np.asarray(w)
    return w.reshape(w.shape[1:]) if w.ndim == 3 and w.shape[0] == 1 else w


def _patch_conv(w):  # Conv3d [dim, C, pt, ph, pw] -> Dense kernel [(pt, ph, pw, C), dim]
    w = np.asarray(w)
    if w.ndim != 5:
        return w
    return np.ascontiguousarray(w.transpose(2, 3, 4, 1, 0).reshape(-1, w.shape[0]))


# source key -> (bcjax path, transform). Block keys are relative to `blocks.N.`.
_TOP: dict[str, tuple[str, Callable[..., np.ndarray]]] = {
    "patch_embedding.weight": ("embed/patch_embedding/kernel", _patch_conv),
    "patch_embedding.bias": ("embed/patch_embedding/bias", _same),
    **{
        f"{src}.{i}.{kind}": (f"embed/{dst}/{'kernel' if kind == 'weight' else 'bias'}",
                              _linear if kind == "weight" else _same)
        for src, i, dst in [("text_embedding", 0, "text_embedding_0"), ("text_embedding", 2, "text_embedding_2"),
                            ("time_embedding", 0, "time_embedding_0"), ("time_embedding", 2, "time_embedding_2"),
                            ("time_projection", 1, "time_projection")]
        for kind in ("weight", "bias")
    },
    "head.head.weight": ("head/head/kernel", _linear),
    "head.head.bias": ("head/head/bias", _same),
    "head.modulation": ("head/modulation", _squeeze0),
}
_BLOCK: dict[str, tuple[str, Callable[..., np.ndarray]]] = {
    **{f"{a}.{p}.weight": (f"{a}/{p}/kernel", _linear) for a in ("self_attn", "cross_attn") for p in "qkvo"},
    **{f"{a}.{p}.bias": (f"{a}/{p}/bias", _same) for a in ("self_attn", "cross_attn") for p in "qkvo"},
    **{f"{a}.{n}.weight": (f"{a}/{n}/scale", _same) for a in ("self_attn", "cross_attn") for n in ("norm_q", "norm_k")},
    "norm3.weight": ("norm3/scale", _same),
    "norm3.bias": ("norm3/bias", _same),
    "ffn.0.weight": ("ffn_0/kernel", _linear),
    "ffn.0.bias": ("ffn_0/bias", _same),
    "ffn.2.weight": ("ffn_2/kernel", _linear),
    "ffn.2.bias": ("ffn_2/bias", _same),
    "modulation": ("modulation", _squeeze0),
}
_SOURCE_OF = {path: src for src, (path, _) in _TOP.items()} | {
    "blocks/" + path: "blocks.{N}." + src for src, (path, _) in _BLOCK.items()
}


def original_layout(cfg: WanConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """The original Wan2.1 T2V state dict for a WanConfig: key -> (shape, kind), in upstream's module
    order (wan/modules/model.py `WanModel`). kind says how a random stand-in is drawn: "w" a weight
    (fan-in scaled), "b" a bias, "norm" a norm scale (near 1), "mod" a modulation table."""
    d, f = cfg.dim, cfg.ffn_dim
    pt, ph, pw = cfg.patch_size
    lin = lambda n, o, i: {f"{n}.weight": ((o, i), "w"), f"{n}.bias": ((o,), "b")}
    keys = {"patch_embedding.weight": ((d, cfg.in_channels, pt, ph, pw), "w"), "patch_embedding.bias": ((d,), "b"),
            **lin("text_embedding.0", d, cfg.text_dim), **lin("text_embedding.2", d, d),
            **lin("time_embedding.0", d, cfg.freq_dim), **lin("time_embedding.2", d, d),
            **lin("time_projection.1", 6 * d, d), **lin("head.head", cfg.out_channels * pt * ph * pw, d),
            "head.modulation": ((1, 2, d), "mod")}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        for a in ("self_attn", "cross_attn"):
            for n in "qkvo":
                keys |= lin(p + f"{a}.{n}", d, d)
            keys |= {p + f"{a}.norm_q.weight": ((d,), "norm"), p + f"{a}.norm_k.weight": ((d,), "norm")}
        keys |= {p + "norm3.weight": ((d,), "norm"), p + "norm3.bias": ((d,), "b"),
                 **lin(p + "ffn.0", f, d), **lin(p + "ffn.2", d, f), p + "modulation": ((1, 6, d), "mod")}
    return keys


def random_like_original(z, shape: tuple[int, ...], kind: str):
    """A standard-normal draw `z` of `shape` scaled as `original_layout`'s `kind` says (numpy or torch):
    fan-in scaling keeps activations O(1) through 30-40 random layers."""
    fan_in = int(np.prod(shape[1:]))
    return {"w": lambda: z * fan_in**-0.5, "b": lambda: z * 0.02, "norm": lambda: 1 + 0.1 * z,
            "mod": lambda: z * shape[-1] ** -0.5}[kind]()


def _flat_expected(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    flat = jax.tree_util.tree_flatten_with_path(param_shapes(cfg))[0]
    return {"/".join(k.key for k in path): tuple(leaf.shape) for path, leaf in flat}


def convert(state_dict: Mapping[str, np.ndarray], cfg: WanConfig, *, prefix: str = ""):
    """Map an original-layout Wan state dict to the bcjax parameter tree.

    state_dict: {name: array-like} (numpy, or anything np.asarray accepts). `prefix` is stripped
    from every key first (e.g. "model.diffusion_model."). Raises ValueError naming every missing,
    unexpected or mis-shaped key; returns nothing partial.
    """
    expected = _flat_expected(cfg)
    per_layer: dict[str, dict[int, np.ndarray]] = {}
    top: dict[str, np.ndarray] = {}
    origin: dict[str, str] = {}
    errors: list[str] = []
    dtype = cfg.params_dtype

    for raw_key, value in state_dict.items():
        key = raw_key[len(prefix):] if prefix and raw_key.startswith(prefix) else raw_key
        if key in _TOP:
            path, fn = _TOP[key]
            top[path] = fn(value)
            origin[path] = raw_key
            continue
        m = re.fullmatch(r"blocks\.(\d+)\.(.+)", key)
        target = _BLOCK.get(m.group(2)) if m else None
        if m is None or target is None:
            errors.append(f"unexpected key {raw_key} (shape {tuple(np.shape(value))})")
            continue
        layer = int(m.group(1))
        path, fn = target
        if layer >= cfg.num_layers:
            errors.append(f"unexpected key {raw_key}: layer {layer} but the config has {cfg.num_layers} layers")
            continue
        per_layer.setdefault("blocks/" + path, {})[layer] = fn(value)
        origin.setdefault("blocks/" + path, prefix + _SOURCE_OF["blocks/" + path])

    out: dict[str, np.ndarray] = {}
    for path, shape in expected.items():
        if path.startswith("blocks/"):
            layers = per_layer.get(path, {})
            absent = [i for i in range(cfg.num_layers) if i not in layers]
            if absent:
                name = origin.get(path) or prefix + _SOURCE_OF[path]
                errors.append(f"missing key {name.replace('{N}', str(absent[0]))} "
                              f"(layers {absent} of {cfg.num_layers})")
                continue
            stacked_shapes = {tuple(a.shape) for a in layers.values()}
            if stacked_shapes != {shape[1:]}:
                bad = next(i for i in range(cfg.num_layers) if tuple(layers[i].shape) != shape[1:])
                errors.append(
                    f"key {origin[path].replace('{N}', str(bad))} has shape {tuple(layers[bad].shape)} "
                    f"after conversion; expected {shape[1:]} for {cfg}"
                )
                continue
            out[path] = np.stack([layers[i] for i in range(cfg.num_layers)]).astype(dtype)
        else:
            if path not in top:
                errors.append(f"missing key {prefix}{_SOURCE_OF[path]}")
                continue
            if tuple(top[path].shape) != shape:
                errors.append(f"key {origin[path]} has shape {tuple(top[path].shape)} after conversion; "
                              f"expected {shape}")
                continue
            out[path] = top[path].astype(dtype)
    if errors:
        head = "; ".join(errors[:20])
        more = f"; ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"checkpoint does not match the Wan config ({len(errors)} problems): {head}{more}")
    return io.unflatten(out)



def infer_config(state: Mapping, **overrides) -> WanConfig:
    """A WanConfig read off a DiT state dict's shapes, in any of the layouts we convert.

    Works on the original, Self-Forcing/CausVid (nested, `model.` prefixed), Krea and diffusers
    layouts: it only looks for the patch embedding, the text embedding, the FFN and the block count.
    overrides: fields the weights cannot tell: num_heads (Wan2.1 uses 128-channel heads, the
    default), text_len, dtype, param_dtype, attention.
    """
    flat = dict(flat_items(state))
    patch = _find(flat, ("patch_embedding.weight",))
    text = _find(flat, ("text_embedding.0.weight", "text_embedder.linear_1.weight"))
    ffn = _find(flat, ("blocks.0.ffn.0.weight", "blocks.0.ffn.net.0.proj.weight"))
    head = _find(flat, ("head.head.weight", "proj_out.weight"))
    layers = {int(m.group(1)) for k in flat for m in [re.search(r"(?:^|\.)blocks\.(\d+)\.", k)] if m}
    shapes = {"patch embedding": (patch, 5), "text embedding": (text, 2), "FFN": (ffn, 2), "head": (head, 2)}
    for what, (a, ndim) in shapes.items():
        if len(np.shape(a)) != ndim or 0 in np.shape(a):
            raise ValueError(f"cannot tell the model's shape: its {what} weight has shape {tuple(np.shape(a))}; "
                             f"expected {ndim} non-zero dimensions")
    if not layers:
        raise ValueError("cannot tell the model's shape: no blocks.N. keys")
    dim, in_channels = int(patch.shape[0]), int(patch.shape[1])
    pt, ph, pw = (int(s) for s in patch.shape[2:5])
    out_channels = int(head.shape[0]) // (pt * ph * pw)
    fields = dict(dim=dim, ffn_dim=int(ffn.shape[0]), num_heads=max(1, dim // 128), num_layers=max(layers) + 1,
                  in_channels=in_channels, out_channels=out_channels, patch_size=(pt, ph, pw),
                  text_dim=int(text.shape[1]))
    if out_channels < 1:
        raise ValueError(f"cannot tell the model's shape: its head weight has shape {tuple(head.shape)}, fewer "
                         f"outputs than one patch of {pt}x{ph}x{pw}")
    return WanConfig(**{**fields, **overrides})


def flat_items(state: Mapping, prefix: str = ""):
    """(dotted key, leaf) pairs of a nested checkpoint dict."""
    for k, v in state.items():
        if isinstance(v, Mapping):
            yield from flat_items(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}", v


def _find(flat: Mapping, suffixes: tuple[str, ...]):
    for key, value in flat.items():
        if any(key == s or key.endswith("." + s) for s in suffixes):
            return np.asarray(value) if not hasattr(value, "shape") else value
    raise ValueError(f"cannot tell the model's shape: no key ending in {' or '.join(suffixes)}")
