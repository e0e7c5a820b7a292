"""Compile targets: real TPU and GPU device sets that XLA compiles for without the hardware.

A `Target` names a device set (a TPU slice, a GPU node, this host) and knows its per-device memory
and the topology it maps to. `target.devices()` gives compile-only devices:

* TPU: libtpu's compile-only topologies (`jax[tpu]`; `jax.experimental.topologies`), compiled
  by XLA:TPU with Mosaic for the Pallas kernels;
* GPU: the CUDA plugin's deviceless client (`jax[cuda13]`) from a target description, one
  `GpuTargetConfigProto` text file per GPU in this package (h100.txtpb, h200.txtpb), compiled by
  XLA:GPU with Triton and cuDNN;
* cpu: this process's own devices (XLA:CPU).

Arrays cannot be created on compile-only devices; programs are lowered from ShapeDtypeStructs
(the runners' `abstract_inputs`). Nothing runs, so these give memory and kernel validity, never time.

The whole-slice rule: XLA:TPU refuses a program on a v5e slice of more than 16 chips (v5e-32,
v5e-64) whose device assignment is not the whole slice ("On platforms with limited ICI routing device
assignment should include all slice devices"). `whole_slice` records it per target, as probed with
the real compiler (`tests/test_compile_targets.py` pins it); `make_mesh` pads the `tokens` axis to
cover the slice.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from importlib import resources

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    platform: str  # "tpu", "gpu", "cpu": what picks the attention backend
    topology: str  # libtpu topology ("v5e:2x4"), GPU "slices x hosts x devices" ("1x1x8"), or "host"
    num_devices: int
    memory_bytes: int  # HBM per device (host RAM for cpu)
    whole_slice: bool = False  # a program must use every device (TPU slices with limited ICI routing)
    spec_file: str | None = None  # GPU: the GpuTargetConfigProto text file in this package
    what: str = ""

    @property
    def memory_gib(self) -> float:
        return self.memory_bytes / GiB

    def devices(self) -> list:
        """The target's devices, compile-only for TPU and GPU (ordered as the topology lists them)."""
        return list(_devices(self))

    def spec_text(self) -> str:
        if self.spec_file is None:
            raise ValueError(f"target {self.name!r} has no GPU target description")
        return resources.files(__name__).joinpath(self.spec_file).read_text()


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gpu_memory(spec_file: str) -> int:
    text = resources.files(__name__).joinpath(spec_file).read_text()
    return int(text.split("device_memory_size:")[1].split()[0])


def _tpu(name: str, topology: str, chips: int, memory_gb: float, whole_slice: bool, what: str) -> Target:
    return Target(name, "tpu", topology, chips, int(memory_gb * 2**30), whole_slice, None, what)


# HBM per chip as libtpu reports it: v5e 16 GiB, v5p 95 GiB, v6e 32 GiB. whole_slice: probed
# with XLA:TPU (libtpu 0.0.42), see the module docstring.
TARGETS: dict[str, Target] = {t.name: t for t in (
    _tpu("v5e-8", "v5e:2x4", 8, 16, False, "TPU v5e, 8 chips (one host)"),
    _tpu("v5e-16", "v5e:4x4", 16, 16, False, "TPU v5e, 16 chips (4 hosts)"),
    _tpu("v5e-32", "v5e:4x8", 32, 16, True, "TPU v5e, 32 chips (8 hosts)"),
    _tpu("v5p-8", "v5p:2x2x1", 4, 95, False, "TPU v5p-8: 4 chips (8 TensorCores)"),
    _tpu("v5p-16", "v5p:2x2x2", 8, 95, False, "TPU v5p-16: 8 chips (16 TensorCores)"),
    _tpu("v6e-8", "v6e:2x4", 8, 32, False, "TPU v6e (Trillium), 8 chips"),
    _tpu("v6e-16", "v6e:4x4", 16, 32, False, "TPU v6e (Trillium), 16 chips"),
    Target("h100", "gpu", "1x1x8", 8, _gpu_memory("h100.txtpb"), False, "h100.txtpb", "8x NVIDIA H100 SXM 80 GB"),
    Target("h200", "gpu", "1x1x8", 8, _gpu_memory("h200.txtpb"), False, "h200.txtpb", "8x NVIDIA H200 SXM 141 GB"),
    Target("cpu", "cpu", "host", 0, _host_memory(), False, None, "this host's XLA:CPU devices"),
)}


