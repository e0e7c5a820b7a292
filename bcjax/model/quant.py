"""Quantized DiT blocks through qwix (google/qwix): int8 or fp8 weights, and optionally activations.

The modes (`bcjax.names.Quant`, `WanConfig.quant`, `--quant`):

* ``int8-weight`` / ``fp8-weight``: the projections' weights are stored as int8 (or float8_e4m3fn)
  with one scale per output channel and dequantized into the compute dtype before each matmul;
  memory and weight traffic halve against bf16, the matmul is the bf16 one.
* ``int8`` / ``fp8``: the weights as above and each matmul's input quantized on the fly with one
  scale per token (dynamic range, absmax), so the contraction itself runs at 8 bits: an s8 x s8
  dot on a TPU, an f8 GEMM on an H100 (`bcjax bench compile --quant` reads which one compiled).

What is quantized: the attention projections (self- and cross-attention q, k, v, o) and the FFN
(ffn_0, ffn_2) of every block: 97% of the DiT's weights. The patch, text and time embeddings, the
norms, the modulation and the head stay in the compute dtype (small, and the time path is fp32
in Wan). Attention itself (q.k, p.v) is not quantized.

qwix does the quantization: `qwix.quantize_model` wraps `WanBlock` with a `PtqProvider` whose rules
pick the projections by module path, and its interception turns their `dot_general`/`einsum` into
qwix's quantized ones. Stored checkpoints hold plain arrays (a quantized kernel becomes
``{"qvalue": int8/fp8 [L, in, out], "scale": [L, 1, out]}``), so orbax, the manifest and the
tensor-parallel specs see an ordinary tree; `for_layer` turns one layer's slice back into the
`WithAux(QArray)` leaves qwix's module reads.
"""

from __future__ import annotations

import functools
import re
from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from bcjax.names import Quant, as_quant

if TYPE_CHECKING:
    from bcjax.model.config import WanConfig

# block parameters a mode quantizes: (sublayer, projection) paths
PROJECTIONS = tuple((sub, p) for sub in ("self_attn", "cross_attn") for p in "qkvo") + (("ffn_0",), ("ffn_2",))
_PATH = re.compile(r"(.*/)?((self_attn|cross_attn)/[qkvo]|ffn_[02])$")
QVALUE, SCALE = "qvalue", "scale"


def qtype(mode: Quant):
    """The storage type of a mode's weights (None for "none")."""
    check(mode)
    return None if mode == "none" else (jnp.int8 if mode.startswith("int8") else jnp.float8_e4m3fn)


def quantizes_activations(mode: Quant) -> bool:
    return mode in ("int8", "fp8")


def check(mode: str) -> None:
    as_quant(mode)


def _qwix():
    try:
        import qwix
    except ImportError:  # the `quant` extra
        raise ValueError("quantized DiT weights (--quant, or a checkpoint stored quantized) need qwix: "
                         "pip install \".[quant]\" (bcjax's quant extra)") from None
    return qwix


@functools.cache
def _provider(mode: Quant):
    qwix = _qwix()
    t = qtype(mode)
    rule = qwix.QuantizationRule(module_path=_PATH.pattern, weight_qtype=t,
                                 act_qtype=t if quantizes_activations(mode) else None)
    return qwix.PtqProvider([rule])


@functools.cache
def _lora_provider(mode: Quant, rank: int):
    # alpha = rank: the delta is x A B unscaled (with Adam a scale is a learning rate of B)
    qwix = _qwix()
    t = qtype(mode)
    act = t if quantizes_activations(mode) else None
    rule = qwix.LoraRule(module_path=_PATH.pattern, weight_qtype=t, act_qtype=act, rank=rank, alpha=float(rank))
    return qwix.LoraProvider([rule])


def block_module(cfg: WanConfig, kv_axis: str | None = None, model_axis: str | None = None,
                 lora_rank: int | None = None):
    """The DiT block module `forward` and `text_kv` apply: `WanBlock`, or its qwix-quantized
    version when `cfg.quant` is not "none" (same methods, params with quantized kernels).

    lora_rank: the block with qwix's low-rank adapters on the projections its `__call__` runs
    (`bcjax.adapt`; QLoRA over quantized kernels when `cfg.quant` says so): each projection's
    params also hold `kernel_lora_a` [in, r] and `kernel_lora_b` [r, out], and its output gains
    x A B. Only `__call__` is wrapped: the cross-attention K/V of the prompt (`cross_kv`) stay the
    base model's."""
    from bcjax.model.layers import WanBlock

    block = WanBlock(cfg, kv_axis=kv_axis, model_axis=model_axis)
    if lora_rank is not None:
        return _qwix().apply_lora_to_model(block, _lora_provider(cfg.quant, lora_rank), methods=("__call__",))
    if cfg.quant == "none":
        return block
    return _qwix().quantize_model(block, _provider(cfg.quant), methods=("__call__", "cross_kv", "init_all"))


