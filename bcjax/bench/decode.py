"""What decoding one block costs with the Wan VAE and with TAEHV, and what it does to end-to-end FPS.

    python -m bcjax.bench.decode [--latent-hw 60 104] [--time-latent-hw 4 6] [--repeats 1]
                                 [--preset wan2.1-1.3b] [--port self_forcing] [--mfu 0.4]

Per block (3 latent frames, steady state: not the clip's first block), for each decoder:
* FLOPs two ways: counted from the traced program (every conv and matmul of `decode_step`'s jaxpr,
  2 x MACs from its shapes) and XLA's `cost_analysis()` of the compiled step, at --latent-hw
  (60x104 = 480x832 video);
* CPU seconds of both, side by side in this run, at --time-latent-hw (default 4x6 = 32x48
  video: a 480x832 Wan VAE decode is ~40 TFLOP, minutes on a CPU), fp32, random weights;
* the modelled end-to-end FPS (`bcjax.bench.comm`'s model: FLOPs / (peak x MFU) on an H100, plus
  P4's exposed communication on the paper's 5-H100 node) of sequential and P4, with the decode on
  the denoising device (sequential: after each block; P4: on the mesh's first device, which every tick then waits
  for, ticks being lockstep) or on its own decode device (overlapped: the slower of the two sets
  the pace).
Compiled memory per accelerator comes from `bench compile --cases vae taehv` (not here).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from bcjax.bench._common import VIDEO_FRAMES_PER_BLOCK

BLOCK_LATENT_FRAMES = 3


def _jaxpr_flops(jaxpr) -> float:
    """2 x multiply-adds of every conv and dot_general in a (closed) jaxpr, nested calls included."""
    import jax
    import jax.extend.core

    total = 0.0
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if name == "conv_general_dilated":
            out = eqn.outvars[0].aval.shape
            rhs = eqn.invars[1].aval.shape  # the kernel: spatial dims, in, out per its dimension numbers
            dn = eqn.params["dimension_numbers"]
            k_in = rhs[dn.rhs_spec[1]]
            spatial = np.prod([rhs[d] for d in dn.rhs_spec[2:]])
            total += 2.0 * np.prod(out) * spatial * k_in
        elif name == "dot_general":
            (lc, _), _ = eqn.params["dimension_numbers"]
            lhs = eqn.invars[0].aval.shape
            total += 2.0 * np.prod(eqn.outvars[0].aval.shape) * np.prod([lhs[d] for d in lc])
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            total += _jaxpr_flops(sub)
    return total


def _steady_state(module, cfg, hw):
    """A decode state past the clip's first block (frames = 3), as the stream's later blocks see it."""
    state = module.init_decode_state(cfg, 1, hw)
    return state._replace(frames=state.frames + BLOCK_LATENT_FRAMES)


def _decoders():
    from bcjax.vae import taehv, wan_vae

    return {"Wan VAE": (wan_vae, wan_vae.VAEConfig.preset("wan2.1")),
            "TAEHV": (taehv, taehv.TAEHVConfig.preset("taew2_1"))}


def flops(module, cfg, hw) -> tuple[float, float]:
    """(counted from the jaxpr, XLA cost_analysis) FLOPs of one steady-state block's decode_step."""
    import jax
    import jax.extend.core

    params = module.param_shapes(cfg)
    state = jax.eval_shape(lambda: _steady_state(module, cfg, hw))
    z = jax.ShapeDtypeStruct((1, BLOCK_LATENT_FRAMES, *hw, 16), np.float32)
    counted = _jaxpr_flops(jax.make_jaxpr(lambda p, s, x: module.decode_step(cfg, p, s, x))(params, state, z).jaxpr)
    cost = module.decode_step.lower(cfg, params, state, z).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return counted, float(cost.get("flops", float("nan")))


