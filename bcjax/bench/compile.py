"""Compile bcjax's real programs with the real TPU and GPU compilers: no accelerator needed.

    bcjax bench compile --target {v5e-8,v5e-16,v5e-32,v5p-8,v5p-16,v6e-8,v6e-16,h100,h200,cpu}
                        [--preset wan2.1-1.3b wan2.1-14b] [--cases sequential krea p4 vae taehv umt5]
                        [--backends splash chunked ...] [--meshes 5x1 8x4 ...] [--latent-hw 60 104]
                        [--layers N] [--dtype bfloat16] [--headroom 0.1] [--port krea_14b_clean_pass]
                        [--quant none int8-weight int8 fp8-weight fp8] [--ranks 16 64]

Every row is one program lowered from abstract values (the runners' `abstract_inputs`, nothing
allocated) and compiled for the target's devices (`bcjax.targets`): XLA:TPU with Mosaic (splash),
XLA:GPU with Triton (pallas_gpu) and cuDNN, or XLA:CPU (`--target cpu`, this host's devices; what
`bench memory` printed before). Per device, from the compiler's buffer assignment
(`compiled.memory_analysis()`): arguments, temporaries, output, total = args + temp + out - alias;
whether it fits the device's memory with `--headroom` kept free (default 10%, for the runtime,
fragmentation and what XLA does not count); compile seconds; the collectives of the optimised HLO
per mesh axis (ops per call, loops counted by trip count, and their payload bytes); with `--quant`
(`bcjax.model.quant`), one row per mode, and the element types of the optimised HLO's matmuls
(`contractions`): "s8" where an int8 x int8 dot compiled, "f8" for an fp8 one (an H100 cuBLASLt
f8 GEMM), "bf16" where the weights were dequantized into a bf16 dot.

Programs:
* sequential: the sequential pipeline's block function (num_steps denoising passes and the clean
  pass over a full cache), on (1, model) meshes (tensor parallel over `model`);
* krea: one block of Krea's own loop (the rebuilt-context pass and the denoising passes; the
  `krea_14b` port's sampler);
* p4: one P4 bidirectional tick under shard_map over (tokens, model), per device (the `tokens` axis
  splits the tick's tokens, `bcjax.cascade.tokens`);
* cp: one tick of the sequential stagger split the same way: context parallelism of one block's
  pass over the `tokens` devices (n + 1 such ticks make a block);
* adapt: one adaptation step (`bcjax.adapt.step`, issue 36) of the P4 bidirectional tick: the
  teacher-forced tick's forward and backward (each layer rematerialised), the gradient reduced
  over the mesh and one AdamW update of the LoRA factors, a row per `--ranks` rank;
* vae: the Wan VAE decoder's streaming step for one block (block_frames latent frames);
* taehv: TAEHV's (taew2_1, the tiny Wan2.1 decoder) streaming step for one block, its memory
  blocks carried as the state (`bcjax.vae.taehv.decode_step`);
* umt5: the umT5-XXL encoder for one prompt (512 tokens).

Meshes: by default every mesh of the target worth a row: model sizes from the smallest whose
weights take at most half a device, tokens 5 (the paper's one P4 block per device) and the whole
target (the tick's tokens over every device); a target that must be used whole (v5e-32) gets its
`tokens` axis grown to the slice (`make_mesh`).
A program the compiler refuses is one row with the compiler's first line; one that does not fit is
marked "does not fit: X GiB > Y GiB". Nothing runs: no timing.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import time
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, SingleDeviceSharding
from jax.sharding import PartitionSpec as P

from bcjax import targets
from bcjax.names import BACKENDS, QUANTS, TOKENS

GiB = 2**30
CASES = ("sequential", "krea", "p4", "cp", "adapt", "vae", "taehv", "umt5")
DIT_CASES = ("sequential", "krea", "p4", "cp", "adapt")


@dataclasses.dataclass
class Row:
    """One compiled (or refused) program: figures in bytes per device."""

    model: str
    program: str
    mesh: str
    backend: str
    quant: str = "none"
    args: float = 0.0
    temp: float = 0.0
    out: float = 0.0
    alias: float = 0.0
    compile_s: float = 0.0
    collectives: dict = dataclasses.field(default_factory=dict)
    written: float = 0.0  # HBM bytes written per call (hbm_bytes_written)
    contractions: str = ""  # the matmuls' operand types in the optimised HLO (`contractions`)
    error: str | None = None

    @property
    def total(self) -> float:
        return self.args + self.temp + self.out - self.alias

    def fits(self, memory: float, headroom: float) -> tuple[bool, str]:
        limit = memory * (1 - headroom)
        if self.total <= limit:
            return True, "yes"
        return False, f"does not fit: {self.total / GiB:.2f} GiB > {limit / GiB:.2f} GiB"


def compile_row(model: str, program: str, mesh_label: str, backend: str, lower: Callable, mesh: Mesh | None,
                quant: str = "none") -> Row:
    """Compile lower() and read its memory and collectives; a refusal is a row, not a crash."""
    from bcjax.model import attention

    row = Row(model, program, mesh_label, backend, quant)
    t0 = time.perf_counter()
    attention._warned.clear()  # so that a kernel's refusal of this program's shapes is seen here
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            compiled = lower().compile()
    except Exception as e:  # noqa: BLE001 - the compiler's refusal is the row's content
        row.error = f"{type(e).__name__}: {_first_line(e)}"
        row.compile_s = time.perf_counter() - t0
        return row
    row.compile_s = time.perf_counter() - t0
    # a kernel that refused a shape at trace time fell back to chunked: the row must say so
    if any("using 'chunked'" in str(w.message) for w in caught):
        row.backend += " (fell back to chunked)"
    m = compiled.memory_analysis()
    row.args, row.temp = m.argument_size_in_bytes, m.temp_size_in_bytes
    row.out, row.alias = m.output_size_in_bytes, m.alias_size_in_bytes
    hlo = compiled.as_text()
    row.written = hbm_bytes_written(hlo)
    row.contractions = contractions(hlo)
    if mesh is not None and mesh.size > 1:
        from bcjax.bench.hlo import hlo_collectives

        row.collectives = hlo_collectives(hlo, mesh)
    return row


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.startswith("===")]
    # XLA's RET_CHECKs put the reason after the check; keep both, within a table cell
    return " ".join(lines[:2])[:300] if lines else type(e).__name__


# -- the matmuls' precision ----------------------------------------------------------------------

_DEF = re.compile(r"%([\w.\-]+)\s*=\s*([a-z0-9]+)\[")
_DOT = re.compile(r"\s(?:dot|convolution)\(%([\w.\-]+),\s*%([\w.\-]+)")
_F8_GEMM = re.compile(r'custom_call_target="__cublas\$lt\$matmul\$f8"')
_KINDS = {"s8": "s8", "u8": "s8", "f8e4m3fn": "f8", "f8e5m2": "f8", "f8e4m3fnuz": "f8", "bf16": "bf16", "f16": "f16",
          "f32": "f32"}


def contractions(hlo: str) -> str:
    """The operand element types of the optimised HLO's matmuls, most frequent first, e.g.
    "s8 x 240, f32 x 12": every dot/convolution by its operands (an int8 x int8 dot is "s8"; a dot
    with two types is named by both), and an H100's cuBLASLt f8 GEMM custom call as "f8"."""
    types: dict[str, str] = dict(_DEF.findall(hlo))  # instruction names are unique in a module: name -> element type
    counts: dict[str, int] = {}
    for x, y in _DOT.findall(hlo):
        a, b = types.get(x, "?"), types.get(y, "?")
        ka, kb = _KINDS.get(a, a), _KINDS.get(b, b)
        kind = ka if ka == kb else f"{ka}*{kb}"
        counts[kind] = counts.get(kind, 0) + 1
    f8 = len(_F8_GEMM.findall(hlo))
    if f8:
        counts["f8"] = counts.get("f8", 0) + f8
    return ", ".join(f"{k} x {n}" for k, n in sorted(counts.items(), key=lambda kv: -kv[1])) or "-"


