"""The teacher (the same weights run sequentially) and the teacher-forced tick loss.

Every block-causal model holds its own teacher: the sequential pipeline. For a generation of K
blocks it records, per block, each stage's input x_k and x0 prediction and the clean cache
before the block (`teacher_trajectory`). A teacher-forced tick (`forced_tick_loss`) then runs the
cascade's real tick (`bcjax.cascade.tick.tick`, with the adapter) on the state the cascade would
hold at that tick had every earlier tick reproduced the teacher:

* each in-flight slot's last x0 is the teacher's x0 of the previous stage, so the tick's own
  re-noise (`bcjax.sampler.stage_input`, noise from (key, block, stage)) gives exactly the
  teacher's input x_k of that stage (stage 0: the same noise; the clean stage: the final x0);
* the cache is the teacher's clean cache of the blocks whose clean pass (write stage) ran before
  the tick.

What the student sees that the teacher did not: its in-flight predecessors as they are now,
still noisy (block b at stage s sees block b-1 at stage s + stride, ...), in place of their clean
K/V, and under a bidirectional mask also its noisier successors. The loss is the mean over the
in-flight denoising slots of ||x0_student - x0_teacher||^2 in latent space: the x0 each tick
emits is what the cascade outputs (its last stage) and what it re-noises into the next stage
(the others), and the toy-world study scores the decoded output against the sequential one.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from bcjax.cascade.tick import CascadeState, TickSpec, tick
from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import KVCache, write_frames
from bcjax.model.wan import KV
from bcjax.sampler import cached_pass, clean_block, pass_positions, sample_block
from bcjax.schedule.config import PipelineConfig
from bcjax.schedule.stagger import slot_state


class Trajectory(NamedTuple):
    """The sequential pipeline's generation of K blocks, every stage recorded."""

    inputs: jax.Array  # [K, n, B, bf, H, W, C] each stage's input (stage 0: the block's noise)
    x0: jax.Array  # [K, n, B, bf, H, W, C] each stage's x0 prediction (stage n-1: the block's output)
    caches: KVCache  # leaves [K + 1, ...]: the clean cache before block k; [K] after the last block


def teacher_trajectory(cfg: WanConfig, pcfg: PipelineConfig, params, text: KV, key, num_blocks: int,
                       latent_hw: tuple[int, int], cache: KVCache, first_block: int = 0) -> Trajectory:
    """The sequential pipeline (`bcjax.sampler.denoise_block`'s passes and noise, block after
    block) from `cache` (empty, or holding given context blocks 0 .. first_block - 1), recording
    every stage. params: the base model (an adapter never runs here)."""
    batch, bf = text.k.shape[1], pcfg.block_frames
    shape = (batch, bf, *latent_hw, cfg.in_channels)

    def block_fn(cache, j):
        block = first_block + j
        frame_ids = block * bf + jnp.arange(bf)
        cache_b, positions = pass_positions(cfg, pcfg, cache, frame_ids, frame_ids[-1])

        def pass_fn(x, t_k):
            return cached_pass(cfg, params, x, jnp.full((batch, bf), t_k), text, cache_b, positions)

        if pcfg.clean_pass:
            x0, inputs, x0s = sample_block(lambda x, t_k: pass_fn(x, t_k)[0], pcfg, key, block, shape)
            after = clean_block(cfg, pcfg, params, text, x0, cache_b, block)
        else:  # the last denoising pass's K/V are the block's cache entry
            x0, inputs, x0s, kv = sample_block(pass_fn, pcfg, key, block, shape, last_aux=True)
            after = write_frames(cache_b, kv, frame_ids, pcfg.sink_frames)
        return after, (cache, inputs, x0s)

    last, (caches, inputs, x0s) = jax.lax.scan(block_fn, cache, jnp.arange(num_blocks))
    caches = jax.tree_util.tree_map(lambda s, f: jnp.concatenate([s, f[None]]), caches, last)
    return Trajectory(inputs, x0s, caches)


def forced_state(spec: TickSpec, traj: Trajectory, tau, first_block) -> CascadeState:
    """The cascade's state before tick `tau` (traced) had it followed the teacher exactly."""
    st = spec.plan
    n, k = st.num_steps, traj.x0.shape[0]
    blocks, stages, busy = slot_state(st, tau, jnp.arange(st.num_slots), k, xp=jnp)
    j = jnp.clip(blocks, 0, k - 1)
    prev = traj.x0[j, jnp.clip(stages - 1, 0, n - 1)]  # [M, B, bf, H, W, C]
    prev = jnp.where((busy & (stages >= 1))[:, None, None, None, None, None], prev, 0.0)
    # blocks whose cache entry was written before this tick
    written = jnp.clip((tau - st.write_stage - 1) // st.stride + 1, 0, k)
    cache = jax.tree_util.tree_map(lambda a: a[written], traj.caches)
    return CascadeState(prev, cache, jnp.asarray(tau, jnp.int32), jnp.asarray(first_block, jnp.int32))


def forced_targets(spec: TickSpec, traj: Trajectory, tau) -> jax.Array:
    """[M, B, bf, H, W, C]: the teacher's x0 of each slot's block and stage at tick `tau`."""
    n, k = spec.plan.num_steps, traj.x0.shape[0]
    blocks, stages, _ = slot_state(spec.plan, tau, jnp.arange(spec.plan.num_slots), k, xp=jnp)
    return traj.x0[jnp.clip(blocks, 0, k - 1), jnp.clip(stages, 0, n - 1)]


def tick_errors(spec: TickSpec, params, text: KV, key, num_blocks, state: CascadeState, target, axis=None,
                model_axis=None):
    """(sum over the tick's denoising slots of each slot's mean squared x0 error against `target`
    [M, B, bf, H, W, C], their count): the tick run from `state` (a teacher-forced one, see
    `forced_state`). axis, model_axis: as `bcjax.cascade.tick.tick` (under shard_map); every
    device returns the same figures (the tick all-gathers its x0 over `axis`)."""
    st = spec.plan
    new, _ = tick(spec, params, text, key, num_blocks, state, axis, model_axis)
    _, stages, busy = slot_state(st, state.tick, jnp.arange(st.num_slots), num_blocks, xp=jnp)
    scored = busy & (stages < st.num_steps)  # the clean stage's x0 is not used by the cascade
    err = jnp.mean(jnp.square(new.x - target), axis=tuple(range(1, target.ndim)))  # [M]
    return jnp.sum(jnp.where(scored, err, 0.0)), jnp.sum(scored)


def forced_tick_errors(spec: TickSpec, params, text: KV, key, traj: Trajectory, first_block, tau):
    """`tick_errors` of the teacher-forced tick `tau` of the trajectory. params: the base params,
    adapted or not (`bcjax.model.lora`)."""
    k = traj.x0.shape[0]
    return tick_errors(spec, params, text, key, jnp.int32(k), forced_state(spec, traj, tau, first_block),
                       forced_targets(spec, traj, tau))


def forced_tick_loss(spec: TickSpec, params, text: KV, key, traj: Trajectory, first_block=0):
    """Mean over every tick of the K-block generation and its in-flight denoising slots of the
    x0 error against the teacher (each slot's error a mean over batch and latent)."""
    ticks = spec.plan.num_ticks(traj.x0.shape[0])

    def one(tau):
        return forced_tick_errors(spec, params, text, key, traj, first_block, tau)

    sums, counts = jax.lax.map(one, jnp.arange(ticks))
    return jnp.sum(sums) / jnp.maximum(jnp.sum(counts), 1)
