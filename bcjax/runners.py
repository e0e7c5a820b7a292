"""Which runner a sampler and schedule need: the one place that chooses between them.

Every runner shares the stepping interface (`bcjax.stepping.Runner`, a Protocol) and the sampler
(`bcjax.sampler`: one few-step loop, the clean and context passes, the RoPE rebase), so callers
above (`bcjax.interactive`, `bcjax serve`, the CLI, the toy world's harnesses, the benches) pick
one here and never look at its type again.

The core is the tick (`Cascade`): its schedule says how many blocks are in flight, from
"sequential" (one block, n + 1 ticks, Krea's rules included) to P4, on any number of `stage`
devices. The two sequential runners are that schedule's one-block-per-call programs for a single
`stage` device (a `model` axis allowed): `SequentialPipeline` compiles a whole block (its n
denoising passes and its clean pass) into one call, n + 1 dispatches fewer per block, and keeps
video-to-video; `KreaPipeline` keeps Krea's own loop where the tick cannot: R from the VAE round
trip (`start(reencode=)`, `blocks(reencode=)`) and keep_first_frame. Tests pin both to the tick's
sequential schedule (`tests/test_token_split.py`).
"""

from __future__ import annotations

from bcjax.cascade.cascade import Cascade
from bcjax.model.config import WanConfig
from bcjax.names import DEFAULT_WINDOW
from bcjax.pipeline.krea import KreaPipeline
from bcjax.pipeline.sequential import SequentialPipeline
from bcjax.schedule.config import PipelineConfig


def make_runner(cfg: WanConfig, pcfg: PipelineConfig, latent_hw: tuple[int, int], schedule: str | int = "sequential",
                window: str = DEFAULT_WINDOW, mesh=None):
    """SequentialPipeline (schedule "sequential", a clean-pass cache), KreaPipeline (sequential,
    Krea's rebuilt context), or a Cascade (P1, P2, P4 or a stride) on `mesh`.

    Sequential on a mesh with more than one `stage` device is context parallelism: the cascade's
    sequential schedule (one block in flight, n + 1 ticks per block) with each pass's tokens split
    over `stage`, the same latents as one device. Krea's loop stays KreaPipeline (its `model`
    axis only): its VAE round trip (R, `start(reencode=)`) needs the block on the host between
    blocks; the cascade computes Krea's rules with R the latent frame (`Cascade(..., "sequential")`
    does, split)."""
    from bcjax.cascade.cascade import STAGE

    if schedule == "sequential" and mesh is not None and mesh.shape.get(STAGE, 1) > 1 and pcfg.context != "rebuild":
        return Cascade(cfg, pcfg, latent_hw, "sequential", "causal", mesh)
    if schedule == "sequential":
        if pcfg.context == "rebuild":
            return KreaPipeline(cfg, pcfg, latent_hw, mesh)
        return SequentialPipeline(cfg, pcfg, latent_hw, mesh)
    return Cascade(cfg, pcfg, latent_hw, schedule, window, mesh)
