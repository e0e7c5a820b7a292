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
from checkpoints_conv import wan as wan_conv


def write_random(path: str, cfg: WanConfig, dtype: str) -> int:
    """A random original-layout checkpoint at `path` (safetensors, torch-free writer). Returns bytes."""
    import json

    import ml_dtypes

    np_dtype, tag = (np.dtype(ml_dtypes.bfloat16), "BF16") if dtype == "bfloat16" else (np.dtype(np.float32), "F32")
    shapes = {key: shape for key, (shape, _) in wan_conv.original_layout(cfg).items()}
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
        for shape in shapes.values():
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
        out_bytes = (sum(os.path.getsize(os.path.join(r, n)) for r, _, fs in os.walk(dst) for n in fs)
                     if os.path.isdir(dst) else 0)
        print(f"bcjax convert: {wall:.1f} s wall (process start included), peak host memory {child_peak:.2f} GB, "
              f"checkpoint {out_bytes / 1e9:.2f} GB on disk")
        return proc.returncode


if __name__ == "__main__":
    raise SystemExit(main())
