"""The persistent compilation cache: on in the `bcjax` command (not on import), overridable, and a second
start reads it."""

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


_SETTINGS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
             "jax_cpu_collectives_implementation")


def _clean_env(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("BCJAX_COMPILE_CACHE", "JAX_COMPILATION_CACHE_DIR")}
    env["XDG_CACHE_HOME"] = str(tmp_path)
    return env


def _run(code, env):
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout.strip().splitlines()[-1]


def test_import_changes_no_jax_setting(tmp_path):
    """`import bcjax` and the modules of the Python API leave JAX's global config as a bare `import jax` has it."""
    read = f"import jax; print([getattr(jax.config, k) for k in {_SETTINGS!r}])"
    modules = ("bcjax", "bcjax.app.t2v", "bcjax.app.streaming", "bcjax.checkpoint", "bcjax.runners",
               "bcjax.distributed", "bcjax.cascade", "bcjax.text", "bcjax.vae", "bcjax.compile_cache", "ports")
    bare = _run(read, _clean_env(tmp_path))
    assert _run("; ".join(f"import {m}" for m in modules) + "; " + read, _clean_env(tmp_path)) == bare
    assert not (tmp_path / "bcjax").exists()  # no cache folder made either


@pytest.mark.slow
def test_command_turns_the_cache_on_and_opt_out(tmp_path):
    """What `bcjax` runs before its command: on by default, overridable, and a directory the user gave JAX stays."""
    code = ("import sys, jax; from bcjax.cli import build_parser, _runtime; "
            "_runtime(build_parser().parse_args(sys.argv[1:] + ['info'])); print(jax.config.jax_compilation_cache_dir)")
    env = _clean_env(tmp_path)
    def run(e, *flags):
        return subprocess.run([sys.executable, "-c", code, *flags], env=e, capture_output=True,
                              text=True).stdout.strip()

    assert run(env) == str(tmp_path / "bcjax" / "jax-compile")
    assert run({**env, "BCJAX_COMPILE_CACHE": "off"}) == "None"
    assert run({**env, "BCJAX_COMPILE_CACHE": str(tmp_path / "mine")}) == str(tmp_path / "mine")
    assert run(env, "--compile-cache", str(tmp_path / "flag")) == str(tmp_path / "flag")
    assert run(env, "--no-compile-cache") == "None"
    # a directory the user gave JAX itself is left alone
    assert run({**env, "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax")}) == str(tmp_path / "jax")


def test_explicit_enable_for_python_users(tmp_path):
    code = ("import bcjax, jax; "
            "print(bcjax.compile_cache.enable(), jax.config.jax_persistent_cache_min_compile_time_secs)")
    env = {**_clean_env(tmp_path), "BCJAX_COMPILE_CACHE": "off"}  # an explicit call wins over the command's opt-out
    assert _run(code, env) == f"{tmp_path / 'bcjax' / 'jax-compile'} {compile_cache.MIN_COMPILE_S}"


def test_cpu_collectives_only_for_a_multi_process_cpu_job():
    from bcjax.distributed import cpu_collectives

    assert cpu_collectives("cpu", 3, None) == "gloo"
    assert cpu_collectives("cpu", None, None) == "gloo"  # auto-detected clusters are several processes
    assert cpu_collectives("cpu", 1, None) is None  # one process: nothing crosses processes
    assert cpu_collectives("cuda,cpu", 2, None) is None  # GPU collectives are NCCL's, not the CPU client's
    assert cpu_collectives(None, 2, None) is None  # auto-detected platform: JAX's own default stands
    assert cpu_collectives("cpu", 2, "mpi") is None  # the user's choice stands


def test_suite_runs_uncached():
    assert compile_cache.current() is None  # conftest opts out: tests never depend on a warm cache
