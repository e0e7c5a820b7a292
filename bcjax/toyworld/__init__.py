"""A toy world with known ground truth, and block-causal training of a tiny Wan DiT on it.

`world` (sprites, prompts, renders, position readout), `train` (teacher forcing with clean
context: `python -m bcjax.toyworld.train`), `evaluate` (generation vs ground truth:
`python -m bcjax.toyworld.evaluate`), `png` (figures without a plotting library). Only the
world is re-exported here, so `python -m bcjax.toyworld.train` does not import itself twice.
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
    prompt_tokens,
    read_positions,
    render,
    sample_batch,
    sample_scene,
)

__all__ = [
    "Scene", "Sprite", "WorldConfig", "parse_prompt", "position_error", "positions", "prompt_embedding",
    "prompt_text", "prompt_tokens", "read_positions", "render", "sample_batch", "sample_scene",
]
