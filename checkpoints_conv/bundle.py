"""`bcjax convert`: upstream checkpoint files -> one bcjax checkpoint folder (dit [+ text + vae + tokenizer]).

Every part is read, checked (full key set, every shape) and converted before anything is
written; the folder is then written atomically (bcjax.checkpoint.save).
"""

from __future__ import annotations

import os
import resource
import time
from typing import Any

import jax
import numpy as np

from bcjax import checkpoint
from bcjax.errors import naming as _named
from checkpoints_conv import causvid, diffusers_wan, io, krea, longlive, self_forcing
from checkpoints_conv import wan as wan_conv

LAYOUTS = ("wan", "self-forcing", "causvid", "longlive", "krea", "diffusers")


def _source_dtype(state) -> str:
    """bfloat16 if the checkpoint's floating tensors are bf16, else float32 (what 'keep' keeps)."""
    for _, v in wan_conv.flat_items(state):
        kind = str(getattr(v, "dtype", ""))
        if kind == "bfloat16":
            return "bfloat16"
        if kind.startswith("float"):
            return "float32"
    return "float32"


def _read_dit(layout: str, src: str):
    if layout == "diffusers":
        return diffusers_wan.read(src)
    return io.load(src)


def _convert_dit(layout, state, lora, lora_alpha, ema, num_heads, dtype, text_encoder, text_preset):
    """(WanConfig, params) of the DiT read from the upstream file."""
    from bcjax.text.umt5 import UMT5Config

    text_cfg = UMT5Config.preset(text_preset, param_dtype=dtype, dtype=dtype) if text_encoder else None
    overrides: dict[str, Any] = {"param_dtype": dtype, "dtype": dtype}
    if num_heads:
        overrides["num_heads"] = num_heads
    if text_cfg is not None:
        overrides["text_len"] = text_cfg.text_len
    cfg = wan_conv.infer_config(state, **overrides)

    if layout == "wan":
        dit = wan_conv.convert(state, cfg)
    elif layout == "self-forcing":
        dit = self_forcing.convert(state, cfg, ema=True if ema is None else ema)
    elif layout == "causvid":
        dit = causvid.convert(state, cfg, ema=bool(ema))
    elif layout == "longlive":
        alpha = longlive.LONGLIVE_ADAPTER["alpha"] if lora_alpha is None else lora_alpha
        dit = longlive.convert(state, lora, cfg, alpha=alpha, ema=bool(ema))
    elif layout == "krea":
        dit = krea.convert(state, cfg)
    else:
        dit = diffusers_wan.convert(state, cfg)
    return cfg, dit


def convert_bundle(layout: str, src: str, dst: str, *, lora: str | None = None, lora_alpha: float | None = None,
                   ema: bool | None = None, num_heads: int | None = None, dtype: str = "keep",
                   text_encoder: str | None = None, text_layout: str = "wan", text_preset: str = "umt5-xxl",
                   tokenizer: str | None = None, vae: str | None = None, vae_preset: str = "wan2.1",
                   taehv: str | None = None, overwrite: bool = False, quant: str = "none") -> dict:
    """Convert and write; returns a summary (parts, parameter counts, seconds, peak RSS). quant: the
    DiT's kernels stored quantized (`bcjax.model.quant`; weight-only and weights+activations modes of
    one type store the same arrays)."""
    from bcjax.text.tokenizer import find_tokenizer_model, load_tokenizer
    from bcjax.text.umt5 import UMT5Config
    from bcjax.vae.wan_vae import VAEConfig
    from checkpoints_conv import umt5 as umt5_conv
    from checkpoints_conv import wan_vae as vae_conv

    if layout not in LAYOUTS:
        raise ValueError(f"--from {layout!r}: expected one of {', '.join(LAYOUTS)}")
    if (layout == "longlive") != (lora is not None):
        raise ValueError("--lora is required with --from longlive, and only then")
    if (text_encoder is None) != (tokenizer is None):
        raise ValueError("--text-encoder and --tokenizer go together (the tokenizer is bundled for generation)")
    inputs = [p for p in (src, lora, text_encoder, tokenizer, vae, taehv) if p]
    checkpoint.check_destination(dst, inputs, overwrite=overwrite)  # before anything is read
    t0 = time.perf_counter()
    with _named(src):
        state = _read_dit(layout, src)
        dtype = _source_dtype(state) if dtype == "keep" else dtype
        dit = _convert_dit(layout, state, lora, lora_alpha, ema, num_heads, dtype, text_encoder, text_preset)
    if quant != "none":
        import dataclasses

        from bcjax.model.quant import quantize
        from bcjax.names import as_quant

        mode = as_quant(quant)
        dit = (dataclasses.replace(dit[0], quant=mode), quantize(dit[1], mode))
    cfg = dit[0]
    del state
    parts: dict[str, tuple[Any, Any]] = {"dit": dit}
    text_cfg = UMT5Config.preset(text_preset, param_dtype=dtype, dtype=dtype) if text_encoder else None
    sources = {"dit": os.path.abspath(src)} | ({"lora": os.path.abspath(lora)} if lora else {})
    files = {}
    if text_encoder:
        # both set together with text_encoder (text_cfg above; tokenizer checked on entry)
        assert text_cfg is not None and tokenizer is not None
        convert_text = umt5_conv.convert_wan if text_layout == "wan" else umt5_conv.convert_transformers
        with _named(text_encoder):
            parts["text"] = (text_cfg, convert_text(io.read_state_dict(text_encoder), text_cfg))
        tok = find_tokenizer_model(tokenizer)
        load_tokenizer(tok)  # a file sentencepiece cannot read is refused now, not at the first generate
        files["tokenizer/spiece.model"] = str(tok)
        sources |= {"text": os.path.abspath(text_encoder), "tokenizer": os.path.abspath(tok)}
    if vae:
        vae_cfg = VAEConfig.preset(vae_preset)
        with _named(vae):
            parts["vae"] = (vae_cfg, vae_conv.convert(io.read_state_dict(vae), vae_cfg))
        sources["vae"] = os.path.abspath(vae)
    if taehv:  # the tiny preview decoder, kept whole (its encoder serves video-to-video previews)
        from bcjax.vae.taehv import TAEHVConfig
        from checkpoints_conv import taehv as taehv_conv

        taehv_cfg = TAEHVConfig.preset("taew2_1")
        with _named(taehv):
            parts["taehv"] = (taehv_cfg, taehv_conv.convert_file(taehv, taehv_cfg))
        sources["taehv"] = os.path.abspath(taehv)
    checkpoint.save(dst, parts, {"layout": layout, "sources": sources,
                                 "options": {"ema": ema, "lora_alpha": lora_alpha, "dtype": dtype, "quant": quant}},
                    files=files, overwrite=overwrite, sources=inputs)
    counts = {name: int(sum(np.size(a) for a in jax.tree_util.tree_leaves(p))) for name, (_, p) in parts.items()}
    return {"parts": counts, "dit_config": cfg, "seconds": time.perf_counter() - t0,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "dst": checkpoint.resolve(dst)}

