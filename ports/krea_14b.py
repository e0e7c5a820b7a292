"""Krea Realtime 14B as Krea's server runs it (krea-ai/realtime-video, `release_server.py`).

Self-Forcing-distilled Wan2.1-14B. `GenerationSession.generate_block` with the default
`GenerateParams` (num_denoising_steps 5, kv_cache_num_frames 3, keep_first_frame False, shift 5):
the server builds its own float32 step list, the warp of [1000, 750, 500, 250, 0] =
[1000, 937.5, 833.33, 625, 0] (the yaml's [1000, 937, 833, 625, 0] is not used), runs every
entry as a pass (the trailing 0 included), keeps no cache between blocks and rebuilds 3 context
frames before every block (`bcjax.pipeline.krea`). With 4 steps ("use 4 for performance") the
list is [1000, 666, 333, 0] warped = [1000, 908.843, 713.979, 0]:
`dataclasses.replace(PORT.pipeline, denoising_steps=(1000, 666, 333, 0))`.

`krea_14b_clean_pass` is the same model sampled like Self-Forcing (4 passes and a clean-pass
cache of the same span), what Block Cascading's cascade keeps.
"""

from bcjax.schedule.config import PipelineConfig
from ports import Port

PORT = Port(
    name="krea_14b",
    model="wan2.1-14b",
    pipeline=PipelineConfig(
        denoising_steps=(1000, 750, 500, 250, 0), warp_denoising_step=True, shift=5.0, trailing_zero="pass",
        block_frames=3, window_frames=6, sink_frames=0, context_noise=0.0, context="rebuild",
    ),
    source="krea-ai/realtime-video release_server.py GenerationSession.generate_block (default GenerateParams)",
    notes="context rebuilt before every block from the last 3 frames, the first re-encoded by the VAE",
)
