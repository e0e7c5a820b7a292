"""The umT5 encoder Wan2.1 conditions on, in Flax: config, layers, and pure encode functions.

umT5 is T5 v1.1 (RMS norm without mean or bias, gated-GELU FFN, unscaled attention with a learned
relative-position bias, no biases in linears) except that *every* layer owns its bias table
instead of sharing layer 0's. Parameter names mirror Wan's `wan/modules/t5.py` (`token_embedding`,
`blocks.N.attn.q`, `blocks.N.pos_embedding`, `blocks.N.ffn.gate`, `norm`), so the Wan converter
is a rename.

params = {"token_embedding": ..., "blocks": <every leaf stacked on a leading layer axis>, "norm": ...};
the blocks run under one `lax.scan`. Numerics: the residual stream, norms, position bias and
softmax are float32; the linears run in `cfg.dtype`.
"""

from __future__ import annotations

import dataclasses
import math
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bcjax.model.layers import RMSNorm
from bcjax.presets import check_dtypes, from_preset

F32 = jnp.float32

_PRESETS: dict[str, dict] = {
    # google/umt5-xxl encoder, as Wan2.1 ships it (models_t5_umt5-xxl-enc-bf16.pth).
    "umt5-xxl": {},
    # Tests: d_model and text_len match WanConfig.preset("tiny") (text_dim 32, text_len 16).
    "tiny": {"vocab_size": 300, "d_model": 32, "num_layers": 2, "num_heads": 4, "d_kv": 8, "d_ff": 48, "text_len": 16},
}


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    vocab_size: int = 256384
    d_model: int = 4096
    num_layers: int = 24
    num_heads: int = 64
    d_kv: int = 64
    d_ff: int = 10240
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512  # Wan pads every prompt to this many tokens
    param_dtype: str = "float32"
    dtype: str = "float32"  # linear-layer compute dtype; residual, norms and softmax stay fp32

    def __post_init__(self):
        if self.num_buckets % 4:
            raise ValueError(f"num_buckets {self.num_buckets} must be divisible by 4 "
                             "(two directions, exact + log halves)")
        if self.max_distance <= self.num_buckets // 4:
            raise ValueError(f"max_distance {self.max_distance} must exceed num_buckets // 4 = {self.num_buckets // 4}")
        check_dtypes(self)

    @classmethod
    def preset(cls, name: str, **overrides) -> UMT5Config:
        return from_preset(cls, _PRESETS, name, overrides)

    @staticmethod
    def preset_names() -> list[str]:
        return sorted(_PRESETS)

    @property
    def inner_dim(self) -> int:
        return self.num_heads * self.d_kv

    @property
    def compute_dtype(self):
        return jnp.dtype(self.dtype)

    @property
    def params_dtype(self):
        return jnp.dtype(self.param_dtype)


