"""One process of the multi-host cascade test: `python distributed_worker.py PID N PORT DEVICES OUT CKPT [MODEL]`.

Joins the others through bcjax.distributed, builds the (tokens 5, model MODEL = 1) mesh across all of them,
runs a P4 cascade of the tiny model and (process 0 only) saves the latents to OUT.
"""

import os
import sys

pid, n, port, devices, out, ckpt = (int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4], sys.argv[5],
                                    sys.argv[6])
model = int(sys.argv[7]) if len(sys.argv) > 7 else 1
# its own device count after the suite's compile flags (tests/shared.subprocess_env)
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
os.environ["JAX_PLATFORMS"] = "cpu"

import bcjax.distributed as dist  # noqa: E402

dist.initialize(f"localhost:{port}", n, pid, timeout_s=60)

import numpy as np  # noqa: E402
from distributed_case import run_case  # noqa: E402

latents = run_case(checkpoint_path=ckpt, model=model)  # params read by orbax straight onto the 2-process mesh
if dist.is_primary():
    np.save(out, np.asarray(latents))
print(dist.env_summary(), flush=True)
