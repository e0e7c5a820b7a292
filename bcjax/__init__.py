"""bcjax: Block Cascading (arXiv 2511.20426) for block-causal Wan video DiTs, in JAX/Flax."""

# No global effects here: the persistent compile cache is the CLI's choice, or the caller's
# (`bcjax.compile_cache.enable()`), since JAX's config belongs to the whole importing program.
from bcjax import compile_cache  # noqa: F401 (bcjax.compile_cache.enable() without another import)
from bcjax.compile_count import CompileCounter
from bcjax.model import KV, WanConfig, forward, init_params, param_shapes, text_kv
from bcjax.model.kv_cache import KVCache, init_cache
from bcjax.runners import Block, Runner, Step, StepState, generate, make_mesh, make_runner
from bcjax.schedule.config import PipelineConfig

__all__ = [
    "KV", "Block", "CompileCounter", "KVCache", "PipelineConfig", "Runner", "Step", "StepState", "WanConfig",
    "forward", "generate", "init_cache", "init_params", "make_mesh", "make_runner", "param_shapes", "text_kv",
]
