"""Several hosts, one ('tokens', 'model') mesh: JAX's multi-controller runtime, not a launcher of our own.

Every process runs the same program. `initialize` joins them through `jax.distributed` (which
finds TPU pods, SLURM, ... by itself; or takes an explicit coordinator); `jax.devices()` then
lists every process's devices and `make_mesh` spans them. Arrays handed to the cascade must then
be *global*: `replicate` / `put` build them from data every process holds (each process
supplies only its own devices' shards), and `fetch` brings a replicated result back to the host
from a local copy. Only the primary process (index 0) writes files.
"""

from __future__ import annotations

import os
import socket
import sys
import time

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None, *,
               local_device_ids=None, timeout_s: int = 120) -> None:
    """Join the JAX distributed runtime; call before anything touches a device.

    No arguments: auto-detection (TPU pod slices, SLURM, Open MPI...). Explicit: coordinator
    'HOST:PORT' (process 0 listens there), num_processes and process_id, all three. A coordinator
    that never answers or a process count that never completes fails after `timeout_s` seconds
    with the address, rank and count in the message, not a hang.
    """
    explicit = {"coordinator": coordinator, "num_processes": num_processes, "process_id": process_id}
    given = {k for k, v in explicit.items() if v is not None}
    if given and given != set(explicit):
        raise ValueError(f"--coordinator, --num-processes and --process-id go together; got only {sorted(given)}")
    if coordinator is not None:
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"coordinator {coordinator!r}: expected HOST:PORT (e.g. 10.0.0.1:1234)")
        assert num_processes is not None and process_id is not None  # given together with coordinator
        if num_processes < 1 or not 0 <= process_id < num_processes:
            raise ValueError(f"process_id {process_id} must lie in [0, num_processes={num_processes})")
        if process_id != 0:
            _wait_for(host, int(port), timeout_s, f"process {process_id} of {num_processes}")
    # XLA aborts the process (no Python exception) when the job never completes, e.g. fewer
    # processes than num_processes: say first what was attempted, so the log explains the abort.
    print(f"bcjax.distributed: joining {coordinator or 'the auto-detected cluster'}"
          + (f" as process {process_id} of {num_processes}" if coordinator else "") + f" (timeout {timeout_s} s)",
          file=sys.stderr, flush=True)
    chosen = jax.config.jax_cpu_collectives_implementation  # type: ignore[attr-defined]  # flags are set at run time
    collectives = cpu_collectives(jax.config.jax_platforms,  # type: ignore[attr-defined]  # flags are set at run time
                                  num_processes, chosen)
    if collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", collectives)
    try:
        jax.distributed.initialize(coordinator, num_processes, process_id, local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s)
    except Exception as e:  # re-raised with the context a user needs
        where = (f"coordinator {coordinator}, process {process_id} of {num_processes}" if coordinator
                 else "auto-detected cluster")
        raise ConnectionError(f"could not join the JAX distributed runtime ({where}) within {timeout_s} s: {e}") from e


def cpu_collectives(platforms: str | None, num_processes: int | None, chosen: str | None) -> str | None:
    """The CPU collectives to set before joining, or None to leave JAX's setting as it is.

    Only a CPU job of several processes needs cross-process collectives on its CPU client (without
    one, its first cross-process collective fails); gloo is then chosen unless the user picked an
    implementation (mpi, or JAX's own default, gloo since jax 0.5). platforms: `jax_platforms`
    ("cpu", "cuda,cpu", or None for JAX's auto-detection, where the accelerator, if any, wins);
    num_processes: None when auto-detected, which joins several processes by design.
    """
    cpu = platforms is not None and platforms.split(",")[0].strip() == "cpu"
    several = num_processes is None or num_processes > 1
    return "gloo" if cpu and several and chosen is None else None


def _wait_for(host: str, port: int, timeout_s: float, who: str) -> None:
    """Until the coordinator accepts TCP connections; a clear error at the deadline."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=1.0).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"coordinator {host}:{port} did not answer within {timeout_s} s ({who}): {e}; "
                                   "is process 0 running, with the same --coordinator?") from None
            time.sleep(0.25)


def is_primary() -> bool:
    """Whether this process writes outputs (process 0; always True on one host)."""
    return jax.process_index() == 0


def put(x, sharding: NamedSharding):
    """A global array with `sharding` from host data `x` that every process holds identically
    (numpy, or a local jax array). Each process transfers only its own devices' shards; on one
    host this is `jax.device_put`. An array already so placed is returned as is."""
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(sharding, x.ndim):
        return x
    if jax.process_count() == 1:
        return jax.device_put(x, sharding)
    host = fetch(x) if isinstance(x, jax.Array) else np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def replicate(tree, mesh):
    """Every leaf of `tree` replicated over `mesh` (params, prompt K/V, the clean cache)."""
    rep = NamedSharding(mesh, P())
    return jax.tree_util.tree_map(lambda x: put(x, rep), tree)


def fetch(x) -> np.ndarray:
    """Host copy of a replicated (or single-process) array, read from this process's own devices."""
    if x.is_fully_addressable:
        return np.asarray(x)
    if not x.sharding.is_fully_replicated:
        raise ValueError(f"array with sharding {x.sharding} is split across processes; gather it first")
    return np.asarray(x.addressable_shards[0].data)


def local(x):
    """x itself when this process holds all of it, else a local array of this process's replica."""
    return x if x.is_fully_addressable else jax.numpy.asarray(fetch(x))


def env_summary() -> str:
    return (f"process {jax.process_index()}/{jax.process_count()}, {jax.local_device_count()} local of "
            f"{jax.device_count()} devices, platform {jax.default_backend()}, host {os.uname().nodename}")
