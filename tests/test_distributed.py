"""Several processes, one mesh: the cascade across 3 local processes (2 fake CPU devices each,
gloo collectives; the `tokens` mesh takes 5 of the 6, so it spans all three), and across 2
processes of 5 devices forming (tokens 5, model 2), equals the single-process 5-device cascade,
with params restored by orbax straight onto that mesh; bad setups fail fast. (Equal devices per process: JAX's and
orbax's multi-host utilities assume it.)"""

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from shared import subprocess_env

import bcjax.distributed as dist

HERE = pathlib.Path(__file__).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _env():
    """Each worker sets its own device count (the suite's compile flags kept)."""
    env = subprocess_env(None)
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), env.get("PYTHONPATH", "")])
    return env


@pytest.mark.slow
@pytest.mark.parametrize("processes, devices, model", [(3, 2, 1), (2, 5, 2)],
                         ids=["3x2 devices, (5,1)", "2x5 devices, (5,2)"])
def test_processes_form_one_mesh_and_match_one_process(tmp_path, processes, devices, model):
    """3 processes x 2 devices, the `tokens` mesh taking 5 of the 6; 2 x 5 forming (tokens 5,
    model 2), the weights split over `model` and restored that way. Both equal one process's
    (5, 1) cascade."""
    if jax.device_count() < 5:
        pytest.skip("needs 5 devices (XLA_FLAGS=--xla_force_host_platform_device_count=5)")
    from distributed_case import run_case, tiny_params

    from bcjax import checkpoint

    reference = np.asarray(run_case())
    checkpoint.save(str(tmp_path / "ckpt"), {"dit": tiny_params()}, {"layout": "test"})
    port, out = _free_port(), tmp_path / "latents.npy"
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, str(HERE / "distributed_worker.py"), str(i), str(processes), str(port),
                               str(devices), str(out), str(tmp_path / "ckpt"), str(model)],
                              env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(processes)]
    logs = [p.communicate(timeout=300)[0] for p in procs]
    print(f"{processes} processes: {time.perf_counter() - t0:.1f} s")
    for p, log in zip(procs, logs, strict=True):
        assert p.returncode == 0, log[-3000:]
    total = processes * devices
    for i, log in enumerate(logs):
        assert f"process {i}/{processes}, {devices} local of {total} devices" in log, log[-2000:]
    latents = np.load(out)  # written by process 0 only
    assert latents.shape == reference.shape
    assert float(np.abs(latents - reference).max()) <= 1e-5


def test_unreachable_coordinator_fails_fast_with_its_address():
    port = _free_port()  # nothing listens there
    code = ("import os; os.environ['JAX_PLATFORMS'] = 'cpu'\n"
            "import bcjax.distributed as d\n"
            f"d.initialize('localhost:{port}', 2, 1, timeout_s=5)\n")
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"coordinator localhost:{port} did not answer within 5 s (process 1 of 2)" in r.stderr, r.stderr[-2000:]
    assert time.perf_counter() - t0 < 60


@pytest.mark.slow
def test_missing_processes_abort_after_the_timeout_naming_the_job():
    port = _free_port()
    code = ("import os; os.environ['JAX_PLATFORMS'] = 'cpu'\n"
            "import bcjax.distributed as d\n"
            f"d.initialize('localhost:{port}', 2, 0, timeout_s=5)\n")  # process 1 never comes
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", code], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert f"joining localhost:{port} as process 0 of 2 (timeout 5 s)" in r.stderr, r.stderr[-2000:]
    assert time.perf_counter() - t0 < 60


@pytest.mark.parametrize("args, match", [
    (("localhost:1234", None, None), "go together"),
    (("localhost", 2, 0), "HOST:PORT"),
    (("localhost:99999", 2, 0), "HOST:PORT"),
    (("localhost:1234", 2, 2), r"process_id 2 must lie in \[0, num_processes=2\)"),
])
def test_bad_arguments_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        dist.initialize(*args)


def test_cli_runtime_flags_are_checked_before_anything_runs():
    r = subprocess.run([sys.executable, "-m", "bcjax.cli", "--coordinator", "localhost:1234", "info"], env=_env(),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "go together" in r.stderr, r.stderr[-2000:]
    r = subprocess.run([sys.executable, "-m", "bcjax.cli", "--distributed", "--coordinator", "h:1",
                        "--num-processes", "2",
                        "--process-id", "0", "info"], env=_env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "--distributed auto-detects" in r.stderr, r.stderr[-2000:]
