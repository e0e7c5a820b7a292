"""Pipelines: the sequential block-causal sampler (and later text-to-video, streaming, prompt switch)."""

from bcjax.pipeline.sequential import SequentialPipeline, cached_pass, denoise_block
from bcjax.schedule.config import PipelineConfig

__all__ = ["PipelineConfig", "SequentialPipeline", "cached_pass", "denoise_block"]
