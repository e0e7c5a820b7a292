"""The Wan2.1 DiT: config, layers, attention, RoPE, KV cache."""

from bcjax.model.config import WanConfig
from bcjax.model.wan import KV, encode_text, forward, init_params, param_shapes

__all__ = ["WanConfig", "KV", "encode_text", "forward", "init_params", "param_shapes"]
