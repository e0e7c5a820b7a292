"""The token-split equality case on 8 fake CPU devices: `report()` (tests/test_token_split.py calls
it in the suite's process, which has 10) gives every stagger on 8 `tokens` devices, and (tokens, model)
meshes (2, 2) and (4, 2), against one device; and the compiles of a stream on the (4, 2) mesh after
its first tick (must be 0).

`python tests/token_split_case.py --table` prints the docs' equality table instead: every case on
2, 3, 4, 5 and 8 `tokens` devices and on (2, 2) and (4, 2), max abs difference to one device.
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor

if __name__ == "__main__":
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

from shared import runner  # noqa: E402

import ports  # noqa: E402
from bcjax.cascade import make_mesh  # noqa: E402
from bcjax.compile_count import CompileCounter  # noqa: E402
from bcjax.model import WanConfig, init_params, text_kv  # noqa: E402
from bcjax.pipeline import PipelineConfig  # noqa: E402
from bcjax.runners import make_runner  # noqa: E402

HW = (4, 6)
CFG = WanConfig.preset("tiny", num_heads=4, attention="xla")
ROLLING = PipelineConfig(window_frames=9, sink_frames=3)
KREA = ports.get("krea_14b").pipeline
CASES = {  # name: (pipeline config, stagger, mask)
    "sequential": (ROLLING, "sequential", "causal"),
    "krea": (KREA, "sequential", "causal"),
    "P2-causal": (ROLLING, "P2", "causal"),
    "P2-bidirectional": (ROLLING, "P2", "bidirectional"),
    "P4-causal": (ROLLING, "P4", "causal"),
    "P4-bidirectional": (ROLLING, "P4", "bidirectional"),
    "P4-no-clean": (ROLLING, "P4-no-clean", "bidirectional"),  # 4 blocks in flight, no clean stage
}
BLOCKS = 5


def report() -> dict:
    """{"errors": {case: max abs to one device}, "splits": {case: token split}, "stream_compiles": n}."""
    params = init_params(CFG, jax.random.key(0), HW)
    prompt = jnp.asarray(np.random.default_rng(0).standard_normal((1, CFG.text_len, CFG.text_dim)), jnp.float32)
    text = text_kv(CFG, params, prompt)
    key = jax.random.key(3)
    report: dict = {"errors": {}, "splits": {}}
    jobs = []  # (case, mesh label, (tokens, model) or None for the one-device reference, token group)
    for name in CASES:
        jobs.append((name, None, None, None))
        meshes = ({"8": (8, 1), "4x2": (4, 2), "2x2": (2, 2)} if name in ("sequential", "P4-bidirectional")
                  else {"8": (8, 1)})
        jobs += [(name, label, shape, group) for label, shape in meshes.items() for group in (None, 2)]

    def run(job):
        name, _, shape, group = job
        pcfg, schedule, window = CASES[name]
        cas = runner(CFG, pcfg, HW, schedule, window, make_mesh(*shape) if shape else None, token_group=group,
                     program="tick")
        return cas, cas.generate(params, text, key, num_blocks=BLOCKS)

    # the 29 programs are independent: two threads compile two at once (XLA releases the GIL)
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(jobs, pool.map(run, jobs), strict=True))
    for (name, label, shape, group), (cas, got) in results.items():
        if shape is not None:
            ref = results[(name, None, None, None)][1]
            report["errors"][f"{name} {label} group={group}"] = float(jnp.abs(got - ref).max())
            report["splits"][f"{name} {label} group={group}"] = list(cas.tick_program.spec.split)

    # a stream on (4, 2): one compile of the tick, then none however long it runs
    cas = make_runner(CFG, ROLLING, HW, "P4", "bidirectional", make_mesh(4, 2), token_group=2, program="tick")
    state = cas.start(params, text, key, num_blocks=None)
    state, _ = cas.step(params, text, state)
    with CompileCounter() as counter:
        for _ in range(12):
            state, _ = cas.step(params, text, state)
    report["stream_compiles"] = counter.count
    return report


def table() -> None:
    params = init_params(CFG, jax.random.key(0), HW)
    prompt = jnp.asarray(np.random.default_rng(0).standard_normal((1, CFG.text_len, CFG.text_dim)), jnp.float32)
    text = text_kv(CFG, params, prompt)
    key = jax.random.key(3)
    meshes = {"2": (2, 1), "3": (3, 1), "4": (4, 1), "5": (5, 1), "8": (8, 1), "(2, 2)": (2, 2), "(4, 2)": (4, 2)}
    print(f"| case ({BLOCKS} blocks, fp32) | " + " | ".join(meshes) + " |\n|---|" + "---:|" * len(meshes))
    for name, (pcfg, schedule, window) in CASES.items():
        ref = make_runner(CFG, pcfg, HW, schedule, window, program="tick").generate(params, text, key,
                                                                                    num_blocks=BLOCKS)
        row = []
        for stage, model in meshes.values():
            run = make_runner(CFG, pcfg, HW, schedule, window, make_mesh(stage, model), program="tick")
            got = run.generate(params, text, key, num_blocks=BLOCKS)
            row.append(f"{float(jnp.abs(got - ref).max()):.1e}")
        print(f"| {name} | " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
    if sys.argv[1:] != ["--table"]:
        sys.exit("usage: python tests/token_split_case.py --table")
    table()
