"""The staggers of Block Cascading (when each block enters; how many are in flight), as data.

A block lives n + 1 ticks: stages 0..n-1 are its denoising steps (t_{n-1}, ..., t_0 in the
paper's notation; stage 0 is pure noise) and stage n is the clean-context pass (t_c) that writes
its K/V into the cache. Block b enters at tick b * stride, so at tick tau it is in stage
tau - b * stride. `P_k` makes the next block enter after its predecessor has done n / k denoising
steps, rounded to the nearest step with halves up (stride = max(1, floor(n / k + 1/2))):

* P1 (stride n): the next block's first step shares a tick with its predecessor's clean pass.
  Under the causal mask this is exactly the sequential pipeline, one pass per block cheaper.
* P2 (stride 2 for 3- and 4-step models, 3 for 5 steps) and P4 (stride 1 for n <= 5: the
  one-step stagger, every stage busy every tick).
* "sequential" (stride n + 1): no overlap at all.

`P_k-no-clean` is the same stagger without the clean stage: a block lives n ticks, and its last
denoising pass (stage n - 1, the one that emits its x0) also writes its K/V into the cache (the
sampler's `context="last-pass"`, `bcjax.schedule.config.PipelineConfig`). One pass less per
block (-20% compute with 4 steps); P4-no-clean keeps n = 4 blocks in flight, P1-no-clean is the
sequential pipeline without the clean pass.

Blocks are stationary in *slots*: block b sits in slot b mod num_slots for its whole life, and
num_slots = ceil(num_stages / stride) (the in-flight count) makes it free again when block
b + num_slots enters. Slots are not devices: the `tokens` mesh axis splits a tick's tokens
(`bcjax.cascade.tokens`), whatever the slot count.
"""

from __future__ import annotations

import dataclasses
import math
import re

import numpy as np

NO_CLEAN = "-no-clean"  # stagger-name suffix: the stagger without the clean stage


@dataclasses.dataclass(frozen=True)
class Stagger:
    num_steps: int  # n denoising steps; stages 0..n-1 denoise, stage n is the clean pass
    stride: int  # ticks between consecutive block entries
    num_slots: int  # in-flight capacity (the in-flight count; more slots would only idle)
    # False: no clean stage; the last denoising pass's K/V are the block's cache entry
    clean_pass: bool = True

    def __post_init__(self):
        if not 1 <= self.stride <= self.num_stages:
            raise ValueError(f"stride {self.stride} must be in [1, {self.num_stages}] for {self.num_steps} steps"
                             + ("" if self.clean_pass else " and no clean pass"))
        if self.num_slots < self.in_flight:
            raise ValueError(
                f"{self.num_slots} slots cannot hold the {self.in_flight} blocks in flight of stride {self.stride}"
            )

    @property
    def num_stages(self) -> int:
        return self.num_steps + int(self.clean_pass)

    @property
    def clean_stage(self) -> int:
        """The clean pass's stage (n); with no clean pass, n too, a stage no block reaches."""
        return self.num_steps

    @property
    def write_stage(self) -> int:
        """The stage whose pass's K/V become the block's cache entry: the clean pass, or without
        one the last denoising pass."""
        return self.num_steps if self.clean_pass else self.num_steps - 1

    @property
    def emit_stage(self) -> int:
        """The stage whose pass yields the block's final x0."""
        return self.num_steps - 1

    @property
    def in_flight(self) -> int:
        return math.ceil(self.num_stages / self.stride)

    def num_ticks(self, num_blocks: int) -> int:
        return (num_blocks - 1) * self.stride + self.num_stages

    def emit_tick(self, block):
        return block * self.stride + self.emit_stage


def make_stagger(stagger: str | int, num_steps: int, clean_pass: bool = True) -> Stagger:
    """The table of a named stagger ("P1", "P2", "P4", "sequential", each with a "-no-clean"
    suffix too) or an explicit stride; one slot per block in flight. clean_pass False (or the
    suffix): no clean stage (`Stagger.clean_pass`)."""
    name = stagger
    if isinstance(stagger, str) and stagger.endswith(NO_CLEAN):
        stagger, clean_pass = stagger[:-len(NO_CLEAN)], False
    num_stages = num_steps + int(clean_pass)
    if isinstance(stagger, int):
        stride = stagger
    elif stagger == "sequential":
        stride = num_stages
    elif m := re.fullmatch(r"[Pp](\d+)", str(stagger)):
        k = int(m.group(1))
        if k < 1:
            raise ValueError(f"stagger {name!r}: P_k needs k >= 1")
        stride = max(1, math.floor(num_steps / k + 0.5))
    else:
        raise ValueError(f"stagger {name!r}: expected 'sequential', 'P1', 'P2', 'P4' (any P<k>, each also "
                         f"with '{NO_CLEAN}') or a stride")
    in_flight = math.ceil(num_stages / stride)
    return Stagger(num_steps, stride, in_flight, clean_pass)



def slot_state(st: Stagger, tick, slot, num_blocks, xp=np):
    """Which block sits in `slot` at `tick`, in which stage, and whether the slot is busy.

    Works on numpy or jax.numpy (xp) arrays; tick, slot, num_blocks broadcast.
    Returns (block, stage, busy); block and stage are meaningless where busy is False.
    """
    period = st.num_slots * st.stride
    # the newest block of this slot that has entered by `tick`
    j = xp.floor_divide(tick - slot * st.stride, period)
    block = slot + st.num_slots * j
    stage = tick - block * st.stride
    busy = (j >= 0) & (stage < st.num_stages) & (block < num_blocks)
    return block, stage, busy


def stagger_table(st: Stagger, num_blocks: int) -> dict[str, np.ndarray]:
    """The whole generation as a table: for every tick and slot, block, stage and busy.

    Returns {"block", "stage", "busy"}: int/bool arrays [num_ticks, num_slots]; idle entries
    hold block = -1, stage = -1.
    """
    ticks = np.arange(st.num_ticks(num_blocks))[:, None]
    slots = np.arange(st.num_slots)[None, :]
    block, stage, busy = slot_state(st, ticks, slots, num_blocks)
    return {"block": np.where(busy, block, -1), "stage": np.where(busy, stage, -1), "busy": busy}
