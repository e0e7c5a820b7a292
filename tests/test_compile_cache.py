"""The persistent compilation cache: on by default, overridable, and a second start reads it."""

import os
import subprocess
import sys

import pytest

from bcjax import compile_cache
from bcjax.bench.startup import start


@pytest.mark.slow
def test_second_start_hits_the_cache(tmp_path):
    cache = str(tmp_path / "cache")
    cold = start(cache, "tiny", (4, 6), "sequential")
    assert cold["cache"] == cache and cold["hits"] == 0 and cold["misses"] > 0
    assert sum(len(f) for _, _, f in os.walk(cache)) > 0  # entries were written
    warm = start(cache, "tiny", (4, 6), "sequential")
    assert warm["hits"] >= 1 and warm["misses"] < cold["misses"]  # the block function came from disk
    print(f"first block: cold {cold['first_block_s']:.2f} s, warm {warm['first_block_s']:.2f} s")


def test_on_by_default_and_opt_out(tmp_path):
    code = "import bcjax, jax; print(jax.config.jax_compilation_cache_dir)"
    env = {k: v for k, v in os.environ.items() if k not in ("BCJAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    run = lambda e: subprocess.run([sys.executable, "-c", code], env=e, capture_output=True, text=True).stdout.strip()  # noqa: E731
    assert run(env) == str(tmp_path / "bcjax" / "jax-compile")
    assert run({**env, "BCJAX_COMPILE_CACHE": "off"}) == "None"
    assert run({**env, "BCJAX_COMPILE_CACHE": str(tmp_path / "mine")}) == str(tmp_path / "mine")
    # a directory the user gave JAX itself is left alone
    assert run({**env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax")}) == str(tmp_path / "jax")


def test_suite_runs_uncached():
    assert compile_cache.current() is None  # conftest opts out: tests never depend on a warm cache
