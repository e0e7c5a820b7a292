"""Self-Forcing (guandeh17/Self-Forcing, configs/self_forcing_dmd.yaml, pipeline/causal_inference.py).

4 warped steps at shift 5, blocks of 3 latent frames, a global 21-frame (32760-token) cache,
clean pass at context_noise 0.
"""

from bcjax.schedule.config import PipelineConfig
from ports import Port

PORT = Port(
    name="self_forcing",
    model="wan2.1-1.3b",
    pipeline=PipelineConfig(
        denoising_steps=(1000, 750, 500, 250), warp_denoising_step=True, shift=5.0,
        block_frames=3, window_frames=21, sink_frames=0, context_noise=0.0,
    ),
    source="guandeh17/Self-Forcing configs/self_forcing_dmd.yaml",
)
