"""Conversion cost of a real-shaped checkpoint: time and peak host memory of `bcjax convert`.

    python -m bcjax.bench.convert [--preset tiny|wan2.1-1.3b] [--dtype bfloat16] [--workdir DIR]

The default preset is tiny (seconds, megabytes); the real cost needs `--preset wan2.1-1.3b`
(about 9 GB of host memory and 5.7 GB of disk), whose needs are printed before anything starts.

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


def needs(cfg: WanConfig, dtype: str) -> tuple[int, int]:
    """(disk, host memory) bytes a run needs, roughly: the source plus the converted folder (same
    dtype) on disk; the converter's peak, a process's own 0.5 GB plus the source's bytes and a
    float32 working copy (1.3B in bfloat16: 9.0 GB estimated, 8.3 GB measured)."""
    params = sum(int(np.prod(shape)) for shape, _ in wan_conv.original_layout(cfg).values())
    itemsize = 2 if dtype == "bfloat16" else 4
    return 2 * params * itemsize, 5 * 10**8 + params * (itemsize + 4)


def _bytes(n: int) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 10**8 else f"{n / 1e6:.1f} MB"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bcjax bench convert", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=WanConfig.preset_names(),
                    help="DiT shapes (default tiny; wan2.1-1.3b for the real cost: about 9 GB of memory, 5.7 GB of "
                         "disk)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--workdir", help="where to write the random source and the converted folder (default: a temp dir)")
    args = ap.parse_args(argv)
    cfg = WanConfig.preset(args.preset)
    disk, memory = needs(cfg, args.dtype)
    print(f"bcjax bench convert: {args.preset} ({args.dtype}) needs about {_bytes(disk)} of disk "
          f"(the random source and the converted folder) and {_bytes(memory)} of host memory", flush=True)
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
