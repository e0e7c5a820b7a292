"""Block Cascading vs the sequential pipeline: critical path, FLOPs per tick, wall time, 5-device model.

    python -m bcjax.bench.cascade [--preset tiny|wan2.1-1.3b|wan2.1-14b] [--latent-hw H W]
                                  [--port self_forcing] [--ticks N] [--dtype float32|bfloat16]
                                  [--link-gbps 450]

Everything is measured in one run on whatever `jax.devices()[0]` is:
* critical path: dependent forward passes per emitted block in steady state (from the stagger);
* FLOPs per emitted block of every stagger x mask (`bcjax.names`: P4-no-clean, the
  restricted bidirectional masks), from the tick masks' visible keys;
* FLOPs (matmul count, XLA cost analysis as a cross-check) of a sequential cached pass, of a
  one-device batched tick and of one block's share of a sharded tick (its block's queries against
  cache + every in-flight block);
* wall time per emitted block: sequential block function vs P2/P4 ticks batched on one device;
* a one-block share of a tick (one block's pass with the other in-flight blocks' K/V as extra context),
  from which the FPS of a cascade with one block per device is estimated, adding the per-layer
  K/V all-gather at a stated link bandwidth. The model and its inputs are printed.
FPS = 12 video frames / seconds per emitted block (one block = 3 latent frames = 12 frames).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

import ports
from bcjax.bench._common import VIDEO_FRAMES_PER_BLOCK, full_cache, median_seconds
from bcjax.model.config import WanConfig
from bcjax.model.wan import KV, forward, init_params, text_kv
from bcjax.names import MASKS, Mask
from bcjax.runners import make_runner
from bcjax.sampler import cached_pass
from bcjax.schedule.stagger import make_stagger, slot_state


def _flops(jitted, *args) -> float:
    cost = jitted.lower(*args).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan")))


def _pass_flops(cfg: WanConfig, q_tokens: int, k_tokens: int) -> float:
    """Matmul FLOPs of one DiT pass: q_tokens queries, self-attention over k_tokens keys (masked
    keys are computed too), cross-attention over the prompt (its K/V are cached per prompt)."""
    d, f = cfg.dim, cfg.ffn_dim
    per_token = 8 * d * d + 4 * d * d + 4 * d * f + 4 * d * k_tokens + 4 * d * cfg.text_len
    embed_head = 2 * cfg.patch_features * d + 2 * d * cfg.out_channels * cfg.patch_size[1] * cfg.patch_size[2]
    return float(q_tokens * (cfg.num_layers * per_token + embed_head))


def variant_block_flops(cfg: WanConfig, pcfg, pp: int, stagger: str, mask: Mask) -> float:
    """Matmul FLOPs per emitted block of a cascade (stagger, mask) deep in a long stream, at
    `pp` tokens per frame: the stride ticks that emit one block, each busy slot's queries against
    the keys its row of the tick mask (`bcjax.cascade.masks`) lets it see (attention cost follows
    the visible keys); a cache of the sink and the rolling frames before the oldest block in flight."""
    import jax.numpy as jnp
    import numpy as np

    from bcjax.cascade.masks import tick_frame_mask

    st = make_stagger(stagger, pcfg.num_steps, clean_pass=pcfg.clean_pass)
    bf, sink, rolling, m = pcfg.block_frames, pcfg.sink_frames, pcfg.cache_frames - pcfg.sink_frames, st.num_slots
    total, big = 0.0, 10 ** 6
    first_tick = st.stride * (pcfg.window_frames + 2 * m)  # every slot busy, the cache long full
    for tau in range(first_tick, first_tick + st.stride):
        blocks, stages, busy = slot_state(st, tau, np.arange(m), big)
        oldest = int(blocks[busy].min())
        cache = np.concatenate([np.arange(sink), oldest * bf - rolling + np.arange(rolling)])
        seen = tick_frame_mask(jnp.arange(m), jnp.asarray(blocks), jnp.asarray(busy), jnp.asarray(cache),
                               block_frames=bf, sink=sink, rolling=rolling, mask=mask,
                               clean=jnp.asarray(busy & (stages == st.clean_stage)))
        keys = np.asarray(seen).sum(axis=1) * pp
        total += sum(_pass_flops(cfg, bf * pp, int(k)) for k, b in zip(keys, busy, strict=True) if b)
    return total


def _variant_table(cfg: WanConfig, pcfg, pp: int) -> dict[str, float]:
    """FLOPs per emitted block of every stagger x mask (`bcjax.names`) against the sequential
    pipeline's n + 1 passes; dependent passes per block (the critical path) beside them."""
    import dataclasses

    bf, n = pcfg.block_frames, pcfg.num_steps
    f_seq = (n + 1) * _pass_flops(cfg, bf * pp, pcfg.window_frames * pp)
    last = dataclasses.replace(pcfg, context="last-pass")
    print(f"\n== FLOPs per emitted block at {pp} tokens/frame, steady state (visible keys only) ==")
    print(f"  {'stagger':<14} {'mask':<28} {'TFLOP/block':>12} {'x sequential':>13} {'passes/block':>13}")
    print(f"  {'sequential':<14} {'-':<28} {f_seq / 1e12:12.3f} {1.0:13.3f} {n + 1:13d}")
    f_last = n * _pass_flops(cfg, bf * pp, pcfg.window_frames * pp)
    print(f"  {'sequential':<14} {'- (no clean pass)':<28} {f_last / 1e12:12.3f} {f_last / f_seq:13.3f} {n:13d}")
    out = {"sequential": f_seq, "sequential-no-clean": f_last}
    for stagger in ("P1", "P2", "P4", "P4-no-clean"):
        st = make_stagger(stagger, n)
        for mask in (MASKS if st.in_flight > 1 else ("causal",)):
            f = variant_block_flops(cfg, last if not st.clean_pass else pcfg, pp, stagger, mask)
            out[f"{stagger} {mask}"] = f
            print(f"  {stagger:<14} {mask:<28} {f / 1e12:12.3f} {f / f_seq:13.3f} {st.stride:13d}")
    return out


