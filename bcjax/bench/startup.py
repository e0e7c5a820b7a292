"""Cold vs warm start: time to the first block of a fresh process, with an empty and a filled
persistent compilation cache (`bcjax bench startup [--preset tiny --latent-hw 8 8 --stagger P4]`).

Each start is a new Python process (imports, model init, compile or cache load, first block),
as a user restarting a job sees it; the cache is a fresh temporary directory unless --cache-dir.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from bcjax.flags import OldName
from bcjax.names import GRID_STAGGERS

_CHILD = r"""
import json, sys, time
t0 = time.perf_counter()
import jax, jax.numpy as jnp
import bcjax
bcjax.compile_cache.enable_unless_configured()  # as the `bcjax` command does
from bcjax.model import WanConfig, text_kv, init_params
from bcjax.pipeline import PipelineConfig
from bcjax.runners import make_runner
events = {"hits": 0, "misses": 0}
def listen(name, **_):
    if name.endswith("/cache_hits"): events["hits"] += 1
    if name.endswith("/cache_misses"): events["misses"] += 1
jax.monitoring.register_event_listener(listen)
preset, h, w, stagger = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
t_import = time.perf_counter() - t0
cfg = WanConfig.preset(preset)
params = init_params(cfg, jax.random.key(0), (h, w))
text = text_kv(cfg, params, jnp.zeros((1, cfg.text_len, cfg.text_dim)))
pcfg = PipelineConfig(window_frames=12, sink_frames=3)
runner = make_runner(cfg, pcfg, (h, w), stagger)
_, first = next(runner.blocks(params, text, jax.random.key(1), num_blocks=4))
jax.block_until_ready(first)
print(json.dumps({"first_block_s": time.perf_counter() - t0, "import_s": t_import,
                  "cache": bcjax.compile_cache.current(), **events}))
"""


def start(cache_dir: str | None, preset: str, hw, stagger: str) -> dict:
    env = dict(os.environ, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"))
    env["BCJAX_COMPILE_CACHE"] = cache_dir or "off"
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, preset, str(hw[0]), str(hw[1]), stagger], env=env,
                       capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"start-up child failed:\n{r.stderr[-3000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["process_s"] = time.perf_counter() - t0
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bcjax bench startup", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--latent-hw", type=int, nargs=2, default=(8, 8))
    p.add_argument("--stagger", "--schedule", dest="stagger", default="P4", choices=GRID_STAGGERS,
                   action=OldName, new="--stagger", help="--schedule: its deprecated name")
    p.add_argument("--cache-dir", help="cache directory to use (default: a fresh temporary one)")
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        cache = a.cache_dir or os.path.join(tmp, "cache")
        runs = {"uncached": start(None, a.preset, a.latent_hw, a.stagger),
                "cold": start(cache, a.preset, a.latent_hw, a.stagger),
                "warm": start(cache, a.preset, a.latent_hw, a.stagger)}
        entries = sum(len(files) for _, _, files in os.walk(cache))
    for name, r in runs.items():
        print(f"{a.preset} {a.stagger} {name:>8}: first block after {r['first_block_s']:.2f} s "
              f"(imports {r['import_s']:.2f} s, process {r['process_s']:.2f} s), "
              f"cache hits {r['hits']}, misses {r['misses']}")
    print(f"cache entries {entries}; "
          f"warm start saves {runs['cold']['first_block_s'] - runs['warm']['first_block_s']:.2f} s")
    return {"runs": runs, "entries": entries}


if __name__ == "__main__":
    main()
