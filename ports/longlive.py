"""LongLive (NVlabs/LongLive, branch v1.0 @e52d9ef: the paper's 1.3B release).

Wan2.1-1.3B + LoRA (rank 256, alpha 256); 4 warped steps at shift 5; a short rolling window of
12 latent frames (`local_attn_size`, including the block being denoised) whose first 3 frames
are an attention sink kept forever (`sink_size`); `context_noise: 0`.

Interactive prompt switches (configs/longlive_interactive_inference.yaml, `global_sink: true`)
are the "recache" policy of `bcjax.pipeline.recache`, which restates
`pipeline/interactive_causal_inference.py::_recache_after_switch` as that code runs: the last 12
generated frames re-run in one bidirectional pass under the new prompt, the old sink kept once
the stream is past the window.
"""

from bcjax.schedule.config import PipelineConfig
from ports import Port

PORT = Port(
    name="longlive",
    model="wan2.1-1.3b",
    pipeline=PipelineConfig(
        denoising_steps=(1000, 750, 500, 250), warp_denoising_step=True, shift=5.0,
        block_frames=3, window_frames=12, sink_frames=3, context_noise=0.0,
    ),
    source="NVlabs/LongLive@e52d9ef (v1.0) configs/longlive_inference.yaml, "
           "configs/longlive_interactive_inference.yaml",
    notes="prompt switches: policy 'recache' = _recache_after_switch with global_sink: true",
)
