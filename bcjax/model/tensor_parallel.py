"""Tensor-parallel weights: the `model` mesh axis (Megatron's layout of the Wan DiT).

With m devices on `model`, each holds num_heads / m attention heads and ffn_dim / m FFN columns:

* self- and cross-attention q/k/v are column-split (this device's heads, with their qk-norm
  scales), o is row-split: one psum per attention sublayer;
* ffn_0 is column-split, ffn_2 row-split: one psum for the FFN;
* the text K/V and the clean KV cache are split by heads like the k/v weights that made them;
* modulation, norms, embeddings and the head are replicated (small; the residual stream is
  replicated over `model`).

Wan's qk-norm is an RMS norm over all heads (dim), so a device's q and k need the sum of squares
of every device's heads: one more psum, of [B, T, 1] (tiny), per normed projection.

**shard_map over both axes, not sharding annotations under jit.** The communication decides it:

* The cascade already runs its tick under `shard_map` over `tokens`, with the per-layer K/V
  all-gather written by hand. With `model` in the same shard_map that all-gather stays exactly as
  it is and moves only this device's heads (1/m of the bytes); under jit annotations GSPMD would
  have to rediscover it from a sharded layout and may choose another collective.
* Every byte on the wire is one we wrote: three [B, T, dim] psums and three [B, T, 1] psums per
  layer, the `tokens` all-gather of [B, T_tick, heads/m, head_dim] K and V. `bcjax bench memory`
  counts them from the compiled HLO and checks them against that formula. Under annotations the
  partitioner chooses; with a head-spanning norm and the cache's dynamic-update-slices it can
  insert all-gathers of q/k or of the cache, invisible in the source.
* One mechanism for one process and many: shard_map over global arrays.

The cost is that the model code knows it is sharded: `forward`/`text_kv` take `model_axis`,
which only `layers.py` reads (its projections are sized num_heads / m, its output projections
are row-parallel). Nothing changes with model = 1: the same modules, no collectives.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from bcjax.model.config import WanConfig
from bcjax.model.quant import QVALUE, SCALE
from bcjax.names import MODEL  # re-exported: the axis this module splits over

# (module, parameter) of a block -> the axis of its per-layer shape split over `model`
_COLUMN = {(proj, "kernel"): 1 for proj in "qkv"} | {(proj, "bias"): 0 for proj in "qkv"} | {
    ("norm_q", "scale"): 0, ("norm_k", "scale"): 0, ("o", "kernel"): 0,
    ("ffn_0", "kernel"): 1, ("ffn_0", "bias"): 0, ("ffn_2", "kernel"): 0}

KV_SPEC = P(None, None, None, MODEL, None)  # [L, B, S, heads, head_dim]: split by heads


def model_size(mesh: Mesh | None) -> int:
    return 1 if mesh is None else mesh.shape.get(MODEL, 1)


def check_model_axis(cfg: WanConfig, model: int) -> None:
    """A clear error, before anything compiles, when `model` cannot split the heads or the FFN."""
    bad = [name for name, n in (("num_heads", cfg.num_heads), ("ffn_dim", cfg.ffn_dim)) if model < 1 or n % model]
    if bad:
        raise ValueError(f"mesh axis {MODEL!r} = {model} must divide num_heads = {cfg.num_heads} and ffn_dim = "
                         f"{cfg.ffn_dim} (it splits heads and FFN columns); it does not divide {' and '.join(bad)}")


def param_specs(params):
    """PartitionSpec per leaf of a DiT parameter tree (arrays or ShapeDtypeStructs)."""

    def spec(path, leaf):
        keys = [str(getattr(k, "key", "")) for k in path]
        part = None
        # a quantized kernel (bcjax.model.quant) is split as the kernel was
        if len(keys) > 2 and keys[-2] == "kernel" and keys[-1] in (QVALUE, SCALE):
            keys, part = keys[:-1], keys[-1]
        axis = _COLUMN.get((keys[-2], keys[-1])) if keys[0] == "blocks" and len(keys) > 1 else None
        if axis is None or (part == SCALE and axis == 0):  # a row-split kernel's scales are per output: whole
            return P()
        parts: list[str | None] = [None] * leaf.ndim
        parts[1 + axis] = MODEL  # after the stacked layer axis
        return P(*parts)

    return jax.tree_util.tree_map_with_path(spec, params)


def lora_specs(lora):
    """PartitionSpec per leaf of an adapter tree (`bcjax.model.lora`): the factors follow the
    kernel they adapt. A column-split kernel [in, out / m] keeps A [in, r] whole and splits B
    [r, out] by columns, so x A B_local is this device's output columns; a row-split kernel
    [in / m, out] splits A by rows and keeps B whole, so x_local A_local B is a partial sum that
    the sublayer's own psum completes. Leaves are [L, ...] (stacked layers)."""

    def spec(path, leaf):
        keys = [str(getattr(k, "key", "")) for k in path]
        axis = _COLUMN.get((keys[-2], "kernel"))
        if axis == 1 and keys[-1] == "kernel_lora_b":  # column-split: B's output columns
            return P(None, None, MODEL)
        if axis == 0 and keys[-1] == "kernel_lora_a":  # row-split: A's input rows
            return P(None, MODEL, None)
        return P()

    return jax.tree_util.tree_map_with_path(spec, lora)


