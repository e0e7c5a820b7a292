"""One command for a GPU box: bcjax's speed at the real size, random weights, every figure printed.

    python -m bcjax.bench.gpu [--preset wan2.1-1.3b] [--latent-hw 60 104] [--dtype bfloat16]
                              [--blocks 3] [--link-gbps 450] [--backends cudnn pallas_gpu ...]

Prints, for the model at the latent size (speed does not depend on the weights, so they are random):
* sequential: steady-state block time (cache full) -> denoise FPS; with the streamed VAE decode of
  each block -> end-to-end FPS; time to first frame (block 0 on an empty cache + its decode);
* P4 bidirectional, every slot batched on this device: tick time -> FPS;
* one block's share of a 5-device P4 tick (its block's queries over the cache and all in-flight blocks'
  K/V) + the per-layer K/V all-gather bytes at --link-gbps -> modelled 5-device P4 FPS;
* one layer's self-attention (sequential pass, full cache) per attention backend of the platform;
* peak device memory (where the platform reports it).
Compiles are timed and excluded from the figures. FPS = 12 video frames / seconds per block.
Runs anywhere; `--preset tiny --latent-hw 8 8` is the CPU smoke run (a test does it).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from bcjax.bench._common import VIDEO_FRAMES_PER_BLOCK, full_cache, median_seconds
from bcjax.model import attention
from bcjax.model.config import WanConfig
from bcjax.model.wan import KV, forward, init_params, text_kv
from bcjax.runners import make_runner
from bcjax.schedule.config import PipelineConfig


def _compiled(label: str, jitted, *args):
    t0 = time.perf_counter()
    c = jitted.lower(*args).compile()
    print(f"  compiled {label} in {time.perf_counter() - t0:.1f} s", flush=True)
    return c


def _peak_gib() -> str:
    stats = jax.devices()[0].memory_stats() or {}
    peak = stats.get("peak_bytes_in_use")
    return "n/a (the platform reports no memory stats)" if peak is None else f"{peak / 2**30:.2f} GiB"


def _fps(seconds_per_block: float) -> float:
    return VIDEO_FRAMES_PER_BLOCK / seconds_per_block


def run(args) -> dict:
    from bcjax.vae import wan_vae

    cfg = WanConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, attention=args.attention)
    pcfg, hw = PipelineConfig(), tuple(args.latent_hw)
    p, bf = cfg.tokens_per_frame(*hw), pcfg.block_frames
    platform = jax.default_backend()
    print(f"device {jax.devices()[0].device_kind} ({platform}) x{jax.device_count()} | jax {jax.__version__} | "
          f"{args.preset} dim {cfg.dim} layers {cfg.num_layers} heads {cfg.num_heads} | {cfg.dtype} | latent "
          f"{hw[0]}x{hw[1]} = {p} tokens/frame | block {bf} frames, window {pcfg.window_frames} | "
          f"{pcfg.num_steps} steps | attention {cfg.attention}", flush=True)
    key = jax.random.key(0)
    params = init_params(cfg, key, hw)
    text = text_kv(cfg, params, jax.random.normal(key, (1, cfg.text_len, cfg.text_dim)))
    vcfg = wan_vae.VAEConfig.preset("tiny" if args.preset == "tiny" else "wan2.1", dtype=args.dtype,
                                     param_dtype=args.dtype)
    vparams = wan_vae.init_params(vcfg, jax.random.key(1))
    out: dict[str, float] = {}

    print("\n== compile ==", flush=True)
    pipe = make_runner(cfg, pcfg, hw)
    first = pcfg.cache_frames // bf  # a full cache holds frames [0, cache_frames)
    cache = full_cache(cfg, pcfg, 1, p, key)
    block_fn = _compiled("sequential block fn", pipe, params, text, cache, key, jnp.int32(first))
    vstate = wan_vae.init_decode_state(vcfg, 1, hw)
    z = jnp.zeros((1, bf, *hw, vcfg.z_dim), jnp.float32)
    decode = _compiled("VAE decode step (one block)", wan_vae.decode_step, vcfg, vparams, vstate, z)

    print("\n== sequential ==", flush=True)
    times, e2e = [], []
    b = first
    for i in range(args.blocks + 1):  # the first call warms up
        t0 = time.perf_counter()
        cache, x0 = jax.block_until_ready(block_fn(params, text, cache, key, jnp.int32(b)))
        t1 = time.perf_counter()
        vstate, video = jax.block_until_ready(decode(vparams, vstate, x0))
        t2 = time.perf_counter()
        if i:
            times.append(t1 - t0)
            e2e.append(t2 - t0)
        b += 1
    out["seq_block_s"], out["seq_e2e_s"] = statistics.median(times), statistics.median(e2e)
    ttff = []
    for _ in range(2):  # a new stream: block 0 on an empty cache, then its decode (the first step pads)
        empty, fresh = pipe.block_program.init_cache(1), wan_vae.init_decode_state(vcfg, 1, hw)
        jax.block_until_ready((empty, fresh))
        t0 = time.perf_counter()
        _, x0 = block_fn(params, text, empty, key, jnp.int32(0))
        jax.block_until_ready(decode(vparams, fresh, x0))
        ttff.append(time.perf_counter() - t0)
    out["ttff_s"] = min(ttff)
    print(f"  denoise: {1e3 * out['seq_block_s']:.1f} ms/block = {_fps(out['seq_block_s']):.2f} FPS (cache full)")
    print(f"  with streamed VAE decode: {1e3 * out['seq_e2e_s']:.1f} ms/block = {_fps(out['seq_e2e_s']):.2f} FPS "
          f"end to end; video block {tuple(video.shape)}")
    print(f"  time to first frame (block 0, empty cache, + decode): {1e3 * out['ttff_s']:.1f} ms", flush=True)
    del cache

    print("\n== P4 bidirectional, every slot batched on this device ==", flush=True)
    cas = make_runner(cfg, pcfg, hw, "P4", "bidirectional")
    st = cas.plan
    steady = st.num_stages + first  # every slot busy, cache full
    state = cas.tick_program.init_state(1)
    state = state._replace(x=jax.random.normal(key, state.x.shape), cache=full_cache(cfg, pcfg, 1, p, key),
                           tick=jnp.int32(steady))
    nb = jnp.int32(10**6)
    step = _compiled("P4 tick", cas, params, text, key, nb, state)
    ticks = []
    for i in range(args.blocks + 1):
        t0 = time.perf_counter()
        state, emitted = step(params, text, key, nb, state)
        jax.block_until_ready(emitted)
        if i:
            ticks.append(time.perf_counter() - t0)
    out["p4_tick_s"] = statistics.median(ticks)
    print(f"  {1e3 * out['p4_tick_s']:.1f} ms/tick, {st.stride} tick(s)/block = "
          f"{_fps(out['p4_tick_s'] * st.stride):.2f} FPS ({st.num_slots} slots)", flush=True)
    del state

    print(f"\n== P4 on {st.num_slots} devices: one block's share of a tick, measured here, + all-gather model ==",
          flush=True)
    others = st.num_slots - 1
    cache = full_cache(cfg, pcfg, 1, p, key)
    extra = jax.random.normal(key, (cfg.num_layers, 1, others * bf * p, cfg.num_heads, cfg.head_dim), cfg.compute_dtype)
    ctx = KV(jnp.concatenate([cache.k, extra], axis=2), jnp.concatenate([cache.v, extra], axis=2))
    del cache, extra
    x = jax.random.normal(key, (1, bf, *hw, cfg.in_channels))
    frames = jnp.arange(bf) + pcfg.cache_frames
    share = jax.jit(lambda prm, c, xx: forward(cfg, prm, xx, jnp.full((1, bf), 500.0), text, frames, c)[0])
    share = _compiled("one block's pass", share, params, ctx, x)
    out["share_s"] = median_seconds(lambda c=ctx: jax.block_until_ready(share(params, c, x)), args.blocks)
    del ctx
    item = jnp.dtype(cfg.compute_dtype).itemsize
    gather = 2 * cfg.num_layers * others * bf * p * cfg.dim * item  # K and V of the other blocks, every layer
    out["gather_bytes"] = gather
    t_comm = gather / (args.link_gbps * 1e9)
    print(f"  one block's share of a tick: {1e3 * out['share_s']:.1f} ms; K/V all-gather {gather / 1e6:.1f} MB per "
          f"tick per device = {1e3 * t_comm:.2f} ms at {args.link_gbps:g} GB/s")
    for label, t in (("all-gather overlapped", max(out["share_s"], t_comm)),
                     ("all-gather serial", out["share_s"] + t_comm)):
        print(f"  modelled P4 on {st.num_slots} devices, {label}: {1e3 * t:.1f} ms/tick = "
              f"{_fps(t * st.stride):.2f} FPS")
    out["p4_5dev_fps"] = _fps((out["share_s"] + t_comm) * st.stride)

    print("\n== one layer's self-attention (sequential pass, full cache), per backend ==", flush=True)
    ks = jax.random.split(key, 5)
    heads = (cfg.num_heads, cfg.head_dim)
    cache_tokens, own = pcfg.cache_frames * p, bf * p
    q = jax.random.normal(ks[0], (1, own, *heads), cfg.compute_dtype)
    kc, vc = (jax.random.normal(k, (1, cache_tokens, *heads), cfg.compute_dtype) for k in ks[1:3])
    ko, vo = (jax.random.normal(k, (1, own, *heads), cfg.compute_dtype) for k in ks[3:5])
    masks = {"full cache": jnp.ones((1, 1, cache_tokens + own), bool)}
    masks["empty cache"] = masks["full cache"].at[:, :, :cache_tokens].set(False)
    for backend in args.backends or attention.installed_backends(platform):
        fn = jax.jit(lambda q, kc, ko, vc, vo, m, b=backend: attention.attend(q, (kc, ko), (vc, vo), m,
                                                                            implementation=b))
        try:
            c = fn.lower(q, kc, ko, vc, vo, masks["full cache"]).compile()
        except Exception as e:  # noqa: BLE001 - one backend failing must not hide the others
            print(f"  {backend:12} failed to compile: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
            continue
        cells = []
        for name, m in masks.items():
            t = median_seconds(lambda c=c, m=m: jax.block_until_ready(c(q, kc, ko, vc, vo, m)), args.repeats)
            out[f"attn_{backend}_{name}_s"] = t
            cells.append(f"{name} {1e3 * t:8.2f} ms")
        print(f"  {backend:12} " + " | ".join(cells), flush=True)

    print(f"\npeak device memory: {_peak_gib()}")
    print("\n| figure | value |\n|---|---|")
    rows = [("sequential denoise FPS", f"{_fps(out['seq_block_s']):.2f}"),
            ("sequential + streamed VAE decode FPS", f"{_fps(out['seq_e2e_s']):.2f}"),
            ("time to first frame", f"{1e3 * out['ttff_s']:.0f} ms"),
            ("P4 batched on one device FPS", f"{_fps(out['p4_tick_s'] * st.stride):.2f}"),
            ("P4 one block's share of a tick", f"{1e3 * out['share_s']:.1f} ms"),
            ("P4 all-gather per tick per device", f"{gather / 1e6:.1f} MB"),
            (f"modelled P4 on {st.num_slots} devices FPS (all-gather serial)", f"{out['p4_5dev_fps']:.2f}"),
            ("peak device memory", _peak_gib())]
    for label, value in rows:
        print(f"| {label} | {value} |")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bcjax bench gpu", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan2.1-1.3b", choices=WanConfig.preset_names())
    ap.add_argument("--latent-hw", nargs=2, type=int, default=(60, 104), metavar=("H", "W"))
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--attention", default="auto", help="backend of the pipeline runs (WanConfig.attention)")
    ap.add_argument("--backends", nargs="+",
                    help="backends of the per-layer attention timing (default: the platform's, tokamax's where "
                         "installed)")
    ap.add_argument("--blocks", type=int, default=3, help="timed blocks / ticks / repeats per figure")
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per attention backend")
    ap.add_argument("--link-gbps", type=float, default=450.0,
                    help="per-device all-gather bandwidth of the 5-device model (H100 NVLink4 ~450 GB/s per direction)")
    args = ap.parse_args(argv)
    if args.blocks < 1 or args.repeats < 1:
        ap.error(f"--blocks {args.blocks} and --repeats {args.repeats} must both be >= 1")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
