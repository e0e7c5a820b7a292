"""Krea Realtime 14B (krea-ai/realtime-video; HF `krea/krea-realtime-video`) -> bcjax.

Layout, as read in krea-ai/realtime-video: `release_server.py` `load_transformer` does
`state_dict = load_file(config.checkpoint_path)` (safetensors, `krea-realtime-video-14b.safetensors`)
and `WanDiffusionWrapper(model_name="Wan2.1-T2V-14B", is_causal=True).load_state_dict(state_dict)`,
picking 1.3B vs 14B from `state_dict["model.blocks.0.self_attn.k.weight"].shape[0]`: a flat state
dict of `model.` + the original Wan2.1 layout (separate q/k/v; `fuse_projections` runs after
loading). daydreamlive/scope's `WanDiffusionWrapper` loads the same file and strips `model.`
when every key has it, so unprefixed files are accepted too.

The HF repo also ships the transformer sharded under `transformer/`; a folder (or a file whose
keys are diffusers names, `condition_embedder.*`) goes through `checkpoints_conv.diffusers_wan`.
"""

from __future__ import annotations

from pathlib import Path

from bcjax.model.config import WanConfig
from checkpoints_conv import diffusers_wan, io
from checkpoints_conv import wan as wan_conv
from checkpoints_conv.self_forcing import strip_wrappers


def convert(path_or_state, cfg: WanConfig):
    """`krea-realtime-video-14b.safetensors` (path, or its {name: array} dict), or the repo's
    `transformer/` folder -> bcjax parameter tree (use `WanConfig.preset("wan2.1-14b")`)."""
    if isinstance(path_or_state, (str, Path)) and Path(path_or_state).is_dir():
        return diffusers_wan.convert(path_or_state, cfg)
    state, source = io.checkpoint_and_source(path_or_state)
    if not io.is_flat(state):
        raise ValueError(f"Krea checkpoint {source} is not a flat state dict "
                         f"(top-level keys: {io.shorten(io.top_keys(state))})")
    if any(k.startswith("condition_embedder.") for k in state):
        return diffusers_wan.convert_state_dict(state, cfg)
    return wan_conv.convert(strip_wrappers(state), cfg)
