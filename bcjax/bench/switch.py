"""The stall at a prompt switch: LongLive's recache vs Block Cascading's no-recache, per pipeline.

    python -m bcjax.bench.switch [--preset tiny|wan2.1-1.3b] [--latent-hw H W] [--port longlive]
                                 [--blocks 8] [--switch-at 5] [--repeats 3]

For each pipeline (sequential; P4 cascade, bidirectional, batched on one device) and policy, a
stream of --blocks blocks switches prompt at block --switch-at. Reported: the steady time per
emitted block (median of the blocks before the switch), the time of the emitted block whose
interval holds the switch (in the cascade: the tick where the new prompt's first block enters),
and the stall = their difference (median over --repeats streams; the first stream compiles and
is discarded). The recache itself (one pass over the window under the new prompt) is also timed.
"""

from __future__ import annotations

import argparse
import statistics

import jax
import numpy as np

import ports
from bcjax.app.interactive import stream
from bcjax.model.config import WanConfig
from bcjax.model.wan import init_params, text_kv
from bcjax.names import Policy
from bcjax.pipeline.recache import POLICIES
from bcjax.runners import make_runner


def measure(runner, params, texts, key, blocks: int, switch_at: int, policy: Policy, repeats: int) -> dict:
    """{'steady_ms', 'switch_ms', 'stall_ms', 'recache_ms'} medians over `repeats` streams."""
    rows = []
    for r in range(repeats + 1):  # the first stream compiles
        events = list(stream(runner, params, [(0, texts[0]), (switch_at, texts[1])], key, blocks, policy=policy))
        if r == 0:
            continue
        at = next(i for i, e in enumerate(events) if e.switched)  # the interval the switch happened in
        before = [e.seconds for e in events[2:at]] or [events[at - 1].seconds]
        steady = statistics.median(before)
        sw = events[at].seconds
        rows.append((steady, sw, sw - steady, events[at].recache_s))
    med = np.median(np.asarray(rows), axis=0) * 1e3
    return dict(zip(("steady_ms", "switch_ms", "stall_ms", "recache_ms"), (float(v) for v in med), strict=True))


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="bcjax bench switch", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--latent-hw", type=int, nargs=2, default=(8, 8))
    p.add_argument("--port", default="longlive", help="sampler/window preset (LongLive: 12-frame window, 3-frame sink)")
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--switch-at", type=int, default=6, help="block id where the new prompt starts (> 4: P4 has filled)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--layers", type=int, help="override the preset's layer count (a reduced model)")
    a = p.parse_args(argv)
    if not 6 <= a.switch_at < a.blocks:
        raise SystemExit(f"--switch-at {a.switch_at} must lie in [6, --blocks {a.blocks}) "
                         "so the cascade is full before it")
    cfg = WanConfig.preset(a.preset, attention="xla")
    if a.layers:
        import dataclasses

        cfg = dataclasses.replace(cfg, num_layers=a.layers)
    port = ports.get(a.port)
    hw = tuple(a.latent_hw)
    params = init_params(cfg, jax.random.key(0), hw)
    rng = np.random.default_rng(0)
    texts = [text_kv(cfg, params, rng.standard_normal((1, cfg.text_len, cfg.text_dim)).astype(np.float32))
             for _ in range(2)]
    key = jax.random.key(1)
    print(f"prompt-switch stall: {a.preset} ({cfg.num_layers} layers, dim {cfg.dim}), latents {hw[0]}x{hw[1]}, "
          f"{port.name} window {port.pipeline.window_frames} frames (sink {port.pipeline.sink_frames}), "
          f"switch at block {a.switch_at} of {a.blocks}, {jax.default_backend()}, median of {a.repeats}")
    out = {}
    runners = {"sequential": make_runner(cfg, port.pipeline, hw), "P4-bidirectional": make_runner(
        cfg, port.pipeline, hw, "P4", "bidirectional")}
    for name, runner in runners.items():
        for policy in POLICIES:
            m = measure(runner, params, texts, key, a.blocks, a.switch_at, policy, a.repeats)
            out[f"{name}/{policy}"] = m
            print(f"  {name:<18s} {policy:<14s} steady {m['steady_ms']:9.2f} ms/block  block after switch "
                  f"{m['switch_ms']:9.2f} ms  stall {m['stall_ms']:+9.2f} ms  (recache pass {m['recache_ms']:8.2f} ms)")
    return out


if __name__ == "__main__":
    main()