# 8-bit matmuls each platform's matrix units take (what `--quant int8`/`fp8` compile to): TPU v5e,
# v5p and v6e multiply int8 (v5e at twice its bf16 rate) but have no fp8 MXU path; Hopper tensor
# cores take int8 and fp8 (e4m3); XLA:CPU takes int8 dots
EIGHT_BIT_MATMULS = {"tpu": ("int8",), "gpu": ("int8", "fp8"), "cpu": ("int8",)}


def check_quant(target: Target, quant: str) -> None:
    """A weights+activations mode the target's matrix units cannot multiply is refused, naming the
    target (weight-only modes dequantize to bf16 and run anywhere)."""
    if quant in ("int8", "fp8") and quant not in EIGHT_BIT_MATMULS[target.platform]:
        raise ValueError(f"--quant {quant}: target {target.name} ({target.what}) has no {quant} matmuls; "
                         f"use --quant {quant}-weight (8-bit weights, bf16 matmuls) or "
                         f"{' / '.join(EIGHT_BIT_MATMULS[target.platform])}")


def get(name: str) -> Target:
    if name not in TARGETS:
        raise ValueError(f"unknown compile target {name!r}; known: {', '.join(TARGETS)}")
    return TARGETS[name]


@functools.cache
def _devices(target: Target) -> tuple:
    import jax
    from jax.experimental import topologies

    if target.platform == "cpu":
        return tuple(jax.devices("cpu"))
    if target.platform == "tpu":
        if not _has_libtpu():  # a target this install cannot compile for: one line, not a traceback
            raise ValueError(f"target {target.name!r} needs libtpu (XLA:TPU's compile-only topologies), which is not "
                             f"installed: pip install 'jax[tpu]=={jax.__version__}' (bcjax's tpu extra)")
        # compile-only needs no exclusive hold on a TPU: without this, a second process (a test run
        # beside a bench) finds libtpu's lockfile taken and gets no topology
        os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
        try:
            topo = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
        except Exception as e:  # libtpu missing or refusing: say what to install
            raise RuntimeError(f"target {target.name!r} needs libtpu's compile-only topologies "
                               f"(pip install 'jax[tpu]=={jax.__version__}'): {str(e).splitlines()[0]}") from e
    else:
        try:
            topo = topologies.get_topology_desc(topology_name="", platform="cuda", target_config=target.spec_text(),
                                                topology=target.topology)
        except Exception as e:
            raise RuntimeError(f"target {target.name!r} needs the CUDA plugin's deviceless compiler "
                               f"(pip install 'jax[cuda13]=={jax.__version__}', run with JAX_PLATFORMS=cpu): "
                               f"{str(e).splitlines()[0]}") from e
    devices = tuple(topo.devices)
    if len(devices) != target.num_devices:
        raise RuntimeError(f"target {target.name!r}: topology {target.topology} gave {len(devices)} devices, "
                           f"expected {target.num_devices}")
    return devices


def _has_libtpu() -> bool:
    """Whether jax can load libtpu: the `libtpu` package, or a library at $TPU_LIBRARY_PATH (how
    jax._src.cloud_tpu_init.get_tpu_library_path finds it)."""
    if os.path.isfile(os.environ.get("TPU_LIBRARY_PATH", "")):
        return True
    try:
        return importlib.util.find_spec("libtpu") is not None
    except ImportError:  # a finder that blocks the package (as .ci/no_torch blocks torch)
        return False


def whole_slice_required(devices) -> bool:
    """Whether XLA:TPU needs a program on these devices to use all of them: a TPU slice whose
    kind and chip count match a target probed to need it."""
    devices = list(devices)
    if not devices or devices[0].platform != "tpu":
        return False
    kind = devices[0].device_kind.lower()
    n = len({d.id for d in devices})
    for t in TARGETS.values():
        if t.platform == "tpu" and t.whole_slice and t.num_devices == n and t.topology.split(":")[0] in _kinds(kind):
            return True
    # probed: v5e:4x8 and v5e:8x8 need it, v5e:4x4 does not; v6e:4x8 and v5p:2x4x4 do not
    return n > 16 and "v5e" in _kinds(kind)


def _kinds(device_kind: str) -> tuple[str, ...]:
    """Topology prefixes a device_kind ("TPU v5 lite", "TPU v5e", "TPU v6 lite", "TPU v5p") maps to."""
    if "v5 lite" in device_kind or "v5e" in device_kind or "v5litepod" in device_kind:
        return ("v5e",)
    if "v6" in device_kind:
        return ("v6e",)
    if "v5p" in device_kind or device_kind.strip().endswith("v5"):
        return ("v5p",)
    return ()
