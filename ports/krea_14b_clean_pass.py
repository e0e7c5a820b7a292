"""Krea Realtime 14B sampled like Self-Forcing: 4 passes, then a clean pass that writes a cache.

The denoising schedule of configs/self_forcing_server_14b.yaml ([1000, 937, 833, 625, 0] un-warped, the
trailing 0 the end point) over a clean-pass cache with Krea's 6-frame span (3 context frames +
the block). Not what Krea's server runs (see `krea_14b`), but the form the cascade's
clean-pass stage takes.
"""

from bcjax.schedule.config import PipelineConfig
from ports import Port

PORT = Port(
    name="krea_14b_clean_pass",
    model="wan2.1-14b",
    pipeline=PipelineConfig(
        denoising_steps=(1000, 937, 833, 625, 0), warp_denoising_step=False, shift=5.0,
        block_frames=3, window_frames=6, sink_frames=0, context_noise=0.0,
    ),
    source="krea-ai/realtime-video configs/self_forcing_server_14b.yaml",
    notes="clean-pass cache of the same span instead of Krea's per-block rebuild",
)
