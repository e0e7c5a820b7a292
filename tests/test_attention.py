"""The per-query-block masked attention against jax.nn.dot_product_attention with a full mask."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.model.attention import _attend_fused, attend


@pytest.mark.parametrize("query_blocks", [1, 3])
def test_block_mask_equals_expanded_token_mask(query_blocks):
    b, t, s, n, h = 2, 12, 20, 2, 8
    q = jax.random.normal(jax.random.key(0), (b, t, n, h))
    k = jax.random.normal(jax.random.key(1), (b, s, n, h))
    v = jax.random.normal(jax.random.key(2), (b, s, n, h))
    mask = jax.random.bernoulli(jax.random.key(3), 0.5, (b, query_blocks, s)).at[:, :, 0].set(True)
    ours = attend(q, k, v, mask, implementation="xla")
    token_mask = jnp.repeat(mask, t // query_blocks, axis=1)[:, None]  # [B, 1, T, S]
    ref = jax.nn.dot_product_attention(q, k, v, mask=token_mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-6)
    # and masked keys really do not count
    far = v.at[:, :, :, :].add(jnp.where(mask[:, 0, :, None, None], 0.0, 1e3)) if query_blocks == 1 else v
    np.testing.assert_allclose(np.asarray(attend(q, k, far, mask, implementation="xla")), np.asarray(ours), atol=1e-4)


def test_fused_path_falls_back_cleanly_without_cudnn():
    q = jax.random.normal(jax.random.key(0), (1, 12, 2, 8)).astype(jnp.bfloat16)
    mask = jnp.ones((1, 3, 12), bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _attend_fused(q, q, q, mask)
    ref = attend(q, q, q, mask, implementation="xla")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref, np.float32))
    if jax.default_backend() != "gpu":
        assert any("XLA path" in str(w.message) for w in caught)
