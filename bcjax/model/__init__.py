"""The Wan2.1 DiT: config, layers, attention, RoPE, KV cache."""

from bcjax.model.config import WanConfig
from bcjax.model.wan import KV, forward, init_params, param_shapes, text_kv

__all__ = ["WanConfig", "KV", "forward", "init_params", "param_shapes", "text_kv"]