# -- HBM traffic -------------------------------------------------------------------------------

_CONTROL = re.compile(r"(?:body|condition|true_computation|false_computation)=%([\w.\-]+)")
_OP = re.compile(r"(?:^|[\s}\]])([a-z][a-z0-9\-]*)\(")
_NO_TRAFFIC = ("parameter(", "constant(", "get-tuple-element(", "tuple(", "bitcast(", "while(", "conditional(",
               "after-all(", "partition-id(", "replica-id(", "-done(")


def hbm_bytes_written(hlo: str) -> float:
    """Bytes the program's top-level ops (fusions, custom calls such as the attention kernels,
    copies, collectives) write to device memory per call, loops counted by trip count: a proxy
    for HBM traffic (reads are of the same order), from the optimised HLO. Ops inside a fusion
    stay on chip and are not counted; in-place updates (dynamic-update-slice, e.g. cache writes)
    are left out, their slices being small beside the rest. A proxy to compare backends of one
    program, not a measurement."""
    from bcjax.bench.hlo import SHAPE, parse_computations, shape_bytes

    trips = {callee: k for comp in parse_computations(hlo)[0].values() for callee, k in comp[1]}
    comps: dict[str, tuple[list, list[str]]] = {}  # computation: ([(bytes, op or fused computation)], callees)
    in_place: set[str] = set()  # fused computations rooted at a dynamic-update-slice
    entry, name = None, None
    for line in hlo.splitlines():
        m = re.match(r"^(ENTRY )?%([\w.\-]+) ", line)
        if m and line.rstrip().endswith("{"):
            name = m.group(2)
            comps[name] = ([], [])
            entry = name if m.group(1) else entry
            continue
        if name is None or " = " not in line:
            continue
        rhs = line.split(" = ", 1)[1]
        calls = _CONTROL.findall(line)
        if b := re.search(r"branch_computations=\{([^}]*)\}", line):
            calls += [c.strip().lstrip("%") for c in b.group(1).split(",")]
        comps[name][1].extend(calls)
        # the op is the first lower-case word before "(" (layouts hold upper-case T(...) and S(...))
        if not (op := _OP.search(rhs)):
            continue
        if "ROOT" in line and op.group(1) == "dynamic-update-slice":
            in_place.add(name)
        if not any((op.group(1) + "(").endswith(x) for x in _NO_TRAFFIC):
            called = re.search(r"calls=%([\w.\-]+)", line) if op.group(1) == "fusion" else None
            comps[name][0].append((shape_bytes(" ".join(f"{dt}[{d}]" for dt, d in SHAPE.findall(rhs[:op.start(1)]))),
                                   called.group(1) if called else op.group(1)))
    total = 0.0

    def visit(comp: str, k: float):
        nonlocal total
        out, callees = comps.get(comp, ([], []))
        # an in-place update (a KV cache write) writes its slice, not the buffer its shape names
        total += k * sum(b for b, what in out if what not in in_place and what != "dynamic-update-slice")
        for c in callees:
            visit(c, k * trips.get(c, 1))

    if entry:
        visit(entry, 1)
    return total