def text_specs():
    """Specs of text_kv's KV: split by heads."""
    from bcjax.model.wan import KV

    return KV(KV_SPEC, KV_SPEC)  # type: ignore[arg-type]  # a tree of specs shaped like the K/V


def cache_specs():
    """Specs of a KVCache: K/V split by heads, frame ids and base replicated."""
    from bcjax.model.kv_cache import KVCache

    return KVCache(KV_SPEC, KV_SPEC, P(), P())  # type: ignore[arg-type]  # specs shaped like the cache


def shardings(mesh: Mesh, specs):
    return jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def place(tree, mesh: Mesh, specs):
    """`tree` on `mesh` with `specs` (global arrays over several processes; see bcjax.distributed.put)."""
    from bcjax.distributed import put

    return jax.tree_util.tree_map(put, tree, shardings(mesh, specs))


def _for_mesh(specs, mesh: Mesh | None):
    """specs with MODEL dropped when the mesh has no such axis (a plain 'tokens' mesh, or none)."""
    if mesh is not None and MODEL in mesh.shape:
        return specs
    return jax.tree_util.tree_map(lambda s: P(*(None if a == MODEL else a for a in s)), specs,
                                  is_leaf=lambda s: isinstance(s, P))


class Layout:
    """Where a runner's DiT tensors live on its mesh: params by `param_specs`, text K/V and the
    cache by heads (all replicated when model = 1), and the shard_map wrapper of its passes."""

    def __init__(self, cfg: WanConfig, mesh: Mesh | None, device=None):
        check_model_axis(cfg, model_size(mesh))
        self.cfg, self.mesh, self.model = cfg, mesh, model_size(mesh)
        self.axis = MODEL if self.model > 1 else None  # what forward(model_axis=) gets
        # without a mesh: the one device the passes compile for (a compile-only target's device,
        # or the default one); its platform picks the attention backend
        self.device = device if device is not None else mesh.devices.flat[0] if mesh is not None else jax.devices()[0]

    @classmethod
    def split_only(cls, cfg: WanConfig, mesh: Mesh | None) -> Layout:
        """The layout of a runner that uses a mesh only to split weights (the sequential
        pipeline, Krea's loop): one device (the mesh's first) unless the mesh's `model` axis is
        > 1 or the mesh is a TPU slice that must be used whole (a `tokens` axis then holds replicas)."""
        from bcjax.targets import whole_slice_required

        keep = mesh is not None and (model_size(mesh) > 1 or whole_slice_required(mesh.devices.flat))
        # a slice that must be used whole keeps its mesh: the passes run replicated over it
        return cls(cfg, mesh if keep else None, None if mesh is None else mesh.devices.flat[0])

    @property
    def platform(self) -> str:
        """The platform its programs compile for ("cpu", "gpu", "tpu")."""
        from bcjax.model.attention import platform_of

        return platform_of(self.mesh if self.mesh is not None else [self.device])

    def resolve(self, cfg: WanConfig) -> WanConfig:
        """cfg with "auto" attention resolved for this layout's platform (checked against it),
        also used by the layout itself from now on."""
        self.cfg = cfg.for_platform(self.platform)
        return self.cfg

    # -- abstract values: what `lower` takes in a process that cannot (or need not) allocate ---------
    def sharding(self, spec: P = P()):
        return NamedSharding(self.mesh, spec) if self.mesh is not None else SingleDeviceSharding(self.device)

    def abstract(self, tree, specs=None):
        """ShapeDtypeStructs of `tree` (arrays or ShapeDtypeStructs) placed by `specs` (a tree of
        PartitionSpecs; None: replicated), nothing allocated."""
        if specs is None:
            specs = jax.tree_util.tree_map(lambda _: P(), tree)
        flat_specs = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))
        leaves, treedef = jax.tree_util.tree_flatten(tree)
        return jax.tree_util.tree_unflatten(treedef, [
            jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=self.sharding(s))
            for a, s in zip(leaves, flat_specs, strict=True)])

    def abstract_params(self):
        from bcjax.model.wan import param_shapes

        shapes = param_shapes(self.cfg)
        return self.abstract(shapes, self.params if self.mesh is not None else None)

    def abstract_text(self, batch: int):
        from bcjax.model.wan import KV

        cfg = self.cfg
        kv = jax.ShapeDtypeStruct((cfg.num_layers, batch, cfg.text_len, cfg.num_heads, cfg.head_dim), cfg.compute_dtype)
        # abstract: ShapeDtypeStruct leaves stand in for the arrays
        abstract_kv = KV(kv, kv)  # type: ignore[arg-type]  # the type cannot say "array or its abstract value"
        return self.abstract(abstract_kv, self.text if self.mesh is not None else None)

    def abstract_cache(self, batch: int, capacity: int, tokens_per_frame: int):
        from bcjax.model.kv_cache import init_cache

        shapes = jax.eval_shape(lambda: init_cache(self.cfg, batch, capacity, tokens_per_frame))
        return self.abstract(shapes, self.cache if self.mesh is not None else None)

    def abstract_scalar(self, dtype=jnp.int32):
        return jax.ShapeDtypeStruct((), dtype, sharding=self.sharding())

    def abstract_key(self):
        return self.abstract(jax.eval_shape(lambda: jax.random.key(0)))

    def specs(self):
        """(params, text, cache) specs for `shard_map`; Nones without tensor parallelism, where
        shard_map is not used (no parameter shapes are traced for them)."""
        return (self.params, self.text, self.cache) if self.axis else (None, None, None)

    @functools.cached_property
    def params(self):
        from bcjax.model.wan import param_shapes

        return _for_mesh(param_specs(param_shapes(self.cfg)), self.mesh)

    @property
    def text(self):
        return _for_mesh(text_specs(), self.mesh)

    def lora(self, lora):
        """Specs of an adapter tree on this mesh (`lora_specs`; replicated when model = 1)."""
        return _for_mesh(lora_specs(lora), self.mesh)

    @property
    def cache(self):
        return _for_mesh(cache_specs(), self.mesh)

    def place(self, tree, spec: P):
        """Every leaf of `tree` on the mesh with one spec (P(): replicated)."""
        if self.mesh is None:
            raise ValueError("Layout.place needs a mesh (without one, use replicate)")
        return place(tree, self.mesh, jax.tree_util.tree_map(lambda _: spec, tree))

    def replicate(self, tree):
        """Leaves on every device of the mesh; without one, device arrays on the default device."""
        if self.mesh is None:
            return jax.tree_util.tree_map(jax.numpy.asarray, tree)
        return self.place(tree, P())

    def place_params(self, params):
        """params where the passes read them; quantized first when `cfg.quant` asks and they are
        not (quantize-at-load, `bcjax.model.quant.quantize`)."""
        from bcjax.model.quant import quantize

        params = quantize(params, self.cfg.quant)
        return params if self.mesh is None else place(params, self.mesh, self.params)

    def place_text(self, text):
        return text if self.mesh is None else place(text, self.mesh, self.text)

    def place_cache(self, cache):
        return cache if self.mesh is None else place(cache, self.mesh, self.cache)

    def init_cache(self, batch: int, capacity: int, tokens_per_frame: int):
        """An empty cache made where it lives (each device allocates only its heads)."""
        from bcjax.model.kv_cache import init_cache

        if self.mesh is None:
            return init_cache(self.cfg, batch, capacity, tokens_per_frame)
        return self._make_cache(batch, capacity, tokens_per_frame)

    @functools.cached_property
    def _make_cache(self):
        # one jitted maker per layout: a stream start must not recompile it (used with a mesh only)
        from bcjax.model.kv_cache import init_cache

        assert self.mesh is not None
        return jax.jit(functools.partial(init_cache, self.cfg), static_argnums=(0, 1, 2),
                       out_shardings=shardings(self.mesh, self.cache))

    def shard_map(self, fn, in_specs, out_specs):
        """fn(..., model_axis=) mapped over the whole mesh (the `model` axis splitting heads);
        fn itself (model_axis None) when model = 1."""
        if self.axis is None:
            return fn
        return jax.shard_map(functools.partial(fn, model_axis=self.axis), mesh=self.mesh, in_specs=in_specs,
                             out_specs=out_specs, check_vma=False)

    def text_kv(self, params, context):
        """`bcjax.model.wan.text_kv` on this layout: prompt embeddings [B, Lt, text_dim] (replicated) ->
        per-layer cross-attention K/V split by heads."""
        from bcjax.model.wan import text_kv

        if self.axis is None:
            from bcjax.model.quant import quantize

            return self.place_text(text_kv(self.cfg, quantize(params, self.cfg.quant), context))
        return self._text_kv(self.place_params(params), context)

    @functools.cached_property
    def _text_kv(self):
        # jitted once per layout: every prompt (a switch mid-stream included) reuses the program
        from bcjax.model.wan import text_kv

        return jax.jit(self.shard_map(lambda p, c, model_axis: text_kv(self.cfg, p, c, model_axis=model_axis),
                                      (self.params, P()), self.text))
