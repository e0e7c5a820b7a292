"""Pipelines: the sequential block-causal sampler (and later text-to-video, streaming, prompt switch)."""

from bcjax.pipeline.config import PipelineConfig
from bcjax.pipeline.sequential import SequentialPipeline, cached_pass, denoise_block

__all__ = ["PipelineConfig", "SequentialPipeline", "cached_pass", "denoise_block"]