def cpu_seconds(module, cfg, hw, repeats: int) -> float:
    """Median wall seconds of one block's decode_step on the host CPU (fp32, random weights)."""
    import jax
    import jax.extend.core

    from bcjax.bench._common import median_seconds

    cpu = jax.devices("cpu")[0]
    params = jax.device_put(module.init_params(cfg, jax.random.key(0)), cpu)
    state = jax.device_put(_steady_state(module, cfg, hw), cpu)
    z = jax.device_put(
        np.random.default_rng(0).standard_normal((1, BLOCK_LATENT_FRAMES, *hw, 16)).astype(np.float32), cpu)
    return median_seconds(lambda: jax.block_until_ready(module.decode_step(cfg, params, state, z)), repeats)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bcjax bench decode", description=__doc__.split("\n")[0])
    ap.add_argument("--latent-hw", nargs=2, type=int, default=(60, 104), metavar=("H", "W"),
                    help="FLOPs and the FPS model")
    ap.add_argument("--time-latent-hw", nargs=2, type=int, default=(4, 6), metavar=("H", "W"), help="CPU timing")
    ap.add_argument("--repeats", type=int, default=1, help="timed CPU runs per decoder after a warm-up")
    ap.add_argument("--preset", default="wan2.1-1.3b", help="DiT of the FPS model")
    ap.add_argument("--port", default="self_forcing", help="sampler of the FPS model")
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of peak FLOP/s, DiT and decoders alike")
    args = ap.parse_args(argv)
    hw, thw = tuple(args.latent_hw), tuple(args.time_latent_hw)
    rows = {}
    for name, (module, cfg) in _decoders().items():
        t0 = time.perf_counter()
        counted, xla = flops(module, cfg, hw)
        secs = cpu_seconds(module, cfg, thw, args.repeats)
        rows[name] = (counted, xla, secs)
        print(f"  {name}: analysed in {time.perf_counter() - t0:.0f} s", flush=True)
    s = cfg.spatial_scale
    print(f"\n== One block ({BLOCK_LATENT_FRAMES} latent frames -> {VIDEO_FRAMES_PER_BLOCK} video frames), FLOPs at "
          f"{hw[0] * s}x{hw[1] * s} (latent {hw[0]}x{hw[1]}), CPU time at {thw[0] * s}x{thw[1] * s} (latent "
          f"{thw[0]}x{thw[1]}), fp32 ==")
    print("| decoder | FLOPs counted (jaxpr) | FLOPs XLA cost_analysis | CPU s / block | CPU video frames / s |")
    print("|---|---|---|---|---|")
    for name, (counted, xla, secs) in rows.items():
        print(f"| {name} | {counted / 1e12:.3f} T | {xla / 1e12:.3f} T | {secs:.3f} | "
              f"{VIDEO_FRAMES_PER_BLOCK / secs:.1f} |")
    w, t = rows["Wan VAE"], rows["TAEHV"]
    print(f"TAEHV / Wan VAE: {t[0] / w[0]:.4f}x the FLOPs, {t[2] / w[2]:.3f}x the CPU time")
    _fps_model(rows, hw, args)
    print("Compiled memory on an H100 / TPU v5e: `JAX_PLATFORMS=cpu bcjax bench compile --target h100 "
          "--cases vae taehv` (or --target v5e-8; not part of this bench).")
    return 0


def _fps_model(rows, hw, args) -> None:
    import ports
    from bcjax.bench.comm import HARDWARE, model_fps, tick_bytes, tick_flops, tick_layout
    from bcjax.model.config import WanConfig

    chip = HARDWARE["5 H100"]
    cfg = WanConfig.preset(args.preset, dtype="bfloat16", param_dtype="bfloat16", attention="dense")
    pcfg = ports.get(args.port).pipeline
    # sequential on one H100: n + 1 ticks (passes) per block; P4 on 5 (NVLink): one tick per block
    seq = tick_layout(cfg, pcfg, hw, "sequential", 1)
    seq_flops = tick_flops(cfg, pcfg, hw, "sequential", "causal", 1, 1)["device"]
    seq_s = 1e-3 * seq.stride * model_fps(seq_flops, {}, HARDWARE["1 H100"], args.mfu, seq.stride)["tick_ms"]
    flops = tick_flops(cfg, pcfg, hw, "P4", "bidirectional", 5, 1)["device"]
    tick_s = 1e-3 * model_fps(flops, tick_bytes(cfg, pcfg, hw, "P4", 5, 1), chip, args.mfu, 1)["tick_ms"]
    print(f"\n== Modelled end-to-end FPS: {args.preset}, {args.port}, H100 at {args.mfu:.0%} MFU; "
          f"sequential on 1 H100, P4 on 5 (NVLink); denoise {1e3 * seq_s:.0f} ms / block sequential, "
          f"{1e3 * tick_s:.0f} ms / tick P4 ==")
    print("| decoder | decode ms / block | sequential, decode on device 0 | sequential, decode device | "
          "P4, decode on mesh device 0 | P4, decode device |")
    print("|---|---|---|---|---|---|")
    fps = VIDEO_FRAMES_PER_BLOCK
    for name, (counted, _, _) in rows.items():
        dec = counted / (chip.tflops * 1e12 * args.mfu)
        print(f"| {name} | {1e3 * dec:.1f} | {fps / (seq_s + dec):.1f} | {fps / max(seq_s, dec):.1f} | "
              f"{fps / (tick_s + dec):.1f} | {fps / max(tick_s, dec):.1f} |")
    print("A decode device: a 6th H100 beside the 5 stages (P4) or a 2nd beside the one (sequential); overlapped, so "
          "the slower of denoise and decode sets the pace.")


if __name__ == "__main__":
    raise SystemExit(main())
