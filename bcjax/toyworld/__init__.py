"""A toy world with known ground truth, and block-causal training of a tiny Wan DiT on it.

`world` (walled sprites, prompts, renders, position and colour readout), `train` (clean-context
teacher forcing, diffusion forcing, self-rollout: `python -m bcjax.toyworld.train --stage ...`),
`evaluate` (the quality harness over every stagger: `bcjax eval toyworld`), `study` (several
models x every stagger x seeds, with confidence intervals), `demo` (`bcjax demo`: the shipped
checkpoint `checkpoint/`, sequential vs cascade as a labelled mp4 + report), `png` (figures
without a plotting library). Only the world is re-exported here, so
`python -m bcjax.toyworld.train` does not import itself twice.
"""

from bcjax.toyworld.world import (
    Scene,
    Sprite,
    WorldConfig,
    parse_prompt,
    position_error,
    positions,
    prompt_embedding,
    prompt_text,
    read_positions,
    render,
    sample_batch,
    sample_scene,
)

__all__ = [
    "Scene", "Sprite", "WorldConfig", "parse_prompt", "position_error", "positions", "prompt_embedding",
    "prompt_text", "read_positions", "render", "sample_batch", "sample_scene",
]
