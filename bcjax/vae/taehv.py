"""TAEHV, the tiny video autoencoder (madebyollin/taehv, MIT), in Flax: a cheap streaming preview
decoder for Wan2.1 latents (`taew2_1`), and its encoder.

Same architecture as upstream `taehv.py` (`TAEHV`, base variant, patch size 1): 2D convs per frame,
with time entering only through

- MemBlock: conv(concat(x_t, x_{t-1})) + x_t, where x_{t-1} is the block's own input one frame
  earlier at its level's frame rate (zeros before the clip's first frame);
- TGrow (decoder): a 1x1 conv C -> s C whose s channel groups become s consecutive frames;
- TPool (encoder): s consecutive frames stacked on channels, then a 1x1 conv s C -> C.

Latents and video are channels-last: z [B, F, h, w, 16] *normalised* latents (TAEHV decodes what
the DiT produces, no mean/std), video [B, T, H, W, 3] in [-1, 1] like `bcjax.vae.wan_vae` (upstream
works in [0, 1]; the conversion is x * 2 - 1 and its inverse).

Frames. Each latent frame decodes to 4 pixel frames; upstream's `decode_video` drops the first
`frames_to_trim` = 3 of the clip, so F latent frames give 1 + 4 (F - 1) frames, the Wan VAE's count
(Self-Forcing's and Krea's `--taehv` previews rely on this). The encoder pads a clip at its end
with its last frame to a multiple of 4 frames and turns each 4 into one latent frame.

Streaming. The only memory is each MemBlock's last input frame, a fixed-shape array per MemBlock
(`DecodeState.cache`), so any split of a clip into chunks gives the same frames, and `decode_step`
compiles once per chunk size. As in `wan_vae.decode_step`, every step returns 4F frames and the
clip's first step's 3 leading frames (the ones upstream trims) are zeroed: callers drop
`cfg.first_chunk_padding` frames from the first step's output.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from functools import partial
from typing import NamedTuple, cast

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcjax.presets import check_dtypes, from_preset

F32 = jnp.float32

_PRESETS: dict[str, dict] = {
    # taew2_1: Wan2.1 latents (every Wan2.1 model, Wan2.2-14B, Self-Forcing, CausVid, LongLive, Krea).
    "taew2_1": {},
}


@dataclasses.dataclass(frozen=True)
class TAEHVConfig:
    latent_channels: int = 16
    image_channels: int = 3
    encoder_width: int = 64
    decoder_widths: tuple[int, ...] = (256, 128, 64, 64)  # upstream's n_f: one per stage, then the head
    mem_blocks: int = 3  # MemBlocks per stage
    encoder_time_downscale: tuple[bool, ...] = (True, True, False)
    decoder_time_upscale: tuple[bool, ...] = (False, True, True)
    decoder_space_upscale: tuple[bool, ...] = (True, True, True)
    param_dtype: str = "float32"
    dtype: str = "float32"  # conv compute dtype; the output is float32

    def __post_init__(self):
        for name in ("decoder_widths", "encoder_time_downscale", "decoder_time_upscale", "decoder_space_upscale"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        stages = len(self.decoder_widths) - 1
        for name in ("encoder_time_downscale", "decoder_time_upscale", "decoder_space_upscale"):
            if len(getattr(self, name)) != stages:
                raise ValueError(f"{name}={getattr(self, name)} needs {stages} entries, one per stage "
                                 f"(len(decoder_widths) - 1)")
        if self.mem_blocks < 1 or min(self.decoder_widths) < 1 or self.encoder_width < 1:
            raise ValueError(f"mem_blocks={self.mem_blocks}, decoder_widths={self.decoder_widths}, "
                             f"encoder_width={self.encoder_width}: all must be >= 1")
        check_dtypes(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> TAEHVConfig:
        return from_preset(cls, _PRESETS, name, overrides)

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)

    @property
    def stages(self) -> int:
        return len(self.decoder_widths) - 1

    @property
    def temporal_scale(self) -> int:
        """Pixel frames per latent frame (upstream's t_upscale)."""
        return 2 ** sum(self.decoder_time_upscale)

    @property
    def encoder_temporal_scale(self) -> int:
        """Pixel frames pooled into one latent frame (upstream's t_downscale)."""
        return 2 ** sum(self.encoder_time_downscale)

    @property
    def spatial_scale(self) -> int:
        return 2 ** sum(self.decoder_space_upscale)

    @property
    def first_chunk_padding(self) -> int:
        """Leading frames of the clip's first `decode_step` output: upstream's frames_to_trim."""
        return self.temporal_scale - 1

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


def _conv(cfg: TAEHVConfig, features: int, name: str, *, bias: bool = True, stride: int = 1) -> nn.Conv:
    # upstream's conv(): 3x3, padding 1, applied per frame (leading [B, T] are batch dims)
    return nn.Conv(features, (3, 3), strides=stride, padding=1, use_bias=bias, dtype=cfg.compute_dtype,
                   param_dtype=cfg.params_dtype, name=name)


def _pointwise(cfg: TAEHVConfig, features: int, name: str) -> nn.Dense:
    # TGrow / TPool: bias-free 1x1 Conv2d, a per-pixel linear map
    return nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name)


