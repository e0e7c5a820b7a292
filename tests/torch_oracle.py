"""PyTorch oracle: diffusers' WanTransformer3DModel fed through diffusers' own converter.

Independent of bcjax's model: the state dict follows the *original Wan layout* (its one spelling,
`checkpoints_conv.wan.original_layout`), diffusers maps it with its own
`convert_wan_transformer_to_diffusers` and loads it strictly, and a masked attention processor
(`checkpoints_conv.diffusers_oracle`) gives its bidirectional model a block-causal mask.
"""

from __future__ import annotations

import numpy as np
import torch

from checkpoints_conv import wan as wan_conv
from checkpoints_conv.diffusers_oracle import masked_wan


def random_wan_state_dict(cfg, seed: int = 0) -> dict[str, torch.Tensor]:
    """A random original-layout Wan2.1 T2V state dict (fp32) for a WanConfig."""
    g = torch.Generator().manual_seed(seed)
    return {key: wan_conv.random_like_original(torch.randn(*shape, generator=g), shape, kind)
            for key, (shape, kind) in wan_conv.original_layout(cfg).items()}


def to_numpy(sd: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in sd.items()}


class DiffusersWan:
    """diffusers' Wan DiT loaded from an original-layout state dict, with bcjax-shaped I/O."""

    def __init__(self, cfg, state_dict: dict[str, torch.Tensor]):
        self.cfg = cfg
        self.model, self.processor = masked_wan(cfg, state_dict)

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
