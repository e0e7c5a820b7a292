"""Attention backends against the dense reference, on the masks the pipelines build.

Pallas kernels run in interpret mode ("<kernel>-interpret"); shapes are small and the chunk
size is lowered so the chunk loop, the shifted last chunk and the skipping are all exercised.
"""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.cascade.masks import tick_key_mask
from bcjax.model import attention
from bcjax.model.attention import _attend_fused, attend, check_backend
from bcjax.model.config import WanConfig
from bcjax.schedule.config import PipelineConfig
from bcjax.schedule.stagger import make_stagger, slot_state

BACKENDS = ["chunked", "splash-interpret", "pallas_gpu-interpret"]
P, BF = 16, 3  # tokens per frame, frames per block
N, H = 2, 32


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    monkeypatch.setattr(attention, "MIN_CHUNK", 128)
    monkeypatch.setattr(attention, "CHUNK_LOGITS_BYTES", 1)  # -> MIN_CHUNK keys per chunk


@pytest.mark.parametrize("query_blocks", [1, 3])
def test_block_mask_equals_expanded_token_mask(query_blocks):
    b, t, s, n, h = 2, 12, 20, 2, 8
    q = jax.random.normal(jax.random.key(0), (b, t, n, h))
    k = jax.random.normal(jax.random.key(1), (b, s, n, h))
    v = jax.random.normal(jax.random.key(2), (b, s, n, h))
    mask = jax.random.bernoulli(jax.random.key(3), 0.5, (b, query_blocks, s)).at[:, :, 0].set(True)
    ours = attend(q, k, v, mask, implementation="dense")
    token_mask = jnp.repeat(mask, t // query_blocks, axis=1)[:, None]  # [B, 1, T, S]
    ref = jax.nn.dot_product_attention(q, k, v, mask=token_mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), atol=1e-6)
    # and masked keys really do not count
    far = v.at[:, :, :, :].add(jnp.where(mask[:, 0, :, None, None], 0.0, 1e3)) if query_blocks == 1 else v
    np.testing.assert_allclose(np.asarray(attend(q, k, far, mask, implementation="dense")), np.asarray(ours), atol=1e-4)


