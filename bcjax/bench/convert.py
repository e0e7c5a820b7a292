"""Conversion cost of a real-shaped checkpoint: time and peak host memory of `bcjax convert`.

    python -m bcjax.bench.convert [--preset wan2.1-1.3b] [--dtype bfloat16] [--workdir DIR]

Writes a random original-Wan-layout DiT of the preset's shapes as one safetensors file (the
layout Wan2.1 ships), then runs `bcjax convert --from wan` on it in a fresh process, so the peak
resident memory reported is the converter's own.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

from bcjax.model.config import WanConfig


def original_layout_shapes(cfg: WanConfig) -> dict[str, tuple[int, ...]]:
    """Key -> shape of an original-layout Wan2.1 T2V DiT."""
    d, f = cfg.dim, cfg.ffn_dim
    pt, ph, pw = cfg.patch_size
    shapes = {"patch_embedding.weight": (d, cfg.in_channels, pt, ph, pw), "patch_embedding.bias": (d,),
              "head.head.weight": (cfg.out_channels * pt * ph * pw, d), "head.head.bias": (cfg.out_channels * pt * ph * pw,),
              "head.modulation": (1, 2, d)}
    for name, out, inp in [("text_embedding.0", d, cfg.text_dim), ("text_embedding.2", d, d),
                           ("time_embedding.0", d, cfg.freq_dim), ("time_embedding.2", d, d), ("time_projection.1", 6 * d, d)]:
        shapes |= {f"{name}.weight": (out, inp), f"{name}.bias": (out,)}
    for i in range(cfg.num_layers):
        p = f"blocks.{i}."
        for a in ("self_attn", "cross_attn"):
            for n in "qkvo":
                shapes |= {f"{p}{a}.{n}.weight": (d, d), f"{p}{a}.{n}.bias": (d,)}
            shapes |= {f"{p}{a}.norm_q.weight": (d,), f"{p}{a}.norm_k.weight": (d,)}
        shapes |= {f"{p}norm3.weight": (d,), f"{p}norm3.bias": (d,), f"{p}ffn.0.weight": (f, d), f"{p}ffn.0.bias": (f,),
                   f"{p}ffn.2.weight": (d, f), f"{p}ffn.2.bias": (d,), f"{p}modulation": (1, 6, d)}
    return shapes


def write_random(path: str, cfg: WanConfig, dtype: str) -> int:
    """A random original-layout checkpoint at `path` (safetensors, torch-free writer). Returns bytes."""
    import json

    import ml_dtypes

    np_dtype, tag = (np.dtype(ml_dtypes.bfloat16), "BF16") if dtype == "bfloat16" else (np.dtype(np.float32), "F32")
    shapes = original_layout_shapes(cfg)
    header, offset = {}, 0
    for key, shape in shapes.items():
        size = int(np.prod(shape)) * np_dtype.itemsize
        header[key] = {"dtype": tag, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(0)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little") + blob)
        for key, shape in shapes.items():
            f.write((rng.standard_normal(shape, np.float32) * 0.02).astype(np_dtype).tobytes())
    return 8 + len(blob) + offset


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bcjax bench convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="wan2.1-1.3b", choices=WanConfig.preset_names())
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--workdir", help="where to write the random source and the converted folder (default: a temp dir)")
    args = ap.parse_args(argv)
    cfg = WanConfig.preset(args.preset)
    with tempfile.TemporaryDirectory(dir=args.workdir) as work:
        src, dst = os.path.join(work, "diffusion_model.safetensors"), os.path.join(work, "bcjax_ckpt")
        t0 = time.perf_counter()
        size = write_random(src, cfg, args.dtype)
        print(f"random {args.preset} original-layout DiT, {args.dtype}: {size / 1e9:.2f} GB written in "
              f"{time.perf_counter() - t0:.1f} s")
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "bcjax.cli", "convert", "--from", "wan", src, dst],
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        print(proc.stdout.strip() or proc.stderr.strip())
        child_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
        out_bytes = sum(os.path.getsize(os.path.join(r, n)) for r, _, fs in os.walk(dst) for n in fs) if os.path.isdir(dst) else 0
        print(f"bcjax convert: {wall:.1f} s wall (process start included), peak host memory {child_peak:.2f} GB, "
              f"checkpoint {out_bytes / 1e9:.2f} GB on disk")
        return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