class MemBlock(nn.Module):
    """relu(conv(concat(x, past)) + x), the conv being conv-relu-conv-relu-conv (equal widths in and
    out, so upstream's skip is the identity)."""

    cfg: TAEHVConfig

    @nn.compact
    def __call__(self, x, last):
        """x [B, T, H, W, C]; last [B, H, W, C]: this block's input frame before x[:, 0] (zeros at a
        clip's start). Returns (y [B, T, H, W, C], x[:, -1], the next chunk's `last`)."""
        c = x.shape[-1]
        # [batch, frames, height, width, channels]: each frame's predecessor
        past = jnp.concatenate([last[:, None].astype(x.dtype), x[:, :-1]], axis=1)
        y = jnp.concatenate([x, past], axis=-1)
        y = nn.relu(_conv(self.cfg, c, "conv_0")(y))
        y = nn.relu(_conv(self.cfg, c, "conv_1")(y))
        y = _conv(self.cfg, c, "conv_2")(y)
        return nn.relu(y + x), x[:, -1]


def _tgrow(x, stride: int):
    """[B, T, H, W, s C] -> [B, s T, H, W, C]: channel group j of frame t becomes frame s t + j."""
    b, t, h, w, sc = x.shape
    x = x.reshape(b, t, h, w, stride, sc // stride)
    return x.transpose(0, 1, 4, 2, 3, 5).reshape(b, t * stride, h, w, sc // stride)


def _tpool(x, stride: int):
    """[B, s T, H, W, C] -> [B, T, H, W, s C]: frames s t .. s t + s - 1 stacked on channels, in order."""
    b, st, h, w, c = x.shape
    x = x.reshape(b, st // stride, stride, h, w, c)
    return x.transpose(0, 1, 3, 4, 2, 5).reshape(b, st // stride, h, w, stride * c)


class Decoder(nn.Module):
    cfg: TAEHVConfig

    @nn.compact
    def __call__(self, z, cache):
        """z [B, F, h, w, C_latent]; cache {stage_i_mem_j: [B, h_i, w_i, C_i]} or None (zeros).
        Returns (y [B, 4F, 8h, 8w, 3], upstream's [0, 1] scale before its clamp; cache)."""
        cfg, cache, new = self.cfg, cache or {}, {}
        dt, widths = cfg.compute_dtype, cfg.decoder_widths
        # upstream's Clamp: a soft limit of the latents to (-3, 3)
        x = jnp.tanh(z.astype(dt) / 3) * 3
        x = nn.relu(_conv(cfg, widths[0], "conv_in")(x))
        for i in range(cfg.stages):
            for j in range(cfg.mem_blocks):
                name = f"stage_{i}_mem_{j}"
                last = cache.get(name)
                last = jnp.zeros((x.shape[0], *x.shape[2:]), dt) if last is None else last
                x, new[name] = MemBlock(cfg, name=name)(x, last)
            if cfg.decoder_space_upscale[i]:  # nn.Upsample(scale_factor=2): nearest, a plain repeat
                x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)
            stride = 2 if cfg.decoder_time_upscale[i] else 1
            x = _tgrow(_pointwise(cfg, stride * widths[i], f"stage_{i}_tgrow")(x), stride)
            x = _conv(cfg, widths[i + 1], f"stage_{i}_conv", bias=False)(x)
        x = _conv(cfg, cfg.image_channels, "conv_out")(nn.relu(x))
        return x, new


class Encoder(nn.Module):
    cfg: TAEHVConfig

    @nn.compact
    def __call__(self, x):
        """x [B, T, H, W, 3] in [0, 1], T a multiple of 4 -> [B, T/4, H/8, W/8, C_latent] (whole clip:
        every MemBlock starts from zeros)."""
        cfg, c = self.cfg, self.cfg.encoder_width
        x = nn.relu(_conv(cfg, c, "conv_in")(x.astype(cfg.compute_dtype)))
        for i in range(cfg.stages):
            stride = 2 if cfg.encoder_time_downscale[i] else 1
            x = _pointwise(cfg, c, f"stage_{i}_tpool")(_tpool(x, stride))
            x = _conv(cfg, c, f"stage_{i}_conv", bias=False, stride=2)(x)
            for j in range(cfg.mem_blocks):
                x, _ = MemBlock(cfg, name=f"stage_{i}_mem_{j}")(x, jnp.zeros((x.shape[0], *x.shape[2:]), x.dtype))
        return _conv(cfg, cfg.latent_channels, "conv_out")(x)


class TAEHV(nn.Module):
    """params = {'encoder', 'decoder'}."""

    cfg: TAEHVConfig

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode(self, video01):
        return self.encoder(video01)

    def decode(self, z, cache):
        return self.decoder(z, cache)

    def __call__(self, video01, z):  # init only: touches every parameter
        return self.encode(video01), self.decode(z, None)


# ----------------------------------------------------------------------------------------------
# Pure functions


@partial(jax.jit, static_argnums=0)
def init_params(cfg: TAEHVConfig, key):
    """Random parameters (Flax initialisers); real weights come from checkpoints_conv.taehv."""
    video = jnp.zeros((1, cfg.encoder_temporal_scale, cfg.spatial_scale, cfg.spatial_scale, cfg.image_channels),
                      cfg.compute_dtype)
    z = jnp.zeros((1, 1, 1, 1, cfg.latent_channels), F32)
    return TAEHV(cfg).init(key, video, z)["params"]


def param_shapes(cfg: TAEHVConfig):
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


class DecodeState(NamedTuple):
    """What a streaming decode carries between chunks; fixed shapes whatever the stream length."""

    cache: Mapping  # per MemBlock, its last input frame [B, h_l, w_l, C_l] (zeros at the start)
    frames: jax.Array  # int32 []: latent frames decoded so far (0 = the next step starts the clip)


def init_decode_state(cfg: TAEHVConfig, batch: int, latent_hw: tuple[int, int]) -> DecodeState:
    """The state before a clip's first chunk, for latents [batch, F, *latent_hw, C_latent]."""
    z = jax.ShapeDtypeStruct((batch, 1, *(int(n) for n in latent_hw), cfg.latent_channels), F32)

    def cache_of(z):
        (_, cache), _ = TAEHV(cfg).init_with_output(jax.random.key(0), z, None, method=TAEHV.decode)
        return cache

    shapes = jax.eval_shape(cache_of, z)
    cache = jax.tree_util.tree_map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return DecodeState(cache, jnp.zeros((), jnp.int32))


def _check_latents(cfg: TAEHVConfig, z, state: DecodeState | None = None):
    c = cfg.latent_channels
    if z.ndim != 5 or z.shape[-1] != c:
        raise ValueError(f"TAEHV latents must be channels-last [batch, frames, height, width, {c}]; "
                         f"got shape {z.shape}")
    if state is not None:
        first = state.cache["stage_0_mem_0"].shape  # [batch, h, w, C]
        if (z.shape[0], *z.shape[2:4]) != first[:3]:
            raise ValueError(
                f"latents of shape {z.shape} (batch {z.shape[0]}, latent {z.shape[2]}x{z.shape[3]}) do not match "
                f"the TAEHV decode state, made for batch {first[0]}, latent {first[1]}x{first[2]} (init_decode_state)"
            )


@partial(jax.jit, static_argnums=0)
def decode_step(cfg: TAEHVConfig, params, state: DecodeState, z):
    """Decode the next chunk of a stream: z [B, F, h, w, 16] normalised latents.

    Returns (state, video [B, 4F, 8h, 8w, 3] float32 in [-1, 1]). On the clip's first step
    (state.frames == 0) the first `cfg.first_chunk_padding` = 3 frames are zeros (upstream trims
    them). Compiles once per chunk size F, first step included.
    """
    _check_latents(cfg, z, state)
    y, cache = TAEHV(cfg).apply({"params": params}, z, state.cache, method=TAEHV.decode)
    video = jnp.clip(y.astype(F32), 0.0, 1.0) * 2.0 - 1.0
    pad = (state.frames == 0) & (jnp.arange(video.shape[1]) < cfg.first_chunk_padding)
    video = jnp.where(pad[None, :, None, None, None], 0.0, video)
    return DecodeState(cache, state.frames + z.shape[1]), video


@partial(jax.jit, static_argnums=0)
def decode(cfg: TAEHVConfig, params, z):
    """Whole clip (upstream's `decode_video(parallel=True)`): z [B, F, h, w, 16] normalised latents ->
    video [B, 1 + 4(F-1), 8h, 8w, 3] in [-1, 1]."""
    _check_latents(cfg, z)
    state = init_decode_state(cfg, z.shape[0], z.shape[2:4])
    _, video = decode_step(cfg, params, state, z)
    return video[:, cfg.first_chunk_padding:]


@partial(jax.jit, static_argnums=0)
def encode(cfg: TAEHVConfig, params, video):
    """video [B, T, H, W, 3] in [-1, 1] (H, W multiples of 8) -> normalised latents
    [B, ceil(T / 4), H/8, W/8, 16], upstream's `encode_video`: the clip padded at its end with
    copies of its last frame to a multiple of 4 frames. Whole clip at once (not streamed)."""
    if "encoder" not in params:
        raise ValueError("TAEHV params have no 'encoder' subtree (converted with decoder_only=True?)")
    s, t = cfg.spatial_scale, cfg.encoder_temporal_scale
    if video.ndim != 5 or video.shape[-1] != cfg.image_channels:
        raise ValueError(f"video must be channels-last [batch, frames, height, width, 3]; got shape {video.shape}")
    if video.shape[2] % s or video.shape[3] % s:
        raise ValueError(f"video of shape {video.shape}: TAEHV encodes frames of height and width divisible by {s}")
    pad = -video.shape[1] % t
    if pad:
        video = jnp.concatenate([video, jnp.repeat(video[:, -1:], pad, axis=1)], axis=1)
    z = cast(jax.Array, TAEHV(cfg).apply({"params": params}, (video.astype(F32) + 1.0) / 2.0, method=TAEHV.encode))
    return z.astype(F32)