def is_quantized(params) -> bool:
    """Whether a DiT parameter tree holds quantized kernels (the stored form)."""
    try:
        kernel = params["blocks"]["self_attn"]["q"]["kernel"]
    except (KeyError, TypeError):  # not a DiT tree
        return False
    return isinstance(kernel, dict) and QVALUE in kernel


def stored_name(params) -> str | None:
    """The 8-bit type a parameter tree's kernels are stored in, "int8" or "fp8" (None: not
    quantized, or not a DiT tree). Weight-only and weights+activations modes store the same
    arrays; which one runs is `cfg.quant`."""
    if not is_quantized(params):
        return None
    return "int8" if params["blocks"]["self_attn"]["q"]["kernel"][QVALUE].dtype == jnp.int8 else "fp8"


def check_runs(stored: str | None, mode: Quant, asked: str, where: str = "") -> None:
    """One error naming both when weights stored quantized as `stored` ("int8", "fp8", None) cannot
    run `mode` (`asked`: how the caller spelled the request, e.g. "--quant fp8")."""
    if stored is None:
        return
    want = qtype(mode)
    if want is None or want != qtype(as_quant(f"{stored}-weight")):
        raise ValueError(f"{where}the weights are stored quantized as {stored} ({stored}-weight or {stored} can run "
                         f"them); {asked} asks for {'unquantized weights' if want is None else mode}")


def kernels(tree):
    """Yield (path, subtree holding 'kernel') for each projection of a block tree."""
    for path in PROJECTIONS:
        node = tree
        for key in path:
            node = node[key]
        yield path, node


def quantize(params, mode: Quant):
    """A DiT parameter tree with every projection kernel quantized (stacked over layers: one scale
    per layer and output channel). Embeddings, norms, modulation, biases and the head are kept."""
    check(mode)
    if mode == "none":
        return params
    if is_quantized(params):
        check_runs(stored_name(params), mode, f"quant={mode!r}")
        return params  # stored as this mode asks
    qwix = _qwix()
    blocks = jax.tree_util.tree_map(lambda a: a, params["blocks"])  # a copy to write into
    for _, node in kernels(blocks):
        kernel = node["kernel"]  # [L, in, out]
        q = qwix.quantize(kernel, qtype(mode), channelwise_axes=(0, 2), scale_dtype=kernel.dtype)
        node["kernel"] = {QVALUE: q.qvalue, SCALE: q.scale}
    return {**params, "blocks": blocks}


def dequantized(params):
    """The quantized kernels multiplied back out (in the scale's dtype): the weights a weight-only
    mode computes with, as an ordinary parameter tree."""
    if not is_quantized(params):
        return params
    blocks = jax.tree_util.tree_map(lambda a: a, params["blocks"])
    for _, node in kernels(blocks):
        k = node["kernel"]
        node["kernel"] = k[QVALUE].astype(k[SCALE].dtype) * k[SCALE]
    return {**params, "blocks": blocks}


@functools.cache
def _abstract_layer(cfg: WanConfig):
    """One layer's quantized parameter tree as qwix's module builds it (ShapeDtypeStruct leaves
    inside WithAux(QArray)), for `for_layer` to fill."""
    from bcjax.model.rope import rope_tables

    module = block_module(cfg)
    d, dt = cfg.dim, cfg.compute_dtype

    rope = rope_tables(cfg, jnp.zeros((1,), jnp.int32), (1, 1))
    kv0 = (jnp.zeros((1, 0, cfg.num_heads, cfg.head_dim), dt),) * 2
    return jax.eval_shape(lambda: module.init(
        jax.random.key(0), jnp.zeros((1, 1, d), jnp.float32), jnp.zeros((1, 1, 6, d), jnp.float32), rope, kv0,
        jnp.zeros((1, 1, d), dt), method="init_all"))["params"]


def for_layer(cfg: WanConfig, layer):
    """One layer's slice of a quantized block tree ({"qvalue", "scale"} kernels) as the
    WithAux(QArray) leaves the quantized module reads. Identity for "none"."""
    if cfg.quant == "none":
        return layer
    if not isinstance(layer["self_attn"]["q"]["kernel"], dict):
        raise ValueError(f"WanConfig.quant={cfg.quant!r} but these DiT params are not quantized: pass them through "
                         "bcjax.model.quant.quantize(params, cfg.quant) or Runner.place_params first")
    abstract = _abstract_layer(cfg)
    out = jax.tree_util.tree_map(lambda a: a, layer)
    for path, node in kernels(out):
        ref = abstract
        for key in path:
            ref = ref[key]
        w = ref["kernel"]
        stored = node["kernel"]
        node["kernel"] = w.replace(array=w.array.replace(qvalue=stored[QVALUE], scale=stored[SCALE]))
    return out
