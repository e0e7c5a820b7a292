"""CausVid (tianweiy/CausVid): 3 un-warped steps [1000, 757, 522] at shift 8, blocks of 3 frames.

CausVid also ships a 4-step variant ([1000, 750, 500, 250], warped); use
`dataclasses.replace(PORT.pipeline, ...)` for it.
"""

from bcjax.schedule.config import PipelineConfig
from ports import Port

PORT = Port(
    name="causvid",
    model="wan2.1-1.3b",
    pipeline=PipelineConfig(
        denoising_steps=(1000, 757, 522), warp_denoising_step=False, shift=8.0,
        block_frames=3, window_frames=21, sink_frames=0, context_noise=0.0,
    ),
    source="tianweiy/CausVid configs (wan_causal_dmd)",
)
