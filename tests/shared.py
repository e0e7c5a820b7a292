"""What the tests share: the XLA flags of the run's processes, and one runner per configuration.

A runner jit-compiles its tick or block and, per `num_blocks`, the scan over them; most of the
suite's time is those compiles. A module's tests of the same configuration take the same runner
from `runner(...)`, so its programs compile once, not once per test (tests about compiling or
constructing a runner, or that change one, call `make_runner` themselves); `release()` drops them
after the module. Nothing here imports jax at import time: conftest imports the flags before jax
starts."""

from __future__ import annotations

import functools
import os
import subprocess
import sys

# Ten fake CPU devices, enough for every mesh the suite builds (5 for the paper's P4, 8 and 10 for the
# token-split and tensor-parallel cases), so no test needs a process of its own for its devices.
# XLA:CPU compiling for speed of compiling: the suite's programs are tiny and compile far longer than
# they run (about 2x less with these). LLVM's optimisation off and the classic elemental emitters
# instead of the MLIR fusion emitters change how fast the code is made and runs, not what it computes
# (no fast-math either way; the oracle tolerances hold).
DEVICES = 10
COMPILE_FLAGS = {"--xla_backend_optimization_level": "0", "--xla_llvm_disable_expensive_passes": "true",
                 "--xla_cpu_use_fusion_emitters": "false"}


@functools.cache
def compile_flags() -> dict[str, str]:
    """COMPILE_FLAGS if this jaxlib knows them all (XLA aborts at start on a flag it does not know;
    these only save time), else none. Asked once per run, of a child process."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=" ".join(f"{k}={v}" for k, v in COMPILE_FLAGS.items()))
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env, capture_output=True,
                           timeout=300)
    return COMPILE_FLAGS if probe.returncode == 0 else {}


def _append(base: str, flags: dict[str, str]) -> str:
    return " ".join([base, *(f"{k}={v}" for k, v in flags.items() if k not in base)]).strip()


def xla_flags(devices: int = DEVICES, base: str = "") -> str:
    """`base` (the user's XLA_FLAGS) with the suite's flags appended; a flag `base` sets wins."""
    return _append(base, {"--xla_force_host_platform_device_count": str(devices), **compile_flags()})


def subprocess_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """os.environ for a child process: the suite's compile flags, and `devices` fake CPU devices
    (None: the child sets its own device count, as the multi-process workers do)."""
    env = dict(os.environ, **extra)
    base = " ".join(f for f in env.pop("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform"))
    env["XLA_FLAGS"] = xla_flags(devices, base) if devices else _append(base, compile_flags())
    return env


def runner(cfg, pcfg, latent_hw, *args, **kwargs):
    """`bcjax.runners.make_runner(...)`, one per configuration until `release()`, however the
    arguments are spelled (positional or keyword, defaults given or not). Arguments must be
    hashable: configs are frozen dataclasses, meshes hash by devices and axis names."""
    import inspect

    from bcjax.runners import make_runner

    sig = inspect.signature(make_runner)
    bound = sig.bind(cfg, pcfg, tuple(latent_hw), *args, **kwargs)
    bound.apply_defaults()
    key = []
    for name, value in bound.arguments.items():
        if sig.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            key += sorted(value.items())
        else:
            key.append((name, value))
    return _runner(tuple(key))


@functools.cache
def _runner(arguments: tuple):
    from bcjax.runners import make_runner

    return make_runner(**dict(arguments))


def release() -> None:
    """Drop the shared runners and every compiled program (conftest calls it after each test module).
    Each XLA:CPU executable holds memory maps of its own, and a process may hold only
    vm.max_map_count (65530) of them: a whole suite's programs kept alive in one process crash it
    (a segfault inside a compile), so programs live as long as the module that made them."""
    import gc

    import jax

    _runner.cache_clear()
    jax.clear_caches()
    gc.collect()
