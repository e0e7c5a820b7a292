"""Interactive streams: prompts that change between blocks, under the sequential pipeline or the cascade.

A prompt schedule is [(block id, text K/V)]: the prompt in force from that block on. Text K/V
are computed once per prompt (before the stream, or whenever the caller adds one) and are plain
arrays handed to the same compiled block / tick function: a switch never retraces.

Two policies at a switch (from the block where the new prompt starts):
- "no-recache": only the text changes. In the cascade this is the paper's point: every
  in-flight block is recomputed every tick under the prompt in force anyway, and the clean cache
  keeps the K/V its blocks were finished with.
- "recache": LongLive's baseline: before the first block (tick) under the new prompt, the
  frames still in the window are re-run at t = context_noise under the new prompt and replace
  the cache (`bcjax.pipeline.recache`), a full-window pass on the critical path.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator, Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.distributed import local, put, replicate
from bcjax.model.wan import KV
from bcjax.pipeline.recache import frames_for_cache, recache

POLICIES = ("no-recache", "recache")


class StreamEvent(NamedTuple):
    block: int  # absolute block id
    x0: np.ndarray  # [B, block_frames, H, W, C]
    prompt: int  # index into the schedule of the prompt in force when this block started
    seconds: float  # wall time since the previous event (recache included)
    recache_s: float  # of which spent recaching the cache for a switch (0 when none)
    switched: bool  # a new prompt took effect during this interval (in the cascade: when its first block entered)


def parse_prompt_schedule(spec: str) -> list[tuple[int, str]]:
    """'a fox@0;a wolf@40;snow@80' -> [(0, 'a fox'), (40, 'a wolf'), (80, 'snow')] (block ids).

    A prompt without '@' starts at block 0 when it is the first one; starts must increase.
    """
    out = []
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
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"prompt starts {starts} must strictly increase")
    if any(not t for _, t in out):
        raise ValueError("a prompt in the schedule is empty")
    return out


def _active(starts: Sequence[int], block: int) -> int:
    return max(i for i, s in enumerate(starts) if s <= block) if block >= starts[0] else 0


@functools.lru_cache(maxsize=16)
def _recache_fn(cfg, pcfg, keep_sink: bool):
    # one compiled recache per model/sampler, shared by every stream (a new jit per stream would recompile)
    return jax.jit(partial(recache, cfg, pcfg, keep_sink=keep_sink))


class _Recacher:
    """The jitted recache plus the blocks it may need (the window's worth, context included)."""

    def __init__(self, cfg, pcfg, keep_sink: bool, sharding=None):
        self.fn = _recache_fn(cfg, pcfg, keep_sink)
        self.bf, self.sharding = pcfg.block_frames, sharding
        self.keep = pcfg.cache_frames // pcfg.block_frames + 2
        self.sink_blocks = -(-pcfg.sink_frames // pcfg.block_frames)
        self.blocks: dict[int, np.ndarray] = {}

    def add(self, block: int, x0) -> None:
        self.blocks[block] = np.asarray(x0)
        for b in [b for b in self.blocks if self.sink_blocks <= b <= block - self.keep]:
            del self.blocks[b]

    def __call__(self, params, text: KV, cache):
        like = next(iter(self.blocks.values()))
        frames = frames_for_cache(jax.device_get(cache.frame_ids), self.blocks, self.bf, like)
        frames = put(frames, self.sharding) if self.sharding is not None else jnp.asarray(frames)
        return jax.block_until_ready(self.fn(params, text, frames, cache))


def stream(runner, params, schedule: Sequence[tuple[int, KV]], key, num_blocks: int, *, policy: str = "no-recache",
           keep_sink: bool = False, context=None) -> Iterator[StreamEvent]:
    """Yield a StreamEvent per block, switching prompts per `schedule` under `policy`.

    runner: a SequentialPipeline or a Cascade; schedule: [(first block id, text K/V)], the first
    at block <= the first generated one; context: optional given clean frames [B, G*bf, H, W, C]
    (blocks 0..G-1; generation starts at block G).
    """
    from bcjax.cascade.cascade import Cascade

    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: expected one of {POLICIES}")
    if not schedule:
        raise ValueError("empty prompt schedule")
    starts = [int(s) for s, _ in schedule]
    if any(b <= a for a, b in zip(starts, starts[1:])):
        raise ValueError(f"prompt starts {starts} must strictly increase")
    texts = [t for _, t in schedule]
    bf = runner.pcfg.block_frames
    first = 0 if context is None else context.shape[1] // bf
    if starts[0] > first:
        raise ValueError(f"the first prompt starts at block {starts[0]}; the stream starts at block {first}")
    sharding = None
    if isinstance(runner, Cascade) and runner.mesh is not None:
        from jax.sharding import NamedSharding, PartitionSpec

        sharding = NamedSharding(runner.mesh, PartitionSpec())
        params, texts = replicate((params, texts), runner.mesh)
    rec = _Recacher(runner.cfg, runner.pcfg, keep_sink, sharding)
    batch = texts[0].k.shape[1]
    if context is not None:
        for g in range(first):
            rec.add(g, context[:, g * bf:(g + 1) * bf])
    if isinstance(runner, Cascade):
        yield from _cascade_stream(runner, params, texts, starts, key, num_blocks, policy, rec, context, first, batch)
    else:
        yield from _sequential_stream(runner, params, texts, starts, key, num_blocks, policy, rec, context, first, batch)


def _sequential_stream(pipe, params, texts, starts, key, num_blocks, policy, rec, context, first, batch):
    pipe._check_length(num_blocks, first)
    cache = pipe.prefill(params, texts[_active(starts, first)], context) if context is not None else pipe.init_cache(batch)
    current = _active(starts, first)
    t0 = time.perf_counter()
    for b in range(first, first + num_blocks):
        p, spent = _active(starts, b), 0.0
        switched = p != current
        if switched and policy == "recache" and rec.blocks:
            r0 = time.perf_counter()
            cache = rec(params, texts[p], cache)
            spent = time.perf_counter() - r0
        current = p
        cache, x0 = pipe._block_fn(params, texts[p], cache, key, jnp.int32(b))
        x0 = np.asarray(x0)  # waits for the block
        rec.add(b, x0)
        now = time.perf_counter()
        yield StreamEvent(b, x0, p, now - t0, spent, switched)
        t0 = now


def _cascade_stream(cas, params, texts, starts, key, num_blocks, policy, rec, context, first, batch):
    st = cas.stagger
    cas._check_length(num_blocks, first)
    if context is not None:
        state = cas.init_state(batch, *cas.prefill(params, texts[_active(starts, first)], context))
    else:
        state = cas.init_state(batch)
    n_blocks = jnp.int32(num_blocks)
    current = _active(starts, first)
    t0, spent, switched = time.perf_counter(), 0.0, False
    for tau in range(st.emit_tick(num_blocks - 1) + 1):
        # the prompt in force at a tick is that of the newest block in flight (the one entering)
        newest = first + min(tau // st.stride, num_blocks - 1)
        p = _active(starts, newest)
        switched |= p != current
        if p != current and policy == "recache" and rec.blocks:
            r0 = time.perf_counter()
            state = state._replace(cache=rec(params, texts[p], state.cache))
            spent += time.perf_counter() - r0
        current = p
        state, (x0, _) = cas._step(params, texts[p], key, n_blocks, state)
        if tau >= st.emit_stage and (tau - st.emit_stage) % st.stride == 0:
            b = first + (tau - st.emit_stage) // st.stride
            x0 = np.asarray(local(x0))
            rec.add(b, x0)
            now = time.perf_counter()
            yield StreamEvent(b, x0, _active(starts, b), now - t0, spent, switched)
            t0, spent, switched = now, 0.0, False
