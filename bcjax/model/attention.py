"""The one attention function every Wan attention goes through.

Masks are *per query block*: the T query tokens are Qb equal contiguous blocks, and each block
has its own boolean key mask over all S keys. Block-causal, bidirectional-window, cache
validity and pipeline-fill masks are all of this form (a block of 3 latent frames either sees a
key token or not), and it stays small: [Qb, S] instead of [T, S].
"""

from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp


def attend(q, k, v, key_mask=None, *, implementation: str = "auto"):
    """Scaled dot-product attention with a per-query-block key mask.

    q: [B, T, N, H]; k, v: [B, S, N, H]; key_mask: bool [B or 1, Qb, S] with T % Qb == 0,
    True = attend. Every query block must see at least one key.
    Returns [B, T, N, H] in q's dtype.
    """
    if implementation == "auto":
        implementation = "cudnn" if jax.default_backend() == "gpu" else "xla"
    if implementation == "cudnn":
        return _attend_fused(q, k, v, key_mask)
    return _attend_xla(q, k, v, key_mask)


def _attend_xla(q, k, v, key_mask):
    b, t, n, h = q.shape
    qb = 1 if key_mask is None else key_mask.shape[1]
    if t % qb:
        raise ValueError(f"{t} query tokens do not split into {qb} equal mask blocks")
    # [batch, query_block, tokens_in_block, heads, head_dim]
    qr = q.reshape(b, qb, t // qb, n, h)
    # [batch, query_block, heads, tokens_in_block, keys]
    logits = jnp.einsum("BQTNH,BSNH->BQNTS", qr, k, preferred_element_type=jnp.float32)
    logits = logits * (h**-0.5)
    if key_mask is not None:
        logits = jnp.where(key_mask[:, :, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    out = jnp.einsum("BQNTS,BSNH->BQTNH", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


def _attend_fused(q, k, v, key_mask):
    # Fold query blocks into the batch (keys repeated per query block) so each batch row has
    # one block's queries and that block's key mask.
    if q.dtype not in (jnp.bfloat16, jnp.float16):
        return _attend_xla(q, k, v, key_mask)  # cuDNN flash attention is half precision only
    b, t, n, h = q.shape
    qb = 1 if key_mask is None else key_mask.shape[1]
    qr = q.reshape(b * qb, t // qb, n, h)
    kr, vr = (jnp.repeat(a, qb, axis=0) if qb > 1 else a for a in (k, v))
    # cuDNN wants its bias as [batch, 1, T, S] (no broadcast over T), so the block's key mask is
    # expanded over the block's queries: one bias per query block, not per head.
    mask = None if key_mask is None else jnp.broadcast_to(
        key_mask[:, :, None, :], (b, qb, t // qb, k.shape[1])).reshape(b * qb, 1, t // qb, -1)
    try:
        out = jax.nn.dot_product_attention(qr, kr, vr, mask=mask, implementation="cudnn")
    except (ValueError, NotImplementedError, TypeError, RuntimeError) as e:  # no cuDNN, or a shape it refuses
        warnings.warn(f"cuDNN attention unavailable ({e}); using the XLA path", stacklevel=2)
        return _attend_xla(q, k, v, key_mask)
    return out.reshape(b, t, n, h)
