"""Compile-time memory of the real programs per attention backend: no accelerator needed.

    python -m bcjax.bench.memory [--preset wan2.1-1.3b wan2.1-14b] [--latent-hw 60 104]
                                 [--backends dense chunked ...] [--cases sequential p4 p4-mesh vae]
                                 [--meshes 5x1 5x2 5x4 5x8] [--port krea_14b_clean_pass]
                                 [--layers 1] [--dtype bfloat16]

Every figure comes from XLA's own buffer assignment of the compiled program
(`jit(...).lower(...).compile().memory_analysis()`), on the CPU backend, from abstract inputs
(nothing of the real size is allocated or run). Cases:

* sequential: the block function of the sequential pipeline (num_steps denoising passes and the
  clean pass over the clean cache; `SequentialPipeline._block_fn`);
* p4: one Block Cascading P4 tick with its 5 slots batched on one device;
* p4-mesh: the same tick under `shard_map` on a (stage, model) mesh per --meshes (default 5x1:
  5 stage devices), per device; the weights split over `model` (tensor parallel), the cache and
  text K/V by heads (this process forces 40 host devices when jax has not started yet);
* vae: the Wan VAE decoder's streaming step for one block (block_frames latent frames).

"temp/layer" is the temporaries of the program compiled with ONE DiT layer (what one layer's
activations and attention need: layers run one after another under `lax.scan`); "temp/model"
with every layer. Weights and the clean cache are the program's inputs at the model's size.
"CPU-only f32 upcasts" are f32 copies of whole layer stacks that only XLA:CPU makes (it has no
bf16 matmul); "total - upcasts" is the estimate for a bf16-native accelerator.
A pass of a kernel backend that the platform lacks (splash off TPU, Pallas GPU off GPU) is
compiled in interpret mode, whose memory says nothing about the kernel: such rows are skipped.
"""

from __future__ import annotations

import os

# The p4-mesh case needs up to 40 devices (5 x 8): forced here, which works as long as no jax
# backend has started yet (importing jax does not start one).
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=40"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import itertools  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

GiB = 2**30
CASES = ("sequential", "p4", "p4-mesh", "vae")


def _sds(tree, sharding=None):
    return jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


def _gib(x: float) -> str:
    return f"{x:.2f}" if x >= 0.01 else f"{x:.2e}"


def _nbytes(tree) -> int:
    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree))


