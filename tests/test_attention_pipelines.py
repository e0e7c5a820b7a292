"""Every attention backend gives the dense backend's latents through the real pipelines (fp32):
the sequential pipeline, and the P4 cascade batched on one device and sharded over 5."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shared

from bcjax.cascade import make_mesh
from bcjax.model import text_kv
from bcjax.pipeline import PipelineConfig

HW = (4, 6)
ROLLING = PipelineConfig(window_frames=9, sink_frames=3)  # sink + a window the stream outgrows
BACKENDS = ["chunked", "splash-interpret", "pallas_gpu-interpret"]


@pytest.fixture(scope="module")
def text(tiny_cfg, tiny_params):
    ctx = np.random.default_rng(11).standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)).astype(np.float32)
    return text_kv(tiny_cfg, tiny_params, jnp.asarray(ctx))


def _run(cfg, params, text, where):
    key = jax.random.key(4)
    if where == "sequential":
        return shared.runner(cfg, ROLLING, HW, program="block").generate(params, text, key, num_blocks=4)
    mesh = None
    if where == "p4-mesh5":
        if jax.device_count() < 5:
            pytest.skip("needs 5 devices (XLA_FLAGS=--xla_force_host_platform_device_count=5)")
        mesh = make_mesh(5)
    return shared.runner(cfg, ROLLING, HW, "P4", "bidirectional", mesh=mesh, program="tick").generate(params, text, key,
                                                                                                    num_blocks=4)


@pytest.mark.slow
@pytest.mark.parametrize("where", ["sequential", "p4", "p4-mesh5"])
def test_every_backend_gives_the_dense_latents(tiny_cfg, tiny_params, text, where):
    dense = _run(dataclasses.replace(tiny_cfg, attention="dense"), tiny_params, text, where)
    errs = {}
    for backend in BACKENDS:
        out = _run(dataclasses.replace(tiny_cfg, attention=backend), tiny_params, text, where)
        errs[backend] = float(jnp.max(jnp.abs(out - dense)))
    print(f"\n{where}: max abs latent error vs dense {errs}")
    assert max(errs.values()) <= 1e-5, errs