@pytest.mark.parametrize("query_blocks", [1, 3])
def test_dense_one_head_at_a_time_equals_all_heads_at_once(monkeypatch, query_blocks):
    """Where all heads' logits outgrow DENSE_HEADS_LOGITS_BYTES the dense path loops over heads
    (a CPU's cache); the loop gives what one einsum over every head gives."""
    b, t, s, n, h = 2, 12, 20, 3, 8
    q, k, v = (jax.random.normal(jax.random.key(i), (b, x, n, h)) for i, x in enumerate((t, s, s)))
    mask = jax.random.bernoulli(jax.random.key(3), 0.5, (b, query_blocks, s)).at[:, :, 0].set(True)
    assert attention.dense_heads_together(n, b * t * s * 4) == n
    together = attend(q, k, v, mask, implementation="dense")
    monkeypatch.setattr(attention, "DENSE_HEADS_LOGITS_BYTES", b * t * s * 4 * n - 1)
    assert attention.dense_heads_together(n, b * t * s * 4) == 1
    looped = jax.jit(lambda q, k, v, m: attend(q, k, v, m, implementation="dense"))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(looped), np.asarray(together), atol=1e-6)
    token_mask = jnp.repeat(mask, t // query_blocks, axis=1)[:, None]  # [B, 1, T, S]
    ref = jax.nn.dot_product_attention(q, k, v, mask=token_mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(looped), np.asarray(ref), atol=1e-6)


def _sequential_mask(filled: int, capacity: int = 6):
    """[1, 1, (capacity + BF) * P]: a cache with `filled` of `capacity` frame slots, then the block."""
    ids = jnp.where(jnp.arange(capacity) < filled, jnp.arange(capacity), -1)
    return jnp.concatenate([jnp.repeat(ids >= 0, P), jnp.ones(BF * P, bool)])[None, None]


def _tick_mask(stagger: str, mask: str, tick: int, sink: int = 0, rolling: int = 6, capacity: int = 6):
    """The batched tick's mask [1, slots, (capacity + slots * BF) * P] at `tick` (idle slots during
    fill when tick is small), with the cache holding the frames before the oldest busy block."""
    st = make_stagger(stagger, 4)
    blocks, _, busy = slot_state(st, tick, np.arange(st.num_slots), 100)
    oldest = int(np.min(np.where(busy, blocks, 10**6))) * BF
    frames = [f for f in range(oldest) if f < sink or f >= oldest - (capacity - sink)]
    ids = np.full(capacity, -1)
    ids[:len(frames)] = frames
    keys = tick_key_mask(jnp.arange(st.num_slots), jnp.asarray(blocks), jnp.asarray(busy), jnp.asarray(ids),
                         block_frames=BF, tokens_per_frame=P, sink=sink, rolling=rolling, mask=mask)
    return keys, st.num_slots


def _case(mask, dtype, key=0):
    qb, s = mask.shape[1], mask.shape[2]
    ks = jax.random.split(jax.random.key(key), 3)
    q = jax.random.normal(ks[0], (1, qb * BF * P, N, H), dtype)
    k = jax.random.normal(ks[1], (1, s, N, H), dtype)
    v = jax.random.normal(ks[2], (1, s, N, H), dtype)
    return q, k, v


CASES = {
    "sequential, cache 2/6 filled": lambda: (_sequential_mask(2), 6),
    "P4 causal, fill (idle slots)": lambda: _tick_mask("P4", "causal", 2) + (6,),
    "P4 bidirectional, steady": lambda: _tick_mask("P4", "bidirectional", 9) + (6,),
    "P2 causal, fill": lambda: _tick_mask("P2", "causal", 3) + (6,),
    "P2 bidirectional, sink + rolling window": lambda: _tick_mask("P2", "bidirectional", 16, sink=1, rolling=3,
                                                                   capacity=4) + (4,),
}


def _unpack(case):
    out = CASES[case]()
    mask, capacity = out[0], out[-1]
    return mask, capacity


@pytest.mark.parametrize("case,dtype",
                         [(c, jnp.float32) for c in CASES] + [("P4 causal, fill (idle slots)", jnp.bfloat16)])
def test_backends_equal_dense_on_pipeline_masks(case, dtype):
    mask, capacity = _unpack(case)
    q, k, v = _case(mask, dtype)
    c = capacity * P  # [cache | own] as two parts, the way WanBlock passes them
    ref = np.asarray(attend(q, k, v, mask, implementation="dense"), np.float32)
    errs = {}
    for backend in BACKENDS:
        fn = jax.jit(lambda q, k, v, m, b=backend: attend(q, (k[:, :c], k[:, c:]), (v[:, :c], v[:, c:]), m,
                                                           implementation=b))
        out = np.asarray(fn(q, k, v, mask), np.float32)
        errs[backend] = float(np.max(np.abs(out - ref)))
        if dtype == jnp.float32:
            assert errs[backend] <= 1e-5, (backend, errs)
        else:
            assert errs[backend] <= 2e-2 * float(np.max(np.abs(ref))), (backend, errs)
    print(f"\n{case} {jnp.dtype(dtype).name} max abs error vs dense: {errs}")


@pytest.mark.parametrize("backend", ["dense", *BACKENDS])
def test_a_cache_no_query_sees_is_never_computed(backend):
    """NaN values in an invisible cache would reach the output if any of its chunks ran
    (0 * NaN); the dense path shows it, the chunk-skipping backends must not."""
    mask = _sequential_mask(0)
    q, k, v = _case(mask, jnp.float32)
    c = 6 * P
    vc = jnp.full_like(v[:, :c], jnp.nan)
    v_nan = jnp.concatenate([vc, v[:, c:]], axis=1)
    assert np.isnan(np.asarray(attend(q, k, v_nan, mask, implementation="dense"))).any()  # one part: computed
    out = attend(q, (k[:, :c], k[:, c:]), (vc, v[:, c:]), mask, implementation=backend)
    ref = attend(q[:, :], k[:, c:], v[:, c:], mask[:, :, c:], implementation="dense")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


def test_the_chunk_plan_computes_only_the_chunks_holding_visible_frames(monkeypatch):
    """Self-Forcing's parts, [18-frame cache | 3-frame block]: a granule is one block of frames, a
    chunk is one granule while its logits fit the budget, and a cache with k of 18 frames filled
    costs ceil(k / 3) chunks, not all 6 (dim 512 on 16x16 latents: 1152 keys fitted one budget
    chunk, so any visible key cost the whole cache). Larger granules split into budget chunks."""
    monkeypatch.undo()  # the real budget, not the small-chunk fixture's
    p, cap = 64, 18  # 16x16 latents
    granule = attention.key_granule([cap * p, BF * p])
    assert granule == BF * p
    qr_shape = (1, 1, BF * p, 4, 128)
    for kernel in ("chunked", "splash", "pallas_gpu"):
        c = attention.chunk_size(kernel, qr_shape, granule)
        assert c == granule, kernel
        for k in range(cap + 1):
            valid = jnp.repeat(jnp.arange(cap) < k, p)
            computed = attention.chunk_visible(valid, c)
            assert computed.shape == (cap // BF,)
            assert int(computed.sum()) == -(-k // BF), (kernel, k)
            assert bool(computed[:-(-k // BF)].all())  # the filled slots come first
    # 1.3B at 480x832: a 4680-key granule exceeds the budget; chunks of the budget, still skipped
    p = 1560
    c = attention.chunk_size("chunked", (1, 1, BF * p, 12, 128), attention.key_granule([cap * p, BF * p]))
    assert c % attention.MIN_CHUNK == 0 and c < BF * p
    for k in (0, 3, 9, 18):
        assert int(attention.chunk_visible(jnp.repeat(jnp.arange(cap) < k, p), c).sum()) == -(-k * p // c)


def test_dense_takes_the_shortest_prefix_of_whole_granules_holding_every_visible_key():
    assert attention.prefix_buckets(18 * P, BF * P) == tuple(g * BF * P for g in range(7))
    many = attention.prefix_buckets(60 * P, P)  # 60 one-frame granules: at most MAX_PREFIX_BUCKETS prefixes
    assert len(many) == attention.MAX_PREFIX_BUCKETS + 1 and many[0] == 0 and many[-1] == 60 * P
    # neighbouring pairs: many[1:] is one shorter, so the truncation is intended
    assert all(a < b and b % P == 0 for a, b in zip(many, many[1:], strict=False))
    buckets = attention.prefix_buckets(18 * P, BF * P)
    for k in range(19):
        valid = jnp.repeat(jnp.arange(18) < k, P)
        assert buckets[int(attention.prefix_bucket(valid, buckets))] == -(-k // BF) * BF * P, k
    # visibility that is not a prefix (a sink and the ring's newest slot) takes the prefix to the last one
    valid = jnp.repeat(jnp.zeros(18, bool).at[0].set(True).at[10].set(True), P)
    assert buckets[int(attention.prefix_bucket(valid, buckets))] == 12 * P


@pytest.mark.parametrize("backend", ["dense", *BACKENDS])
@pytest.mark.parametrize("filled", [0, 3, 6])
def test_cache_granules_no_query_sees_are_never_computed(backend, filled):
    """NaN values in the cache's hidden frames would reach the output if attention read them; a
    cache of 6 frames with `filled` (whole blocks) of them visible must cost, and give, only those."""
    mask = _sequential_mask(filled)
    q, k, v = _case(mask, jnp.float32)
    c, seen = 6 * P, filled * P
    vc = v[:, :c].at[:, seen:].set(jnp.nan)
    out = attend(q, (k[:, :c], k[:, c:]), (vc, v[:, c:]), mask, implementation=backend)
    keep = np.r_[0:seen, c:mask.shape[2]]
    ref = attend(q, k[:, keep], v[:, keep], mask[:, :, keep], implementation="dense")
    np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-5)


@pytest.mark.parametrize("filled", range(7))
def test_dense_in_parts_equals_dense_on_the_concatenation(filled):
    mask = _sequential_mask(filled)
    q, k, v = _case(mask, jnp.float32, key=filled)
    c = 6 * P
    whole = attend(q, k, v, mask, implementation="dense")
    parts = jax.jit(lambda q, k, v, m: attend(q, (k[:, :c], k[:, c:]), (v[:, :c], v[:, c:]), m,
                                              implementation="dense"))(q, k, v, mask)
    np.testing.assert_allclose(np.asarray(parts), np.asarray(whole), atol=1e-6)


def test_auto_is_dense_when_small_and_chunked_when_large(monkeypatch):
    q = jnp.zeros((1, 8, 2, 8))
    assert attention._resolve("auto", q, 16) == "dense"
    monkeypatch.setattr(attention, "DENSE_LOGITS_BYTES", 8 * 2 * 16 * 4 - 1)
    assert attention._resolve("auto", q, 16) == "chunked"
    assert attention._resolve("xla", q, 16) == "dense"


def test_a_backend_the_platform_lacks_is_named():
    with pytest.raises(ValueError, match=r"needs a TPU.*\('chunked', 'dense'\)"):
        check_backend("splash", "cpu")
    with pytest.raises(ValueError, match=r"needs a GPU.*\('splash', 'chunked', 'dense'\)"):
        check_backend("cudnn", "tpu")
    with pytest.raises(ValueError, match="attention='flash3'"):
        WanConfig.preset("tiny", attention="flash3")
    # a runner checks its backend against the platform of the devices it compiles for, at construction
    from bcjax.runners import make_runner

    cpu = WanConfig.preset("tiny", attention="pallas_gpu")
    with pytest.raises(ValueError, match="pallas_gpu.*needs a GPU"):
        make_runner(cpu, PipelineConfig(), (4, 4), program="block")


def test_auto_follows_the_platform_compiled_for():
    assert attention.for_platform("auto", "tpu") == "splash"
    assert attention.for_platform("auto", "gpu", jnp.bfloat16) == attention.GPU_DEFAULT
    assert attention.for_platform("auto", "gpu", jnp.float32) == "auto"  # fp32: dense/chunked by size
    assert attention.for_platform("auto", "cpu") == "auto"
    assert attention.for_platform("chunked", "tpu") == "chunked"
    assert attention.backends_for("gpu")[0] == attention.GPU_DEFAULT
    assert attention.platform_of(jax.devices()[:1]) == "cpu"


def test_a_shape_the_kernel_refuses_warns_once_and_takes_the_chunked_path(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    h = 24  # not a power of two: the GPU flash kernel refuses it
    q = jax.random.normal(jax.random.key(0), (1, 48, 2, h))
    mask = jnp.ones((1, 1, 48), bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = attend(q, q, q, mask, implementation="pallas_gpu-interpret")
        attend(q, q, q, mask, implementation="pallas_gpu-interpret")
    msgs = [str(w.message) for w in caught if "pallas_gpu" in str(w.message)]
    assert len(msgs) == 1 and "head_dim 24" in msgs[0] and "'chunked'" in msgs[0], msgs
    np.testing.assert_allclose(np.asarray(out), np.asarray(attend(q, q, q, mask, implementation="dense")), atol=1e-5)


def test_fused_path_falls_back_cleanly_without_cudnn(monkeypatch):
    monkeypatch.setattr(attention, "_warned", set())
    q = jax.random.normal(jax.random.key(0), (1, 12, 2, 8)).astype(jnp.bfloat16)
    mask = jnp.ones((1, 3, 12), bool)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _attend_fused(q, q, q, mask)
    ref = attend(q, q, q, mask, implementation="dense")
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(ref, np.float32), atol=2e-2)
    if jax.default_backend() != "gpu":
        assert any("'chunked'" in str(w.message) for w in caught)
