"""Pieces shared by the benchmarks."""

from __future__ import annotations

import os
import statistics
import time
import warnings

import jax
import jax.numpy as jnp

from bcjax.model.kv_cache import KVCache

VIDEO_FRAMES_PER_BLOCK = 12  # one block = 3 latent frames = 12 video frames (paper's FPS)


def force_host_devices(n: int) -> None:
    """Ask XLA:CPU for `n` fake host devices (the compile-only meshes of `bench comm --hlo` and
    `bench compile --target cpu`), unless the caller's XLA_FLAGS already chose a count. A bench's
    main calls it before its first device query: the flag only counts before a backend starts,
    so a process whose backend is up already is told so instead of silently getting fewer."""
    from jax._src import xla_bridge

    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    if xla_bridge.backends_are_initialized():
        warnings.warn(f"jax's backends are already running: the {n} fake CPU devices this bench compiles for "
                      "cannot be added (set XLA_FLAGS=--xla_force_host_platform_device_count=N before jax starts)",
                      stacklevel=2)
        return
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def median_seconds(fn, repeats: int) -> float:
    """Median seconds of fn() (which must block), after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def full_cache(cfg, pcfg, batch: int, tokens_per_frame: int, key) -> KVCache:
    """A cache with every slot holding a frame (random K/V): the steady state of a long stream.

    A full cache is the costliest case (attention skips what no query sees, so an empty cache is
    cheaper); starting full skips filling it with real (slow) blocks.
    """
    cap = pcfg.cache_frames
    shape = (cfg.num_layers, batch, cap * tokens_per_frame, cfg.num_heads, cfg.head_dim)
    k1, k2 = jax.random.split(key)
    return KVCache(jax.random.normal(k1, shape, cfg.compute_dtype), jax.random.normal(k2, shape, cfg.compute_dtype),
                   jnp.arange(cap, dtype=jnp.int32), jnp.int32(0))
