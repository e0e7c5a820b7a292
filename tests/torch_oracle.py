"""PyTorch oracle: diffusers' WanTransformer3DModel fed through diffusers' own converter.

Independent of bcjax: the state dict is written here in the *original Wan layout* from the
shapes of the upstream code, diffusers maps it with `convert_wan_transformer_to_diffusers`, and
a masked attention processor gives its bidirectional model a block-causal mask.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import WanTransformer3DModel
from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers
from diffusers.models.transformers.transformer_wan import WanAttnProcessor


def random_wan_state_dict(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random original-layout Wan2.1 T2V state dict (fp32) for a WanConfig."""
    g = torch.Generator().manual_seed(seed)
    d, f = cfg.dim, cfg.ffn_dim
    pt, ph, pw = cfg.patch_size
    out = cfg.out_channels * pt * ph * pw

    def w(*shape, fan_in=None):
        return torch.randn(*shape, generator=g) * (fan_in or shape[-1]) ** -0.5

    def b(n):
        return torch.randn(n, generator=g) * 0.02

    sd = {
        "patch_embedding.weight": w(d, cfg.in_channels, pt, ph, pw, fan_in=cfg.in_channels * pt * ph * pw),
        "patch_embedding.bias": b(d),
        "text_embedding.0.weight": w(d, cfg.text_dim), "text_embedding.0.bias": b(d),
        "text_embedding.2.weight": w(d, d), "text_embedding.2.bias": b(d),
        "time_embedding.0.weight": w(d, cfg.freq_dim), "time_embedding.0.bias": b(d),
        "time_embedding.2.weight": w(d, d), "time_embedding.2.bias": b(d),
        "time_projection.1.weight": w(6 * d, d), "time_projection.1.bias": b(6 * d),
        "head.head.weight": w(out, d), "head.head.bias": b(out),
        "head.modulation": torch.randn(1, 2, d, generator=g) * d**-0.5,
    }
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        for attn in ("self_attn", "cross_attn"):
            for name in "qkvo":
                sd[p + f"{attn}.{name}.weight"] = w(d, d)
                sd[p + f"{attn}.{name}.bias"] = b(d)
            sd[p + f"{attn}.norm_q.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
            sd[p + f"{attn}.norm_k.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        sd[p + "norm3.weight"] = 1 + 0.1 * torch.randn(d, generator=g)
        sd[p + "norm3.bias"] = b(d)
        sd[p + "ffn.0.weight"] = w(f, d)
        sd[p + "ffn.0.bias"] = b(f)
        sd[p + "ffn.2.weight"] = w(d, f)
        sd[p + "ffn.2.bias"] = b(d)
        sd[p + "modulation"] = torch.randn(1, 6, d, generator=g) * d**-0.5
    return sd


def to_numpy(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


class MaskedWanAttnProcessor(WanAttnProcessor):
    """WanAttnProcessor with a settable boolean mask [L, L] (True = attend) for self-attention."""

    mask: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return super().__call__(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb)


class DiffusersWan:
    """diffusers' Wan DiT loaded from an original-layout state dict, with bcjax-shaped I/O."""

    def __init__(self, cfg, state_dict: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.model = WanTransformer3DModel(
            patch_size=cfg.patch_size, num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_channels, out_channels=cfg.out_channels, text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
            cross_attn_norm=cfg.cross_attn_norm, qk_norm="rms_norm_across_heads", eps=cfg.eps,
            rope_max_seq_len=cfg.rope_max_positions,
        )
        converted = convert_wan_transformer_to_diffusers({k: v.clone() for k, v in state_dict.items()})
        missing, unexpected = self.model.load_state_dict(converted, strict=False)
        assert not missing and not unexpected, (missing, unexpected)
        self.model.eval()
        self.processor = MaskedWanAttnProcessor()
        for block in self.model.blocks:
            block.attn1.set_processor(self.processor)

    @torch.no_grad()
    def __call__(self, x: np.ndarray, t: np.ndarray, context: np.ndarray, mask: np.ndarray | None = None):
        """x [B, F, H, W, C], t [B] (one timestep per sample: diffusers' scalar path) or [B, F]
        (per frame: expanded to diffusers' per-token path), context [B, Lt, text_dim],
        mask bool [L, L] over the F*h*w tokens. Returns the flow [B, F, H, W, C] as numpy."""
        b, f, hh, ww, _ = x.shape
        _, ph, pw = self.cfg.patch_size
        per_frame = (hh // ph) * (ww // pw)
        xt = torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 4, 1, 2, 3)))
        t = np.asarray(t, np.float32)
        tt = torch.from_numpy(t if t.ndim == 1 else np.repeat(t, per_frame, axis=1))
        self.processor.mask = None if mask is None else torch.from_numpy(np.asarray(mask, bool))
        out = self.model(xt, tt, torch.from_numpy(np.asarray(context, np.float32)), return_dict=False)[0]
        self.processor.mask = None
        return out.numpy().transpose(0, 2, 3, 4, 1)


def block_causal_mask(frame_blocks: np.ndarray, tokens_per_frame: int, visible_frames=None) -> np.ndarray:
    """Token mask [L, L]: a token sees tokens of its own block and of older blocks.

    frame_blocks: block index of each frame. visible_frames: optional bool [F, F] further
    restricting which key frames each query frame may see (a rolling window).
    """
    fb = np.repeat(np.asarray(frame_blocks), tokens_per_frame)
    mask = fb[None, :] <= fb[:, None]
    if visible_frames is not None:
        mask &= np.repeat(np.repeat(visible_frames, tokens_per_frame, 0), tokens_per_frame, 1)
    return mask