# -- programs -----------------------------------------------------------------------------------


def dit_lowering(case: str, cfg, pcfg, hw, mesh: Mesh, rank: int = 16) -> Callable:
    """A thunk lowering the DiT program `case` on `mesh` from the runner's abstract inputs
    (rank: the adapter's, for "adapt")."""
    from bcjax.runners import make_runner

    if case == "adapt":
        return adapt_lowering(cfg, pcfg, hw, mesh, rank)
    if case == "sequential":  # the fused block, its mesh only splitting weights
        runner = make_runner(cfg, pcfg, hw, "sequential", mesh=mesh, program="block")
    elif case == "krea":
        import ports

        runner = make_runner(cfg, ports.get("krea_14b").pipeline, hw, "sequential", mesh=mesh, program="krea")
    elif case == "p4":
        runner = make_runner(cfg, pcfg, hw, "P4", "bidirectional", mesh)
    elif case == "cp":  # context parallel: the tick's sequential stagger, each pass split over `tokens`
        runner = make_runner(cfg, pcfg, hw, "sequential", mesh=mesh, program="tick")
    else:
        raise ValueError(f"not a DiT program: {case!r}")
    return lambda: runner.lower(*runner.abstract_inputs(1))


def adapt_lowering(cfg, pcfg, hw, mesh: Mesh, rank: int) -> Callable:
    """A thunk lowering one adaptation step (`bcjax.adapt.step.AdaptStep`) of rank `rank`, P4
    bidirectional, one prompt, from abstract inputs."""
    from bcjax.adapt import AdaptConfig
    from bcjax.adapt.step import make_adapt_step

    step = make_adapt_step(cfg, pcfg, hw, AdaptConfig(stagger="P4", mask="bidirectional", rank=rank), mesh)
    return lambda: step.lower(*step.abstract_inputs(1))


