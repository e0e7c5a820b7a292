"""The cascade run by the multi-host test, in every worker process and in the single-process reference."""

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.cascade import make_mesh
from bcjax.model import WanConfig, init_params
from bcjax.pipeline import PipelineConfig
from bcjax.runners import make_runner


def tiny_params():
    cfg = WanConfig.preset("tiny", attention="xla")
    return cfg, init_params(cfg, jax.random.key(0), (4, 6))


def run_case(num_blocks: int = 6, checkpoint_path: str | None = None, model: int = 1):
    """P4 latents on a (tokens 5, `model`) mesh; the params restored from `checkpoint_path`
    straight onto the mesh (split over `model`) when given."""
    cfg, params = tiny_params()
    mesh = make_mesh(5, model)
    if checkpoint_path:
        from bcjax import checkpoint

        _, params = checkpoint.restore(checkpoint_path, "dit", mesh=mesh)
        assert not next(iter(jax.tree_util.tree_leaves(params))).is_fully_addressable or jax.process_count() == 1
        q = params["blocks"]["self_attn"]["q"]["kernel"]
        assert q.addressable_shards[0].data.shape[-1] == cfg.dim // model  # this device's heads only
    ctx = np.random.default_rng(0).standard_normal((1, cfg.text_len, cfg.text_dim)).astype(np.float32)
    cas = make_runner(cfg, PipelineConfig(window_frames=9, sink_frames=3), (4, 6), "P4", "bidirectional", mesh,
                      program="tick")
    text = cas.text_kv(params, jnp.asarray(ctx))  # split by heads, like the weights
    return cas.generate(params, text, jax.random.key(1), num_blocks=num_blocks)
