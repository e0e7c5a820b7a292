"""The one attention function every Wan attention goes through, and its backends.

Masks are *per query block*: the T query tokens are Qb equal contiguous blocks, and each block
has its own boolean key mask over all S keys. Block-causal, bidirectional (the tick's masks), cache
validity and pipeline-fill masks are all of this form (a block of 3 latent frames either sees a
key token or not), and it stays small: [Qb, S] instead of [T, S].

Keys may come in parts (the clean cache, the pass's own tokens): `attend(q, (k_cache, k_own),
(v_cache, v_own), mask)` attends as if the parts were concatenated along S, without building the
concatenation. Each part is attended to alone, giving (output, log-sum-exp), and the parts are
merged by their log-sum-exp; a part no query block sees is skipped (`lax.cond`), so a stream's
first block does not pay for its empty cache.

Cost follows the visible keys, at every size. Keys are skipped in *granules* (`key_granule`: the
gcd of the parts' lengths). Every part a Wan layer passes is whole latent frames (the cache,
capacity x tokens_per_frame; a pass, its blocks' frames), so a granule is whole frames, as many
as the parts allow: Self-Forcing's [18-frame cache | 3-frame block] gives one block of 3 frames,
the unit the cache fills by. A cache filling block by block then costs what it holds, as
upstream's growing cache slice does, where a chunk sized by a logits budget alone (1152 cached
keys at dim 512 on 16x16 latents make one chunk) costs the whole capacity once any key is visible.

Backends (`WanConfig.attention`, or "auto": by platform):

* "dense" (alias "xla"): the reference. A masked einsum, logits [B, heads, Qb, T/Qb, S] in fp32,
  of all heads at once, or of one head at a time (`lax.map`) where all heads' logits outgrow a
  CPU's cache (`dense_heads_together`): memory O(T*S) (the parts are concatenated). Of the first
  part (the cache) it takes the shortest of a few static prefixes, whole granules long
  (`prefix_buckets`), that holds every visible key, chosen by `lax.switch`: one einsum over the
  keys, not a loop over key chunks, which is what makes it the fastest path for small shapes on a
  CPU. The cache fills from slot 0 until its ring wraps, so the prefix is what is visible. "auto"
  picks it off TPU/GPU only while the full logits stay under `DENSE_LOGITS_BYTES`.
* "chunked": online softmax in XLA over key chunks of each part (running max and sum carried by
  a `lax.scan`), memory O(T*chunk). A chunk is one granule when its logits fit
  `CHUNK_LOGITS_BYTES` (`chunk_size`), and a chunk that no query block sees is skipped with
  `lax.cond` (`chunk_visible`), so work is proportional to the visible keys. Everywhere else, and
  whenever a kernel refuses a shape (one warning, then this path).
* "splash" (TPU): Pallas splash attention, one kernel call per key chunk inside the same chunk
  loop, with the same skipping. How traced visibility meets splash's static masks: splash skips
  blocks from a `MaskInfo` computed from a static mask at trace time; a tick's visibility (which
  cache slots hold frames, which slots are busy, the window) is traced, and splash's dynamic-mask
  mode materialises the whole [heads, T, S] mask (1.3 GiB of bools per layer at 480x832). Lists of
  precompiled variants under `lax.switch` grow with every fill level, mask and stagger phase,
  and reordering keys into a visible prefix copies the cache every layer. So: the kernel gets a
  static full mask over one key chunk (block sizes divide the chunk), the within-chunk
  visibility goes in as segment ids (queries 1, keys 1 if visible else 0; the mask is per query
  block, so a query block's rows all see the same keys), and the skipping of fully masked key
  blocks is lifted to chunk granularity, one `lax.cond` per chunk in XLA. Skipped chunks cost no
  FLOPs and no memory; visible ones cost one kernel call with O(block) VMEM.
* "pallas_gpu" (GPU): a Triton-lowered Pallas flash kernel (this module's `_flash_gpu_chunk`,
  modelled on jax.experimental.pallas.ops.gpu.attention, whose segment ids need len(q) ==
  len(kv)) taking a per-key visibility vector, in the same chunk loop.
* "cudnn" (GPU, half precision): `jax.nn.dot_product_attention(implementation="cudnn")` with the
  block mask expanded per query block (today's fused path); the cache part is skipped by a
  `lax.cond` when no query sees it.
* "tokamax" (GPU or TPU; the `tokamax` extra): openxla/tokamax's flash attention kernels, one call
  per visible key chunk in the same chunk loop: on a Hopper or Blackwell GPU its Mosaic GPU kernel
  (warp-specialised, FlashAttention-3 style), on an older GPU its Triton kernel, both taking the
  chunk's visibility as a mask broadcast over the block's queries ([rows, 1, 1, C]: a per-key
  vector in the kernel, nothing materialised); on TPU its Mosaic TPU kernel (a fork of splash),
  which takes no segment ids, so a row's visibility goes in as a dense [T/Qb, C] mask from which
  the kernel builds its block map at run time, one row at a time (`vmap`: it refuses a mask that
  differs across the batch). tokamax picks its kernel by the process's *default device* (its
  `implementation="mosaic"` rule, and its Hopper and TPU kernels check that device at trace time),
  and so does this backend: a compile-only process must make the target's device the default
  (`with jax.default_device(target_device):`), or the backend falls back to "chunked" with a
  warning. The public `tokamax.dot_product_attention` returns no log-sum-exp, which the chunk
  merge needs: its implementations (`tokamax._src.ops.attention.api.IMPLEMENTATIONS`, checked on
  import) are called with `return_residuals=True`.

The GPU default (`GPU_DEFAULT`) is chosen by what XLA:GPU compiles for an H100 (`bcjax bench
compile --target h100`): the backend whose programs need the least memory. No GPU has timed them
yet; a run of `bcjax bench gpu` may change it. "tokamax" compiles to the same memory as
"pallas_gpu" on an H100 (9 to 15 MB less of 8.5 GiB per device, docs/performance/attention.md)
but is not the default: it is an optional extra, and it compiles for the process's default device,
so every compile-only process (the benches, the compile tests) would see "auto" fall back to
"chunked" unless it made the target's device the default. On TPU it needs more memory and writes
about twice the HBM bytes of "splash" (its dense per-row masks), so splash stays.

"auto" resolves by the platform the program is compiled FOR (`for_platform`: the runner's mesh
devices, or a compile-only target's), not by the process's default backend: a process compiling
for a TPU or GPU target without one still has "cpu" as its default.

A Pallas backend with the suffix "-interpret" ("splash-interpret", "pallas_gpu-interpret")
runs the kernel in Pallas interpret mode on any platform: the CPU tests use it. tokamax's kernels
have no interpret switch and refuse a CPU device, so "tokamax-interpret" runs tokamax's own XLA
reference (`implementation="xla"`) through the same chunk loop, mask form and residuals.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import inspect
import math
import warnings

import jax
import jax.numpy as jnp

from bcjax.names import BACKENDS, Backend  # re-exported: checked here

F32 = jnp.float32
NEG_INF = -jnp.inf
DENSE_LOGITS_BYTES = 256 * 2**20  # "auto" off TPU/GPU: dense while its fp32 logits fit this
DENSE_HEADS_LOGITS_BYTES = 4 * 2**20  # dense: all heads in one einsum while their fp32 logits fit this
CHUNK_LOGITS_BYTES = 256 * 2**20  # chunked: keys per chunk so that one chunk's logits fit this
MIN_CHUNK = 512  # keys per chunk at least when a granule is larger (a multiple of every kernel's key block)
MAX_PREFIX_BUCKETS = 8  # dense: cache prefixes compiled per attention (one granule each up to 8 granules)
_KERNELS = ("splash", "pallas_gpu", "tokamax")
# BACKENDS (`bcjax.names.Backend`): these kernels, each also "<kernel>-interpret", and "auto", "dense",
# "xla", "chunked", "cudnn"
TOKAMAX_EXTRA = "pip install 'bcjax[tokamax]'"


GPU_DEFAULT: Backend = "pallas_gpu"  # see the module docstring: least memory in XLA:GPU's H100 compile


def platform_of(devices) -> str:
    """The attention platform ("cpu", "gpu", "tpu") of a device list, a Mesh or one device
    (compile-only topology devices included): CUDA and ROCm devices are "gpu"."""
    if hasattr(devices, "devices") and not callable(devices.devices):  # a Mesh
        devices = devices.devices.flat
    elif hasattr(devices, "platform"):
        devices = [devices]
    platforms = {d.platform for d in devices}
    if len(platforms) != 1:
        raise ValueError(f"devices span platforms {sorted(platforms)}; a program is compiled for one")
    platform = platforms.pop()
    return "gpu" if platform in ("cuda", "rocm", "gpu") else platform


def backends_for(platform: str) -> tuple[Backend, ...]:
    """The backends that run on `platform` ("cpu", "gpu", "tpu", ...), default first (what the
    benches and the tuner try unless told). "tokamax", an optional extra, also runs on GPU and TPU
    (`check_backend`) but is tried only when named."""
    if platform == "tpu":
        return ("splash", "chunked", "dense")
    if platform == "gpu":
        return (GPU_DEFAULT, *(b for b in ("cudnn", "pallas_gpu") if b != GPU_DEFAULT), "chunked", "dense")
    return ("chunked", "dense")


@functools.cache
def tokamax_installed() -> bool:
    """Whether the `tokamax` extra is installed (found, not imported: importing it is slow)."""
    try:
        return importlib.util.find_spec("tokamax") is not None
    except ImportError:  # a finder that blocks the package
        return False


def installed_backends(platform: str) -> tuple[Backend, ...]:
    """Every backend `platform` can run here: `backends_for`'s, and on a GPU or TPU tokamax's
    kernels where the `tokamax` extra is installed (opt-in: never a default, see the docstring).
    What `bcjax tune` and `bench gpu` measure unless told."""
    found = backends_for(platform)
    return (*found, "tokamax") if platform in ("gpu", "tpu") and tokamax_installed() else found


def for_platform(name: Backend, platform: str, dtype=jnp.bfloat16) -> Backend:
    """The backend `name` resolves to in a program compiled for `platform` with compute `dtype`:
    "auto" becomes the platform's kernel ("splash" on TPU, `GPU_DEFAULT` on GPU in half
    precision); elsewhere "auto" stays, choosing dense or chunked by size at trace time. A
    backend the platform lacks is refused here, before anything is traced."""
    check_backend(name, platform)
    if name != "auto":
        return name
    if platform == "tpu":
        return "splash"
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return GPU_DEFAULT
    return "auto"


def check_backend(name: str, platform: str | None = None) -> None:
    """Raise a clear error for a backend that is unknown or that `platform` lacks."""
    platform = platform or jax.default_backend()
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {BACKENDS}")
    base = name.removesuffix("-interpret")
    if base == "tokamax" and not tokamax_installed():
        raise ImportError(f"attention backend {name!r} needs tokamax, which is not installed: {TOKAMAX_EXTRA}")
    if name in ("auto", "xla") or name.endswith("-interpret") or base in backends_for(platform):
        return
    if base == "tokamax" and platform in ("gpu", "tpu"):
        return
    needs = {"splash": "a TPU", "tokamax": "a GPU or a TPU"}.get(base, "a GPU")
    how = "tokamax's XLA reference" if base == "tokamax" else "the kernel in Pallas interpret mode"
    raise ValueError(f"attention backend {name!r} needs {needs}; this "
                     f"platform ({platform}) has {backends_for(platform)} (or 'auto'; "
                     f"'{base}-interpret' runs {how} anywhere)")


def attend(q, k, v, key_mask=None, *, implementation: str = "auto"):
    """Scaled dot-product attention with a per-query-block key mask.

    q: [B, T, N, H]; k, v: [B, S, N, H], or tuples of parts [B, S_i, N, H] attended as if
    concatenated along S; key_mask: bool [B or 1, Qb, S] with T % Qb == 0, True = attend (None =
    all). Every query block must see at least one key. Returns [B, T, N, H] in q's dtype.
    """
    ks, vs = (tuple(a) if isinstance(a, (tuple, list)) else (a,) for a in (k, v))
    if any(a.shape[1] for a in ks):
        # zero-length parts (a pass without a cache) have no mask columns: dropped
        ks, vs = zip(*[(kp, vp) for kp, vp in zip(ks, vs, strict=True) if kp.shape[1]], strict=True)
    b, t, n, h = q.shape
    s = sum(a.shape[1] for a in ks)
    qb = 1 if key_mask is None else key_mask.shape[1]
    if t % qb:
        raise ValueError(f"{t} query tokens do not split into {qb} equal mask blocks")
    if key_mask is not None and key_mask.shape[2] != s:
        raise ValueError(f"key_mask covers {key_mask.shape[2]} keys; k has {s}")
    backend = _resolve(implementation, q, s)
    if backend == "dense":
        cat = lambda parts: parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=1)
        if len(ks) == 1 or key_mask is None:
            return _attend_dense(q, cat(ks), cat(vs), key_mask)
        # of the first part (the clean cache), the shortest prefix that holds every visible key
        s0 = ks[0].shape[1]
        buckets = prefix_buckets(s0, key_granule([a.shape[1] for a in ks]))

        def prefix(n):
            m = jnp.concatenate([key_mask[:, :, :n], key_mask[:, :, s0:]], axis=2) if n else key_mask[:, :, s0:]
            return lambda: _attend_dense(q, cat((ks[0][:, :n], *ks[1:]) if n else ks[1:]),
                                         cat((vs[0][:, :n], *vs[1:]) if n else vs[1:]), m)

        which = prefix_bucket(jnp.any(key_mask[:, :, :s0], axis=(0, 1)), buckets)
        return jax.lax.switch(which, [prefix(n) for n in buckets])
    if key_mask is None:
        key_mask = jnp.ones((1, 1, s), bool)
    if backend == "cudnn":
        return _attend_cudnn(q, ks, vs, key_mask)
    kernel, interpret = backend.removesuffix("-interpret"), backend.endswith("-interpret")
    # [batch, query_block, tokens_in_block, heads, head_dim]
    qr = q.reshape(b, qb, t // qb, n, h)
    o, lse = None, None
    start = 0
    granule = key_granule([a.shape[1] for a in ks])
    for kp, vp in zip(ks, vs, strict=True):
        mp = key_mask[:, :, start:start + kp.shape[1]]
        start += kp.shape[1]
        o, lse = _attend_part(kernel, interpret, qr, kp, vp, mp, o, lse, granule)
    assert o is not None  # k has at least one part
    return o.reshape(b, t, n, h).astype(q.dtype)


# -- backend choice ---------------------------------------------------------------------------


def _resolve(name: str, q, s: int) -> str:
    # platform checks happen where the platform is known (`for_platform`, at a runner's
    # construction): a compile-only process traces splash with "cpu" as its default backend
    if name not in BACKENDS:
        raise ValueError(f"attention backend {name!r}: expected one of {BACKENDS}")
    if name == "xla":
        return "dense"
    if name == "auto":  # not resolved by a runner: the process's default backend decides
        name = for_platform(name, jax.default_backend(), q.dtype)
    if name != "auto":
        return name
    b, t, n, _ = q.shape
    return "dense" if b * t * n * s * 4 <= DENSE_LOGITS_BYTES else "chunked"


_warned: set[tuple[str, str]] = set()  # (kernel, why)


def _refuse(kernel: str, why: str) -> None:
    """One warning per kernel and reason; the caller then takes the chunked path."""
    if (kernel, why) not in _warned:
        _warned.add((kernel, why))
        warnings.warn(f"attention backend {kernel!r} cannot take this shape ({why}); using 'chunked'",
                      stacklevel=4)


# -- log-sum-exp merge ------------------------------------------------------------------------


def _merge(o1, l1, o2, l2):
    """Two normalised partial attentions (o [..., H] f32, lse [...] with -inf = no keys) -> one."""
    if o1 is None:
        return o2, l2
    m = jnp.maximum(l1, l2)
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w1, w2 = jnp.exp(l1 - m), jnp.exp(l2 - m)
    tot = w1 + w2
    o = (o1 * w1[..., None] + o2 * w2[..., None]) / jnp.where(tot > 0, tot, 1.0)[..., None]
    return o, m + jnp.log(tot)


# -- dense (reference) ------------------------------------------------------------------------


def dense_heads_together(heads: int, head_logits_bytes: int) -> int:
    """Heads the dense path computes in one einsum: all of them while their fp32 logits fit
    DENSE_HEADS_LOGITS_BYTES, else one (the heads looped by `lax.map`)."""
    return heads if heads * head_logits_bytes <= DENSE_HEADS_LOGITS_BYTES else 1


def _attend_dense(q, k, v, key_mask):
    b, t, n, h = q.shape
    s = k.shape[1]
    qb = 1 if key_mask is None else key_mask.shape[1]
    g = dense_heads_together(n, b * t * s * 4)
    # [head groups, batch, heads per group, tokens, head_dim]: heads ahead of tokens, so the dots
    # are plain batched matmuls
    qh, kh, vh = (a.reshape(b, a.shape[1], n // g, g, h).transpose(2, 0, 3, 1, 4) for a in (q, k, v))

    def group(qkv):
        qi, ki, vi = qkv
        # [batch, heads per group, query_block, tokens_in_block, keys]
        logits = jnp.einsum("BNTH,BNSH->BNTS", qi, ki, preferred_element_type=F32).reshape(b, g, qb, t // qb, s)
        logits = logits * (h**-0.5)
        if key_mask is not None:
            logits = jnp.where(key_mask[:, None, :, None, :], logits, jnp.finfo(F32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype).reshape(b, g, t, s)
        # [batch, heads per group, tokens, head_dim]
        return jnp.einsum("BNTS,BNSH->BNTH", probs, vi, preferred_element_type=F32)

    # one head at a time (`lax.map`) once all heads' logits outgrow a CPU's cache: the 1.3B's 12
    # heads over a full Self-Forcing cache on 16x16 latents (12 MiB of logits) took 2x the time of
    # the loop over heads (then on par with torch's fused CPU attention); below a few MiB the loop
    # gains nothing and costs a little at small sizes
    out = group((qh[0], kh[0], vh[0]))[None] if g == n else jax.lax.map(group, (qh, kh, vh))
    return out.transpose(1, 3, 0, 2, 4).reshape(b, t, n, h).astype(q.dtype)


# -- chunk loop shared by chunked / splash / pallas_gpu -----------------------------------------


def key_granule(part_lengths) -> int:
    """Keys per granule, the unit attention skips by: the gcd of the key parts' lengths (whole
    latent frames, since every part is; see the module docstring)."""
    return math.gcd(*part_lengths)


def chunk_size(kernel: str, qr_shape, granule: int) -> int:
    """Keys per chunk of the chunk loop for queries qr_shape [B, Qb, Tq, N, H]: one granule while
    its fp32 logits fit CHUNK_LOGITS_BYTES (2048 keys at most for a kernel), so a chunk is whole
    frames and skipping follows the visible frames; a larger granule is split into chunks of the
    budget, a multiple of MIN_CHUNK (the kernels' key blocks divide it)."""
    b, qb, tq, n, _ = qr_shape
    c = CHUNK_LOGITS_BYTES // (4 * b * qb * tq * n)
    c = max(MIN_CHUNK, min(8192, c // MIN_CHUNK * MIN_CHUNK))
    if kernel != "chunked":
        c = min(c, 2048)
    return min(c, granule)


def chunk_visible(key_visible, c: int):
    """bool [ceil(S / c)]: which chunks of c keys the chunk loop computes, given key_visible bool
    [S] (any query block of any row sees the key). Chunk i holds keys [i c, min((i + 1) c, S)):
    the last one is read shifted back to end at S, its keys an earlier chunk holds masked."""
    s = key_visible.shape[0]
    num = -(-s // c)
    return jnp.any(jnp.pad(key_visible, (0, num * c - s)).reshape(num, c), axis=1)


def prefix_buckets(length: int, granule: int, max_buckets: int | None = None) -> tuple[int, ...]:
    """The prefix lengths of the first key part the dense path compiles: 0 (none visible), then
    whole granules up to `length`, at most `max_buckets` (MAX_PREFIX_BUCKETS) of them spread evenly:
    each is one more attention in the program, so their number is bounded, not their size."""
    g = length // granule
    m = min(g, MAX_PREFIX_BUCKETS if max_buckets is None else max_buckets)
    return (0, *(granule * -(-g * i // m) for i in range(1, m + 1)))


def prefix_bucket(key_visible, buckets: tuple[int, ...]):
    """int32 []: the index of the shortest prefix in `buckets` holding every visible key of
    key_visible bool [S0]."""
    last = jnp.max(jnp.where(key_visible, jnp.arange(1, key_visible.shape[0] + 1), 0))
    return jnp.searchsorted(jnp.asarray(buckets, jnp.int32), last, side="left").astype(jnp.int32)


def _attend_part(kernel, interpret, qr, k, v, mask, o_acc, lse_acc, granule):
    """Attend qr [B, Qb, Tq, N, H] to one key part k, v [B, S, N, H] under mask [B|1, Qb, S],
    merged into the running (o [B, Qb, Tq, N, H] f32, lse [B, Qb, Tq, N]) (None at the start)."""
    b, qb, tq, n, h = qr.shape
    s = k.shape[1]
    chunk_fn = _chunk_fn(kernel, interpret, qr)
    if chunk_fn is None:
        kernel = "chunked"
        chunk_fn = _chunk_xla
    c = min(chunk_size(kernel, qr.shape, granule), s)
    num = -(-s // c)
    mask = jnp.broadcast_to(mask, (b, qb, s))
    # [chunks]: computed or skipped
    visible = chunk_visible(jnp.any(mask, axis=(0, 1)), c)
    if o_acc is None:
        o_acc = jnp.zeros((b, qb, tq, n, h), F32)
        lse_acc = jnp.full((b, qb, tq, n), NEG_INF, F32)

    def body(carry, xs):
        i, seen = xs
        # the last chunk is shifted back to end at S; keys an earlier chunk covered are masked
        start = jnp.minimum(i * c, s - c)
        # [batch, query_block, chunk]
        mc = jax.lax.dynamic_slice_in_dim(mask, start, c, axis=2)
        mc &= (start + jnp.arange(c) >= i * c)[None, None, :]

        def run(carry):
            kc, vc = (jax.lax.dynamic_slice_in_dim(a, start, c, axis=1) for a in (k, v))
            o, lse = chunk_fn(qr, kc, vc, mc)
            # query blocks that see nothing of this chunk contribute nothing
            rows = jnp.any(mc, axis=2)[:, :, None, None]  # [batch, query_block, 1, 1]
            lse = jnp.where(rows, lse, NEG_INF)
            o = jnp.where(rows[..., None], o, 0.0)
            return _merge(carry[0], carry[1], o, lse)

        return jax.lax.cond(seen, run, lambda c_: c_, carry), None

    # rematerialised: a backward pass (`bcjax.adapt`) keeps each chunk's running (o, lse), not its
    # logits (a no-op without differentiation)
    carry, _ = jax.lax.scan(jax.checkpoint(body, prevent_cse=False), (o_acc, lse_acc), (jnp.arange(num), visible))
    return carry


def _chunk_xla(qr, k, v, mask):
    """(o [B, Qb, Tq, N, H] f32, lse [B, Qb, Tq, N]) of qr over one chunk k, v [B, C, N, H]."""
    h = qr.shape[-1]
    # [batch, query_block, heads, tokens_in_block, chunk] (batch dims leading, as the dense path)
    logits = jnp.einsum("BQTNH,BCNH->BQNTC", qr, k, preferred_element_type=F32) * (h**-0.5)
    logits = jnp.where(mask[:, :, None, None, :], logits, -1e30)
    m = jnp.max(logits, axis=-1)
    p = jnp.exp(logits - m[..., None])
    den = jnp.sum(p, axis=-1)  # [batch, query_block, heads, tokens_in_block]
    o = jnp.einsum("BQNTC,BCNH->BQTNH", p.astype(v.dtype), v, preferred_element_type=F32)
    den_t = jnp.swapaxes(den, 2, 3)
    return o / den_t[..., None], jnp.swapaxes(m, 2, 3) + jnp.log(den_t)


def _chunk_fn(kernel: str, interpret: bool, qr):
    """The per-chunk function of a backend, or None (after one warning) if it refuses the shape."""
    if kernel == "chunked":
        return _chunk_xla
    h = qr.shape[-1]
    if kernel == "splash":
        mod = _splash_module()
        if mod is None:
            _refuse(kernel, "jax.experimental.pallas.ops.tpu.splash_attention is not importable")
            return None
        if not interpret and h % 128:
            _refuse(kernel, f"head_dim {h} is not a multiple of 128")
            return None
        return functools.partial(_splash_chunk, interpret)
    if kernel == "pallas_gpu":
        if _pallas_gpu() is None:
            _refuse(kernel, "jax.experimental.pallas.gpu is not importable")
            return None
        if h < 16 or h & (h - 1):
            _refuse(kernel, f"head_dim {h} is not a power of two >= 16")
            return None
        return functools.partial(_flash_gpu_chunk, interpret)
    if kernel == "tokamax":
        _tokamax_ops()  # installed, or an ImportError naming the extra
        name, why = ("xla", "") if interpret else _tokamax_kernel(qr.dtype, h)
        if name is None:
            _refuse(kernel, why)
            return None
        return functools.partial(_tokamax_chunk, name)
    raise ValueError(f"attention backend {kernel!r} has no chunk kernel")


def _pad_queries(qr, block: int):
    tq = qr.shape[2]
    pad = -tq % block
    return (jnp.pad(qr, ((0, 0), (0, 0), (0, pad), (0, 0), (0, 0))) if pad else qr), tq


def _pad_keys(k, v, mask, block: int):
    """Chunks shorter than one kernel block (small parts) are padded with masked keys."""
    pad = -k.shape[1] % block
    if not pad:
        return k, v, mask
    k, v = (jnp.pad(a, ((0, 0), (0, pad), (0, 0), (0, 0))) for a in (k, v))
    return k, v, jnp.pad(mask, ((0, 0), (0, 0), (0, pad)))


# -- splash (TPU) -----------------------------------------------------------------------------


@functools.cache
def _splash_module():
    try:
        from jax.experimental.pallas.ops.tpu import splash_attention as sa
    except ImportError:
        return None
    needed = ("make_splash_mha_single_device", "FullMask", "MultiHeadMask", "SegmentIds", "BlockSizes")
    if not all(hasattr(sa, a) for a in needed) or "save_residuals" not in inspect.signature(
            sa.make_splash_mha_single_device).parameters:
        return None
    return sa


_SPLASH_BLOCK = 128  # multiple of the TPU lane width; divides every chunk (multiples of 512)


@functools.cache
def _splash_kernel(heads: int, tq: int, c: int, interpret: bool):
    sa = _splash_module()
    bq, bkv = min(512, tq), min(512, c)
    while tq % bq:
        bq //= 2
    while c % bkv:
        bkv //= 2
    mask = sa.MultiHeadMask([sa.FullMask((tq, c)) for _ in range(heads)])
    sizes = sa.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv)
    with jax.ensure_compile_time_eval():  # its MaskInfo arrays are constants, cached across traces
        return sa.make_splash_mha_single_device(mask, block_sizes=sizes, save_residuals=True, interpret=interpret)


def _splash_chunk(interpret: bool, qr, k, v, mask):
    sa = _splash_module()
    b, qb, _, n, h = qr.shape
    qp, tq = _pad_queries(qr, _SPLASH_BLOCK)
    k, v, mask = _pad_keys(k, v, mask, _SPLASH_BLOCK)
    c, tqp = k.shape[1], qp.shape[2]
    kernel = _splash_kernel(n, tqp, c, interpret)
    # splash takes one example [heads, tokens, head_dim] and does not scale the logits
    qh = (qp * jnp.asarray(h**-0.5, qp.dtype)).reshape(b * qb, tqp, n, h).transpose(0, 2, 1, 3)
    kh, vh = (jnp.repeat(a, qb, axis=0).transpose(0, 2, 1, 3) for a in (k, v))
    seg_q = jnp.ones((tqp,), jnp.int32)
    seg_kv = mask.reshape(b * qb, c).astype(jnp.int32)

    def one(qi, ki, vi, si):
        out, (lse,) = kernel(qi, ki, vi, segment_ids=sa.SegmentIds(seg_q, si))
        return out, lse

    # Mosaic refuses a bf16 matmul at fp32 contract precision ("Bad lhs type", XLA:TPU v5e), which
    # a process-wide jax_default_matmul_precision="highest" would ask for inside the kernel; the
    # kernel accumulates in fp32 anyway, so its operands' own precision is the one to use
    precision = "default" if qh.dtype in (jnp.bfloat16, jnp.float16) else None
    with jax.default_matmul_precision(precision) if precision else contextlib.nullcontext():
        out, lse = jax.vmap(one)(qh, kh, vh, seg_kv)  # [rows, heads, tokens, head_dim], [rows, heads, tokens]
    out = out.transpose(0, 2, 1, 3).reshape(b, qb, tqp, n, h)[:, :, :tq].astype(F32)
    lse = lse.transpose(0, 2, 1).reshape(b, qb, tqp, n)[:, :, :tq]
    return out, lse


# -- Pallas GPU flash kernel --------------------------------------------------------------------


@functools.cache
def _pallas_gpu():
    try:
        from jax.experimental import pallas as pl
        from jax.experimental.pallas import triton as plgpu
    except ImportError:
        return None
    # names checked, not assumed: jax 0.10 and 0.11 both have these (pl.ds is the newer alias of
    # pl.dslice; CompilerParams was TritonCompilerParams before)
    ds = getattr(pl, "ds", None) or getattr(pl, "dslice", None)
    params = getattr(plgpu, "CompilerParams", None) or getattr(plgpu, "TritonCompilerParams", None)
    if ds is None or params is None or not all(hasattr(pl, a) for a in ("pallas_call", "BlockSpec")):
        return None
    return pl, plgpu, ds, params


_GPU_BLOCK_Q, _GPU_BLOCK_K = 64, 64


def _flash_gpu_kernel(q_ref, k_ref, v_ref, m_ref, o_ref, lse_ref, *, scale: float, block_k: int):
    """One (query block, row, head): online softmax over the chunk's key blocks, keys masked by
    m_ref (int32 [C], 1 = visible). Modelled on jax.experimental.pallas.ops.gpu.attention."""
    _, plgpu, ds, _ = _pallas_gpu()
    c = k_ref.shape[0]
    bq = q_ref.shape[0]
    q = q_ref[...]
    log2e = math.log2(math.e)

    def body(j, carry):
        o, m_prev, l_prev = carry
        ks = ds(j * block_k, block_k)
        k = k_ref[ks, :]
        # [block_q, block_k] logits in base-2 units
        s = plgpu.dot(q, k.T) * (scale * log2e) if hasattr(plgpu, "dot") else (q @ k.T).astype(F32) * (scale * log2e)
        visible = m_ref[ks] > 0
        s = jnp.where(visible[None, :], s.astype(F32), -1e30)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=-1))
        corr = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        l_next = corr * l_prev + jnp.sum(p, axis=-1)
        v = v_ref[ks, :]
        pv = plgpu.dot(p.astype(v.dtype), v) if hasattr(plgpu, "dot") else (p.astype(v.dtype) @ v).astype(F32)
        return corr[:, None] * o + pv.astype(F32), m_next, l_next

    o0 = jnp.zeros((bq, q_ref.shape[1]), F32)
    m0 = jnp.full((bq,), -jnp.inf, F32)
    l0 = jnp.zeros((bq,), F32)
    o, m, l = jax.lax.fori_loop(0, c // block_k, body, (o0, m0, l0))  # noqa: E741 (m, l: online softmax max, sum)
    o_ref[...] = (o / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = (m + jnp.log2(l)) / log2e  # natural log


def _flash_gpu_chunk(interpret: bool, qr, k, v, mask):
    pl, _, _, compiler_params = _pallas_gpu()
    b, qb, _, n, h = qr.shape
    qp, tq = _pad_queries(qr, _GPU_BLOCK_Q)
    k, v, mask = _pad_keys(k, v, mask, _GPU_BLOCK_K)
    c, tqp = k.shape[1], qp.shape[2]
    rows = b * qb
    q2 = qp.reshape(rows, tqp, n, h)
    k2, v2 = (jnp.repeat(a, qb, axis=0) for a in (k, v))  # one chunk per query block: small
    m2 = mask.reshape(rows, c).astype(jnp.int32)
    kernel = functools.partial(_flash_gpu_kernel, scale=h**-0.5, block_k=min(_GPU_BLOCK_K, c))
    out, lse = pl.pallas_call(
        kernel,
        grid=(tqp // _GPU_BLOCK_Q, rows, n),
        in_specs=[pl.BlockSpec((None, _GPU_BLOCK_Q, None, h), lambda i, r, hh: (r, i, hh, 0)),
                  pl.BlockSpec((None, c, None, h), lambda i, r, hh: (r, 0, hh, 0)),
                  pl.BlockSpec((None, c, None, h), lambda i, r, hh: (r, 0, hh, 0)),
                  pl.BlockSpec((None, c), lambda i, r, hh: (r, 0))],
        out_specs=[pl.BlockSpec((None, _GPU_BLOCK_Q, None, h), lambda i, r, hh: (r, i, hh, 0)),
                   pl.BlockSpec((None, None, _GPU_BLOCK_Q), lambda i, r, hh: (r, hh, i))],
        out_shape=[jax.ShapeDtypeStruct((rows, tqp, n, h), qr.dtype),
                   jax.ShapeDtypeStruct((rows, n, tqp), F32)],
        compiler_params=compiler_params(num_warps=4 if h <= 64 else 8, num_stages=2),
        interpret=interpret,
        name="bcjax_flash_chunk",
    )(q2, k2, v2, m2)
    out = out.reshape(b, qb, tqp, n, h)[:, :, :tq].astype(F32)
    lse = lse.transpose(0, 2, 1).reshape(b, qb, tqp, n)[:, :, :tq]
    return out, lse


# -- tokamax (GPU, TPU) -------------------------------------------------------------------------


@functools.cache
def _tokamax_ops():
    """tokamax's attention implementations by name ("mosaic_gpu", "triton", "mosaic_tpu", "xla",
    ...), or an ImportError naming the extra."""
    try:
        from absl import flags
        from tokamax._src.ops.attention import api
    except ImportError as e:
        raise ImportError(f"attention backend 'tokamax' needs tokamax ({e}): {TOKAMAX_EXTRA}") from None
    ops = getattr(api, "IMPLEMENTATIONS", None)
    if ops is None or "xla" not in ops or "return_residuals" not in inspect.signature(ops["xla"].__call__).parameters:
        import tokamax

        raise ImportError(f"tokamax {tokamax.__version__} has no attention implementations returning residuals "
                          f"(tokamax._src.ops.attention.api.IMPLEMENTATIONS, as in 0.0.12)")
    # tokamax reads its options as absl flags, and on the first read parses sys.argv unless someone
    # did: a program's own arguments (`--attention tokamax`, pytest's) are unknown to absl and fail
    # there. Their defaults are what this backend uses.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    return ops


_TOKAMAX_BLOCK = 128  # TPU: its q and kv blocks (lane width); GPU: a multiple of its kv block


def _tokamax_kernel(dtype, head_dim: int) -> tuple[str | None, str]:
    """tokamax's kernel for the default device, as its own `implementation="mosaic"` rule picks
    (Mosaic GPU on Hopper and Blackwell, Triton on older GPUs, Mosaic TPU): (name, "") or (None,
    why not)."""
    from jax.extend.backend import get_default_device

    ops, dev = _tokamax_ops(), get_default_device()
    if dev.platform == "tpu":
        name = "mosaic_tpu"
        if head_dim % 128:
            return None, f"head_dim {head_dim} is not a multiple of 128"
    elif dev.platform == "gpu":
        cc = float(getattr(dev, "compute_capability", 0) or 0)
        name = "mosaic_gpu" if 9 <= cc < 11 else "triton"
        if name == "mosaic_gpu" and jnp.dtype(dtype) not in (jnp.bfloat16, jnp.float16):
            return None, f"dtype {jnp.dtype(dtype)} (tokamax's Mosaic GPU kernel takes bf16/fp16)"
    else:
        return None, (f"the default device is a {dev.platform} device; tokamax compiles its kernels for the default "
                      f"device (a compile-only process: `with jax.default_device(target_device)`)")
    if name not in ops or not ops[name].supported_on(dev):
        return None, f"tokamax has no {name} kernel for {dev.device_kind}"
    return name, ""


def _tokamax_chunk(name: str, qr, k, v, mask):
    """(o [B, Qb, Tq, N, H] f32, lse [B, Qb, Tq, N]) of qr over one chunk k, v [B, C, N, H] under
    mask [B, Qb, C], by tokamax's implementation `name`."""
    b, qb, _, n, h = qr.shape
    # Mosaic TPU's q block must divide the queries; every kernel gets whole kv blocks (a chunk is
    # whole blocks already unless a part is shorter than one: that one is padded with masked keys)
    qp, tq = _pad_queries(qr, _TOKAMAX_BLOCK) if name == "mosaic_tpu" else (qr, qr.shape[2])
    k, v, mask = _pad_keys(k, v, mask, _TOKAMAX_BLOCK)
    c, tqp = k.shape[1], qp.shape[2]
    rows = b * qb
    q2 = qp.reshape(rows, tqp, n, h)
    k2, v2 = (jnp.repeat(a, qb, axis=0) for a in (k, v))  # one chunk per query block: small
    vis = mask.reshape(rows, c)
    out, lse = _tokamax_rows(name, q2, k2, v2, vis, per_row=name == "mosaic_tpu")
    out = out.reshape(b, qb, tqp, n, h)[:, :, :tq].astype(F32)
    lse = lse.reshape(b, qb, tqp, n)[:, :, :tq]
    return out, lse


def _tokamax_rows(name: str, q, k, v, vis, per_row: bool):
    """tokamax attention of q [R, T, N, H] over k, v [R, C, N, H], row r seeing the keys vis[r]
    (bool [R, C]): (out [R, T, N, H] in q's dtype, lse [R, T, N] f32). per_row: one call per row
    with the mask dense over the row's queries (Mosaic TPU's form); else one call, the mask
    broadcast over queries and heads."""
    op = _tokamax_ops()[name]
    half = {jnp.dtype(jnp.bfloat16): jax.lax.DotAlgorithmPreset.BF16_BF16_F32,
            jnp.dtype(jnp.float16): jax.lax.DotAlgorithmPreset.F16_F16_F32}.get(jnp.dtype(q.dtype))

    def call(q, k, v, mask):
        out, (m, second) = op(q, k, v, mask=mask, precision=half, return_residuals=True)
        # residuals [..., heads, tokens]: (max logit, softmax denominator), but (max logit,
        # log-sum-exp) from Mosaic TPU (tokamax 0.0.12)
        lse = second if name == "mosaic_tpu" else m + jnp.log(second)
        return out, jnp.swapaxes(lse, -1, -2).astype(F32)

    # as for splash: Mosaic refuses a bf16 matmul at a process-wide fp32 contract precision, and
    # tokamax's TPU kernel does not pass `precision` on
    with jax.default_matmul_precision("default") if half is not None else contextlib.nullcontext():
        if per_row:  # [1 (heads), T, C]: dense over the row's queries
            row = lambda qi, ki, vi, si: call(qi, ki, vi, jnp.broadcast_to(si, (1, qi.shape[0], si.shape[0])))
            return jax.vmap(row)(q, k, v, vis)
        return call(q, k, v, vis[:, None, None, :])  # [R, 1 (heads), 1 (queries), C]


# -- cuDNN (GPU) ------------------------------------------------------------------------------


def _attend_cudnn(q, ks, vs, key_mask):
    if q.dtype not in (jnp.bfloat16, jnp.float16):  # cuDNN flash attention is half precision only
        _refuse("cudnn", f"dtype {q.dtype} (cuDNN flash attention takes bf16/fp16)")
        return attend(q, ks, vs, key_mask, implementation="chunked")
    if len(ks) == 1:
        return _cudnn_one(q, ks[0], vs[0], key_mask)
    # the first part (the clean cache) is left out of the call when no query block sees it
    s0 = ks[0].shape[1]
    rest = lambda: _cudnn_one(q, jnp.concatenate(ks[1:], 1) if len(ks) > 2 else ks[1],
                              jnp.concatenate(vs[1:], 1) if len(vs) > 2 else vs[1], key_mask[:, :, s0:])
    whole = lambda: _cudnn_one(q, jnp.concatenate(ks, 1), jnp.concatenate(vs, 1), key_mask)
    return jax.lax.cond(jnp.any(key_mask[:, :, :s0]), whole, rest)


def _cudnn_one(q, k, v, key_mask):
    # Fold query blocks into the batch (keys repeated per query block) so each batch row has
    # one block's queries and that block's key mask.
    b, t, n, h = q.shape
    qb = key_mask.shape[1]
    qr = q.reshape(b * qb, t // qb, n, h)
    kr, vr = (jnp.repeat(a, qb, axis=0) if qb > 1 else a for a in (k, v))
    # cuDNN wants its bias as [batch, 1, T, S] (no broadcast over T), so the block's key mask is
    # expanded over the block's queries: one bias per query block, not per head.
    mask = jnp.broadcast_to(key_mask[:, :, None, :], (b, qb, t // qb, k.shape[1])).reshape(b * qb, 1, t // qb, -1)
    try:
        out = jax.nn.dot_product_attention(qr, kr, vr, mask=mask, implementation="cudnn")
    except (ValueError, NotImplementedError, TypeError, RuntimeError) as e:  # no cuDNN, or a shape it refuses
        _refuse("cudnn", str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
        return attend(q, k, v, key_mask, implementation="chunked")
    return out.reshape(b, t, n, h)


def _attend_fused(q, k, v, key_mask):
    """The cuDNN path on one key array (kept for callers and tests of the fused path)."""
    if key_mask is None:
        key_mask = jnp.ones((1, 1, k.shape[1]), bool)
    return _attend_cudnn(q, (k,), (v,), key_mask)