def _inputs(cfg, pcfg, hw, batch: int = 1):
    """Abstract (params, text K/V, clean cache) of a model at latent size hw."""
    from bcjax.model.kv_cache import KVCache
    from bcjax.model.wan import KV, param_shapes

    params = param_shapes(cfg)
    heads = (cfg.num_heads, cfg.head_dim)
    dt = cfg.compute_dtype
    text = KV(*(jax.ShapeDtypeStruct((cfg.num_layers, batch, cfg.text_len, *heads), dt),) * 2)
    kv = jax.ShapeDtypeStruct((cfg.num_layers, batch, pcfg.cache_frames * cfg.tokens_per_frame(*hw), *heads), dt)
    cache = KVCache(kv, kv, jax.ShapeDtypeStruct((pcfg.cache_frames,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32))
    return params, text, cache


_CONVERT = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = f32\[(\d+),([\d,]*)\]\S* (?:convert\(|fusion\(.*calls=%wrapped_convert)")


def _cpu_upcasts(hlo: str, layers: int) -> float:
    """GiB of f32 copies of whole layer stacks in the entry computation: XLA:CPU has no bf16
    matmul, so it converts the stacked bf16 weights (and slices of the stacked K/V) to f32 once,
    outside the layer loop. A GPU or TPU compile has no such buffers."""
    entry = hlo[hlo.index("\nENTRY"):] if "\nENTRY" in hlo else hlo
    total = 0
    for line in entry.splitlines():
        m = _CONVERT.match(line)
        if m and int(m.group(1)) == layers and layers > 1:
            total += 4 * layers * int(np.prod([int(d) for d in m.group(2).split(",") if d]))
    return total / GiB


def _analyse(lowered, layers: int = 1) -> dict[str, float]:
    t0 = time.perf_counter()
    compiled = lowered.compile()
    m = compiled.memory_analysis()
    return {"temp": m.temp_size_in_bytes / GiB, "args": m.argument_size_in_bytes / GiB,
            "out": m.output_size_in_bytes / GiB, "alias": m.alias_size_in_bytes / GiB,
            "upcast": _cpu_upcasts(compiled.as_text(), layers) if jax.default_backend() == "cpu" else 0.0,
            "compile_s": time.perf_counter() - t0}


def _per_device(tree, specs, model: int) -> int:
    """Bytes one device holds of `tree` laid out by `specs` (leaves split over 'model' by `model`)."""
    from bcjax.model.tensor_parallel import MODEL

    leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, P))
    return sum(_nbytes(a) // (model if MODEL in s else 1) for a, s in zip(jax.tree_util.tree_leaves(tree), leaves))


def _lower_dit(case: str, cfg, pcfg, hw, mesh_shape: tuple[int, int] = (5, 1)):
    """The lowered program of a DiT case, and the bytes of its weights and cache inputs per device."""
    from bcjax.cascade import Cascade, make_mesh
    from bcjax.cascade.tick import CascadeState
    from bcjax.pipeline.sequential import SequentialPipeline

    params, text, cache = _inputs(cfg, pcfg, hw)
    key = jax.random.key(0)
    if case == "sequential":
        lowered = SequentialPipeline(cfg, pcfg, hw)._block_fn.lower(params, text, cache, key, jnp.int32(7))
        return lowered, _nbytes(params), _nbytes(cache)
    mesh = None
    if case == "p4-mesh":
        n = mesh_shape[0] * mesh_shape[1]
        if jax.device_count() < n:
            raise RuntimeError(f"case p4-mesh {mesh_shape} needs {n} devices; jax has {jax.device_count()} (run this "
                               "module as its own process so it can force 40 host devices)")
        mesh = make_mesh(*mesh_shape, devices=jax.devices()[:n], cfg=cfg)
    cas = Cascade(cfg, pcfg, hw, schedule="P4", window="bidirectional", mesh=mesh)
    x = jax.ShapeDtypeStruct((cas.stagger.num_slots, 1, *cas.spec.block_shape), jnp.float32)
    scalar = jax.ShapeDtypeStruct((), jnp.int32)
    if mesh is None:
        state = CascadeState(x, cache, scalar, scalar)
        args = (params, text, key, jnp.int32(100), state)
    else:
        from bcjax.model.tensor_parallel import shardings

        rep, lay = NamedSharding(mesh, P()), cas.layout

        def put(tree, specs):
            return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree,
                                          shardings(mesh, specs))

        state = CascadeState(_sds(x, NamedSharding(mesh, P("stage"))), put(cache, lay.cache), _sds(scalar, rep),
                             _sds(scalar, rep))
        args = (put(params, lay.params), put(text, lay.text), key, jnp.int32(100), state)
        model = mesh_shape[1]
        return cas._step.lower(*args), _per_device(params, lay.params, model), _per_device(cache, lay.cache, model)
    return cas._step.lower(*args), _nbytes(params), _nbytes(cache)


def _vae_row(latent_hw, block_frames: int, dtype: str) -> dict[str, float]:
    from bcjax.vae.wan_vae import VAEConfig, _cache_shapes, decode_step, param_shapes

    vcfg = VAEConfig.preset("wan2.1", dtype=dtype, param_dtype=dtype)
    params = param_shapes(vcfg)
    from bcjax.vae.wan_vae import DecodeState

    state = DecodeState(_cache_shapes(vcfg, 1, latent_hw), jax.ShapeDtypeStruct((), jnp.int32))
    z = jax.ShapeDtypeStruct((1, block_frames, *latent_hw, vcfg.z_dim), jnp.float32)
    row = _analyse(decode_step.lower(vcfg, params, state, z))
    row["weights"], row["cache"] = _nbytes(params) / GiB, _nbytes(state.cache) / GiB
    return row


def available_backends() -> list[str]:
    from bcjax.model import attention

    return list(attention.backends_for(jax.default_backend()))


def main(argv=None) -> int:
    from bcjax.model.config import WanConfig
    from bcjax.pipeline.config import PipelineConfig

    ap = argparse.ArgumentParser(prog="bcjax bench memory", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", nargs="+", default=["wan2.1-1.3b", "wan2.1-14b"], choices=WanConfig.preset_names())
    ap.add_argument("--latent-hw", nargs=2, type=int, default=(60, 104), metavar=("H", "W"))
    ap.add_argument("--backends", nargs="+", help="attention backends (default: every one this platform runs)")
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--layers", type=int, nargs="+", default=None,
                    help="layer counts to compile (default: 1 and the model's; `--layers 1` is the quick subset)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--meshes", nargs="+", default=["5x1"], metavar="STAGExMODEL",
                    help="meshes of the p4-mesh case (model > 1: tensor-parallel weights)")
    ap.add_argument("--port", help="the sampler's window and steps from this port (default: PipelineConfig())")
    args = ap.parse_args(argv)
    backends = args.backends or available_backends()
    meshes = [tuple(int(v) for v in m.lower().split("x")) for m in args.meshes]
    hw = tuple(args.latent_hw)
    if args.port:
        import ports

        pcfg = ports.get(args.port).pipeline
    else:
        pcfg = PipelineConfig()
    print(f"jax {jax.__version__} | {jax.default_backend()} x{jax.device_count()} | latent {hw[0]}x{hw[1]} | "
          f"{args.dtype} weights and compute | window {pcfg.window_frames} frames (cache {pcfg.cache_frames}) | "
          f"block {pcfg.block_frames} frames | XLA memory_analysis of the compiled program (GiB, per device)", flush=True)
    head = ("| model | case | backend | layers | temp | weights | cache | total = args+temp+out-alias | "
            "CPU-only f32 upcasts | total - upcasts | compile s |")
    print(head + "\n|" + "---|" * (head.count("|") - 1), flush=True)
    for preset in args.preset:
        base = WanConfig.preset(preset, dtype=args.dtype, param_dtype=args.dtype)
        runs = [(case, m) for case in args.cases if case != "vae"
                for m in (meshes if case == "p4-mesh" else [None])]
        for (case, mesh_shape), backend, layers in itertools.product(runs, backends, args.layers or [1, base.num_layers]):
            cfg = dataclasses.replace(base, num_layers=layers, attention=backend)
            label = case if mesh_shape is None else f"p4-mesh:{mesh_shape[0]}x{mesh_shape[1]}"
            try:
                lowered, weights, cache = _lower_dit(case, cfg, pcfg, hw, *([mesh_shape] if mesh_shape else []))
                r = _analyse(lowered, layers)
            except Exception as e:  # noqa: BLE001 - a row that cannot compile is reported, not fatal
                print(f"| {preset} | {label} | {backend} | {layers} | failed: {type(e).__name__}: "
                      f"{str(e).splitlines()[0][:160]} |", flush=True)
                continue
            total = r["args"] + r["temp"] + r["out"] - r["alias"]
            print(f"| {preset} | {label} | {backend} | {layers} | {_gib(r['temp'])} | {weights / GiB:.2f} | "
                  f"{cache / GiB:.2f} | {total:.2f} | {r['upcast']:.2f} | {total - r['upcast']:.2f} | "
                  f"{r['compile_s']:.0f} |", flush=True)
    if "vae" in args.cases:
        # one block per decode step, and Wan's own schedule (one latent frame per step) for scale;
        # its attention is per frame (h*w tokens of one latent frame), so its logits are
        # frames * (h*w)^2 * 4 bytes
        for frames in (pcfg.block_frames, 1):
            r = _vae_row(hw, frames, args.dtype)
            total = r["args"] + r["temp"] + r["out"] - r["alias"]
            logits = frames * (hw[0] * hw[1]) ** 2 * 4 / GiB
            print(f"| wan2.1 VAE | decode {frames} latent frame(s) (attention logits {logits:.2f}) | - | - | "
                  f"{_gib(r['temp'])} | {r['weights']:.2f} | {r['cache']:.2f} | {total:.2f} | - | - | "
                  f"{r['compile_s']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
