"""Low-rank adapters on the DiT's block projections, the model side (training: `bcjax.adapt`).

An adapted parameter tree is the base tree plus one more entry, params["lora"]: for each adapted
projection of the stacked blocks, qwix's LoRA factors (`bcjax.model.quant.block_module`)

    params["lora"]["self_attn"]["q"] = {"kernel_lora_a": [L, in, r], "kernel_lora_b": [L, r, out]}

and `bcjax.model.wan.forward_tokens` runs the blocks through qwix's LoRA module when the entry is
there: each projection's output gains x A B (alpha = rank). Without it the forward is the base
one, the same program. The adapted projections are the ones a block's forward runs on the
video tokens: self-attention q, k, v, o, cross-attention q and o, ffn_0 and ffn_2. The
cross-attention k and v project the prompt only, once per prompt (`text_kv`), so the prompt's
K/V (shared by every runner and by a prompt switch) stay the base model's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

LORA = "lora"  # the adapted params' extra entry
A, B = "kernel_lora_a", "kernel_lora_b"
# (sublayer, projection) paths an adapter covers
TARGETS = tuple(("self_attn", p) for p in "qkvo") + (("cross_attn", "q"), ("cross_attn", "o"), ("ffn_0",), ("ffn_2",))


def name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def rank(lora) -> int:
    """The rank r of an adapter tree (its first A factor's last dim)."""
    return int(jax.tree_util.tree_leaves(_node(lora, TARGETS[0])[A])[0].shape[-1])


def _node(tree, path):
    for key in path:
        tree = tree[key]
    return tree


def init(cfg, key, rank: int, dtype=jnp.float32) -> dict:
    """An adapter of rank r for every layer: A he-uniform (qwix's default), B zero, so the
    untrained adapter leaves every output unchanged. Shapes from `cfg` (nothing else allocated)."""
    from bcjax.model.wan import param_shapes

    if rank < 1:
        raise ValueError(f"adapter rank {rank}: expected >= 1")
    blocks = param_shapes(cfg)["blocks"]
    out: dict = {}
    for i, path in enumerate(TARGETS):
        kernel = _node(blocks, path)["kernel"]
        if isinstance(kernel, dict):  # a quantized kernel {"qvalue", "scale"}
            kernel = kernel["qvalue"]
        layers, d_in, d_out = kernel.shape
        a = jax.nn.initializers.he_uniform(in_axis=-2, out_axis=-1)(jax.random.fold_in(key, i), (layers, d_in, rank),
                                                                      dtype)
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = {A: a, B: jnp.zeros((layers, rank, d_out), dtype)}
    return out


def with_layer(layer, lora_layer):
    """One layer's params with its adapter factors beside the kernels they adapt (what qwix's LoRA
    module reads: `kernel_lora_a`, `kernel_lora_b` in the projection's own params)."""
    out = dict(layer)
    for k, v in lora_layer.items():
        out[k] = with_layer(layer[k], v) if isinstance(v, dict) and k not in (A, B) else v
    return out


def split(params):
    """(base params, adapter tree or None) of a possibly adapted parameter tree."""
    if isinstance(params, dict) and LORA in params:
        return {k: v for k, v in params.items() if k != LORA}, params[LORA]
    return params, None


def adapted(params, lora, dtype=None):
    """The base params with `lora` as their adapter (cast to `dtype`: the compute dtype, so the
    projections' outputs keep theirs)."""
    if dtype is not None:
        lora = jax.tree_util.tree_map(lambda a: a.astype(dtype), lora)
    return {**split(params)[0], LORA: lora}
