"""A toy world with known ground truth, and block-causal training of a tiny Wan DiT on it.

`world` (walled sprites, prompts, renders, position readout), `train` (clean-context teacher
forcing: `python -m bcjax.toyworld.train`), `evaluate` (the quality harness over every schedule:
`bcjax eval toyworld`), `demo` (`bcjax demo`: the shipped checkpoint `checkpoint/`, sequential vs
cascade as a labelled mp4 + report), `png` (figures without a plotting library). Only the world
is re-exported here, so `python -m bcjax.toyworld.train` does not import itself twice.
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
