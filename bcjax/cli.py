"""The `bcjax` command line: info, demo, bench."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def _info(args) -> int:
    import importlib.metadata as md

    import jax

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "safetensors", "torch", "diffusers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    devices = jax.devices()
    print(f"bcjax {md.version('bcjax')}  python {sys.version.split()[0]}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    print(f"backend: {jax.default_backend()}  processes: {jax.process_count()}  devices: {len(devices)}")
    for d in devices:
        print(f"  {d.id}: {d.device_kind} ({d.platform})")
    n = len(devices)
    print(f"mesh: ('stage',) = ({n},): a P4 cascade of a 4-step model keeps 5 blocks in flight, "
          f"{'one per device' if n == 5 else 'batched per device' if n < 5 else 'extra devices idle or on a model axis'}")
    return 0


def _save_atomic(path: str, array) -> None:
    import numpy as np

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy", delete=False) as f:
        np.save(f, np.asarray(array))
        tmp = f.name
    os.replace(tmp, path)


def _demo(args) -> int:
    import jax
    import jax.numpy as jnp

    import ports
    from bcjax.model import WanConfig, encode_text, init_params
    from bcjax.pipeline import SequentialPipeline

    port = ports.get(args.port)
    cfg = WanConfig.preset("tiny")
    h, w = args.latent_hw
    print(f"bcjax demo: tiny random-weight Wan DiT ({cfg.num_layers} layers, dim {cfg.dim}), "
          f"{port.name} sampling ({port.pipeline.num_steps} steps, window {port.pipeline.window_frames} frames, "
          f"sink {port.pipeline.sink_frames}), latents {h}x{w}, {args.blocks} blocks, on {jax.default_backend()}")
    print("(random weights: the trained toy-world checkpoint is not shipped yet, so this shows speed, not video)")
    key = jax.random.key(args.seed)
    params = init_params(cfg, jax.random.fold_in(key, 1), (h, w))
    prompt = jax.random.normal(jax.random.fold_in(key, 2), (1, cfg.text_len, cfg.text_dim))
    text = encode_text(cfg, params, prompt)
    pipe = SequentialPipeline(cfg, port.pipeline, (h, w))
    blocks, times = [], []
    t0 = time.perf_counter()
    for x0 in pipe.blocks(params, text, jax.random.fold_in(key, 3), args.blocks):
        blocks.append(jax.block_until_ready(x0))
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        print(f"  block {len(blocks) - 1}: {1e3 * times[-1]:8.1f} ms  |x0| mean {float(jnp.abs(x0).mean()):.3f}")
    steady = sorted(times[1:] or times)
    per_block = steady[len(steady) // 2]  # median: the first steady blocks still overlap async work
    print(f"first block (with compile): {1e3 * times[0]:.0f} ms; steady (median): {1e3 * per_block:.1f} ms/block, "
          f"{1e3 * per_block / (port.pipeline.num_steps + 1):.1f} ms/pass, {12 / per_block:.1f} FPS "
          f"(12 video frames per block)")
    if args.out:
        _save_atomic(args.out, jnp.concatenate(blocks, axis=1))
        print(f"latents [B, F, H, W, C] written to {args.out}")
    return 0


def _bench(args) -> int:
    if args.what == "sequential":
        from bcjax.bench import sequential

        return sequential.main(args.rest) or 0
    raise AssertionError(args.what)


def _positive(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bcjax", description="Block Cascading for block-causal Wan video models, in JAX.")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="devices, mesh and versions")
    s.set_defaults(fn=_info)

    s = sub.add_parser("demo", help="generate a few blocks with the tiny model and print timings")
    s.add_argument("--blocks", type=_positive, default=6)
    s.add_argument("--port", default="self_forcing", help="sampling preset: self_forcing, causvid, longlive, krea_14b")
    s.add_argument("--latent-hw", type=_positive, nargs=2, default=(8, 8), metavar=("H", "W"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", help="write the latents here (.npy, written atomically)")
    s.set_defaults(fn=_demo)

    s = sub.add_parser("bench", help="benchmarks (e.g. `bcjax bench sequential --preset tiny`)")
    s.add_argument("what", choices=["sequential"])
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    s.set_defaults(fn=_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:  # bad input: one clear line, no traceback
        print(f"bcjax {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
