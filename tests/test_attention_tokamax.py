"""The "tokamax" attention backend (openxla/tokamax's flash kernels, the `tokamax` extra).

tokamax's kernels have no interpret mode and refuse a CPU device, so the CPU tests run its XLA
reference ("tokamax-interpret") through the same chunk loop, mask forms and residuals; the slow
tests compile the kernels themselves for an H100 (Mosaic GPU) and a v5e (Mosaic TPU) with the real
compilers, the target's device made the default as tokamax needs.
"""

import dataclasses
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.cascade.masks import tick_key_mask
from bcjax.model import attention
from bcjax.model.attention import attend, check_backend
from bcjax.schedule.stagger import make_stagger, slot_state

pytest.importorskip("tokamax", reason="the tokamax backend needs the `tokamax` extra: pip install 'bcjax[tokamax]'")

P, BF = 16, 3  # tokens per frame, frames per block
N, H = 2, 32


@pytest.fixture(autouse=True)
def small_chunks(request, monkeypatch):
    if "slow" in request.keywords:  # the real compiles keep the real chunk plan
        return
    monkeypatch.setattr(attention, "MIN_CHUNK", 128)
    monkeypatch.setattr(attention, "CHUNK_LOGITS_BYTES", 1)  # -> MIN_CHUNK keys per chunk


def _tick_mask(stagger: str, mask: str, tick: int, capacity: int = 12):
    """[1, slots, (capacity + slots * BF) * P]: a tick's per-query-block mask, the cache holding the
    frames before the oldest busy block (during fill: idle slots and empty cache slots)."""
    st = make_stagger(stagger, 4)
    blocks, _, busy = slot_state(st, tick, np.arange(st.num_slots), 100)
    oldest = int(np.min(np.where(busy, blocks, 10**6))) * BF
    frames = list(range(max(0, oldest - capacity), oldest))
    ids = np.full(capacity, -1)
    ids[:len(frames)] = frames
    keys = tick_key_mask(jnp.arange(st.num_slots), jnp.asarray(blocks), jnp.asarray(busy), jnp.asarray(ids),
                         block_frames=BF, tokens_per_frame=P, sink=0, rolling=capacity, mask=mask)
    return keys, capacity


def _sequential_mask(filled: int, capacity: int = 12):
    """[1, 1, (capacity + BF) * P]: a cache with `filled` of `capacity` frame slots, then the block."""
    keys = jnp.concatenate([jnp.repeat(jnp.arange(capacity) < filled, P), jnp.ones(BF * P, bool)])
    return keys[None, None], capacity


CASES = {
    "sequential, cache 3/12 (empty chunks)": lambda: _sequential_mask(3),
    "P4 causal, fill (idle slots)": lambda: _tick_mask("P4", "causal", 2),
    "P4 bidirectional, steady": lambda: _tick_mask("P4", "bidirectional", 9),
}


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("case", CASES)
def test_tokamax_equals_dense_on_per_query_block_masks(case, dtype):
    """Through `attend`, [cache | own] as two parts the way WanBlock passes them: chunks no query
    block sees are skipped, the others go to tokamax with the block's visibility as its mask."""
    mask, capacity = CASES[case]()
    qb, s = mask.shape[1], mask.shape[2]
    c = capacity * P
    if "steady" not in case:  # the chunk loop skips chunks of the cache no query block sees
        chunk = attention.chunk_size("tokamax", (1, qb, BF * P, N, H), attention.key_granule([c, s - c]))
        assert not bool(attention.chunk_visible(jnp.any(mask[0, :, :c], axis=0), chunk).all())
    ks = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(ks[0], (1, qb * BF * P, N, H), dtype)
    k, v = (jax.random.normal(kk, (1, s, N, H), dtype) for kk in ks[1:])
    ref = np.asarray(attend(q, k, v, mask, implementation="dense"), np.float32)
    fn = jax.jit(lambda q, k, v, m: attend(q, (k[:, :c], k[:, c:]), (v[:, :c], v[:, c:]), m,
                                           implementation="tokamax-interpret"))
    out = np.asarray(fn(q, k, v, mask), np.float32)
    err = float(np.max(np.abs(out - ref)))
    assert err <= (1e-5 if dtype == jnp.float32 else 2e-2 * float(np.max(np.abs(ref)))), err


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_the_tpu_mask_form_equals_the_gpu_one(dtype):
    """Mosaic TPU takes no mask that differs across the batch: one call per row, the row's
    visibility dense over its queries. With tokamax's reference both forms give the same output
    and log-sum-exp (what the chunk merge weighs parts by), and those are each row's own."""
    r, t, c = 3, 40, 256
    ks = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(ks[0], (r, t, N, H), dtype)
    k, v = (jax.random.normal(kk, (r, c, N, H), dtype) for kk in ks[1:3])
    vis = jax.random.bernoulli(ks[3], 0.3, (r, c)).at[:, 0].set(True)
    o1, l1 = attention._tokamax_rows("xla", q, k, v, vis, per_row=True)
    o2, l2 = attention._tokamax_rows("xla", q, k, v, vis, per_row=False)
    np.testing.assert_array_equal(np.asarray(o1, np.float32), np.asarray(o2, np.float32))
    np.testing.assert_allclose(np.asarray(l1), np.asarray(l2), atol=1e-6)
    f32 = [np.asarray(a, np.float32) for a in (q, k, v)]
    # [rows, heads, tokens, keys]
    logits = np.einsum("RTNH,RCNH->RNTC", f32[0], f32[1]) * H**-0.5
    logits = np.where(np.asarray(vis)[:, None, None, :], logits, -np.inf)
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1)) + logits.max(-1)
    out = np.einsum("RNTC,RCNH->RTNH", np.exp(logits - lse[..., None]), f32[2])
    tol = 1e-5 if dtype == jnp.float32 else 5e-2
    np.testing.assert_allclose(np.asarray(l1), lse.transpose(0, 2, 1), atol=tol)
    np.testing.assert_allclose(np.asarray(o1, np.float32), out, atol=tol)


