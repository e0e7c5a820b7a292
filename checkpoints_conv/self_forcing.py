"""Self-Forcing checkpoints (`gdhe17/Self-Forcing`, e.g. `checkpoints/self_forcing_dmd.pt`) -> bcjax.

Layout (guandeh17/Self-Forcing): `trainer/distillation.py` `Trainer.save` writes
`torch.save({"generator": ..., "critic": ..., "generator_ema": ...})`, each a full state dict of
`utils/wan_wrapper.py` `WanDiffusionWrapper`, whose only weights are `self.model =
CausalWanModel(...)`: so every key is `model.` + the original Wan2.1 layout
(`model.blocks.0.self_attn.q.weight`). `inference.py` loads
`state_dict['generator' if not args.use_ema else 'generator_ema']`, and the README's inference
command passes `--use_ema`, hence `ema=True` here. `critic` (the fake score) is not read.

`select_generator` and `strip_wrappers` are shared with the CausVid and LongLive converters,
whose trainers write the same dicts.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from bcjax.model.config import WanConfig
from checkpoints_conv import io
from checkpoints_conv import wan as wan_conv

# Prefixes FSDP, activation checkpointing and torch.compile can leave inside parameter names;
# LongLive's inference scripts remove "_fsdp_wrapped_module." from EMA weights the same way.
_WRAPPER_PARTS = ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "_orig_mod.")


def convert(path_or_state, cfg: WanConfig, *, ema: bool = True):
    """A Self-Forcing `.pt` (path, or its loaded dict) -> bcjax parameter tree.

    ema: take `generator_ema` (upstream's `--use_ema`, the default of its README) or `generator`.
    """
    return wan_conv.convert(generator_state_dict(path_or_state, ema=ema, layout="Self-Forcing"), cfg)


def generator_state_dict(path_or_state, *, ema: bool, layout: str,
                         fallbacks: tuple[str, ...] = ()) -> dict[str, np.ndarray]:
    """The original-layout Wan state dict inside a generator checkpoint (prefixes stripped)."""
    ckpt, source = io.checkpoint_and_source(path_or_state)
    return strip_wrappers(select_generator(ckpt, ema=ema, source=source, layout=layout, fallbacks=fallbacks))


def select_generator(ckpt, *, ema: bool, source, layout: str, fallbacks: tuple[str, ...] = ()) -> Mapping:
    """ckpt["generator_ema"] if ema else ckpt["generator"] (then any of `fallbacks`), with an error
    naming the checkpoint's top-level keys when the wanted dict is absent."""
    want = "generator_ema" if ema else "generator"
    for key in (want, *(() if ema else fallbacks)):
        if isinstance(ckpt, Mapping) and key in ckpt and isinstance(ckpt[key], Mapping):
            return ckpt[key]
    keys = io.top_keys(ckpt)
    hint = ""
    if io.is_flat(ckpt):
        hint = ("; it looks like a bare state dict, not a training checkpoint: "
                "convert it with checkpoints_conv.wan.convert(state, cfg, prefix='model.')")
    elif ema and isinstance(ckpt, Mapping) and "generator" in ckpt:
        hint = "; it has 'generator': pass ema=False to use the non-EMA weights"
    elif not ema and isinstance(ckpt, Mapping) and "generator_ema" in ckpt:
        hint = "; it has 'generator_ema': pass ema=True"
    names = " or ".join(repr(k) for k in (want, *(() if ema else fallbacks)))
    raise ValueError(f"{layout} checkpoint {source} has no {names} dict (top-level keys: {io.shorten(keys)}){hint}")


def strip_wrappers(state: Mapping, prefix: str = "model.") -> dict[str, np.ndarray]:
    """Drop `prefix` (the `WanDiffusionWrapper.model` attribute) and FSDP/compile wrapper parts
    from every key; keys without the prefix are kept as they are (and then reported by the Wan
    converter if they are not Wan weights)."""
    out: dict[str, np.ndarray] = {}
    for key, value in state.items():
        for part in _WRAPPER_PARTS:
            key = key.replace(part, "")
        if prefix and key.startswith(prefix):
            key = key[len(prefix):]
        out[key] = value
    return out

