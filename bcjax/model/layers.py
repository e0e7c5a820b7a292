"""Parameterised layers of the Wan2.1 DiT (Flax linen).

Numerics follow Wan: layer norms, adaLN modulation and the residual stream are float32; the
linear layers and attention run in `cfg.dtype`. Parameter names mirror the original Wan
checkpoint (`self_attn.q`, `norm3`, `ffn_0`, `modulation`, ...) so the converter is a rename.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from bcjax.model.attention import attend
from bcjax.model.config import WanConfig
from bcjax.model.rope import apply_rope

F32 = jnp.float32


def _dense(cfg: WanConfig, features: int, name: str, *, fp32: bool = False) -> nn.Dense:
    return nn.Dense(
        features, dtype=F32 if fp32 else cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name
    )


def _layer_norm(cfg: WanConfig, name: str, *, affine: bool = False) -> nn.LayerNorm:
    # Two-pass variance: Wan's residual stream grows large, E[x^2]-E[x]^2 would lose digits.
    return nn.LayerNorm(
        epsilon=cfg.eps, dtype=F32, param_dtype=cfg.params_dtype, use_bias=affine,
        use_scale=affine, use_fast_variance=False, name=name,
    )


def sinusoidal_embedding(t, dim: int):
    """Wan's timestep embedding [cos | sin]: t [...] -> [..., dim] float32."""
    half = dim // 2
    freqs = jnp.exp(-jnp.log(10000.0) * jnp.arange(half, dtype=F32) / half)
    angles = t.astype(F32)[..., None] * freqs
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


def _shards(axis: str | None) -> int:
    """Devices on the tensor-parallel mesh axis (1 outside shard_map or without one)."""
    return 1 if axis is None else jax.lax.axis_size(axis)


class RMSNorm(nn.Module):
    """RMS norm over the last dim. axis: the features are split over this mesh axis (Wan's qk-norm
    spans every head, so heads sharded over `model` need the sum of squares of all of them: one
    [B, T, 1] psum, not a gather of q)."""

    eps: float
    param_dtype: jnp.dtype = F32
    axis: str | None = None

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), self.param_dtype)
        xf = x.astype(F32)
        if _shards(self.axis) == 1:
            ms = jnp.mean(xf * xf, axis=-1, keepdims=True)
        else:
            ms = jax.lax.psum(jnp.sum(xf * xf, axis=-1, keepdims=True), self.axis) / (x.shape[-1] * _shards(self.axis))
        y = xf * jax.lax.rsqrt(ms + self.eps)
        return (y * scale.astype(F32)).astype(x.dtype)


