"""The tensor-parallel equality case on the suite's 10 fake CPU devices (tests/test_tensor_parallel.py
calls `report(ckpt_dir)`).

The tiny DiT with 4 heads (2 per device on `model` = 2) and a sink + window cache, continuing a
given first block: sequential and P4 (causal, bidirectional) latents on meshes (tokens, model)
= (1, 2), (5, 1), (5, 2) against one device (the sequential pipeline replicates over `tokens`), text K/V computed
on each runner's layout, params
restored by orbax straight into the (5, 2) layout; plus where the tensors ended up.
"""

from concurrent.futures import ThreadPoolExecutor

import jax
import jax.numpy as jnp
import numpy as np
from shared import runner as shared_runner

from bcjax import checkpoint
from bcjax.cascade import make_mesh
from bcjax.model import WanConfig, init_params
from bcjax.pipeline import PipelineConfig

HW = (4, 6)
CFG = WanConfig.preset("tiny", num_heads=4, attention="xla")
PCFG = PipelineConfig(window_frames=9, sink_frames=3)


def runner(kind: str, mesh):
    if kind == "sequential":
        return shared_runner(CFG, PCFG, HW, mesh=mesh, program="block")
    return shared_runner(CFG, PCFG, HW, "P4", kind, mesh, program="tick")


def report(ckpt: str) -> dict:
    """{"devices", "max_abs": {case: max abs to one device}, where the restored tensors live, "comm"}."""
    params = init_params(CFG, jax.random.key(0), HW)
    rng = np.random.default_rng(0)
    prompt = jnp.asarray(rng.standard_normal((1, CFG.text_len, CFG.text_dim)).astype(np.float32))
    first = jnp.asarray(rng.standard_normal((1, PCFG.block_frames, *HW, CFG.in_channels)).astype(np.float32))
    key = jax.random.key(1)
    checkpoint.save(ckpt, {"dit": (CFG, params)}, {"layout": "test"})
    report = {"devices": jax.device_count(), "max_abs": {}}
    meshes = {(1, 1): None, (1, 2): make_mesh(1, 2), (5, 1): make_mesh(5, 1), (5, 2): make_mesh(5, 2)}
    _, restored = checkpoint.restore(ckpt, "dit", mesh=meshes[5, 2])  # orbax straight into the split layout
    q = restored["blocks"]["self_attn"]["q"]["kernel"]
    report["restored_q_spec"] = str(q.sharding.spec)
    report["restored_q_shard"] = list(q.addressable_shards[0].data.shape)
    report["restored_bytes_per_device"] = sum(
        a.addressable_shards[0].data.nbytes for a in jax.tree_util.tree_leaves(restored))
    report["full_bytes"] = sum(a.nbytes for a in jax.tree_util.tree_leaves(params))

    def latents(job):
        kind, shape = job
        run = runner(kind, meshes[shape])
        prm = restored if shape == (5, 2) else params
        text = run.text_kv(prm, prompt)
        return np.asarray(jax.device_get(run.generate(prm, text, key, num_blocks=5, context=first)))

    # twelve independent programs: two threads compile two at once (XLA releases the GIL)
    jobs = [(kind, shape) for kind in ("sequential", "causal", "bidirectional") for shape in meshes]
    with ThreadPoolExecutor(2) as pool:
        lat = dict(zip(jobs, pool.map(latents, jobs), strict=True))
    for kind, (tokens, model) in jobs:
        if (tokens, model) != (1, 1):
            report["max_abs"][f"{kind} {tokens}x{model}"] = float(np.abs(lat[kind, (tokens, model)] -
                                                                         lat[kind, (1, 1)]).max())
    run = runner("bidirectional", meshes[5, 2])
    text = run.text_kv(restored, prompt)
    state = run.start(restored, text, key, num_blocks=5, context=first)
    k = run.cache(state).k
    report["cache_shape"] = list(k.shape)
    report["cache_shard"] = list(k.addressable_shards[0].data.shape)
    report["text_shard"] = list(text.k.addressable_shards[0].data.shape)
    # Krea's own loop (context rebuilt before every block, R = the latent): one device vs (1, 2)
    import ports

    kcfg = ports.get("krea_14b").pipeline

    def krea_latents(model):
        krea = shared_runner(CFG, kcfg, HW, mesh=make_mesh(1, model) if model > 1 else None, program="krea")
        return np.asarray(jax.device_get(krea.generate(params, krea.text_kv(params, prompt), key, num_blocks=4)))

    # collectives of the compiled tick against the formula (bytes per tick per device)
    from bcjax.bench.comm import compiled_tick_collectives, tick_bytes

    def collectives(shape):
        return compiled_tick_collectives(CFG, PCFG, HW, "P4", "bidirectional", *shape)

    comm_meshes = ((5, 1), (1, 2), (5, 2))
    with ThreadPoolExecutor(2) as pool:
        lat = dict(zip((1, 2), pool.map(krea_latents, (1, 2)), strict=True))
        hlos = dict(zip(comm_meshes, pool.map(collectives, comm_meshes), strict=True))
    report["max_abs"]["krea 1x2"] = float(np.abs(lat[2] - lat[1]).max())
    report["comm"] = {}
    for tokens, model in comm_meshes:
        formula = tick_bytes(CFG, PCFG, HW, "P4", tokens, model)
        report["comm"][f"{tokens}x{model}"] = {
            src: {axis: [v["payload"], v["wire"]] for axis, v in d.items()}
            for src, d in (("hlo", hlos[tokens, model]), ("formula", formula))}
    return report
