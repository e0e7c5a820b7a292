"""JAX's persistent compilation cache: the second start of a job skips compiling.

The `bcjax` command turns it on (`enable_unless_configured`): JAX's cache goes to `default_dir()`
unless the user already chose a directory (`jax_compilation_cache_dir`,
`JAX_COMPILATION_CACHE_DIR`) or opted out with `BCJAX_COMPILE_CACHE=off`;
`BCJAX_COMPILE_CACHE=/some/dir` moves it. `import bcjax` leaves JAX's settings alone (they are the
importing program's, not the library's): Python users call `enable()` themselves. The cache key
covers the program, the jax/XLA versions, the devices and flags, so entries are never reused wrongly.
"""

from __future__ import annotations

import os

import jax

ENV = "BCJAX_COMPILE_CACHE"
# Every program that took this long to compile is kept (JAX's default, 1 s, would skip a tiny
# model's block function on CPU, which is what the time-to-first-frame of a small job is made of).
MIN_COMPILE_S = 0.1


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bcjax", "jax-compile")


_OFF = ("off", "0", "false", "no")


def enable(path: str | None = None, min_compile_s: float = MIN_COMPILE_S) -> str:
    """Use `path` (default: $BCJAX_COMPILE_CACHE or default_dir()) as the persistent cache; returns it."""
    choice = os.environ.get(ENV, "")
    chosen = choice if choice.lower() not in _OFF else None  # an explicit call enables even where the env opts out
    path = os.path.abspath(os.path.expanduser(path or chosen or default_dir()))
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
    return path


def disable() -> None:
    jax.config.update("jax_compilation_cache_dir", None)


def current() -> str | None:
    """The directory JAX caches compiled programs in, or None."""
    return jax.config.jax_compilation_cache_dir  # type: ignore[attr-defined]  # flags are set at run time


def enable_unless_configured() -> str | None:
    """What the `bcjax` command does at start: enable unless opted out or already configured by the user."""
    choice = os.environ.get(ENV, "")
    if choice.lower() in _OFF or current() is not None:
        return current()
    try:
        return enable(choice or None)
    except OSError:  # a read-only home: run uncached rather than fail
        return None
