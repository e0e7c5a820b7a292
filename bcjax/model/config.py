"""WanConfig: the shape and numerics of a Wan2.1 DiT, one frozen dataclass."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from bcjax.names import BACKENDS, QUANTS, Backend, Quant
from bcjax.presets import check_dtypes, from_preset

_PRESETS: dict[str, dict] = {
    # Self-Forcing, CausVid, LongLive (paper.md §2.1).
    "wan2.1-1.3b": dict(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    # Krea Realtime 14B.
    "wan2.1-14b": dict(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
    # Tests and the random-weight demo: every code path of the real model, a few KB of weights.
    "tiny": dict(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16),
}


@dataclasses.dataclass(frozen=True)
class WanConfig:
    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    text_dim: int = 4096
    text_len: int = 512
    freq_dim: int = 256
    qk_norm: bool = True
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_positions: int = 1024
    rope_theta: float = 10000.0
    param_dtype: str = "float32"
    dtype: str = "float32"  # matmul/attention compute dtype; norms, modulation and residual stay fp32
    # attention backend (`bcjax.names.Backend`): "auto" picks by platform; "dense" (alias
    # "xla"), "chunked", "splash" (TPU), "pallas_gpu" / "cudnn" (GPU), "<kernel>-interpret"
    attention: Backend = "auto"
    # quantized projections (`bcjax.model.quant`, `bcjax.names.Quant`): a run option like `dtype`
    quant: Quant = "none"

    def __post_init__(self):
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.head_dim % 2 or self.head_dim < 6:
            raise ValueError(f"head_dim {self.head_dim} must be even and >= 6 for Wan's 3D RoPE")
        if self.patch_size[0] != 1:
            raise ValueError(f"patch_size {self.patch_size}: per-frame timesteps need a temporal patch of 1")
        if self.attention not in BACKENDS:
            raise ValueError(f"attention={self.attention!r}: expected one of {BACKENDS}")
        if self.quant not in QUANTS:
            raise ValueError(f"quant={self.quant!r}: expected one of {QUANTS}")
        check_dtypes(self)

    def for_platform(self, platform: str) -> WanConfig:
        """This config with its attention backend resolved for programs compiled for `platform`
        ("auto": the platform's kernel; a backend the platform lacks is refused here)."""
        from bcjax.model.attention import for_platform

        return dataclasses.replace(self, attention=for_platform(self.attention, platform, self.compute_dtype))

    @classmethod
    def preset(cls, name: str, **overrides) -> WanConfig:
        return from_preset(cls, _PRESETS, name, overrides)

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def rope_split(self) -> tuple[int, int, int]:
        """Channels of each head given to the (frame, height, width) RoPE axes, as in Wan."""
        hw = 2 * (self.head_dim // 6)
        return (self.head_dim - 2 * hw, hw, hw)

    @property
    def patch_features(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.in_channels

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def tokens_per_frame(self, latent_h: int, latent_w: int) -> int:
        _, ph, pw = self.patch_size
        return (latent_h // ph) * (latent_w // pw)