class RowParallelDense(nn.Module):
    """nn.Dense (same `kernel`/`bias` parameters) whose input features are split over mesh axis
    `axis`: each device multiplies its rows, one psum sums the partial products, and the bias is
    added once, after it (Megatron's row-parallel layer: the one reduction of a sublayer)."""

    features: int
    axis: str
    dtype: jnp.dtype = F32
    param_dtype: jnp.dtype = F32

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), self.param_dtype)
        if isinstance(kernel, jax.Array):  # a qwix-quantized kernel (bcjax.model.quant) is dequantized by qwix
            kernel = kernel.astype(self.dtype)
        # a dot_general, as nn.Dense's: qwix's LoRA (`bcjax.model.lora`) adds its x A B to it here,
        # before the psum (A split by rows like the kernel, `tensor_parallel.lora_specs`)
        x = x.astype(self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return jax.lax.psum(y, self.axis) + bias.astype(self.dtype)


def _out_dense(cfg: WanConfig, features: int, name: str, axis: str | None):
    """The sublayer's output projection: plain, or row-parallel when its input is sharded."""
    if axis is None or _shards(axis) == 1:
        return _dense(cfg, features, name)
    return RowParallelDense(features, axis, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name)


class Attention(nn.Module):
    """q/k/v/o projections with RMSNorm on q and k across all heads (Wan's qk-norm).

    model_axis: inside shard_map, the mesh axis the heads are split over (tensor parallel): q/k/v
    are column-split (this device's heads), o row-split with one psum."""

    cfg: WanConfig
    model_axis: str | None = None

    def setup(self):
        cfg = self.cfg
        inner = cfg.dim // _shards(self.model_axis)  # this device's heads x head_dim
        self.q, self.k, self.v = (_dense(cfg, inner, n) for n in "qkv")
        self.o = _out_dense(cfg, cfg.dim, "o", self.model_axis)
        if cfg.qk_norm:
            self.norm_q = RMSNorm(cfg.eps, cfg.params_dtype, self.model_axis)
            self.norm_k = RMSNorm(cfg.eps, cfg.params_dtype, self.model_axis)

    def _heads(self, x):
        # [batch, tokens, heads (this device's), head_dim]
        return x.reshape(*x.shape[:-1], -1, self.cfg.head_dim)

    def project_q(self, x):
        q = self.q(x)
        return self._heads(self.norm_q(q) if self.cfg.qk_norm else q)

    def project_kv(self, x):
        k = self.k(x)
        k = self.norm_k(k) if self.cfg.qk_norm else k
        return self._heads(k), self._heads(self.v(x))

    def project_out(self, o):
        return self.o(o.reshape(*o.shape[:-2], -1))


class WanBlock(nn.Module):
    """One DiT block: modulated self-attention, cross-attention to text, modulated FFN.

    kv_axis: inside `shard_map`, the mesh axis over which the pass's tokens are spread (the
    cascade's `tokens`): each device's keys/values are all-gathered in every layer so the sharded
    pass attends exactly as the joint pass over all devices' tokens would.
    model_axis: inside `shard_map`, the tensor-parallel axis: this device holds num_heads / m
    heads and ffn_dim / m FFN columns (bcjax.model.tensor_parallel); the residual stream, norms
    and modulation are replicated, and each sublayer ends in one psum.
    """

    cfg: WanConfig
    kv_axis: str | None = None
    model_axis: str | None = None

    def setup(self):
        cfg = self.cfg
        self.self_attn = Attention(cfg, self.model_axis)
        self.cross_attn = Attention(cfg, self.model_axis)
        self.norm1 = _layer_norm(cfg, "norm1")
        self.norm2 = _layer_norm(cfg, "norm2")
        self.norm3 = _layer_norm(cfg, "norm3", affine=True) if cfg.cross_attn_norm else (lambda x: x)
        self.ffn_0 = _dense(cfg, cfg.ffn_dim // _shards(self.model_axis), "ffn_0")
        self.ffn_2 = _out_dense(cfg, cfg.dim, "ffn_2", self.model_axis)
        self.modulation = self.param(
            "modulation", nn.initializers.normal(cfg.dim**-0.5), (6, cfg.dim), cfg.params_dtype
        )

    def cross_kv(self, text_emb):
        """Text K/V of this layer, computed once per prompt. text_emb [B, Lt, D] -> 2x [B, Lt, N, H]."""
        return self.cross_attn.project_kv(text_emb.astype(self.cfg.compute_dtype))

    def init_all(self, x, e0, rope, ctx_kv, text_emb):
        """Init entry point that touches every parameter (the text K/V path included)."""
        return self(x, e0, rope, self.cross_kv(text_emb), ctx_kv, None)

    def __call__(self, x, e0, rope, text_kv, ctx_kv, key_mask, kv_out=None):
        """x [B, F*P, D] f32 residual; e0 [B, F, 6, D] per-frame modulation; rope (cos, sin)
        [F*P, H/2]; text_kv 2x [B, Lt, N, H]; ctx_kv 2x [B, S, N, H] post-RoPE keys from the
        clean cache (S may be 0); key_mask bool [B|1, Qb, S + G*F*P] (G = devices on kv_axis).
        Returns (x, (k, v)): this call's post-RoPE k, v [B, F*P, N, H] for the cache, or with
        kv_out = (start, length) the [start, start+length) token slice of the gathered k, v."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        b, tokens, d = x.shape
        f = e0.shape[1]
        # [batch, frame, 6, dim] -> six [batch, frame, 1, dim] that broadcast over a frame's tokens
        mods = jnp.split((e0 + self.modulation.astype(F32))[:, :, None], 6, axis=3)
        shift, scale, gate, c_shift, c_scale, c_gate = (m[:, :, :, 0] for m in mods)

        def per_frame(h):  # [batch, frame, tokens_per_frame, dim]
            return h.reshape(b, f, tokens // f, d)

        def modulate(h, sh, sc):
            return ((per_frame(h) * (1 + sc) + sh).reshape(b, tokens, d)).astype(dt)

        def gated(h, g):
            return (per_frame(h.astype(F32)) * g).reshape(b, tokens, d)

        # self-attention over [clean cache | this call's tokens]
        h = modulate(self.norm1(x), shift, scale)
        q = apply_rope(self.self_attn.project_q(h), *rope)
        k, v = self.self_attn.project_kv(h)
        k = apply_rope(k, *rope)
        if self.kv_axis is not None:
            # [batch, all devices' tokens, heads, head_dim], device-major
            k = jax.lax.all_gather(k, self.kv_axis, axis=1, tiled=True)
            v = jax.lax.all_gather(v, self.kv_axis, axis=1, tiled=True)
        # the cache and the pass's own keys are attended as two parts merged by log-sum-exp: no
        # [cache | own] copy per layer, and a cache no query sees is skipped
        o = attend(q, (ctx_kv[0].astype(dt), k), (ctx_kv[1].astype(dt), v), key_mask, implementation=cfg.attention)
        x = x + gated(self.self_attn.project_out(o), gate)

        # cross-attention to the prompt (all text tokens, as Wan's T2V does)
        qc = self.cross_attn.project_q(self.norm3(x).astype(dt))
        oc = attend(qc, text_kv[0], text_kv[1], implementation=cfg.attention)
        x = x + self.cross_attn.project_out(oc).astype(F32)

        h = modulate(self.norm2(x), c_shift, c_scale)
        h = self.ffn_2(nn.gelu(self.ffn_0(h), approximate=True))
        x = x + gated(h, c_gate)
        if kv_out is not None:
            start, length = kv_out
            k, v = (jax.lax.dynamic_slice_in_dim(a, start, length, axis=1) for a in (k, v))
        return x, (k, v)


class WanEmbed(nn.Module):
    """Patch, text and per-frame time embeddings."""

    cfg: WanConfig

    def setup(self):
        cfg = self.cfg
        self.patch_embedding = _dense(cfg, cfg.dim, "patch_embedding")
        self.text_embedding_0 = _dense(cfg, cfg.dim, "text_embedding_0")
        self.text_embedding_2 = _dense(cfg, cfg.dim, "text_embedding_2")
        # Wan runs the time path in float32 whatever the compute dtype.
        self.time_embedding_0 = _dense(cfg, cfg.dim, "time_embedding_0", fp32=True)
        self.time_embedding_2 = _dense(cfg, cfg.dim, "time_embedding_2", fp32=True)
        self.time_projection = _dense(cfg, 6 * cfg.dim, "time_projection", fp32=True)

    def patches(self, patches):
        """[B, T, patch_features] -> [B, T, D] float32 residual stream."""
        return self.patch_embedding(patches.astype(self.cfg.compute_dtype)).astype(F32)

    def text(self, context):
        """[B, Lt, text_dim] -> [B, Lt, D]."""
        h = self.text_embedding_0(context.astype(self.cfg.compute_dtype))
        return self.text_embedding_2(nn.gelu(h, approximate=True))

    def time(self, t):
        """t [B, F] -> (e [B, F, D] for the head, e0 [B, F, 6, D] for the blocks), float32."""
        e = self.time_embedding_2(nn.silu(self.time_embedding_0(sinusoidal_embedding(t, self.cfg.freq_dim))))
        e0 = self.time_projection(nn.silu(e))
        return e, e0.reshape(*e0.shape[:-1], 6, self.cfg.dim)

    def __call__(self, patches, context, t):  # init only
        return self.patches(patches), self.text(context), self.time(t)


class WanHead(nn.Module):
    """Final modulated norm and projection back to patch space."""

    cfg: WanConfig

    @nn.compact
    def __call__(self, x, e):
        """x [B, F*P, D] f32, e [B, F, D] -> [B, F*P, patch_features_out] float32."""
        cfg = self.cfg
        b, tokens, d = x.shape
        f = e.shape[1]
        mod = self.param("modulation", nn.initializers.normal(cfg.dim**-0.5), (2, cfg.dim), cfg.params_dtype)
        shift, scale = jnp.split(e[:, :, None, None, :] + mod.astype(F32)[:, None, :], 2, axis=2)
        # shift/scale: [batch, frame, 1, 1, dim]
        h = _layer_norm(cfg, "norm")(x).reshape(b, f, 1, tokens // f, d)
        h = (h * (1 + scale) + shift).reshape(b, tokens, d)
        out_features = cfg.out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
        return _dense(cfg, out_features, "head")(h.astype(cfg.compute_dtype)).astype(F32)
