"""The state a runner (`bcjax.runners.Runner`) steps through, and what a step returns.

    state = runner.start(params, text, key, num_blocks=None, context=None)
    while not runner.done(state):
        prompt_block = runner.entering(state)        # whose prompt is in force for the next step
        state, out = runner.step(params, text, state)  # the prompt's text K/V: an argument of every step
        if out.block >= 0:
            use(out.x0)

A step is one call of the runner's compiled program: one block (all its denoising passes and
its clean pass) for the sequential pipeline, one tick (a joint pass over every block in flight)
for the cascade. Prompt switching, streaming and the server are written once against this
interface (`bcjax.app.interactive`), above every runner; the runners know nothing of prompts beyond
the text K/V of each step.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax


class StepState(NamedTuple):
    """A stream between steps. `carry` is the runner's device state (a `KVCache` for the
    sequential pipeline, a `CascadeState` for the cascade): pass it back unchanged, or read and
    replace its cache through `runner.cache(state)` / `runner.with_cache(state, cache)`."""

    carry: Any
    key: jax.Array  # the stream's noise key (noise depends on (key, block, step) only)
    step: int  # steps taken so far
    first_block: int  # absolute id of the stream's first generated block (> 0 after given context)
    num_blocks: int | None  # blocks the stream generates; None: until the caller stops
    # video-to-video input latents [B, num_blocks * block_frames, H, W, C] (one-block-per-step programs)
    source: Any = None


class Step(NamedTuple):
    """What one step did."""

    block: int  # absolute id of the block whose final x0 this step produced; -1 when none
    x0: jax.Array | None  # [B, block_frames, H, W, C] that block's x0; None when block == -1
    # (block id, stage) of every block this step worked on; stages 0..num_steps-1 denoise
    # (0 = pure noise), stage num_steps is the clean pass that writes the block's K/V (absent
    # with no clean pass: a "-no-clean" stagger, context="last-pass")
    stages: tuple[tuple[int, int], ...]


class Block(NamedTuple):
    """One finished block, what every runner's `blocks()` yields (unpacks as `for b, x0 in ...`)."""

    id: int  # absolute block id (> 0 after given context blocks)
    x0: jax.Array  # [B, block_frames, H, W, C] its final x0 latents


def block_entering(state: StepState) -> int:
    """`entering` of a runner whose step is one whole block (sequential, Krea's loop): the block
    the next step makes; its prompt is the one in force for that step."""
    return state.first_block + state.step


def blocks_done(state: StepState) -> bool:
    """`done` of a runner whose step is one whole block: every planned block made."""
    return state.num_blocks is not None and state.step >= state.num_blocks


def keeps_clean_cache(pcfg) -> bool:
    """`keeps_cache` of a clean-pass runner: a cache a recache policy may rewrite at a switch.
    Under Krea's rules it holds the rebuilt context, made under the prompt in force anyway."""
    return pcfg.context != "rebuild"
