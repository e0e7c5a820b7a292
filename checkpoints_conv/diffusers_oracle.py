"""diffusers' Wan DiT built from an original-layout state dict, its self-attention under a mask
that can be set per call: the PyTorch oracle of the parity tests and of `bcjax bench sequential`.

diffusers maps the original layout with its own `convert_wan_transformer_to_diffusers` and loads it
strictly (every key used, none missing), so the oracle does not share bcjax's rename table.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping

import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


class MaskedWanAttnProcessor(WanAttnProcessor):
    """WanAttnProcessor with a settable boolean mask [L, L] (True = attend) for self-attention
    (diffusers' Wan passes no mask of its own: its model is bidirectional)."""

    mask: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


def masked_wan(cfg, state_dict: Mapping[str, torch.Tensor], *, empty_init: bool = False):
    """(model in eval mode, the MaskedWanAttnProcessor every block's self-attention shares) for a
    WanConfig and an original-layout state dict. empty_init: parameters start on the meta device
    and adopt the state dict's tensors (one copy of a 1.3B/14B model, not two; needs accelerate)."""
    empty = contextlib.nullcontext()
    if empty_init:
        try:
            from accelerate import init_empty_weights

            empty = init_empty_weights()
        except ImportError:
            empty_init = False
    with empty:
        model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
            cross_attn_norm=cfg.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=cfg.eps,
            rope_max_seq_len=cfg.rope_max_positions,
        )
    # the converter pops keys from the dict it is given: hand it a copy, the caller's stays whole
    converted = convert_wan_transformer_to_diffusers(dict(state_dict))
    missing, unexpected = model.load_state_dict(converted, strict=False, assign=empty_init)
    if missing or unexpected:
        raise RuntimeError(f"diffusers Wan state dict mismatch: missing {missing}, unexpected {unexpected}")
    model.eval()
    processor = MaskedWanAttnProcessor()
    for block in model.blocks:
        block.attn1.set_processor(processor)
    return model, processor
