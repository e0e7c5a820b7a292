"""The Wan2.1 video VAE in Flax, with a streaming decoder whose state has static shapes.

Latents and video are channels-last: z [B, F, h, w, 16], video [B, T, H, W, 3] in [-1, 1] with
T = 1 + 4 (F - 1), H = 8 h, W = 8 w. Latents in and out of this module are *normalised* (what the
DiT produces and consumes): the decoder de-normalises them itself (z * std + mean, as the Wan
pipelines do before calling diffusers' `AutoencoderKLWan.decode`, which takes raw latents), and
`encode` returns the normalised posterior mean.

Streaming. Every temporal conv of the decoder is causal (left zero-padding of kt-1 = 2 frames),
so a clip may be split into chunks of any size if each causal conv carries its last two input
frames; that carry is `DecodeState.cache`, a pytree of fixed-shape arrays. The one exception is
Wan's first latent frame, which decodes to a single video frame: each `upsample3d` passes the
clip's first frame through without its time_conv instead of doubling it. Here that is a mask, not
a shape: every step turns F latent frames into 4F video frames, and on the first step (state.frames
== 0) the clip's first frame is emitted as (padding, frame) at each doubling, the padding frames
are zeroed at every causal-conv input (so they are indistinguishable from Wan's zero padding) and
the 3 leading output frames are zeros. `decode_step` therefore compiles once per chunk size, the
first step included; callers drop `cfg.first_chunk_padding` frames from the first step's output.

The encoder runs a whole clip (T = 1 + 4k frames) at once; it is not streamed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcjax.presets import check_dtypes, from_preset

F32 = jnp.float32

# Wan2.1's per-channel latent statistics (Wan `WanVAE.mean/std`, diffusers' AutoencoderKLWan defaults).
WAN21_LATENTS_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)
WAN21_LATENTS_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)

_PRESETS: dict[str, dict] = {
    # The VAE of every Wan2.1 model (1.3B and 14B) and of Self-Forcing, CausVid, LongLive, Krea.
    "wan2.1": dict(base_dim=96),
    # Tests: Wan2.1's exact block structure (so both checkpoint layouts apply) at 1/12 the width.
    "tiny": dict(base_dim=8),
}


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # upstream's spelling; the decoder reverses it
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    param_dtype: str = "float32"
    dtype: str = "float32"  # conv/attention compute dtype; norms and softmax stay fp32

    def __post_init__(self):
        # Lists would make the config unhashable, and it is a static jit argument.
        for name in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temperal_downsample {self.temperal_downsample} needs one entry per downsampling level, "
                f"len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )
        for name in ("latents_mean", "latents_std"):
            if len(getattr(self, name)) != self.z_dim:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries; z_dim is {self.z_dim}")
        if min(self.latents_std) <= 0:
            raise ValueError(f"latents_std must be positive; got {self.latents_std}")
        if self.num_res_blocks < 1 or self.base_dim < 1:
            raise ValueError(f"base_dim={self.base_dim}, num_res_blocks={self.num_res_blocks}: both must be >= 1")
        check_dtypes(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> VAEConfig:
        return from_preset(cls, _PRESETS, name, overrides)

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)

    @property
    def temporal_scale(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_scale(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    @property
    def first_chunk_padding(self) -> int:
        """Leading zero frames in the first `decode_step` output (latent frame 0 -> 1 video frame)."""
        return self.temporal_scale - 1

    @property
    def encoder_dims(self) -> tuple[int, ...]:
        return tuple(self.base_dim * u for u in (1, *self.dim_mult))

    @property
    def decoder_dims(self) -> tuple[int, ...]:
        return tuple(self.base_dim * u for u in (self.dim_mult[-1], *self.dim_mult[::-1]))

    @property
    def upsample_modes(self) -> tuple[str | None, ...]:
        """Per decoder level: 'upsample3d' (2x time and space), 'upsample2d' (2x space) or None (last)."""
        up = self.temperal_downsample[::-1]
        last = len(self.dim_mult) - 1
        return tuple(None if i == last else ("upsample3d" if up[i] else "upsample2d") for i in range(last + 1))

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)

    def video_frames(self, latent_frames: int) -> int:
        return 1 + self.temporal_scale * (latent_frames - 1)


# ----------------------------------------------------------------------------------------------
# Layers


def _dense(cfg: VAEConfig, features: int, name: str) -> nn.Dense:
    # Wan's pointwise convs (1x1 Conv2d, 1x1x1 CausalConv3d) are per-position linear maps.
    return nn.Dense(features, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name)


class RMSNorm(nn.Module):
    """Wan's channel norm: F.normalize over channels (x / max(|x|, 1e-12)) * sqrt(C) * scale."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.cfg.params_dtype)
        xf = x.astype(F32)
        norm = jnp.sqrt(jnp.sum(xf * xf, axis=-1, keepdims=True))
        return (xf / jnp.maximum(norm, 1e-12) * (c**0.5 * scale.astype(F32))).astype(self.cfg.compute_dtype)