def _placement(devices, whole: bool):
    """Where a one-device program (VAE, umT5) goes: device 0, or replicated over the whole slice
    where the target needs every program to use all of it."""
    if whole:
        return NamedSharding(Mesh(np.asarray(devices), ("all",)), P()), Mesh(np.asarray(devices), ("all",))
    return SingleDeviceSharding(devices[0]), None


def vae_lowering(hw, block_frames: int, dtype: str, sharding, preset: str = "wan2.1") -> Callable:
    from bcjax.vae import wan_vae

    vcfg = wan_vae.VAEConfig.preset(preset, dtype=dtype, param_dtype=dtype)

    def lower():
        put = _abstract(sharding)
        state = wan_vae.DecodeState(wan_vae._cache_shapes(vcfg, 1, hw),  # shapes, not arrays: lowered only
                                    jax.ShapeDtypeStruct((), jnp.int32))  # type: ignore[arg-type]
        z = jax.ShapeDtypeStruct((1, block_frames, *hw, vcfg.z_dim), jnp.float32)
        return wan_vae.decode_step.lower(vcfg, put(wan_vae.param_shapes(vcfg)), put(state), put(z))

    return lower


def taehv_lowering(hw, block_frames: int, dtype: str, sharding, preset: str = "taew2_1") -> Callable:
    """A thunk lowering TAEHV's streaming decode step for one block of `block_frames` latent frames."""
    from bcjax.vae import taehv

    tcfg = taehv.TAEHVConfig.preset(preset, dtype=dtype, param_dtype=dtype)

    def lower():
        put = _abstract(sharding)
        state = jax.eval_shape(lambda: taehv.init_decode_state(tcfg, 1, hw))
        z = jax.ShapeDtypeStruct((1, block_frames, *hw, tcfg.latent_channels), jnp.float32)
        return taehv.decode_step.lower(tcfg, put(taehv.param_shapes(tcfg)), put(state), put(z))

    return lower


def umt5_lowering(dtype: str, sharding) -> Callable:
    from bcjax.text import umt5

    tcfg = umt5.UMT5Config.preset("umt5-xxl", dtype=dtype, param_dtype=dtype)

    def lower():
        put = _abstract(sharding)
        ids = jax.ShapeDtypeStruct((1, 512), jnp.int32)
        mask = jax.ShapeDtypeStruct((1, 512), jnp.bool_)
        return umt5.encode.lower(tcfg, put(umt5.param_shapes(tcfg)), put(ids), put(mask))

    return lower


def _abstract(sharding):
    return lambda tree: jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), tree)


# -- meshes --------------------------------------------------------------------------------------


def model_sizes(cfg, target: targets.Target, n: int) -> list[int]:
    """`model` sizes that split the heads and FFN, from the smallest whose DiT weights take at most
    half a device (the rest is cache, activations and the runtime) up to n."""
    from bcjax.model.wan import param_shapes

    weights = sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
                  for a in jax.tree_util.tree_leaves(param_shapes(cfg)))
    valid = [m for m in (1, 2, 4, 8, 16) if m <= n and cfg.num_heads % m == 0 and cfg.ffn_dim % m == 0]
    fitting = [m for m in valid if weights / m <= target.memory_bytes / 2]
    return fitting[:1] or valid[-1:]


