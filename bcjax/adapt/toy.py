"""Prompts for `bcjax adapt`: a prompts file read and checked line by line, and the toy world's
batches (a sprite phrase per line; its image drawn at start corners from the step's seed)."""

from __future__ import annotations

import numpy as np


def read_prompts(path: str) -> list[str]:
    """The non-blank lines of a prompts file (one prompt each; '#' starts a comment line). One
    ValueError naming the file and line when a line is not UTF-8, or naming the file when it
    holds no prompt."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ValueError(f"--prompts {path}: cannot read ({e.strerror})") from None
    prompts = []
    for i, line in enumerate(raw.splitlines(), 1):
        try:
            text = line.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"--prompts {path}: line {i} is not UTF-8 text (byte {e.start + 1})") from None
        if text and not text.startswith("#"):
            prompts.append((i, text))
    if not prompts:
        raise ValueError(f"--prompts {path}: no prompts (the file is empty; one prompt per line)")
    return [f"{i}\t{t}" for i, t in prompts]


def toy_source(world, prompts: list[str], batch: int, path: str = "prompts"):
    """A `bcjax.adapt.train.Source` over toy-world sprite phrases ("red east fast, blue west slow"):
    each checked now (a bad one named with its line), then drawn per step with its image at random
    start corners (the toy models continue a given first block)."""
    from bcjax.toyworld.world import parse_prompt, prompt_embedding, render

    parsed = []
    for entry in prompts:
        line, _, text = entry.partition("\t")
        try:
            scene = parse_prompt(text, world)
        except ValueError as e:
            raise ValueError(f"--prompts {path}: line {line}: {e}") from None
        parsed.append((text, len(scene)))

    def source(rng: np.random.Generator):
        embeds, frames = [], []
        for i in rng.integers(0, len(parsed), batch):
            text, sprites = parsed[int(i)]
            starts = [(int(y), int(x)) for y, x in (rng.integers(world.lo, world.hi + 1, 2) for _ in range(sprites))]
            scene = parse_prompt(text, world, starts)
            embeds.append(prompt_embedding(scene, world))
            frames.append(render(scene, world.block_frames, world))
        return np.stack(embeds), np.stack(frames)

    return source
