"""Sequential block-causal generation: bcjax's KV-cached block function vs diffusers, one run.

    python -m bcjax.bench.sequential [--preset tiny|wan2.1-1.3b] [--latent-hw H W] [--blocks N]
                                     [--dtype float32|bfloat16] [--no-torch] [--repeats R]
                                     [--attention auto|dense|chunked|...]

Both sides get the same random original-layout Wan weights. bcjax is timed in steady state (cache
full and rolling, compile excluded) and on a stream's first block (empty cache); diffusers, which
has no KV cache, is timed on one block alone and on the full uncached [context frames | block]
sequence that a cache-less driver re-runs every pass.
FPS = 12 video frames / seconds per block (one block = 3 latent frames = 12 video frames).
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.bench._common import VIDEO_FRAMES_PER_BLOCK, full_cache
from bcjax.model.config import WanConfig
from bcjax.model.wan import forward, text_kv
from bcjax.runners import make_runner
from bcjax.sampler import cached_pass
from bcjax.schedule.config import PipelineConfig
from checkpoints_conv import wan as wan_conv


class _RandomStateDict(Mapping):
    """A random original-layout state dict (fp32 numpy), each tensor drawn on access.

    Tensor i comes from its own seeded generator, so bcjax and diffusers read identical weights
    while at most one full copy of the 1.3B/14B weights is alive per consumer.
    """

    def __init__(self, cfg: WanConfig, seed: int = 0):
        self._layout, self._seed = wan_conv.original_layout(cfg), seed
        self._index = {k: i for i, k in enumerate(self._layout)}

    def __getitem__(self, key: str) -> np.ndarray:
        shape, kind = self._layout[key]
        z = np.random.default_rng([self._seed, self._index[key]]).standard_normal(shape, np.float32)
        return wan_conv.random_like_original(z, shape, kind)

    def __iter__(self) -> Iterator[str]:
        return iter(self._layout)

    def __len__(self) -> int:
        return len(self._layout)


def _to_device(tree):
    """numpy tree -> jax arrays in place, dropping each numpy leaf as soon as it is copied."""
    for k, v in tree.items():
        tree[k] = _to_device(v) if isinstance(v, dict) else jnp.asarray(v)
    return tree


def _ms(fn: Callable[[], object], repeats: int) -> float:
    """Median wall time of fn() in ms (fn must block until its result is ready)."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _bench_bcjax(cfg, pcfg, hw, context, blocks: int, repeats: int) -> dict[str, float]:
    params = _to_device(wan_conv.convert(_RandomStateDict(cfg), cfg))
    text = jax.block_until_ready(jax.jit(partial(text_kv, cfg))(params, jnp.asarray(context)))
    pipe, key, bf = make_runner(cfg, pcfg, hw), jax.random.key(0), pcfg.block_frames
    cache = full_cache(cfg, pcfg, 1, cfg.tokens_per_frame(*hw), jax.random.key(3))
    t0 = time.perf_counter()
    # AOT-compiled once: every later call reuses this executable (static shapes), so no call
    # below pays compilation.
    first = pcfg.cache_frames // bf  # the cache holds frames [0, cache_frames): blocks go on from there
    block_fn = pipe.lower(params, text, cache, key, jnp.int32(first)).compile()
    out = {"compile_s": time.perf_counter() - t0}
    print(f"bcjax: compiled block fn in {out['compile_s']:.1f} s; cache starts full ({pcfg.cache_frames} frames)",
          flush=True)
    per_block = []
    for b in range(first, first + 1 + blocks):  # one warm-up call, then the timed ones
        t0 = time.perf_counter()
        cache, x0 = jax.block_until_ready(block_fn(params, text, cache, key, jnp.int32(b)))
        per_block.append(1e3 * (time.perf_counter() - t0))
    print("bcjax: ms per block (first is warm-up): " + " ".join(f"{t:.1f}" for t in per_block), flush=True)
    out["block_ms"] = statistics.median(per_block[1:])
    # a stream's first block: the same executable on an empty cache (attention skips what no
    # query sees, so this is cheaper than the steady state above)
    empty_ms = []
    for _ in range(1 + blocks):
        empty = pipe.block_program.init_cache(1)
        t0 = time.perf_counter()
        jax.block_until_ready(block_fn(params, text, empty, key, jnp.int32(0)))
        empty_ms.append(1e3 * (time.perf_counter() - t0))
    print("bcjax: ms per block 0 on an empty cache (first is warm-up): " + " ".join(f"{t:.1f}" for t in empty_ms),
          flush=True)
    out["empty_block_ms"] = statistics.median(empty_ms[1:])

    # [batch, block_frames, H, W, C] at the first denoising timestep, the next block's positions
    x = jax.random.normal(jax.random.key(1), x0.shape)
    t = jnp.full((1, bf), float(pcfg.timesteps[0]))
    ids = (first + 1 + blocks) * bf + jnp.arange(bf)
    with_cache = jax.jit(lambda p, x, t, c, ids: cached_pass(cfg, p, x, t, text, c, ids)[0])
    alone = jax.jit(lambda p, x, t: forward(cfg, p, x, t, text, jnp.arange(bf))[0])
    for name, fn, fn_args in [("fwd_cache_ms", with_cache, (params, x, t, cache, ids)),
                              ("fwd_alone_ms", alone, (params, x, t))]:
        compiled = fn.lower(*fn_args).compile()  # compiled ahead, so the timed calls hold no compile
        out[name] = _ms(lambda: jax.block_until_ready(compiled(*fn_args)), repeats)  # noqa: B023 (called at once, inside this iteration)
    return out


