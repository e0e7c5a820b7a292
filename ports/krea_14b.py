"""Krea Realtime 14B (krea-ai/realtime-video, configs/self_forcing_server_14b.yaml).

Self-Forcing-distilled Wan2.1-14B. The config spells the schedule out un-warped as
[1000, 937, 833, 625, 0] (the trailing 0 is the end point, so 4 passes) at shift 5.
Krea attends to kv_cache_num_frames=3 context frames plus the 3-frame block, and rebuilds that
context from clean frames before every block (`do_kv_recomp`); here the context is the usual
clean-pass cache with the same 6-frame span, which is what Block Cascading keeps.
"""

from bcjax.pipeline.config import PipelineConfig
from ports import Port

PORT = Port(
    name="krea_14b",
    model="wan2.1-14b",
    pipeline=PipelineConfig(
        denoising_steps=(1000, 937, 833, 625, 0), warp_denoising_step=False, shift=5.0,
        block_frames=3, window_frames=6, sink_frames=0, context_noise=0.0,
    ),
    source="krea-ai/realtime-video configs/self_forcing_server_14b.yaml",
    notes="KV recomputation before every block is replaced by the clean-pass cache (same span).",
)