def _krea_cost(cfg: WanConfig, pp: int) -> float:
    """Krea's own loop (`bcjax.pipeline.krea`: a 3-frame rebuild pass + 5 passes over [3 context
    | 3] frames) against the same model sampled with a clean-pass cache (4 passes + a clean pass,
    each over [3 cached | 3] frames), per block at `pp` tokens per frame. Returns the FLOP ratio."""
    krea, clean = ports.get("krea_14b").pipeline, ports.get("krea_14b_clean_pass").pipeline
    bf, c = krea.block_frames, krea.cache_frames
    f_block = _pass_flops(cfg, bf * pp, (c + bf) * pp)
    f_rebuild = _pass_flops(cfg, c * pp, c * pp)
    f_krea = f_rebuild + krea.num_steps * f_block
    f_clean = (clean.num_steps + 1) * f_block
    print(f"\n== Krea's loop vs the clean-pass cache, per block at {pp} tokens/frame "
          f"({cfg.num_layers} layers, dim {cfg.dim}) ==")
    print(f"  Krea (krea_14b): 1 rebuild pass over {c} frames + {krea.num_steps} passes = "
          f"{1 + krea.num_steps} dependent passes (+ the VAE round trip of R): {f_krea / 1e12:.2f} TFLOP")
    print(f"  clean-pass (krea_14b_clean_pass): {clean.num_steps} passes + 1 clean pass = "
          f"{clean.num_steps + 1} dependent passes: {f_clean / 1e12:.2f} TFLOP")
    print(f"  ratio {f_krea / f_clean:.3f}x")
    # in a cascade, Krea's rebuild pass of block b's context is block b-1's clean stage (t = 0, seeing only itself)
    print(f"  critical path in Krea's mode: sequential {krea.num_steps + 1} dependent passes per block; cascade "
          f"({krea.num_steps} passes + the rebuild as the clean stage):", end="")
    for stagger in ("P1", "P2", "P4"):
        st = make_stagger(stagger, krea.num_steps)
        print(f" {stagger} {st.stride} ({st.in_flight} in flight)", end="")
    print()
    return f_krea / f_clean