def _bench_torch(cfg, pcfg, hw, context, repeats: int) -> dict[str, float]:
    import torch

    from checkpoints_conv.diffusers_oracle import masked_wan

    # parameters on the meta device, then adopted from the state dict: one copy, not two
    model, proc = masked_wan(cfg, {k: torch.from_numpy(v) for k, v in _RandomStateDict(cfg).items()}, empty_init=True)

    bf, p = pcfg.block_frames, cfg.tokens_per_frame(*hw)
    rng = np.random.default_rng(1)
    ctx = torch.from_numpy(context)
    # bcjax's "dtype" is the matmul/attention dtype with fp32 params; autocast is torch's equivalent
    autocast = torch.autocast("cpu", torch.bfloat16, enabled=cfg.dtype == "bfloat16")

    def inputs(frames: int):
        """x [1, C, F, H, W]; per-token t: clean context frames, then the block at the first step."""
        x = torch.from_numpy(rng.standard_normal((1, cfg.in_channels, frames, *hw), np.float32))
        t = np.repeat(np.r_[np.full(frames - bf, pcfg.context_noise), np.full(bf, pcfg.timesteps[0])], p)
        fb = np.repeat(np.arange(frames) // bf, p)  # block-causal: a token sees its block and older ones
        mask = None if frames == bf else torch.from_numpy(fb[None, :] <= fb[:, None])  # all-True: leave SDPA free
        return x, torch.from_numpy(t[None].astype(np.float32)), mask

    out: dict[str, float] = {}
    with torch.inference_mode(), autocast:
        for name, frames in [("fwd_alone_ms", bf), ("fwd_full_ms", pcfg.window_frames)]:
            x, t, proc.mask = inputs(frames)
            run = lambda: model(x, t, ctx, return_dict=False)[0]  # noqa: B023 (timed within this iteration)
            if not out:
                run()  # one warm-up (thread pool, allocator) before anything is timed
            out[name] = _ms(run, repeats)
            print(f"torch: {name} = {out[name]:.1f} ms ({frames} frames)", flush=True)
    out["uncached_block_ms"] = pcfg.num_steps * out["fwd_full_ms"]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bcjax bench sequential", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="tiny", choices=WanConfig.preset_names())
    ap.add_argument("--latent-hw", nargs=2, type=int, default=(8, 8), metavar=("H", "W"))
    ap.add_argument("--blocks", type=int, default=3, help="steady-state blocks timed after the cache is full")
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--no-torch", action="store_true", help="skip the diffusers oracle")
    ap.add_argument("--attention", default="auto", help="WanConfig.attention backend (default: by platform)")
    ap.add_argument("--repeats", type=int, help="timed repeats of each single forward pass (3 for tiny, else 1)")
    args = ap.parse_args(argv)
    if args.repeats is None:  # a real-size pass takes tens of seconds on a CPU
        args.repeats = 3 if args.preset == "tiny" else 1
    if args.blocks < 1 or args.repeats < 1:
        ap.error(f"--blocks {args.blocks} and --repeats {args.repeats} must both be >= 1")

    cfg = WanConfig.preset(args.preset, dtype=args.dtype, attention=args.attention)
    pcfg, hw = PipelineConfig(), tuple(args.latent_hw)
    context = np.random.default_rng(2).standard_normal((1, cfg.text_len, cfg.text_dim), np.float32)
    torch_version = "not used"
    if not args.no_torch:
        try:
            import diffusers  # noqa: F401 (the torch baseline needs it installed)
            import torch

            torch_version = f"{torch.__version__} ({torch.get_num_threads()} threads)"
        except ImportError as e:
            print(f"note: skipping the PyTorch oracle ({e}); install bcjax[convert] to include it")
            args.no_torch = True
    print(f"device {jax.devices()} | jax {jax.__version__} | torch {torch_version} | preset {args.preset} "
          f"dim {cfg.dim} layers {cfg.num_layers} heads {cfg.num_heads} | latent {hw[0]}x{hw[1]} "
          f"{cfg.tokens_per_frame(*hw)} tokens/frame | block {pcfg.block_frames} frames window "
          f"{pcfg.window_frames} (cache {pcfg.cache_frames}) | {pcfg.num_steps} steps | dtype {cfg.dtype} | "
          f"attention {cfg.attention}", flush=True)

    jx = _bench_bcjax(cfg, pcfg, hw, context, args.blocks, args.repeats)
    gc.collect()  # release bcjax's weights before diffusers builds its own copy
    th = None if args.no_torch else _bench_torch(cfg, pcfg, hw, context, args.repeats)

    fps = lambda ms: f"{VIDEO_FRAMES_PER_BLOCK / (ms / 1e3):.2f}"
    n, w = pcfg.num_steps, pcfg.window_frames
    rows = [(f"bcjax cached block fn ({n} denoise + 1 clean pass), full cache", "", f"{jx['block_ms']:.1f}",
             fps(jx["block_ms"])),
            ("bcjax cached block fn, empty cache (a stream's first block)", "", f"{jx['empty_block_ms']:.1f}",
             fps(jx["empty_block_ms"])),
            (f"bcjax 1 forward, block + full cache ({pcfg.cache_frames} frames)", f"{jx['fwd_cache_ms']:.1f}", "", ""),
            ("bcjax 1 forward, block alone (no context)", f"{jx['fwd_alone_ms']:.1f}", "", "")]
    if th is None:
        rows.append(("diffusers (PyTorch oracle)", "skipped", "", ""))
    else:
        u = th["uncached_block_ms"]
        rows += [("diffusers 1 forward, block alone (no context)", f"{th['fwd_alone_ms']:.1f}", "", ""),
                 (f"diffusers 1 forward, full sequence ({w} frames)", f"{th['fwd_full_ms']:.1f}", "", ""),
                 (f"diffusers uncached driver ({n} x full sequence)", "", f"{u:.1f}", fps(u))]
    width = max(len(r[0]) for r in rows)
    print(f"\nbcjax block fn compile: {jx['compile_s']:.1f} s (excluded below)")
    print(f"| {'':{width}} | ms/forward | ms/block |      FPS |\n"
          f"|{'-' * (width + 2)}|-----------:|---------:|---------:|")
    for name, f, b, s in rows:
        print(f"| {name:{width}} | {f:>10} | {b:>8} | {s:>8} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
