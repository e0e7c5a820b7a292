"""The one prepared script for a lent accelerator: `bcjax bench gpu`, then `bcjax tune`, in under
ten minutes, for the 1.3B model at 480x832 on one device (random weights).

    python -m bcjax.bench.device [--out DIR] [--deadline 570] [--preset wan2.1-1.3b]
                                 [--latent-hw 60 104] [--attention pallas_gpu cudnn chunked]

Each part runs as its own process (the second starts with the device's memory free), with what
is left of `--deadline` as its limit: `bench gpu` gets at most half, `tune` the rest minus a
margin as its `--budget` (a tune stops starting candidates then, keeping what it measured). Every
line either prints is also written to DIR (bench-gpu.txt, tune.txt, the tune record under
DIR/tune/), and DIR/summary.json says what finished. On a CPU, `--preset tiny --latent-hw 8 8`
is the smoke run (a test does it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time

MARGIN_S = 90.0  # what a tune needs after its budget: the candidate in flight (a 1.3B compile), the table


def _run(name: str, cmd: list[str], limit_s: float, out_dir: str) -> dict:
    """Run `cmd`, echoing and saving its output (a thread copies it, so a silent compile cannot
    hold the deadline); killed past `limit_s`. Returns its summary."""
    path = os.path.join(out_dir, f"{name}.txt")
    t0 = time.perf_counter()
    print(f"\n== {name}: {' '.join(cmd)} (limit {limit_s:.0f} s) ==", flush=True)
    with open(path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

        def copy():
            assert proc.stdout is not None
            for line in proc.stdout:
                sys.stdout.write(line)
                sys.stdout.flush()
                log.write(line)

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        try:
            rc: int | str = proc.wait(timeout=limit_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "killed: past its limit"
        reader.join(timeout=10)
    return {"command": cmd, "rc": rc, "seconds": round(time.perf_counter() - t0, 1), "log": path}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bcjax.bench.device", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default="device-check", help="folder of the logs, the tune record and summary.json")
    ap.add_argument("--deadline", type=float, default=570.0, help="seconds for both parts together")
    ap.add_argument("--preset", default="wan2.1-1.3b")
    ap.add_argument("--latent-hw", type=int, nargs=2, default=(60, 104), metavar=("H", "W"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--attention", nargs="+", help="backends the tune measures (default: the platform's kernels, "
                                                   "tokamax's where installed, and chunked; dense's logits do not "
                                                   "fit at 480x832)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    os.makedirs(args.out, exist_ok=True)
    import jax

    from bcjax.model import attention

    dev = jax.devices()[0]
    platform = attention.platform_of([dev])
    backends = args.attention or [b for b in attention.installed_backends(platform) if b != "dense"]
    summary: dict = {"device": dev.device_kind, "platform": platform, "jax": jax.__version__,
                     "preset": args.preset, "latent_hw": list(args.latent_hw), "dtype": args.dtype}
    print(f"bcjax device check: {dev.device_kind} ({platform}) | jax {jax.__version__} | {args.preset} at "
          f"{args.latent_hw[0] * 8}x{args.latent_hw[1] * 8} | deadline {args.deadline:.0f} s", flush=True)
    hw = [str(x) for x in args.latent_hw]
    py = [sys.executable, "-m"]
    summary["bench_gpu"] = _run("bench-gpu", [*py, "bcjax.bench.gpu", "--preset", args.preset, "--latent-hw", *hw,
                                              "--dtype", args.dtype], args.deadline / 2, args.out)
    left = args.deadline - (time.perf_counter() - t0)
    budget = max(1.0, left - MARGIN_S)
    summary["tune"] = _run("tune", [*py, "bcjax.cli", "tune", "--preset", args.preset, "--latent-hw", *hw, "--dtype",
                                    args.dtype, "--attention", *backends, "--budget", f"{budget:.0f}", "--cache",
                                    os.path.join(args.out, "tune")], left, args.out)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    ok = summary["bench_gpu"]["rc"] == 0 and summary["tune"]["rc"] == 0
    print(f"\nbcjax device check: {'done' if ok else 'incomplete'} in {summary['seconds']:.0f} s; "
          f"logs in {args.out}/", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
