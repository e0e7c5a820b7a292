"""The Wan2.1 DiT as pure functions over a parameter pytree.

params = {"embed": ..., "blocks": <every leaf stacked on a leading layer axis>, "head": ...}.
The 30-40 identical blocks run under one `lax.scan`, so compile time does not grow with depth.

Latents are channels-last: x [B, F, H, W, C] (F latent frames). One forward may hold frames at
different noise levels (t [B, F]) and at arbitrary absolute positions (frame_ids [F]); it
attends to a clean K/V context (the cache) plus its own tokens under a per-query-block key mask.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcjax.model import lora, quant
from bcjax.model.config import WanConfig
from bcjax.model.layers import WanBlock, WanEmbed, WanHead
from bcjax.model.rope import rope_tables


class KV(NamedTuple):
    """Per-layer keys and values: k, v [L, B, S, N, H] (keys post-RoPE for self-attention)."""

    k: jax.Array
    v: jax.Array


def grid_hw(cfg: WanConfig, latent_h: int, latent_w: int) -> tuple[int, int]:
    _, ph, pw = cfg.patch_size
    return latent_h // ph, latent_w // pw


def patchify(cfg: WanConfig, x):
    """[B, F, H, W, C] -> [B, F*h*w, ph*pw*C] with features ordered (ph, pw, C)."""
    b, f, hh, ww, c = x.shape
    _, ph, pw = cfg.patch_size
    x = x.reshape(b, f, hh // ph, ph, ww // pw, pw, c).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, f * (hh // ph) * (ww // pw), ph * pw * c)


def unpatchify(cfg: WanConfig, tokens, f: int, latent_h: int, latent_w: int):
    """[B, F*h*w, ph*pw*C] -> [B, F, H, W, C]."""
    b = tokens.shape[0]
    _, ph, pw = cfg.patch_size
    h, w = latent_h // ph, latent_w // pw
    x = tokens.reshape(b, f, h, w, ph, pw, -1).transpose(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(b, f, latent_h, latent_w, -1)


def check_latents(cfg: WanConfig, x, t=None):
    """Clear errors for latents that cannot go through this model."""
    if x.ndim != 5:
        raise ValueError(f"latents must be [batch, frames, height, width, channels]; got shape {x.shape}")
    _, ph, pw = cfg.patch_size
    if x.shape[-1] != cfg.in_channels:
        raise ValueError(f"latents have {x.shape[-1]} channels (shape {x.shape}); the model expects {cfg.in_channels}")
    if x.shape[2] % ph or x.shape[3] % pw:
        raise ValueError(f"latent height/width {x.shape[2:4]} are not divisible by the patch {(ph, pw)}")
    if t is not None and tuple(t.shape) != tuple(x.shape[:2]):
        raise ValueError(f"timesteps t must be [batch, frames] = {tuple(x.shape[:2])}; got {tuple(t.shape)}")


@partial(jax.jit, static_argnums=(0, 2))
def init_params(cfg: WanConfig, key, latent_hw: tuple[int, int] = (4, 4)):
    """Random parameters (Flax initialisers); real weights come from checkpoints_conv."""
    k_embed, k_blocks, k_head = jax.random.split(key, 3)
    gh, gw = grid_hw(cfg, *latent_hw)
    p = gh * gw
    dt = cfg.compute_dtype
    embed = WanEmbed(cfg).init(
        k_embed, jnp.zeros((1, p, cfg.patch_features), dt), jnp.zeros((1, 1, cfg.text_dim), dt), jnp.zeros((1, 1))
    )["params"]
    rope = rope_tables(cfg, jnp.zeros((1,), jnp.int32), (gh, gw))
    heads = (cfg.num_heads, cfg.head_dim)
    kv0 = (jnp.zeros((1, 0, *heads), dt),) * 2

    def init_block(k):
        x = jnp.zeros((1, p, cfg.dim), jnp.float32)
        e0 = jnp.zeros((1, 1, 6, cfg.dim), jnp.float32)
        text_emb = jnp.zeros((1, 1, cfg.dim), dt)
        return WanBlock(cfg).init(k, x, e0, rope, kv0, text_emb, method=WanBlock.init_all)["params"]

    blocks = jax.vmap(init_block)(jax.random.split(k_blocks, cfg.num_layers))
    head = WanHead(cfg).init(k_head, jnp.zeros((1, p, cfg.dim)), jnp.zeros((1, 1, cfg.dim)))["params"]
    return {"embed": embed, "blocks": blocks, "head": head}


def param_shapes(cfg: WanConfig):
    """The parameter tree as ShapeDtypeStructs, without allocating anything (with `cfg.quant`'s
    quantized kernels, `bcjax.model.quant`)."""
    return jax.eval_shape(lambda: quant.quantize(init_params(cfg, jax.random.key(0)), cfg.quant))


@partial(jax.jit, static_argnums=0, static_argnames="model_axis")
def text_kv(cfg: WanConfig, params, context, *, model_axis: str | None = None) -> KV:
    """Prompt embeddings [B, Lt <= text_len, text_dim] -> per-layer cross-attention K/V
    [L, B, text_len, N, H].

    Shorter embeddings are zero-padded to cfg.text_len before the text embedding, as Wan's
    `WanModel.forward` pads every prompt (the padded rows still go through the text MLP and are
    attended to, so an unpadded prompt would give a different video). Computed once per prompt;
    every forward pass (and every tick of a cascade) reuses it. model_axis: inside shard_map, the
    tensor-parallel axis; the K/V come out split by heads like the cross-attention weights.
    """
    if context.ndim != 3 or context.shape[-1] != cfg.text_dim:
        raise ValueError(f"prompt embeddings must be [batch, tokens, {cfg.text_dim}]; got shape {context.shape}")
    if context.shape[1] > cfg.text_len:
        raise ValueError(f"prompt embeddings have {context.shape[1]} tokens (shape {context.shape}); the model's "
                         f"text_len is {cfg.text_len}")
    context = jnp.pad(context, ((0, 0), (0, cfg.text_len - context.shape[1]), (0, 0)))
    emb = WanEmbed(cfg).apply({"params": params["embed"]}, context, method=WanEmbed.text)

    block = quant.block_module(cfg, model_axis=model_axis)

    def layer(_, p):
        return None, block.apply({"params": quant.for_layer(cfg, p)}, emb, method="cross_kv")

    _, (k, v) = jax.lax.scan(layer, None, params["blocks"])
    return KV(k, v)


def empty_context(cfg: WanConfig, batch: int, heads: int | None = None) -> KV:
    """A zero-length clean K/V context, for forwards with no cache (heads: this device's)."""
    z = jnp.zeros((cfg.num_layers, batch, 0, heads or cfg.num_heads, cfg.head_dim), cfg.compute_dtype)
    return KV(z, z)


def forward(cfg: WanConfig, params, x, t, text: KV, frame_ids, context: KV | None = None, key_mask=None, *,
            kv_axis: str | None = None, kv_out: tuple | None = None, model_axis: str | None = None):
    """One DiT pass.

    x [B, F, H, W, C] latents; t [B, F] per-frame timesteps (0..1000); text: text_kv(...);
    frame_ids int [F] absolute latent-frame index of each frame (RoPE); context: clean K/V
    [L, B, S, N, H] the tokens also attend to; key_mask bool [B|1, Qb, S + G*F*h*w] (None = all).
    kv_axis: inside shard_map, the mesh axis (size G) whose devices' tokens form one joint pass.
    model_axis: inside shard_map, the tensor-parallel axis (bcjax.model.tensor_parallel): params,
    text and context hold this device's heads; the returned K/V too.
    Returns (flow prediction [B, F, H, W, C] float32, KV [L, B, F*h*w, N, H] of this pass's tokens,
    or of the gathered tokens [start, start + length) when kv_out = (start, length)).
    """
    check_latents(cfg, x, t)
    _, f, hh, ww, _ = x.shape
    rope = rope_tables(cfg, frame_ids, grid_hw(cfg, hh, ww))
    out, kv = forward_tokens(cfg, params, patchify(cfg, x), t, text, rope, context, key_mask,
                             kv_axis=kv_axis, kv_out=kv_out, model_axis=model_axis)
    return unpatchify(cfg, out, f, hh, ww), kv


def forward_tokens(cfg: WanConfig, params, tokens, t, text: KV, rope, context: KV | None = None, key_mask=None, *,
                   kv_axis: str | None = None, kv_out: tuple | None = None, model_axis: str | None = None,
                   remat: bool = False):
    """One DiT pass over patch tokens, in groups that each carry one timestep.

    tokens [B, T, patch_features]: G groups of T / G consecutive tokens; t [B, G] each group's
    timestep (a group lies inside one latent frame: the modulation is per group, so a frame may
    be cut into several groups, e.g. a token shard of a pass, `bcjax.cascade.tick`); rope (cos,
    sin) [T, head_dim // 2] each token's RoPE angles; key_mask bool [B|1, Qb, S + keys] per
    query block. params may hold an adapter (params["lora"], `bcjax.model.lora`): the blocks then
    run with it. remat: each layer rematerialised in the backward pass (`jax.checkpoint`;
    training). The rest as `forward`. Returns (flow tokens [B, T, patch_features_out] float32,
    KV as `forward`).
    """
    b = tokens.shape[0]
    if tokens.shape[1] % t.shape[1]:
        raise ValueError(f"{tokens.shape[1]} tokens do not split into {t.shape[1]} equal timestep groups")
    if context is None:
        context = empty_context(cfg, b, text.k.shape[3])
    embed = WanEmbed(cfg)
    h = embed.apply({"params": params["embed"]}, tokens, method=WanEmbed.patches)
    e, e0 = embed.apply({"params": params["embed"]}, t, method=WanEmbed.time)
    params, adapter = lora.split(params)
    block = quant.block_module(cfg, kv_axis=kv_axis, model_axis=model_axis,
                               lora_rank=None if adapter is None else lora.rank(adapter))

    def layer(h, xs):
        p, tk, tv, ck, cv, a = xs
        p = quant.for_layer(cfg, p)
        if a is not None:
            p = lora.with_layer(p, a)
        return block.apply({"params": p}, h, e0, rope, (tk, tv), (ck, cv), key_mask, kv_out)

    if remat:
        layer = jax.checkpoint(layer)
    h, (k, v) = jax.lax.scan(layer, h, (params["blocks"], text.k, text.v, context.k, context.v, adapter))
    return WanHead(cfg).apply({"params": params["head"]}, h, e), KV(k, v)
