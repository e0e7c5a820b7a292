"""LongLive (NVlabs/LongLive) = a base generator + LoRA adapters, merged here into one Wan DiT.

Layout, as read in NVlabs/LongLive:
- base (`generator_ckpt: longlive_models/models/longlive_base.pt`, configs/longlive_inference.yaml):
  a Self-Forcing-style `{"generator": ..., ...}` whose keys are `model.` + the original Wan2.1
  layout; the inference scripts take `generator_ema` if `use_ema` (false in that config) else
  `generator`, else `model`. A plain original-layout state dict (e.g. Wan2.1-T2V-1.3B's own
  weights) is accepted too.
- LoRA (`lora_ckpt: longlive_models/models/lora.pt`): `trainer/distillation.py` `save` writes
  `{"generator_lora": ..., "critic_lora": ..., "step": ...}` where `generator_lora =
  peft.get_peft_model_state_dict(peft_model)` of `peft.get_peft_model(generator.model,
  LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=<every nn.Linear inside a
  CausalWanAttentionBlock>))`: keys `base_model.model.blocks.N.self_attn.q.lora_A.weight` [r, in]
  and `...lora_B.weight` [out, r] (peft drops the adapter name `default`); q/k/v/o of both
  attentions and ffn.0/ffn.2. Inference loads it with `peft.set_peft_model_state_dict`, also
  from a bare adapter dict.
- rank and alpha are not in either file: they live in the YAML config
  (`adapter: {type: lora, rank: 256, alpha: 256}`), copied in `LONGLIVE_ADAPTER`. peft's
  merge is W' = W + (alpha / rank) * B @ A (no rsLoRA in LongLive's LoraConfig).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import numpy as np

from bcjax.model.config import WanConfig
from checkpoints_conv import io
from checkpoints_conv import wan as wan_conv
from checkpoints_conv.self_forcing import select_generator, strip_wrappers

# configs/longlive_inference.yaml `adapter:` (also daydreamlive/scope's longlive model.yaml)
LONGLIVE_ADAPTER = {"rank": 256, "alpha": 256}

# peft key: <module>.lora_A.weight, or <module>.lora_A.<adapter name>.weight inside a live model
_LORA_KEY = re.compile(r"(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight")
_LORA_PREFIXES = ("base_model.model.", "model.")


def convert(base, lora, cfg: WanConfig, *, rank: int | None = None, alpha: float | None = None, ema: bool = False):
    """LongLive base + LoRA (paths or loaded dicts) -> bcjax parameter tree, adapters merged.

    rank: checked against every adapter (inferred from lora_A's shape when None).
    alpha: required unless the LoRA file records it; LongLive's is LONGLIVE_ADAPTER["alpha"].
    ema: base weights from `generator_ema` instead of `generator` (upstream `use_ema`).
    """
    return wan_conv.convert(merge(base, lora, rank=rank, alpha=alpha, ema=ema), cfg)


def merge(base, lora, *, rank: int | None = None, alpha: float | None = None,
          ema: bool = False) -> dict[str, np.ndarray]:
    """The base's original-layout Wan state dict with every LoRA adapter merged in (float32)."""
    base_ckpt, base_src = io.checkpoint_and_source(base)
    if io.is_flat(base_ckpt):
        weights = strip_wrappers(base_ckpt)
    else:
        weights = strip_wrappers(select_generator(base_ckpt, ema=ema, source=base_src, layout="LongLive base",
                                                  fallbacks=("model",)))
    lora_ckpt, lora_src = io.checkpoint_and_source(lora)
    adapters = lora_ckpt.get("generator_lora", lora_ckpt) if isinstance(lora_ckpt, Mapping) else lora_ckpt
    if not io.is_flat(adapters):
        raise ValueError(
            f"LongLive LoRA {lora_src} has no 'generator_lora' dict and is not an adapter state dict itself "
            f"(top-level keys: {io.shorten(io.top_keys(lora_ckpt))})"
        )

    pairs: dict[str, dict[str, np.ndarray]] = {}
    origin: dict[str, str] = {}
    errors: list[str] = []
    for key, value in adapters.items():
        m = _LORA_KEY.fullmatch(key)
        if not m:
            errors.append(f"unexpected key {key} in the LoRA (expected <module>.lora_A.weight / .lora_B.weight)")
            continue
        module = m["module"]
        for p in _LORA_PREFIXES:
            module = module[len(p):] if module.startswith(p) else module
        pairs.setdefault(module, {})[m["ab"]] = np.asarray(value)
        origin.setdefault(module, key.replace(".lora_B", ".lora_A"))

    deltas: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for module, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            errors.append(f"LoRA adapter {origin[module]} has lora_{''.join(ab)} "
                          f"but no lora_{'B' if 'A' in ab else 'A'}")
            continue
        a, b = ab["A"], ab["B"]
        target = module + ".weight"
        if target not in weights:
            errors.append(f"LoRA adapter {origin[module]} targets {target}, which the base checkpoint lacks")
            continue
        w = weights[target]
        r = a.shape[0]
        if a.ndim != 2 or b.ndim != 2 or b.shape[1] != r or (b.shape[0], a.shape[1]) != tuple(w.shape):
            errors.append(
                f"LoRA adapter {origin[module]}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not make "
                f"a delta of {target}'s shape {tuple(w.shape)} "
                f"(expected lora_A [r, {w.shape[-1]}], lora_B [{w.shape[0]}, r])"
            )
            continue
        if rank is None:
            rank = r
        elif r != rank:
            errors.append(f"LoRA adapter {origin[module]} has rank {r}; expected {rank}")
            continue
        deltas[module] = (a, b)
    if errors:
        head = "; ".join(errors[:20])
        more = f"; ... and {len(errors) - 20} more" if len(errors) > 20 else ""
        raise ValueError(f"LongLive LoRA {lora_src} does not fit base {base_src} "
                         f"({len(errors)} problems): {head}{more}")
    if not deltas:
        raise ValueError(f"LongLive LoRA {lora_src} holds no adapters")

    if alpha is None:
        alpha = _recorded_alpha(lora_ckpt)
    if alpha is None:
        raise ValueError(
            f"LoRA alpha is not recorded in {lora_src} (LongLive keeps rank and alpha in its YAML config, "
            f"configs/longlive_inference.yaml adapter: rank {LONGLIVE_ADAPTER['rank']}, "
            f"alpha {LONGLIVE_ADAPTER['alpha']}); "
            f"pass alpha=, e.g. alpha=LONGLIVE_ADAPTER['alpha']"
        )
    assert rank is not None  # set (or checked) by every adapter, and there is at least one
    scale = float(alpha) / rank
    merged = dict(weights)
    for module, (a, b) in deltas.items():
        target = module + ".weight"
        # [out, in] += scale * [out, r] @ [r, in]
        merged[target] = np.asarray(weights[target], np.float32) + np.float32(scale) * (
            b.astype(np.float32) @ a.astype(np.float32))
    return merged


def _recorded_alpha(ckpt) -> float | None:
    """lora_alpha if the LoRA file itself records it (a peft-style `lora_alpha`/`alpha` entry,
    possibly under `adapter`/`config`/`peft_config`); LongLive's own files do not."""
    if not isinstance(ckpt, Mapping):
        return None
    for node in (ckpt, *(ckpt.get(k) for k in ("adapter", "config", "peft_config", "lora_config"))):
        if isinstance(node, Mapping):
            for key in ("lora_alpha", "alpha"):
                if key in node and np.ndim(node[key]) == 0:
                    return float(node[key])
    return None
