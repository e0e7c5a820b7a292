"""LongLive (NVlabs/LongLive @1e83e81, configs/longlive_interactive_inference.yaml).

Wan2.1-1.3B + LoRA; 4 warped steps at shift 5; a short rolling window of 12 latent frames
(local_attn_size, including the block being denoised) whose first 3 frames are an attention
sink kept forever.
"""

from bcjax.pipeline.config import PipelineConfig
from ports import Port

PORT = Port(
    name="longlive",
    model="wan2.1-1.3b",
    pipeline=PipelineConfig(
        denoising_steps=(1000, 750, 500, 250), warp_denoising_step=True, shift=5.0,
        block_frames=3, window_frames=12, sink_frames=3, context_noise=0.0,
    ),
    source="NVlabs/LongLive@1e83e81 configs/longlive_interactive_inference.yaml",
)
