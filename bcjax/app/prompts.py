"""Krea's interactive conveniences as pure functions: prompt interpolation and video-to-video strength.

Upstream: krea-ai/realtime-video `release_server.py`:
- `GenerationSession.interpolate_prompt_embeds`: at a switch, `torch.lerp(old, new,
  linspace(0, 1, steps))` gives `steps` embeddings, one popped per block from the next block on
  (the first is the old prompt, the last the new one); the text K/V are re-encoded for each.
  `old` is the embedding in force when the switch arrives, an interpolated one if a ramp is
  still running.
- `get_denoising_schedule` (v2v.py) with `strength`: the same number of denoising steps spread
  over [strength * 1000, 0] (`linspace(...).long()`), then warped through the scheduler table; the
  input latents are noised to the first step's sigma: x = (1 - sigma) latents + sigma eps.

A prompt schedule is [(first block id, embeddings [B, Lt, D])]; interpolation returns another one
with an entry per ramp block, which `text_kv` turns into the [(block, text K/V)] prompt schedule every
runner's stream takes, so it combines with the sequential pipeline and the cascade alike.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import numpy as np

from bcjax.schedule.config import PipelineConfig


def interpolate_prompt_schedule(prompt_schedule: Sequence[tuple[int, np.ndarray]],
                                steps: int) -> list[tuple[int, np.ndarray]]:
    """[(block, embeddings)] with every switch ramped over `steps` blocks: block s + i (i < steps)
    gets lerp(in_force, new, i / (steps - 1)); a switch during a ramp starts from the embedding
    in force at that block."""
    if steps < 2:
        raise ValueError(f"interpolation steps={steps}: need >= 2 (the ramp's first block is the old prompt, "
                         "its last the new one)")
    starts = [int(b) for b, _ in prompt_schedule]
    if any(b <= a for a, b in itertools.pairwise(starts)):
        raise ValueError(f"prompt starts {starts} must strictly increase")
    out: list[tuple[int, np.ndarray]] = []
    for i, (start, new) in enumerate(prompt_schedule):
        new = np.asarray(new, np.float32)
        end = starts[i + 1] if i + 1 < len(starts) else None
        if not out:
            out.append((start, new))
            continue
        old = out[-1][1]  # in force at block start - 1 (ramps are cut by the next switch)
        for j, w in enumerate(np.linspace(0.0, 1.0, steps, dtype=np.float32)):
            if end is not None and start + j >= end:
                break
            out.append((start + j, old + w * (new - old)))  # torch.lerp
    return out


def with_strength(pcfg: PipelineConfig, strength: float) -> PipelineConfig:
    """The sampler for video-to-video at `strength` in (0, 1]: Krea's `get_denoising_schedule`,
    the same number of passes spread over [strength * 1000, 0] (a trailing 0 stays a pass or an
    end point as `trailing_zero` says) and warped when the sampler warps; un-warped step lists are
    cut at strength * 1000 instead."""
    if not 0.0 < strength <= 1.0:
        raise ValueError(f"strength={strength} must lie in (0, 1]")
    steps = [float(s) for s in pcfg.denoising_steps]
    if not pcfg.warp_denoising_step:
        kept = tuple(s for s in steps if s <= strength * 1000)
        if not kept or (len(kept) == 1 and kept[0] == 0):
            raise ValueError(f"strength={strength} leaves no step of {tuple(steps)}")
        return dataclasses.replace(pcfg, denoising_steps=kept)
    count = pcfg.num_steps + (1 if pcfg.trailing_zero == "end" else 0)
    spread = np.linspace(strength * 1000, 0, count, dtype=np.float32).astype(np.int64)  # .long(): truncation
    if pcfg.trailing_zero == "end":
        spread = spread[:-1]
    if spread[0] <= 0:
        raise ValueError(f"strength={strength} leaves no denoising step")
    return dataclasses.replace(pcfg, denoising_steps=tuple(int(s) for s in spread))