def test_tokamax_on_a_cpu_default_device_falls_back_to_chunked_and_says_why():
    """tokamax compiles for the default device: on a CPU one it has no kernel, so the backend
    warns (naming the default device and the remedy) and takes the chunked path."""
    mask, capacity = _sequential_mask(3)
    q = jax.random.normal(jax.random.key(2), (1, BF * P, N, H))
    k = v = jax.random.normal(jax.random.key(3), (1, mask.shape[2], N, H))
    attention._warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attend(q, k, v, mask, implementation="tokamax")
    assert any("default device is a cpu device" in str(w.message) and "jax.default_device" in str(w.message)
               for w in caught), [str(w.message) for w in caught]
    np.testing.assert_allclose(np.asarray(out), np.asarray(attend(q, k, v, mask, implementation="chunked")),
                               atol=1e-6)


def test_the_backend_is_checked_against_the_platform_and_the_install(monkeypatch):
    check_backend("tokamax", "gpu")
    check_backend("tokamax", "tpu")
    check_backend("tokamax-interpret", "cpu")
    with pytest.raises(ValueError, match=r"'tokamax' needs a GPU or a TPU.*tokamax's XLA reference"):
        check_backend("tokamax", "cpu")
    # an optional extra: tried only when named, never a default
    assert "tokamax" not in attention.backends_for("gpu") + attention.backends_for("tpu")
    assert attention.for_platform("auto", "gpu", jnp.bfloat16) != "tokamax"
    monkeypatch.setattr(attention, "tokamax_installed", lambda: False)
    with pytest.raises(ImportError, match=r"pip install 'bcjax\[tokamax\]'"):
        check_backend("tokamax", "gpu")


# -- the kernels themselves, with the real compilers (slow) -------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("target_name,mark", [("h100", 'custom_call_target="mosaic_gpu'),
                                              ("v5e-8", "splash_mha_fwd_residuals")])
def test_one_real_size_layer_compiles_with_the_tokamax_kernel(target_name, mark):
    """One 1.3B layer at 480x832 (4680 queries a block over an 18-frame cache), the sequential
    block function, compiled for the target with the target's device as the default: tokamax's
    own kernel is in the optimised program (H100: Mosaic GPU; v5e: its Mosaic TPU splash fork),
    nothing fell back, and no [T, S] logits are materialised."""
    from bcjax import targets
    from bcjax.bench import compile as bench_compile
    from bcjax.cascade import make_mesh
    from bcjax.model.config import WanConfig
    from bcjax.schedule.config import PipelineConfig

    attention._warned.clear()
    target = targets.get(target_name)
    cfg = WanConfig.preset("wan2.1-1.3b", num_layers=1, dtype="bfloat16", param_dtype="bfloat16")
    cfg = dataclasses.replace(cfg, attention="tokamax")
    with jax.default_device(target.devices()[0]), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mesh = make_mesh(1, 1, devices=target.devices(), cfg=cfg)
        compiled = bench_compile.dit_lowering("sequential", cfg, PipelineConfig(), (60, 104), mesh)().compile()
    assert not [str(w.message) for w in caught if "using 'chunked'" in str(w.message)]
    assert mark in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < 3 * 2**30