def default_meshes(case: str, cfg, target: targets.Target, n: int) -> list[tuple[int, int]]:
    meshes = []
    for m in model_sizes(cfg, target, n):
        if case in ("sequential", "krea"):
            meshes.append((1, m))
        else:
            meshes += [(s, m) for s in (5, n // m) if s >= 1 and s * m <= n]
    return list(dict.fromkeys(meshes))


def build_mesh(tokens: int, model: int, devices, cfg):
    """make_mesh over the target's devices: on a whole-slice target the `tokens` axis is padded so the
    mesh covers every chip (and the label says so)."""
    from bcjax.cascade import make_mesh

    mesh = make_mesh(tokens, model, devices=devices, cfg=cfg)
    label = f"{tokens}x{model}"
    if mesh.shape[TOKENS] != tokens:
        label += f" (grown to {mesh.shape[TOKENS]}x{model}: whole slice)"
    return mesh, label


# -- printing ------------------------------------------------------------------------------------


def _gib(x: float) -> str:
    """GiB with two decimals; small figures (tiny test models) in e-notation rather than 0.00."""
    g = x / GiB
    return f"{g:.2f}" if g >= 0.01 or g == 0 else f"{g:.1e}"


def _fmt_collectives(coll: dict) -> str:
    if not coll:
        return "-"
    return "; ".join(f"{axis} {int(c['ops'])} ops {_gib(c['payload'])} GiB" for axis, c in sorted(coll.items()))


def print_row(row: Row, target: targets.Target, headroom: float) -> None:
    if row.error:
        print(f"| {row.model} | {row.program} | {row.mesh} | {row.backend} | {row.quant} | refused by the compiler: "
              f"{row.error} | | | | | | {row.compile_s:.0f} | | |", flush=True)
        return
    _, fit = row.fits(target.memory_bytes, headroom)
    print(f"| {row.model} | {row.program} | {row.mesh} | {row.backend} | {row.quant} | {_gib(row.args)} | "
          f"{_gib(row.temp)} | {_gib(row.out)} | {_gib(row.total)} | {fit} | {_gib(row.written)} | "
          f"{row.compile_s:.0f} | {row.contractions} | {_fmt_collectives(row.collectives)} |", flush=True)


HEADER = ("| model | program | mesh (tokens x model) | attention | quant | args | temp | out | total | fits | "
          "HBM written | compile s | matmuls (operand types x count) | collectives per call (optimised HLO) |")


def _parse_mesh(text: str) -> tuple[int, int]:
    try:
        tokens, model = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"--meshes {text!r}: expected TOKENSxMODEL, e.g. 5x1") from None
    return tokens, model


def _on(device, lower: Callable) -> Callable:
    """`lower` traced with `device` as jax's default device: tokamax chooses (and checks) its kernel
    by the default device, which in a compile-only process is the host CPU, not the target's."""
    def lowered():
        with jax.default_device(device):
            return lower()
    return lowered


def run(target: targets.Target, presets, cases, backends, meshes, hw, dtype: str, pcfg, layers=None,
        headroom: float = 0.1, emit: Callable[[Row], None] | None = None, quants=("none",),
        ranks=(16,)) -> list[Row]:
    """Compile every (preset, case, mesh, backend) for `target`; returns the rows (also emitted as
    each one finishes)."""
    from bcjax.model import attention
    from bcjax.model.config import WanConfig

    devices = target.devices()
    n = len(devices)
    whole = targets.whole_slice_required(devices)
    rows: list[Row] = []

    def add(row: Row):
        rows.append(row)
        if emit:
            emit(row)

    for preset in presets:
        base = WanConfig.preset(preset, dtype=dtype, param_dtype=dtype)
        if layers:
            base = dataclasses.replace(base, num_layers=layers)
        for case in (c for c in cases if c in DIT_CASES):
            shapes = meshes or default_meshes(case, base, target, n)
            if case in ("sequential", "krea"):  # a `tokens` axis would only hold replicas
                shapes = list(dict.fromkeys((1, model) for _, model in shapes))
            for tokens, model in shapes:
                if tokens * model > n:
                    raise ValueError(f"mesh {tokens}x{model} needs {tokens * model} devices; "
                                     f"target {target.name} has {n}")
                for backend in backends or attention.backends_for(target.platform):
                    for quant in quants:
                        for rank in ranks if case == "adapt" else (None,):
                            program = case if rank is None else f"{case} r{rank}"
                            cfg = dataclasses.replace(base, attention=backend, quant=quant)
                            try:
                                mesh, label = build_mesh(tokens, model, devices, cfg)
                                lower = dit_lowering(case, cfg, pcfg, hw, mesh, rank or 16)
                            except ValueError as e:  # a mesh this model or target cannot take
                                add(Row(preset, program, f"{tokens}x{model}", backend, quant, error=str(e)))
                                continue
                            if backend.startswith("tokamax"):  # it picks its kernel by the default device
                                lower = _on(devices[0], lower)
                            add(compile_row(preset, program, label, backend, lower, mesh, quant))
    sharding, mesh = _placement(devices, whole)
    label = f"{n} replicas (whole slice)" if whole else "1 device"
    if "vae" in cases:
        bf = pcfg.block_frames
        add(compile_row("wan2.1 VAE", f"decode {bf} latent frames", label, "-", vae_lowering(hw, bf, dtype, sharding),
                        mesh))
    if "taehv" in cases:
        bf = pcfg.block_frames
        add(compile_row("taew2_1 TAEHV", f"decode {bf} latent frames", label, "-",
                        taehv_lowering(hw, bf, dtype, sharding), mesh))
    if "umt5" in cases:
        add(compile_row("umt5-xxl", "encode 1 prompt (512 tokens)", label, "-", umt5_lowering(dtype, sharding), mesh))
    return rows


def main(argv=None) -> int:
    from bcjax.bench._common import force_host_devices

    force_host_devices(40)  # --target cpu compiles meshes of up to 40 host devices
    from bcjax.model.config import WanConfig
    from bcjax.schedule.config import PipelineConfig

    ap = argparse.ArgumentParser(prog="bcjax bench compile", description=__doc__.split("\n")[0])
    ap.add_argument("--target", required=True, help=f"one of: {', '.join(targets.TARGETS)}")
    ap.add_argument("--preset", nargs="+", default=["wan2.1-1.3b", "wan2.1-14b"], choices=WanConfig.preset_names())
    ap.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    ap.add_argument("--backends", nargs="+", choices=BACKENDS,
                    help="attention backends (default: every one the target's platform has)")
    ap.add_argument("--meshes", nargs="+", metavar="TOKENSxMODEL",
                    help="meshes of the DiT programs (default: see above)")
    ap.add_argument("--latent-hw", nargs=2, type=int, default=(60, 104), metavar=("H", "W"),
                    help="latent size (default 60 104 = 480x832 video)")
    ap.add_argument("--layers", type=int, help="DiT layers to compile (default: the preset's)")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--headroom", type=float, default=0.1, help="fraction of device memory kept free (default 0.1)")
    ap.add_argument("--port", help="the sampler (window, steps) of the sequential and P4 programs from this port "
                                   "(default: PipelineConfig(), Self-Forcing's)")
    ap.add_argument("--quant", nargs="+", default=["none"], choices=QUANTS,
                    help="DiT quantization modes, a row each (bcjax.model.quant; default: none)")
    ap.add_argument("--ranks", nargs="+", type=int, default=[16],
                    help="adapter ranks of the adapt case, a row each (default: 16)")
    args = ap.parse_args(argv)
    target = targets.get(args.target)
    for q in args.quant:
        targets.check_quant(target, q)
    from bcjax import compile_cache

    compile_cache.disable()  # a compile-only client cannot load cached executables (and nothing runs)
    if not 0 <= args.headroom < 1:
        raise ValueError(f"--headroom {args.headroom}: expected a fraction in [0, 1)")
    from bcjax.model import attention

    for b in args.backends or ():
        attention.check_backend(b, target.platform)
    meshes = [_parse_mesh(m) for m in args.meshes] if args.meshes else None
    if args.port:
        import ports

        pcfg = ports.get(args.port).pipeline
    else:
        pcfg = PipelineConfig()
    hw = tuple(args.latent_hw)
    devices = target.devices()
    for tokens, model in meshes or ():
        if tokens * model > len(devices):
            raise ValueError(f"mesh {tokens}x{model} needs {tokens * model} devices; target {target.name} has "
                             f"{len(devices)}")
    whole = " | programs must use the whole slice" if targets.whole_slice_required(devices) else ""
    print(f"target {target.name}: {target.what} | {len(devices)} x {devices[0].device_kind} ({target.platform}), "
          f"{target.memory_gib:.1f} GiB each, headroom {args.headroom:.0%}{whole} | jax {jax.__version__} | latent "
          f"{hw[0]}x{hw[1]} | {args.dtype} | window {pcfg.window_frames} frames (cache {pcfg.cache_frames}) | "
          f"GiB per device from the compiler's buffer assignment", flush=True)
    print(HEADER + "\n|" + "---|" * (HEADER.count("|") - 1), flush=True)
    run(target, args.preset, args.cases, args.backends, meshes, hw, args.dtype, pcfg, args.layers, args.headroom,
        emit=lambda row: print_row(row, target, args.headroom), quants=tuple(args.quant),
        ranks=tuple(args.ranks))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