def run(args) -> dict:
    port = ports.get(args.port)
    pcfg = port.pipeline
    cfg = WanConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype)
    hw = tuple(args.latent_hw)
    p = cfg.tokens_per_frame(*hw)
    bf, n = pcfg.block_frames, pcfg.num_steps
    dev = jax.devices()[0]
    key = jax.random.key(0)
    print(f"device: {dev.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"model: {args.preset} (dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, {cfg.dtype}); "
          f"port {port.name}: {n} steps, block {bf} frames, window {pcfg.window_frames} (sink {pcfg.sink_frames}); "
          f"latents {hw[0]}x{hw[1]} = {p} tokens/frame, {bf * p} tokens/block")

    print("\n== critical path: dependent forward passes per emitted block (steady state) ==")
    print(f"  sequential: {n + 1} ({n} denoising + 1 clean pass)")
    for stagger in ("P1", "P2", "P4", "P4-no-clean"):
        st = make_stagger(stagger, n)
        print(f"  {stagger}: {st.stride} (stride {st.stride}, {st.in_flight} blocks in flight; "
              f"first block after {st.emit_stage + 1} passes, as sequential)")

    print("\n== FLOPs per pass (matmul count) ==")
    st4 = make_stagger("P4", n)
    block_tokens, cache_tokens = bf * p, pcfg.cache_frames * p
    f_seq = _pass_flops(cfg, block_tokens, cache_tokens + block_tokens)
    f_share = _pass_flops(cfg, block_tokens, cache_tokens + st4.num_slots * block_tokens)
    f_tick = _pass_flops(cfg, st4.num_slots * block_tokens, cache_tokens + st4.num_slots * block_tokens)
    print(f"  sequential pass (block vs cache + block):            {f_seq / 1e9:10.2f} GFLOP")
    print(f"  P4 one-block share (block vs cache + {st4.num_slots} blocks):          {f_share / 1e9:10.2f} GFLOP = "
          f"{f_share / f_seq:.3f}x a sequential pass")
    print(f"  P4 tick batched on one device ({st4.num_slots} blocks):           {f_tick / 1e9:10.2f} GFLOP = "
          f"{f_tick / f_seq:.3f}x")
    pp = cfg.tokens_per_frame(60, 104)  # the paper's 480x832
    r_share = _pass_flops(cfg, bf * pp, (pcfg.cache_frames + st4.num_slots * bf) * pp)
    r_seq = _pass_flops(cfg, bf * pp, (pcfg.cache_frames + bf) * pp)
    print(f"  at 480x832 ({pp} tokens/frame): sequential pass {r_seq / 1e12:.2f} TFLOP, P4 one-block share "
          f"{r_share / 1e12:.2f} TFLOP = {r_share / r_seq:.3f}x")
    gather_480 = 2 * cfg.num_layers * (st4.num_slots - 1) * bf * pp * cfg.dim * 2  # bf16 K and V
    print(f"  at 480x832 bf16: per-layer K/V all-gather {gather_480 / 1e9:.2f} GB per tick per device = "
          f"{1e3 * gather_480 / (args.link_gbps * 1e9):.1f} ms at {args.link_gbps:g} GB/s")
    variants = _variant_table(cfg, pcfg, pp)
    krea_ratio = _krea_cost(cfg, pp)
    if args.skip_timing:
        return {"f_seq": f_seq, "f_share": f_share, "f_tick": f_tick, "krea_ratio": krea_ratio, "variants": variants}

    params = init_params(cfg, key, hw)
    text = text_kv(cfg, params, jax.random.normal(key, (1, cfg.text_len, cfg.text_dim)))
    cache = full_cache(cfg, pcfg, 1, p, key)
    x = jax.random.normal(key, (1, bf, *hw, cfg.in_channels))
    frames = jnp.arange(bf) + pcfg.cache_frames

    # one sequential pass over [full cache | block]
    seq_pass = jax.jit(lambda prm, c, xx: cached_pass(cfg, prm, xx, jnp.full((1, bf), 500.0), text, c, frames)[0])
    # one block's share of a sharded P4 tick: its block's queries, keys = cache + all in-flight blocks
    others = st4.num_slots - 1
    extra = jax.random.normal(key, (cfg.num_layers, 1, others * bf * p, cfg.num_heads, cfg.head_dim), cfg.compute_dtype)

    def share_pass(prm, c, xx):
        ctx = KV(jnp.concatenate([c.k, extra], axis=2), jnp.concatenate([c.v, extra], axis=2))
        return forward(cfg, prm, xx, jnp.full((1, bf), 500.0), text, frames, ctx)[0]

    share_pass = jax.jit(share_pass)
    seq_pipe = make_runner(cfg, pcfg, hw)
    cascades = {s: make_runner(cfg, pcfg, hw, s, "bidirectional") for s in ("P2", "P4")}

    # XLA counts a scanned layer body once, so only its ratios are comparable
    x_seq = _flops(seq_pass, params, cache, x)
    x_share = _flops(share_pass, params, cache, x)
    x_tick = _flops(cascades["P4"], params, text, key, jnp.int32(10 ** 6), cascades["P4"].tick_program.init_state(1))
    print(f"  XLA cost analysis ratios (cross-check): P4 one-block share {x_share / x_seq:.3f}x, "
          f"P4 batched tick {x_tick / x_seq:.3f}x a sequential pass")
    print("\n== wall time, steady state, same device ==")
    t_pass = median_seconds(lambda: jax.block_until_ready(seq_pass(params, cache, x)), args.repeats)
    t_share = median_seconds(lambda: jax.block_until_ready(share_pass(params, cache, x)), args.repeats)

    seq_cache, block = jax.tree_util.tree_map(jnp.copy, cache), pcfg.cache_frames // bf
    seq_times = []
    seq_block = seq_pipe.lower(params, text, seq_cache, key, jnp.int32(block)).compile()
    for i in range(args.ticks + 1):  # the cache is full and rolls: steady state; first call warms up
        t0 = time.perf_counter()
        seq_cache, out = seq_block(params, text, seq_cache, key, jnp.int32(block + i))
        jax.block_until_ready(out)
        seq_times.append(time.perf_counter() - t0)
    t_seq_block = statistics.median(seq_times[1:])
    rows = [("sequential (block fn: 4 + 1 passes)", t_seq_block, 1)]
    for stagger, cas in cascades.items():
        # start at a steady-state tick: every slot busy, cache full (costs are shape-static)
        steady = cas.plan.num_stages + pcfg.cache_frames // bf
        empty = cas.tick_program.init_state(1)
        state = empty._replace(x=jax.random.normal(key, empty.x.shape), cache=jax.tree_util.tree_map(jnp.copy, cache),
                               tick=jnp.int32(steady))
        nb = jnp.int32(10 ** 6)
        ticks = []
        step = cas.lower(params, text, key, nb, state).compile()
        for _ in range(args.ticks + 1):  # the first tick is a warm-up
            t0 = time.perf_counter()
            state, out = step(params, text, key, nb, state)
            jax.block_until_ready(out)
            ticks.append(time.perf_counter() - t0)
        rows.append((f"{stagger} bidirectional, all blocks on one device (tick)", statistics.median(ticks[1:]),
                     cas.plan.stride))
    print(f"  {'':52} {'ms/tick':>10} {'ms/block':>10} {'FPS':>8}")
    print(f"  {'sequential pass (block vs full cache)':52} {1e3 * t_pass:10.1f}")
    for label, t, stride in rows:
        per_block = t * stride
        print(f"  {label:52} {1e3 * t:10.1f} {1e3 * per_block:10.1f} {VIDEO_FRAMES_PER_BLOCK / per_block:8.2f}")
    seq_fps = VIDEO_FRAMES_PER_BLOCK / t_seq_block

    print("\n== one block per device: estimate from a measured one-block pass ==")
    item = jnp.dtype(cfg.compute_dtype).itemsize
    gather_bytes = 2 * cfg.num_layers * others * bf * p * cfg.dim * item  # K and V of the other blocks, every layer
    t_comm = gather_bytes / (args.link_gbps * 1e9)
    print(f"  one-block pass (measured): {1e3 * t_share:.1f} ms; K/V all-gather per tick per device: "
          f"2 x {cfg.num_layers} layers x {others} blocks x {bf * p} tokens x {cfg.dim} x {item} B = "
          f"{gather_bytes / 1e6:.1f} MB -> {1e3 * t_comm:.2f} ms at {args.link_gbps:g} GB/s")
    for label, t in (("comm overlapped", max(t_share, t_comm)), ("comm serial", t_share + t_comm)):
        fps = VIDEO_FRAMES_PER_BLOCK / t
        print(f"  P4 on {st4.num_slots} devices, {label}: {1e3 * t:.1f} ms/tick = {fps:.2f} FPS "
              f"({fps / seq_fps:.2f}x sequential on one device: {seq_fps:.2f} FPS)")
    return {"seq_fps": seq_fps, "t_share": t_share, "t_comm": t_comm, "f_seq": f_seq, "f_share": f_share,
            "f_tick": f_tick}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bcjax bench cascade", description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="tiny", choices=WanConfig.preset_names())
    ap.add_argument("--latent-hw", type=int, nargs=2, default=(8, 8), metavar=("H", "W"))
    ap.add_argument("--port", default="self_forcing", choices=list(ports.NAMES))
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--ticks", type=int, default=5, help="steady-state ticks timed per stagger")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-timing", action="store_true", help="print the critical path and FLOPs only")
    ap.add_argument("--link-gbps", type=float, default=450.0,
                    help="per-device all-gather bandwidth for the 5-device estimate "
                         "(H100 NVLink4 ~450 GB/s per direction)")
    run(ap.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
