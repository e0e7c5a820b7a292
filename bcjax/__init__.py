"""bcjax: Block Cascading (arXiv 2511.20426) for block-causal Wan video DiTs, in JAX/Flax."""

from bcjax import compile_cache

compile_cache.enable_by_default()

from bcjax.cascade import Cascade, generate, make_mesh  # noqa: E402
from bcjax.compile_count import CompileCounter  # noqa: E402
from bcjax.model import KV, WanConfig, encode_text, forward, init_params, param_shapes  # noqa: E402
from bcjax.model.kv_cache import KVCache, init_cache  # noqa: E402
from bcjax.pipeline import PipelineConfig, SequentialPipeline  # noqa: E402

__all__ = [
    "Cascade", "CompileCounter", "KV", "KVCache", "PipelineConfig", "SequentialPipeline", "WanConfig",
    "encode_text", "forward", "generate", "init_cache", "init_params", "make_mesh", "param_shapes",
]
