"""Interactive streams: prompts that change between blocks, written once above every runner.

The loop here drives any runner through the stepping interface (`bcjax.stepping`:
`start`, `entering`, `step`, `done`, `cache` / `with_cache`, `replicate`, `mesh`), which the
sequential pipeline and the cascade share; it never asks which runner it holds. So prompt
switching, `bcjax stream` and `bcjax serve` are the same code for both.

Prompts come from a source with `at(block) -> prompt index` and `text(index) -> text K/V`:
- `PromptSchedule`: a prompt schedule fixed in advance, [(block id, text K/V)]: the prompt in force
  from that block on;
- `LivePrompts`: prompts pushed while the stream runs (from another thread: a web page); a push
  takes effect at the next block that enters.
The prompt in force for a step is that of the block the step starts (`runner.entering`: in the
cascade the newest block in flight; every in-flight block is computed under it). Text K/V are
plain arrays handed to the same compiled block / tick function: a switch never retraces.

Policies at a switch (from the block where the new prompt starts; `bcjax.pipeline.recache`):
- "no-recache": only the text changes. In the cascade this is the paper's point: every
  in-flight block is recomputed every tick under the prompt in force anyway, and the clean cache
  keeps the K/V its blocks were finished with.
- "recache": LongLive v1.0's baseline, exactly: before the first block (tick) under the new
  prompt, the last window_frames generated frames are re-run in one pass at t = context_noise
  under the new prompt and rewrite the cache (the old sink kept once the stream is past the
  window), a full-window pass on the critical path.
- "recache-causal": the same pass under the block-causal mask LongLive builds but ignores.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcjax.model.tensor_parallel import model_size
from bcjax.model.wan import KV
from bcjax.names import Policy
from bcjax.pipeline.recache import POLICIES, Recacher
from bcjax.runners import Runner


class StreamEvent(NamedTuple):
    block: int  # absolute block id
    x0: np.ndarray  # [B, block_frames, H, W, C]
    prompt: int  # index (into the prompt schedule / pushed prompts) of the prompt in force when this block started
    seconds: float  # wall time since the previous event (recache included)
    recache_s: float  # of which spent recaching the cache for a switch (0 when none)
    switched: bool  # a new prompt took effect during this interval (in the cascade: when its first block entered)


class StepRecord(NamedTuple):
    """One runner step as the interactive loop saw it (a whole block for the sequential runners,
    a tick for the cascade)."""

    step: int
    prompt: int  # the prompt in force for this step
    # (block id, stage, prompt the block started under) of every block the step worked on;
    # stage num_steps is the clean pass
    stages: tuple[tuple[int, int, int], ...]
    seconds: float  # wall time of this step, recache included
    recache_s: float  # of which recaching for a switch
    event: StreamEvent | None  # the block this step finished, if any


def parse_prompt_schedule(spec: str) -> list[tuple[int, str]]:
    """'a fox@0;a wolf@40;snow@80' -> [(0, 'a fox'), (40, 'a wolf'), (80, 'snow')] (block ids).

    A prompt without '@' starts at block 0 when it is the first one; starts must increase.
    """
    out = []
    start: str | None
    for i, part in enumerate(p for p in spec.split(";") if p.strip()):
        text, at, start = part.rpartition("@")
        if not at:
            text, start = part, "0" if i == 0 else None
        if start is None or not start.strip().lstrip("-").isdigit():
            raise ValueError(f"prompt {i} {part.strip()!r}: expected 'TEXT@BLOCK' (e.g. 'a red fox@40')")
        out.append((int(start), text.strip()))
    if not out:
        raise ValueError("empty prompt schedule")
    starts = [s for s, _ in out]
    if starts[0] != 0:
        raise ValueError(f"the first prompt must start at block 0; got @{starts[0]}")
    if any(b <= a for a, b in itertools.pairwise(starts)):
        raise ValueError(f"prompt starts {starts} must strictly increase")
    if any(not t for _, t in out):
        raise ValueError("a prompt in the prompt schedule is empty")
    return out


class PromptSchedule:
    """Prompts fixed in advance: [(first block id, text K/V)], starts strictly increasing."""

    def __init__(self, prompt_schedule: Sequence[tuple[int, KV]]):
        if not prompt_schedule:
            raise ValueError("empty prompt schedule")
        self.starts = [int(s) for s, _ in prompt_schedule]
        if any(b <= a for a, b in itertools.pairwise(self.starts)):
            raise ValueError(f"prompt starts {self.starts} must strictly increase")
        self.texts = [t for _, t in prompt_schedule]

    def at(self, block: int) -> int:
        starts = self.starts
        return max(i for i, s in enumerate(starts) if s <= block) if block >= starts[0] else 0

    def text(self, index: int) -> KV:
        return self.texts[index]


def kv_bytes(text: KV) -> int:
    """Bytes a text K/V holds (device or host)."""
    import jax

    return sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree_util.tree_leaves(text))


class LivePrompts:
    """Prompts pushed while a stream runs; thread-safe. A pushed prompt is in force from the next
    block that enters; a block keeps the prompt it entered under (`at` pins it on first ask).

    The text K/V of old prompts are dropped, least recently used first, once the ones held
    exceed `max_bytes` (a real model's K/V is ~94 MB per prompt at 1.3B): a stream asks only for
    the newest prompt and those of blocks still in flight, which are never dropped."""

    _PINS = 256  # pinned blocks kept (a stream only asks about blocks still in flight)
    # newest pinned blocks whose prompts are kept whatever the budget: `steps` asks for the text
    # of the entering block only, the newest (or, before the next one enters, the one before)
    _IN_FLIGHT = 2

    def __init__(self, first: KV, max_bytes: int = 256 * 2 ** 20):
        self.max_bytes = max_bytes
        self._texts: dict[int, KV] = {0: first}  # index -> K/V, least recently used first
        self._bytes = {0: kv_bytes(first)}
        self._newest = 0
        self._pinned: dict[int, int] = {}
        self._lock = threading.Lock()

    def push(self, text: KV) -> int:
        """Add a prompt; returns its index (what `at` and StreamEvent.prompt will report)."""
        with self._lock:
            self._newest += 1
            self._texts[self._newest] = text
            self._bytes[self._newest] = kv_bytes(text)
            self._evict()
            return self._newest

    def at(self, block: int) -> int:
        with self._lock:
            if block not in self._pinned:
                self._pinned[block] = self._newest
                if len(self._pinned) > self._PINS:
                    newest = max(self._pinned)
                    self._pinned = {b: p for b, p in self._pinned.items() if b > newest - self._PINS // 2}
            return self._pinned[block]

    def text(self, index: int) -> KV:
        with self._lock:
            if index not in self._texts:
                raise KeyError(f"prompt {index}'s text K/V was dropped (LivePrompts keeps {self.max_bytes} bytes)")
            self._texts[index] = self._texts.pop(index)  # most recently used
            return self._texts[index]

    def held_bytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def __len__(self) -> int:
        with self._lock:
            return len(self._texts)

    def _evict(self) -> None:
        recent = sorted(self._pinned)[-self._IN_FLIGHT:]
        keep = {self._newest} | {self._pinned[b] for b in recent}
        total = sum(self._bytes.values())
        for index in list(self._texts):
            if total <= self.max_bytes:
                break
            if index not in keep:
                del self._texts[index]
                total -= self._bytes.pop(index)


def steps(runner: Runner, params, prompts, key, num_blocks: int | None = None, *, policy: Policy = "no-recache",
          context=None, on_dispatch: Callable[[], None] | None = None,
          reencode: Callable | None = None) -> Iterator[StepRecord]:
    """Drive `runner` step by step, the prompt of each step from `prompts` (`at`, `text`),
    recaching at a switch under `policy`. Yields a StepRecord per step. num_blocks None: until the
    caller stops (closing the generator ends the stream). context: given clean frames
    [B, G * block_frames, H, W, C] (blocks 0..G-1, written under the prompt in force at block G;
    generation starts at block G).

    on_dispatch: called once per step, after the step is dispatched and before its block is
    waited for, so host work placed there (fetching the previous block's decoded pixels, encoding
    and sending them) runs while the devices compute the step. Its time is left out of the
    StepRecord's `seconds` (the time the step held the caller up), not out of StreamEvent's.

    reencode: Krea's VAE round trip (R), for a runner with Krea's loop (`Runner.takes_round_trip`).
    A policy the runner cannot follow (a recache without a cache) is refused here, before the
    stream starts, not at its first switch."""
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: expected one of {POLICIES}")
    if policy != "no-recache" and not runner.keeps_cache:
        raise ValueError(f"policy {policy!r} rewrites the KV cache at a switch; {runner.label} keeps no cache "
                         "(Krea's loop rebuilds its context under the prompt in force before every block): "
                         "use 'no-recache'")
    bf = runner.pcfg.block_frames
    first = 0 if context is None else context.shape[1] // bf
    if policy != "no-recache" and model_size(runner.mesh) > 1:
        raise ValueError(f"policy {policy!r} recaches with one device's weights; the runner's mesh splits them over "
                         f"'model' = {model_size(runner.mesh)} devices "
                         "(use policy 'no-recache', which a cascade needs anyway)")
    params = runner.place_params(params)
    current = prompts.at(first)
    state = runner.start(params, runner.place_text(prompts.text(current)), key, num_blocks=num_blocks, context=context,
                         reencode=reencode)
    rec = Recacher(runner.cfg, runner.pcfg, policy, None if runner.mesh is None else NamedSharding(runner.mesh, P()))
    for g in range(first):
        rec.add(g, context[:, g * bf:(g + 1) * bf])
    t_event, spent, switched = time.perf_counter(), 0.0, False
    while not runner.done(state):
        t0 = time.perf_counter()
        p = prompts.at(runner.entering(state))
        text = runner.place_text(prompts.text(p))
        r = 0.0
        if p != current:
            switched = True
            if rec.active:
                r0 = time.perf_counter()
                state = runner.with_cache(state, rec(params, text, runner.cache(state)))
                r = time.perf_counter() - r0
            current = p
        spent += r
        n = state.step
        state, out = runner.step(params, text, state)
        beside = 0.0
        if on_dispatch is not None:
            h0 = time.perf_counter()
            on_dispatch()
            beside = time.perf_counter() - h0
        event = None
        if out.block >= 0:
            x0 = np.asarray(out.x0)  # waits for the block
            rec.add(out.block, x0)
            now = time.perf_counter()
            event = StreamEvent(out.block, x0, prompts.at(out.block), now - t_event, spent, switched)
            t_event, spent, switched = now, 0.0, False
        stages = tuple((b, s, prompts.at(b)) for b, s in out.stages)
        yield StepRecord(n, p, stages, time.perf_counter() - t0 - beside, r, event)


def stream(runner: Runner, params, prompt_schedule: Sequence[tuple[int, KV]], key, num_blocks: int, *,
           policy: Policy = "no-recache", context=None) -> Iterator[StreamEvent]:
    """Yield a StreamEvent per block, switching prompts per `prompt_schedule` under `policy`.

    runner: any `bcjax.runners.Runner`; prompt_schedule:
    [(first block id, text K/V)], the first at block <= the first generated one; context:
    optional given clean frames [B, G*bf, H, W, C] (blocks 0..G-1; generation starts at block G).
    """
    prompts = PromptSchedule(prompt_schedule)
    first = 0 if context is None else context.shape[1] // runner.pcfg.block_frames
    if prompts.starts[0] > first:
        raise ValueError(f"the first prompt starts at block {prompts.starts[0]}; the stream starts at block {first}")
    for record in steps(runner, params, prompts, key, num_blocks, policy=policy, context=context):
        if record.event is not None:
            yield record.event