class CausalConv3d(nn.Module):
    """Conv3d, 'same' in space and causal in time, its left temporal padding read from a carried cache.

    The cache holds the last kt-1 input frames of the previous call, zeros before the first one:
    exactly Wan's zero left-padding of the whole clip, so any split of a clip into calls gives the
    same output.
    """

    cfg: VAEConfig
    features: int
    kernel_size: tuple[int, int, int] = (3, 3, 3)

    @nn.compact
    def __call__(self, x, cache=None, valid=None):
        """x [B, F, H, W, Cin]; cache [B, kt-1, H, W, Cin] or None (start of a clip); valid bool [F]
        or None: frames zeroed before the conv (the first chunk's padding frames).
        Returns (y [B, F, H, W, features], cache [B, kt-1, H, W, Cin])."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        kt, kh, kw = self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (kt, kh, kw, x.shape[-1], self.features),
                            cfg.params_dtype)
        bias = self.param("bias", nn.initializers.zeros, (self.features,), cfg.params_dtype)
        x = x.astype(dt)
        if valid is not None:
            x = jnp.where(valid[None, :, None, None, None], x, jnp.zeros((), dt))
        if cache is None:
            cache = jnp.zeros((x.shape[0], kt - 1, *x.shape[2:]), dt)
        # [batch, kt-1 + frames, height, width, channels]
        xc = jnp.concatenate([cache.astype(dt), x], axis=1)
        y = jax.lax.conv_general_dilated(
            xc, kernel.astype(dt), window_strides=(1, 1, 1),
            padding=[(0, 0), (kh // 2, kh // 2), (kw // 2, kw // 2)],
            dimension_numbers=("NDHWC", "DHWIO", "NDHWC"),
        )
        return y + bias.astype(dt), xc[:, xc.shape[1] - (kt - 1):]


class ResidualBlock(nn.Module):
    """norm-silu-conv twice, plus a pointwise shortcut when the width changes."""

    cfg: VAEConfig
    out_dim: int

    @nn.compact
    def __call__(self, x, cache=None, valid=None):
        """x [B, F, H, W, Cin] -> (x [B, F, H, W, out_dim], {'conv1', 'conv2'} caches)."""
        cfg, cache = self.cfg, cache or {}
        h = (x.astype(cfg.compute_dtype) if x.shape[-1] == self.out_dim
             else _dense(cfg, self.out_dim, "conv_shortcut")(x))
        y = nn.silu(RMSNorm(cfg, name="norm1")(x))
        y, c1 = CausalConv3d(cfg, self.out_dim, name="conv1")(y, cache.get("conv1"), valid)
        y = nn.silu(RMSNorm(cfg, name="norm2")(y))
        y, c2 = CausalConv3d(cfg, self.out_dim, name="conv2")(y, cache.get("conv2"), valid)
        return y + h, {"conv1": c1, "conv2": c2}


class AttentionBlock(nn.Module):
    """Single-head self-attention within each frame (tokens = the frame's pixels)."""

    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        """x [B, F, H, W, C] -> same."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        b, f, hh, ww, c = x.shape
        qkv = _dense(cfg, 3 * c, "to_qkv")(RMSNorm(cfg, name="norm")(x))
        # [batch, frame, pixels, channels] each
        q, k, v = jnp.split(qkv.reshape(b, f, hh * ww, 3 * c), 3, axis=-1)
        logits = jnp.einsum("BFQC,BFKC->BFQK", q, k).astype(F32) * c**-0.5
        weights = jax.nn.softmax(logits, axis=-1).astype(dt)
        o = jnp.einsum("BFQK,BFKC->BFQC", weights, v).reshape(b, f, hh, ww, c)
        return x.astype(dt) + _dense(cfg, c, "proj")(o)


class Resample(nn.Module):
    """Wan's Resample: 'upsample2d' | 'upsample3d' (decoder), 'downsample2d' | 'downsample3d' (encoder)."""

    cfg: VAEConfig
    mode: str

    @nn.compact
    def __call__(self, x, cache=None, valid=None, first=None):
        """x [B, F, H, W, C]. Decoder modes: cache {'time_conv': ...} or None, valid bool [F] or None,
        first bool [F]: the clip's first frame at this rate (upsample3d passes it through undoubled).
        Returns (x, cache): upsample3d [B, 2F, 2H, 2W, C/2], upsample2d [B, F, 2H, 2W, C/2],
        downsample2d [B, F, H/2, W/2, C], downsample3d (whole clip, F = 1 + 2k) [B, 1 + k, H/2, W/2, C]."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        b, f, hh, ww, c = x.shape
        x = x.astype(dt)
        new_cache = {}
        if self.mode == "upsample3d":
            # time_conv (C -> 2 x C: two output frames per input frame) runs on the frames after the
            # clip's first, which Wan keeps as one frame; it becomes (padding, itself) so shapes stay static.
            tc_valid = ~first if valid is None else valid & ~first
            y, new_cache["time_conv"] = CausalConv3d(cfg, 2 * c, (3, 1, 1), name="time_conv")(
                x, (cache or {}).get("time_conv"), tc_valid)
            # [batch, frame, height, width, 2, channels]: output channel s*C + c is frame 2t + s
            y = y.reshape(b, f, hh, ww, 2, c)
            kept = jnp.stack([jnp.zeros_like(x), x], axis=4)
            y = jnp.where(first[None, :, None, None, None, None], kept, y)
            x = y.transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * f, hh, ww, c)
        if self.mode.startswith("upsample"):
            # nearest-exact at scale 2 is a plain 2x repeat
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            x = nn.Conv(c // 2, (3, 3), padding=1, dtype=dt, param_dtype=cfg.params_dtype, name="resample")(x)
        elif self.mode.startswith("downsample"):
            # ZeroPad2d((0, 1, 0, 1)): one extra row and column at the bottom/right
            x = nn.Conv(c, (3, 3), strides=2, padding=((0, 1), (0, 1)), dtype=dt, param_dtype=cfg.params_dtype,
                        name="resample")(x)
            if self.mode == "downsample3d":
                # Wan keeps frame 0 and then convolves windows [0, 1, 2], [2, 3, 4], ...
                y = nn.Conv(c, (3, 1, 1), strides=(2, 1, 1), padding="VALID", dtype=dt,
                            param_dtype=cfg.params_dtype, name="time_conv")(x)
                x = jnp.concatenate([x[:, :1], y], axis=1)
        else:
            raise ValueError(f"unknown Resample mode {self.mode!r}")
        return x, new_cache


class MidBlock(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, cache=None):
        """x [B, F, H, W, C] -> (same shape, caches of resnets_0 and resnets_1)."""
        cache, c = cache or {}, x.shape[-1]
        x, c0 = ResidualBlock(self.cfg, c, name="resnets_0")(x, cache.get("resnets_0"))
        x = AttentionBlock(self.cfg, name="attentions_0")(x)
        x, c1 = ResidualBlock(self.cfg, c, name="resnets_1")(x, cache.get("resnets_1"))
        return x, {"resnets_0": c0, "resnets_1": c1}


class UpBlock(nn.Module):
    cfg: VAEConfig
    out_dim: int
    mode: str | None

    @nn.compact
    def __call__(self, x, cache, valid, first):
        cache, new = cache or {}, {}
        for j in range(self.cfg.num_res_blocks + 1):
            x, new[f"resnets_{j}"] = ResidualBlock(self.cfg, self.out_dim, name=f"resnets_{j}")(
                x, cache.get(f"resnets_{j}"), valid)
        if self.mode is not None:
            x, new["upsampler"] = Resample(self.cfg, self.mode, name="upsampler")(
                x, cache.get("upsampler"), valid, first)
        return x, new


def _first_chunk_masks(first_chunk, frames: int, rate: int):
    """At a level where each latent frame is `rate` frames: (valid, first), bool [frames] each.

    On the clip's first chunk the first latent frame occupies `rate` slots, of which the first
    rate-1 are padding and the last is Wan's single first frame."""
    j = jnp.arange(frames)
    first = first_chunk & (j == rate - 1)
    valid = None if rate == 1 else ~(first_chunk & (j < rate - 1))
    return valid, first


class Decoder(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x, cache, first_chunk):
        """x [B, F, h, w, z_dim] raw latents after post_quant_conv; cache: DecodeState.cache or None
        (zeros); first_chunk bool []: this call starts the clip.
        Returns (video [B, 4F, 8h, 8w, 3] unclamped, the first chunk's leading 3 frames padding; cache)."""
        cfg, cache, new = self.cfg, cache or {}, {}
        dims = cfg.decoder_dims
        x, new["conv_in"] = CausalConv3d(cfg, dims[0], name="conv_in")(x, cache.get("conv_in"))
        x, new["mid_block"] = MidBlock(cfg, name="mid_block")(x, cache.get("mid_block"))
        rate = 1
        for i, mode in enumerate(cfg.upsample_modes):
            valid, first = _first_chunk_masks(first_chunk, x.shape[1], rate)
            x, new[f"up_blocks_{i}"] = UpBlock(cfg, dims[i + 1], mode, name=f"up_blocks_{i}")(
                x, cache.get(f"up_blocks_{i}"), valid, first)
            rate *= 2 if mode == "upsample3d" else 1
        valid, _ = _first_chunk_masks(first_chunk, x.shape[1], rate)
        x = nn.silu(RMSNorm(cfg, name="norm_out")(x))
        x, new["conv_out"] = CausalConv3d(cfg, 3, name="conv_out")(x, cache.get("conv_out"), valid)
        return x, new


class Encoder(nn.Module):
    cfg: VAEConfig

    @nn.compact
    def __call__(self, x):
        """Whole clip: x [B, 1 + 4k, H, W, 3] -> [B, 1 + k, H/8, W/8, 2 z_dim]."""
        cfg = self.cfg
        dims = cfg.encoder_dims
        x, _ = CausalConv3d(cfg, dims[0], name="conv_in")(x)
        idx, last = 0, len(cfg.dim_mult) - 1
        # one flat list, as in both checkpoint layouts: num_res_blocks resnets then a Resample per level
        for i in range(last + 1):
            for _ in range(cfg.num_res_blocks):
                x, _ = ResidualBlock(cfg, dims[i + 1], name=f"down_blocks_{idx}")(x)
                idx += 1
            if i != last:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                x, _ = Resample(cfg, mode, name=f"down_blocks_{idx}")(x)
                idx += 1
        x, _ = MidBlock(cfg, name="mid_block")(x)
        x = nn.silu(RMSNorm(cfg, name="norm_out")(x))
        x, _ = CausalConv3d(cfg, 2 * cfg.z_dim, name="conv_out")(x)
        return x


class WanVAE(nn.Module):
    """params = {'encoder', 'quant_conv', 'post_quant_conv', 'decoder'} (diffusers' module names)."""

    cfg: VAEConfig

    def setup(self):
        cfg = self.cfg
        self.encoder = Encoder(cfg)
        self.quant_conv = _dense(cfg, 2 * cfg.z_dim, "quant_conv")
        self.post_quant_conv = _dense(cfg, cfg.z_dim, "post_quant_conv")
        self.decoder = Decoder(cfg)

    def encode(self, video):
        """[B, 1 + 4k, H, W, 3] -> raw posterior mean [B, 1 + k, H/8, W/8, z_dim] (log-variance dropped)."""
        return self.quant_conv(self.encoder(video))[..., : self.cfg.z_dim]

    def decode(self, z, cache, first_chunk):
        """Raw latents [B, F, h, w, z_dim] -> (video [B, 4F, 8h, 8w, 3], cache); see Decoder."""
        return self.decoder(self.post_quant_conv(z.astype(self.cfg.compute_dtype)), cache, first_chunk)

    def __call__(self, video, z):  # init only: touches every parameter
        return self.encode(video), self.decode(z, None, jnp.bool_(True))


# ----------------------------------------------------------------------------------------------
# Pure functions


@partial(jax.jit, static_argnums=0)
def init_params(cfg: VAEConfig, key):
    """Random parameters (Flax initialisers); real weights come from checkpoints_conv.wan_vae."""
    s = cfg.spatial_scale
    video = jnp.zeros((1, 1, s, s, 3), cfg.compute_dtype)
    z = jnp.zeros((1, 1, 1, 1, cfg.z_dim), F32)
    return WanVAE(cfg).init(key, video, z)["params"]


def param_shapes(cfg: VAEConfig):
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def denormalize(cfg: VAEConfig, z):
    """DiT latents -> the VAE's raw latents: z * std + mean per channel (float32)."""
    return z.astype(F32) * jnp.asarray(cfg.latents_std, F32) + jnp.asarray(cfg.latents_mean, F32)


def normalize(cfg: VAEConfig, z):
    """The VAE's raw latents -> DiT latents: (z - mean) / std per channel (float32)."""
    return (z.astype(F32) - jnp.asarray(cfg.latents_mean, F32)) / jnp.asarray(cfg.latents_std, F32)


class DecodeState(NamedTuple):
    """What a streaming decode carries between chunks; fixed shapes whatever the stream length."""

    cache: Mapping  # per causal conv, its last 2 input frames [B, 2, h_l, w_l, C_l] (zeros at the start)
    frames: jax.Array  # int32 []: latent frames decoded so far (0 = the next step starts the clip)


def _cache_shapes(cfg: VAEConfig, batch: int, latent_hw: tuple[int, int]):
    z = jax.ShapeDtypeStruct((batch, 1, *latent_hw, cfg.z_dim), F32)

    def cache_of(z):
        (_, cache), _ = WanVAE(cfg).init_with_output(jax.random.key(0), z, None, jnp.bool_(True),
                                                      method=WanVAE.decode)
        return cache

    return jax.eval_shape(cache_of, z)


def init_decode_state(cfg: VAEConfig, batch: int, latent_hw: tuple[int, int]) -> DecodeState:
    """The state before a clip's first chunk, for latents [batch, F, *latent_hw, z_dim]."""
    latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
    shapes = _cache_shapes(cfg, batch, latent_hw)
    cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return DecodeState(cache, jnp.zeros((), jnp.int32))


def _check_latents(cfg: VAEConfig, z, state: DecodeState | None = None):
    if z.ndim != 5:
        raise ValueError(f"latents must be channels-last [batch, frames, height, width, {cfg.z_dim}]; "
                         f"got shape {z.shape}")
    if z.shape[-1] != cfg.z_dim:
        raise ValueError(
            f"latents have {z.shape[-1]} channels (shape {z.shape}); the Wan VAE expects {cfg.z_dim}, "
            f"channels-last [batch, frames, height, width, {cfg.z_dim}]"
        )
    if state is not None:
        cached = state.cache["conv_in"].shape  # [batch, 2, h, w, z_dim]
        if (z.shape[0], *z.shape[2:4]) != (cached[0], *cached[2:4]):
            raise ValueError(
                f"latents of shape {z.shape} (batch {z.shape[0]}, latent {z.shape[2]}x{z.shape[3]}) do not match "
                f"the decode state, made for batch {cached[0]}, latent {cached[2]}x{cached[3]} (init_decode_state)"
            )


@partial(jax.jit, static_argnums=0)
def decode_step(cfg: VAEConfig, params, state: DecodeState, z):
    """Decode the next chunk of a stream: z [B, F, h, w, 16] normalised latents.

    Returns (state, video [B, 4F, 8h, 8w, 3] float32 in [-1, 1]). On the clip's first step
    (state.frames == 0) the first `cfg.first_chunk_padding` = 3 frames are zero padding: latent
    frame 0 decodes to one video frame. Compiles once per chunk size F, first step included.
    """
    _check_latents(cfg, z, state)
    first = state.frames == 0
    video, cache = WanVAE(cfg).apply({"params": params}, denormalize(cfg, z), state.cache, first,
                                     method=WanVAE.decode)
    pad = first & (jnp.arange(video.shape[1]) < cfg.first_chunk_padding)
    video = jnp.where(pad[None, :, None, None, None], 0.0, jnp.clip(video.astype(F32), -1.0, 1.0))
    return DecodeState(cache, state.frames + z.shape[1]), video


@partial(jax.jit, static_argnums=0, static_argnames="chunk")
def decode(cfg: VAEConfig, params, z, *, chunk: int | None = None):
    """Whole clip: z [B, F, h, w, 16] normalised latents -> video [B, 1 + 4(F-1), 8h, 8w, 3] in [-1, 1].

    chunk: latent frames per `decode_step` (None = the clip in one step; 1 = Wan's own chunking,
    the least activation memory). Full chunks run under one lax.scan, a remainder as one more step.
    """
    _check_latents(cfg, z)
    b, f, h, w, c = z.shape
    chunk = f if chunk is None else chunk
    if not chunk >= 1:
        raise ValueError(f"chunk={chunk} must be >= 1 latent frame")
    chunk = min(chunk, f)
    n, rem = divmod(f, chunk)
    state = init_decode_state(cfg, b, (h, w))
    # [steps, batch, chunk, h, w, c]
    zs = z[:, : n * chunk].reshape(b, n, chunk, h, w, c).swapaxes(0, 1)
    state, videos = jax.lax.scan(lambda s, zc: decode_step(cfg, params, s, zc), state, zs)
    video = videos.swapaxes(0, 1).reshape(b, n * videos.shape[2], *videos.shape[3:])
    if rem:
        _, tail = decode_step(cfg, params, state, z[:, n * chunk:])
        video = jnp.concatenate([video, tail], axis=1)
    return video[:, cfg.first_chunk_padding:]


@partial(jax.jit, static_argnums=0)
def encode(cfg: VAEConfig, params, video):
    """video [B, 1 + 4k, H, W, 3] in [-1, 1] (H, W multiples of 8) -> normalised latents, the posterior
    mean, [B, 1 + k, H/8, W/8, 16]. Whole clip at once (not streamed)."""
    if "encoder" not in params:
        raise ValueError("params have no 'encoder' subtree (converted with decoder_only=True?)")
    s, t = cfg.spatial_scale, cfg.temporal_scale
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"video must be channels-last [batch, frames, height, width, 3]; got shape {video.shape}")
    if (video.shape[1] - 1) % t or video.shape[2] % s or video.shape[3] % s:
        raise ValueError(
            f"video of shape {video.shape}: the Wan VAE encodes 1 + {t}k frames of height and width divisible by {s}"
        )
    mu = WanVAE(cfg).apply({"params": params}, video, method=WanVAE.encode)
    return normalize(cfg, mu)
