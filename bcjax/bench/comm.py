"""Communication of a cascade tick on a (stage, model) mesh, and the FPS it allows on real hardware.

    python -m bcjax.bench.comm [--preset wan2.1-14b] [--port krea_14b_clean_pass] [--latent-hw 60 104]
                               [--meshes 5x1 5x2 5x4 5x8] [--hlo]

Per tick and per device, two sources that must agree:
* the formula (`tick_bytes`): per layer the `stage` all-gather of this pass's K and V (every slot's
  tokens, this device's heads), the `model` psums (o, cross-attention o, ffn_2: [B, T, dim] each,
  in the compute dtype) and qk-norm's sum-of-squares psums ([B, T, 1] f32, three of them); once per
  tick the `stage` psum of the emitted block;
* the compiled program (`--hlo`, `hlo_collectives`): every all-gather / all-reduce of the tick's
  optimised HLO, each counted as often as its loop runs, assigned to the mesh axis its replica
  groups span (compiled on fake CPU devices; nothing runs).
"Wire" bytes are what one device receives with ring collectives: all-gather R (g-1)/g of its
result R, all-reduce 2 S (g-1)/g of its operand S, for a group of g devices.

The FPS model (`model_fps`) per tick: compute = tick FLOPs per device / (peak FLOP/s x MFU), and
each axis' wire bytes / its link bandwidth; the tick takes compute + the exposed communication
(no overlap assumed, the conservative case). P4 emits one block per tick, 12 video frames.
"""

from __future__ import annotations

import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
    # --hlo compiles on fake CPU devices: 40 covers (5, 8); must be set before jax starts a backend
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=40"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import re  # noqa: E402
from collections import defaultdict  # noqa: E402

import numpy as np  # noqa: E402

from bcjax.bench._common import VIDEO_FRAMES_PER_BLOCK  # noqa: E402

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8}
_SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]+)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")


def _bytes(shapes: str) -> int:
    return sum(_ITEMSIZE[dt] * int(np.prod([int(d) for d in dims.split(",") if d])) for dt, dims in _SHAPE.findall(shapes))


