"""Which runner a sampler and schedule need: the one place that chooses between them.

Every runner shares the stepping interface (`bcjax.pipeline.stepping`), so callers above
(`bcjax.interactive`, `bcjax serve`, the CLI) pick one here and never look at its type again.
"""

from __future__ import annotations

from bcjax.cascade.cascade import Cascade
from bcjax.model.config import WanConfig
from bcjax.pipeline.config import PipelineConfig
from bcjax.pipeline.krea import KreaPipeline
from bcjax.pipeline.sequential import SequentialPipeline


def make_runner(cfg: WanConfig, pcfg: PipelineConfig, latent_hw: tuple[int, int], schedule: str | int = "sequential",
                window: str = "bidirectional", mesh=None):
    """SequentialPipeline (schedule "sequential", a clean-pass cache), KreaPipeline (sequential,
    Krea's rebuilt context), or a Cascade (P1, P2, P4 or a stride) on `mesh` (the sequential
    runners use only its `model` axis: tensor-parallel weights)."""
    if schedule == "sequential":
        if pcfg.context == "rebuild":
            return KreaPipeline(cfg, pcfg, latent_hw, mesh)
        return SequentialPipeline(cfg, pcfg, latent_hw, mesh)
    return Cascade(cfg, pcfg, latent_hw, schedule, window, mesh)
