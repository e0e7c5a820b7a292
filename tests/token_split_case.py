"""The token-split equality case with 8 fake CPU devices (the suite's process has 5), run by
tests/test_token_split.py in its own process: `python token_split_case.py OUT.json`.

`python tests/token_split_case.py --table` prints README's equality table instead: every case on
2, 3, 4, 5 and 8 stage devices and on (2, 2) and (4, 2), max abs difference to one device.

Every schedule on 8 stage devices, and (stage, model) meshes (2, 2) and (4, 2), against one
device; and the compiles of a stream on the (4, 2) mesh after its first tick (must be 0).
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax
import jax.numpy as jnp
import numpy as np

jax.config.update("jax_default_matmul_precision", "highest")

import ports  # noqa: E402
from bcjax.cascade import make_mesh  # noqa: E402
from bcjax.compile_count import CompileCounter  # noqa: E402
from bcjax.model import WanConfig, encode_text, init_params  # noqa: E402
from bcjax.pipeline import PipelineConfig  # noqa: E402
from bcjax.runners import make_runner  # noqa: E402

HW = (4, 6)
CFG = WanConfig.preset("tiny", num_heads=4, attention="xla")
ROLLING = PipelineConfig(window_frames=9, sink_frames=3)
KREA = ports.get("krea_14b").pipeline
CASES = {  # name: (pipeline config, schedule, window)
    "sequential": (ROLLING, "sequential", "causal"),
    "krea": (KREA, "sequential", "causal"),
    "P2-causal": (ROLLING, "P2", "causal"),
    "P2-bidirectional": (ROLLING, "P2", "bidirectional"),
    "P4-causal": (ROLLING, "P4", "causal"),
    "P4-bidirectional": (ROLLING, "P4", "bidirectional"),
    "P4-no-clean": (ROLLING, "P4-no-clean", "bidirectional"),  # 4 blocks in flight, no clean stage
}
BLOCKS = 5


def main(out: str) -> None:
    params = init_params(CFG, jax.random.key(0), HW)
    prompt = jnp.asarray(np.random.default_rng(0).standard_normal((1, CFG.text_len, CFG.text_dim)), jnp.float32)
    text = encode_text(CFG, params, prompt)
    key = jax.random.key(3)
    report: dict = {"errors": {}, "splits": {}}
    for name, (pcfg, schedule, window) in CASES.items():
        ref = make_runner(CFG, pcfg, HW, schedule, window, program="tick").generate(params, text, key,
                                                                                    num_blocks=BLOCKS)
        meshes = ({"8": (8, 1), "4x2": (4, 2), "2x2": (2, 2)} if name in ("sequential", "P4-bidirectional")
                  else {"8": (8, 1)})
        for label, (stage, model) in meshes.items():
            for group in (None, 2):
                cas = make_runner(CFG, pcfg, HW, schedule, window, make_mesh(stage, model), token_group=group,
                                  program="tick")
                got = cas.generate(params, text, key, num_blocks=BLOCKS)
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
    with open(out, "w") as f:
        json.dump(report, f, indent=1)


def table() -> None:
    params = init_params(CFG, jax.random.key(0), HW)
    prompt = jnp.asarray(np.random.default_rng(0).standard_normal((1, CFG.text_len, CFG.text_dim)), jnp.float32)
    text = encode_text(CFG, params, prompt)
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
    table() if sys.argv[1] == "--table" else main(sys.argv[1])