_VALUE = re.compile(r"^\s*%([\w.\-]+) = s32\[\]\S* (constant|copy)\((-?\d+|%[\w.\-]+)\)")
_TUPLE_FIRST = re.compile(r"^\s*%([\w.\-]+) = \(.*\) tuple\(%([\w.\-]+)")
_WHILE = re.compile(r"while\(%([\w.\-]+)\), condition=%([\w.\-]+), body=%([\w.\-]+)")
_BOUND = re.compile(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT")


def _parse(hlo: str):
    """{computation: (collectives [(kind, result bytes, first replica group or size)], callees [(name, times)])}, entry.

    A while loop counts its body `known_trip_count` times (XLA:CPU and XLA:GPU annotate it); where
    the annotation is missing (XLA:TPU), from its condition `i < bound` and the induction
    variable's initial constant. XLA:TPU's async collectives keep copies of the collective in their
    continuation fusions and "done" computation: only the start's is counted."""
    comps, entry, name = {}, None, None
    values: dict[str, dict[str, str]] = {}  # per computation: s32 scalar constants and copies
    tuples: dict[str, dict[str, str]] = {}  # per computation: a tuple's first operand
    bounds: dict[str, str] = {}  # condition computation -> the name its `i < bound` compares with
    loops = []  # (computation, init tuple, condition, body) of whiles without a known trip count
    done = set()
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m and line.rstrip().endswith("{"):
            name = m.group(1)
            comps[name] = ([], [])
            values[name], tuples[name] = {}, {}
            if line.startswith("ENTRY"):
                entry = name
            continue
        if name is None or "=" not in line:
            continue
        ops, calls = comps[name]
        if v := _VALUE.match(line):
            values[name][v.group(1)] = v.group(3)
        if t := _TUPLE_FIRST.match(line):
            tuples[name][t.group(1)] = t.group(2)
        if (bnd := _BOUND.search(line)) and "ROOT" in line:
            bounds[name] = bnd.group(1)
        if ("ROOT" in line and 'custom_call_target="AsyncCollectiveDone"' in line) \
                or name.startswith("async_collective_fusion"):  # XLA:TPU's continuation of a started one
            done.add(name)
        c = _COLLECTIVE.search(line)
        if c and "-done" not in line.split("=", 1)[1].split("(", 1)[0]:
            g = _GROUPS_LIST.search(line)
            group = [int(d) for d in g.group(1).split(",")] if g else None
            if group is None and (io := _GROUPS_IOTA.search(line)):
                group = int(io.group(2))  # iota form [groups, size]: the devices are not listed
            shapes = _SHAPE.findall(c.group(1))
            if c.group(2) in ("all-gather", "collective-permute") and f"{c.group(2)}-start(" in line:
                shapes = shapes[len(shapes) // 2:]  # XLA:GPU's start returns (operands, results)
            ops.append((c.group(2), _bytes(" ".join(f"{dt}[{dims}]" for dt, dims in shapes)), group))
        trip = _TRIP.search(line)
        w = _WHILE.search(line)
        if w and not trip:
            loops.append((name, w.group(1), w.group(2), w.group(3), len(calls)))
        for callee in _CALLS.findall(line):
            body = f"body=%{callee}" in line
            calls.append((callee, int(trip.group(1)) if body and trip else 1))
        if b := _BRANCHES.search(line):
            calls.extend((n.strip().lstrip("%"), 1) for n in b.group(1).split(","))

    def constant(comp: str, ref: str) -> int | None:
        for _ in range(8):  # follow copies to the constant
            ref = values.get(comp, {}).get(ref.lstrip("%"), ref)
            if not ref.startswith("%"):
                break
        try:
            return int(ref)
        except ValueError:
            return None

    for comp, init_tuple, cond, body, _ in loops:
        bound = constant(cond, "%" + bounds[cond]) if cond in bounds else None
        first = tuples[comp].get(init_tuple)
        init = constant(comp, "%" + first) if first else None
        if bound is not None and init is not None and bound > init:
            calls = comps[comp][1]
            comps[comp] = (comps[comp][0], [(c, bound - init if c == body else k) for c, k in calls])
    for name in done:
        comps[name] = ([], comps[name][1])
    return comps, entry


def hlo_collectives(hlo: str, mesh) -> dict[str, dict[str, float]]:
    """Per mesh axis ('stage', 'model'; 'other' for groups spanning neither): collective ops run
    per call of the program, their result bytes and the bytes one device receives (ring).
    Each op counts as often as the loops around it run (while known_trip_count); a branch of a
    conditional counts once."""
    comps, entry = _parse(hlo)
    times: dict[str, int] = defaultdict(int)

    def visit(comp: str, k: int):
        times[comp] += k
        for callee, n in comps.get(comp, ((), ()))[1]:
            if callee in comps:
                visit(callee, k * n)

    visit(entry, 1)
    # replica groups name positions in the program's device assignment, which is the mesh's
    # order; device ids agree with them only on some platforms (not on a v5e-32 topology)
    ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    axes = {name: [set(np.moveaxis(ids, i, -1).reshape(-1, ids.shape[i])[j].tolist()) for j in range(ids.size // ids.shape[i])]
            for i, name in enumerate(mesh.axis_names)}
    out = defaultdict(lambda: {"ops": 0, "payload": 0.0, "wire": 0.0})
    for comp, k in times.items():
        for kind, nbytes, group in comps[comp][0]:
            size = group if isinstance(group, int) else len(group or ())
            axis = next((a for a, groups in axes.items() if isinstance(group, list) and set(group) in groups), None)
            if axis is None and isinstance(group, int):  # iota groups: by size, when it is unambiguous
                sizes = [a for a in mesh.axis_names if mesh.shape[a] == size]
                axis = sizes[0] if len(sizes) == 1 else None
            axis = axis or "other"
            if size <= 1:
                continue
            wire = nbytes * (size - 1) / size * (2 if kind == "all-reduce" else 1)
            out[axis]["ops"] += k
            out[axis]["payload"] += k * nbytes
            out[axis]["wire"] += k * wire
    return dict(out)


def tick_bytes(cfg, pcfg, latent_hw, num_slots: int, stage: int, model: int, batch: int = 1) -> dict[str, dict]:
    """The same figures from the formula (module docstring) for one tick of a cascade with
    `num_slots` slots (idle ones included) on a (stage, model) mesh."""
    import jax.numpy as jnp

    p = cfg.tokens_per_frame(*latent_hw)
    bf, dt = pcfg.block_frames, jnp.dtype(cfg.compute_dtype).itemsize
    t_tick = num_slots * bf * p  # every slot's tokens: what the all-gather assembles
    t_dev = t_tick // stage  # this device's queries
    layers = cfg.num_layers
    gather = 2 * batch * t_tick * (cfg.num_heads // model) * cfg.head_dim * dt  # K and V, one layer
    emitted = batch * bf * latent_hw[0] * latent_hw[1] * cfg.in_channels * 4
    reduce_out = 3 * batch * t_dev * cfg.dim * dt
    reduce_norm = (3 if cfg.qk_norm else 0) * batch * t_dev * 4
    out = {}
    if stage > 1:
        out["stage"] = {"ops": 2 * layers + 1, "payload": layers * gather + emitted,
                        "wire": (layers * gather + 2 * emitted) * (stage - 1) / stage}
    if model > 1:
        payload = layers * (reduce_out + reduce_norm)
        out["model"] = {"ops": layers * (3 + (3 if cfg.qk_norm else 0)), "payload": payload,
                        "wire": 2 * payload * (model - 1) / model}
    return out


@dataclasses.dataclass(frozen=True)
class Chip:
    """Published peak figures of one accelerator (bf16 dense FLOP/s; link GB/s one direction)."""

    name: str
    tflops: float
    hbm_gib: float
    stage_gbs: float  # the link the stage all-gather crosses
    model_gbs: float  # the link a model group's psums cross
    note: str


# Sources: Google Cloud TPU v5e / v5p system architecture pages (bf16 peak, HBM, ICI per chip);
# NVIDIA H100 SXM datasheet (989 TFLOP/s dense bf16, NVLink 900 GB/s total = 450 GB/s each way),
# ConnectX-7 400 Gb/s = 50 GB/s per GPU between nodes.
CHIPS = {
    "TPU v5e-32": Chip("TPU v5e-32", 197.0, 16.0, 50.0, 50.0,
                       "ICI 1600 Gbps per chip over 4 links = 50 GB/s per link each way; 2D torus, (5, 4) on 20 of 32 chips"),
    "TPU v5p-16": Chip("TPU v5p-16", 459.0, 95.0, 100.0, 100.0,
                       "ICI 4800 Gbps per chip over 6 links = 100 GB/s per link each way; (5, 2) on 10 of 16 chips"),
    "5x2 H100": Chip("5x2 H100", 989.0, 80.0, 50.0, 450.0,
                     "model pairs on NVLink (450 GB/s each way) inside a node, the 5 stages across 2 nodes over "
                     "400 Gb/s InfiniBand (50 GB/s per GPU)"),
    "5 H100 (paper)": Chip("5 H100 (paper)", 989.0, 80.0, 450.0, 450.0,
                           "the paper's setup, one node, NVLink; it measured 12.5 FPS for 14B P4"),
}
PAPER_14B_P4_FPS = 12.5  # paper.md: Krea Realtime 14B, P4 on 5 H100s
# (hardware, mesh) rows of the FPS model; the last is the paper's measured setup, a calibration
FPS_ROWS = (("TPU v5e-32", (5, 4)), ("TPU v5p-16", (5, 2)), ("5x2 H100", (5, 2)), ("5 H100 (paper)", (5, 1)))


def model_fps(flops_per_device: float, comm: dict, chip: Chip, mfu: float) -> dict[str, float]:
    compute = flops_per_device / (chip.tflops * 1e12 * mfu)
    stage = comm.get("stage", {}).get("wire", 0.0) / (chip.stage_gbs * 1e9)
    model = comm.get("model", {}).get("wire", 0.0) / (chip.model_gbs * 1e9)
    tick = compute + stage + model
    return {"compute_ms": 1e3 * compute, "stage_ms": 1e3 * stage, "model_ms": 1e3 * model, "tick_ms": 1e3 * tick,
            "fps": VIDEO_FRAMES_PER_BLOCK / tick}


def tick_flops_per_device(cfg, pcfg, latent_hw, num_slots: int, stage: int, model: int) -> float:
    """Matmul FLOPs of one device's share of a tick: its slots' queries over the cache and every
    slot's keys, divided over `model` (heads and FFN columns split; embeddings are negligible)."""
    from bcjax.bench.cascade import _pass_flops

    p = cfg.tokens_per_frame(*latent_hw)
    q = num_slots // stage * pcfg.block_frames * p
    k = (pcfg.cache_frames + num_slots * pcfg.block_frames) * p
    return _pass_flops(cfg, q, k) / model


def _fmt(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b >= 2**20 else f"{b / 2**10:,.1f} KiB"


def main(argv=None) -> int:
    import jax

    import ports
    from bcjax.model.config import WanConfig
    from bcjax.schedule.stagger import make_stagger

    ap = argparse.ArgumentParser(prog="bcjax bench comm", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan2.1-14b", choices=WanConfig.preset_names())
    ap.add_argument("--port", default="krea_14b_clean_pass", help="sampler (window, steps) of the cascade")
    ap.add_argument("--latent-hw", nargs=2, type=int, default=(60, 104), metavar=("H", "W"))
    ap.add_argument("--meshes", nargs="+", default=["5x1", "5x2", "5x4", "5x8"], help="STAGExMODEL")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--mfu", type=float, default=0.4, help="assumed fraction of peak FLOP/s reached (FPS model)")
    ap.add_argument("--hlo", action="store_true", help="also count the collectives of each compiled tick")
    args = ap.parse_args(argv)
    cfg = WanConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, attention="dense")
    pcfg, hw = ports.get(args.port).pipeline, tuple(args.latent_hw)
    meshes = [tuple(int(v) for v in m.split("x")) for m in args.meshes]
    print(f"{args.preset} | sampler {args.port} (cache {pcfg.cache_frames} frames) | latent {hw[0]}x{hw[1]} | "
          f"{args.dtype} | P4, batch 1 | bytes per tick per device")
    print("| mesh | stage all-gather (payload / wire) | model psums (payload / wire) | ops stage / model | source |")
    print("|---|---|---|---|---|")
    rows = {}
    for stage, model in meshes:
        st = make_stagger("P4", pcfg.num_steps, stage)
        f = tick_bytes(cfg, pcfg, hw, st.num_slots, stage, model)
        rows[(stage, model)] = (st, f)
        s, m = f.get("stage", {}), f.get("model", {})
        print(f"| ({stage}, {model}) | {_fmt(s.get('payload', 0))} / {_fmt(s.get('wire', 0))} | "
              f"{_fmt(m.get('payload', 0))} / {_fmt(m.get('wire', 0))} | {s.get('ops', 0)} / {m.get('ops', 0)} | formula |",
              flush=True)
        if args.hlo:
            h = compiled_tick_collectives(cfg, pcfg, hw, stage, model)
            s, m = h.get("stage", {}), h.get("model", {})
            print(f"| ({stage}, {model}) | {_fmt(s.get('payload', 0))} / {_fmt(s.get('wire', 0))} | "
                  f"{_fmt(m.get('payload', 0))} / {_fmt(m.get('wire', 0))} | {s.get('ops', 0)} / {m.get('ops', 0)} | "
                  f"compiled HLO ({jax.default_backend()}) |", flush=True)
    if args.hlo and jax.default_backend() == "cpu" and args.dtype == "bfloat16":
        print("XLA:CPU computes bf16 as f32, so its collectives carry twice the bytes of a bf16 accelerator's; "
              "XLA may merge the small qk-norm psums into one op.")
    rows = []
    for chip, mesh in FPS_ROWS:
        st = make_stagger("P4", pcfg.num_steps, mesh[0])
        comm = tick_bytes(cfg, pcfg, hw, st.num_slots, *mesh)
        rows.append((CHIPS[chip], mesh, tick_flops_per_device(cfg, pcfg, hw, st.num_slots, *mesh), comm))
    # calibration: the MFU at which the paper's own setup (last row) gives its measured FPS
    c, _, flops, comm = rows[-1]
    exposed = model_fps(flops, comm, c, 1.0)
    compute_s = VIDEO_FRAMES_PER_BLOCK / PAPER_14B_P4_FPS - 1e-3 * (exposed["stage_ms"] + exposed["model_ms"])
    calibrated = flops / (c.tflops * 1e12 * compute_s)
    print(f"\nModelled FPS (P4: one block = {VIDEO_FRAMES_PER_BLOCK} frames per tick; communication not overlapped "
          f"with compute). MFU {args.mfu:.0%} assumed, and {calibrated:.0%}: the MFU at which the paper's 5 H100 "
          f"reach its measured {PAPER_14B_P4_FPS} FPS")
    print(f"| hardware | mesh | TFLOP/tick/device | compute ms | stage comm ms | model comm ms | tick ms | FPS | "
          f"FPS at MFU {calibrated:.0%} | links |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for c, mesh, flops, comm in rows:
        r, r_cal = model_fps(flops, comm, c, args.mfu), model_fps(flops, comm, c, calibrated)
        print(f"| {c.name} | {mesh} | {flops / 1e12:.1f} | {r['compute_ms']:.0f} | {r['stage_ms']:.1f} | "
              f"{r['model_ms']:.1f} | {r['tick_ms']:.0f} | {r['fps']:.1f} | {r_cal['fps']:.1f} | {c.note} |")
    return 0


def compiled_tick_collectives(cfg, pcfg, latent_hw, stage: int, model: int) -> dict:
    """hlo_collectives of the compiled P4 tick on a (stage, model) mesh of (fake) devices, from
    abstract inputs: nothing of the model's size is allocated."""
    import jax

    from bcjax.bench.compile import dit_lowering
    from bcjax.cascade import make_mesh

    n = stage * model
    if jax.device_count() < n:
        raise RuntimeError(f"a {stage}x{model} mesh needs {n} devices; jax has {jax.device_count()} (run this module "
                           "as its own process so it can force 40 host devices)")
    mesh = make_mesh(stage, model, devices=jax.devices()[:n], cfg=cfg)
    hlo = dit_lowering("p4", cfg, pcfg, latent_hw, mesh)().compile().as_text()
    return hlo_collectives(hlo, mesh)


if __name__ == "__main__":
    raise SystemExit(main())
