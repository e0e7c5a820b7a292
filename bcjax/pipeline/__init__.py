"""Pipelines: the sequential block-causal runner, Krea's loop, text to video, streaming output, prompts
and the recache at a switch."""

from bcjax.pipeline.sequential import SequentialPipeline, cached_pass, denoise_block
from bcjax.schedule.config import PipelineConfig

__all__ = ["PipelineConfig", "SequentialPipeline", "cached_pass", "denoise_block"]
