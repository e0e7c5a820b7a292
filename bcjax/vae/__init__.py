"""The Wan2.1 video VAE: streaming causal decoder (static-shape state) and whole-clip encoder."""

from bcjax.vae.wan_vae import (
    DecodeState,
    VAEConfig,
    decode,
    decode_step,
    denormalize,
    encode,
    init_decode_state,
    init_params,
    normalize,
    param_shapes,
)

__all__ = [
    "DecodeState", "VAEConfig", "decode", "decode_step", "denormalize", "encode", "init_decode_state",
    "init_params", "normalize", "param_shapes",
]
