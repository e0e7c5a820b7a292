"""The sequential stagger's programs (the fused block, Krea's loop) and the KV recache at a
prompt switch; run them through `bcjax.runners.make_runner`."""

from bcjax.pipeline.krea import KreaProgram
from bcjax.pipeline.sequential import BlockProgram
from bcjax.schedule.config import PipelineConfig

__all__ = ["BlockProgram", "KreaProgram", "PipelineConfig"]