def relative_position_buckets(length: int, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional bucket of (key position - query position): int32 [length, length].

    Half the buckets per direction; within a direction, half are exact offsets and half are
    log-spaced up to max_distance. Computed in float32 with a float32 log divisor, as torch does,
    so the truncation lands on the same bucket at every boundary.
    """
    rel = np.arange(length)[None, :] - np.arange(length)[:, None]  # [query, key]
    half = num_buckets // 2
    max_exact = half // 2
    dist = np.abs(rel)
    # dist < max_exact takes the exact branch of the `where`; the maximum only keeps log finite
    log_ratio = np.log(np.maximum(dist, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
        math.log(max_distance / max_exact))
    large = np.minimum(max_exact + (log_ratio * (half - max_exact)).astype(np.int64), half - 1)
    return ((rel > 0) * half + np.where(dist < max_exact, dist, large)).astype(np.int32)


def _dense(cfg: UMT5Config, features: int, name: str) -> nn.Dense:
    return nn.Dense(features, use_bias=False, dtype=cfg.compute_dtype, param_dtype=cfg.params_dtype, name=name)


class UMT5Attention(nn.Module):
    """Self-attention without 1/sqrt(d) scaling (T5 folds it into the init) plus a position bias."""

    cfg: UMT5Config

    @nn.compact
    def __call__(self, x, bias, mask):
        """x [B, L, D] in compute dtype; bias [N, L, L] f32; mask bool [B, L] (True = real token)."""
        cfg = self.cfg
        # [batch, tokens, heads, d_kv]
        q, k, v = (_dense(cfg, cfg.inner_dim, n)(x).reshape(*x.shape[:2], cfg.num_heads, cfg.d_kv) for n in "qkv")
        # [batch, heads, query, key]
        logits = jnp.einsum("BQNH,BKNH->BNQK", q, k, preferred_element_type=F32) + bias
        logits = jnp.where(mask[:, None, None, :], logits, jnp.finfo(F32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        # [batch, tokens, heads, d_kv]
        out = jnp.einsum("BNQK,BKNH->BQNH", probs, v)
        return _dense(cfg, cfg.d_model, "o")(out.reshape(*x.shape[:2], cfg.inner_dim))


class UMT5FeedForward(nn.Module):
    """Gated GELU (tanh approximation, HF's `gelu_new`): fc2(fc1(x) * gelu(gate(x)))."""

    cfg: UMT5Config

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        gate = nn.gelu(_dense(cfg, cfg.d_ff, "gate")(x), approximate=True)
        return _dense(cfg, cfg.d_model, "fc2")(_dense(cfg, cfg.d_ff, "fc1")(x) * gate)


class UMT5Block(nn.Module):
    """Pre-norm attention and FFN; this layer's own relative-position bias table (umT5)."""

    cfg: UMT5Config

    @nn.compact
    def __call__(self, x, buckets, mask):
        """x [B, L, D] f32 residual; buckets int32 [L, L]; mask bool [B, L] -> [B, L, D] f32."""
        cfg, dt = self.cfg, self.cfg.compute_dtype
        table = nn.Embed(cfg.num_buckets, cfg.num_heads, dtype=F32, param_dtype=cfg.params_dtype, name="pos_embedding")
        # [heads, query, key]
        bias = jnp.einsum("QKN->NQK", table(buckets))
        h = RMSNorm(cfg.eps, cfg.params_dtype, name="norm1")(x).astype(dt)
        x = x + UMT5Attention(cfg, name="attn")(h, bias, mask).astype(F32)
        h = RMSNorm(cfg.eps, cfg.params_dtype, name="norm2")(x).astype(dt)
        return x + UMT5FeedForward(cfg, name="ffn")(h).astype(F32)


def _embed(cfg: UMT5Config) -> nn.Embed:
    return nn.Embed(cfg.vocab_size, cfg.d_model, dtype=F32, param_dtype=cfg.params_dtype)


@partial(jax.jit, static_argnums=0)
def init_params(cfg: UMT5Config, key):
    """Random parameters (Flax initialisers); real weights come from checkpoints_conv.umt5."""
    k_embed, k_blocks, k_norm = jax.random.split(key, 3)
    ids, mask = jnp.zeros((1, 1), jnp.int32), jnp.ones((1, 1), bool)
    x = jnp.zeros((1, 1, cfg.d_model), F32)
    buckets = jnp.zeros((1, 1), jnp.int32)
    blocks = jax.vmap(lambda k: UMT5Block(cfg).init(k, x, buckets, mask)["params"])(
        jax.random.split(k_blocks, cfg.num_layers))
    return {
        "token_embedding": _embed(cfg).init(k_embed, ids)["params"],
        "blocks": blocks,
        "norm": RMSNorm(cfg.eps, cfg.params_dtype).init(k_norm, x)["params"],
    }


def param_shapes(cfg: UMT5Config):
    """The parameter tree as ShapeDtypeStructs, without allocating anything."""
    return jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))


def _check_tokens(ids, mask):
    if ids.ndim != 2:
        raise ValueError(f"token ids must be [batch, tokens]; got shape {ids.shape}")
    if tuple(mask.shape) != tuple(ids.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match token ids shape {tuple(ids.shape)}")


@partial(jax.jit, static_argnums=0)
def encode(cfg: UMT5Config, params, ids, mask):
    """ids int32 [B, L], mask bool [B, L] (True = real token) -> [B, L, d_model] float32.

    The encoder's last hidden state (`UMT5EncoderModel(...).last_hidden_state`), every position
    included; padded positions attend to the prompt but no position attends to them.
    """
    _check_tokens(ids, mask)
    mask = mask.astype(bool)
    buckets = jnp.asarray(relative_position_buckets(ids.shape[1], cfg.num_buckets, cfg.max_distance))
    x = _embed(cfg).apply({"params": params["token_embedding"]}, ids)
    block = UMT5Block(cfg)

    def layer(x, p):
        return block.apply({"params": p}, x, buckets, mask), None

    x, _ = jax.lax.scan(layer, x, params["blocks"])
    return RMSNorm(cfg.eps, cfg.params_dtype).apply({"params": params["norm"]}, x)


def prompt_embeddings(cfg: UMT5Config, params, ids, mask, text_len: int | None = None):
    """What Wan feeds its DiT: ids, mask [B, L] -> [B, text_len, d_model] float32.

    Wan's T5EncoderModel returns each prompt's first `mask.sum()` embeddings and the pipeline
    zero-pads them to text_len (512 for umt5-xxl, the default via cfg.text_len); positions past a
    prompt's length are therefore exactly zero, not the encoder's output there.
    """
    text_len = cfg.text_len if text_len is None else text_len
    _check_tokens(ids, mask)
    if ids.shape[1] > text_len:
        raise ValueError(f"token ids have {ids.shape[1]} positions (shape {tuple(ids.shape)}); text_len is {text_len}")
    mask = jnp.asarray(mask, bool)
    out = jnp.where(mask[..., None], encode(cfg, params, jnp.asarray(ids, jnp.int32), mask), 0.0)
    return jnp.pad(out, ((0, 0), (0, text_len - ids.shape[1]), (0, 0)))
