"""Which runner a sampler and schedule need: the one place that chooses between them.

Every runner shares the stepping interface (`bcjax.pipeline.stepping`), so callers above
(`bcjax.interactive`, `bcjax serve`, the CLI) pick one here and never look at its type again.
"""

from __future__ import annotations

from bcjax.cascade.cascade import Cascade
from bcjax.model.config import WanConfig
from bcjax.model.tensor_parallel import model_size
from bcjax.pipeline.config import PipelineConfig
from bcjax.pipeline.krea import KreaPipeline
from bcjax.pipeline.sequential import SequentialPipeline


def make_runner(cfg: WanConfig, pcfg: PipelineConfig, latent_hw: tuple[int, int], schedule: str | int = "sequential",
                window: str = "bidirectional", mesh=None):
    """SequentialPipeline (schedule "sequential", a clean-pass cache; tensor parallel over the
    mesh's `model` axis), KreaPipeline (sequential, Krea's rebuilt context, one device), or a
    Cascade (P1, P2, P4 or a stride) on `mesh`."""
    if schedule == "sequential":
        if pcfg.context == "rebuild":
            if model_size(mesh) > 1:
                raise ValueError(f"Krea's own loop (sequential, context rebuilt through the VAE) runs on one device; "
                                 f"the mesh has 'model' = {model_size(mesh)}: use the clean-pass sampler "
                                 "(port krea_14b_clean_pass) or a cascade schedule")
            return KreaPipeline(cfg, pcfg, latent_hw)
        return SequentialPipeline(cfg, pcfg, latent_hw, mesh)
    return Cascade(cfg, pcfg, latent_hw, schedule, window, mesh)
