"""Block-causal training of a tiny Wan DiT on the toy world, in the stages of the real lineage.

Every recipe trains one forward over a *layout* of blocks -- what the sampler shows the model in
its passes -- with finished context as clean blocks (t = context_noise, block-causal among
themselves, so their K/V are exactly the clean pass's cache entries) and a window of the trained
context + the block itself. `--stage` picks the recipe of a session; a run folder may go through
several (each resumable, each stage's last model kept as model-<stage>):

* clean (teacher forcing with clean context, the old recipe): up to `context_blocks` clean blocks
  and one target block at one noise level; flow-matching loss. Cascading then feeds the model
  partly denoised context it never saw, and sequential generation drifts (exposure bias).
* diffusion-forcing (CausVid's / Self-Forcing's initialisation): a clip of clean context and
  `in_flight` blocks, each at its own noise level (the sampler's sigmas and continuous ones,
  sorted like a cascade's stages half the time, sometimes the oldest in the clean stage), which
  attend to each other exactly as in a cascade tick (`bcjax.cascade.masks`) under the causal or
  the bidirectional mask; 1..in_flight of them exist (fill, drain, and the sequential pass).
  Loss: x0 regression of every in-flight block. With `--cascade P4` (any stagger name) the
  layouts are the stagger's own ticks instead: a tick of a generation drawn at random (fill,
  steady state, drain), its in-flight blocks at exactly their stages' sigmas (the clean stage a
  clean block at t_c), every visible block's cache inside the window, newer blocks visible under
  the bidirectional mask; the other clips (1 - cascade_prob) are the sequential sampler's pass.
* self-rollout (Self-Forcing): the model generates `rollout_blocks` blocks after clean context
  with the few-step sampler through a KV cache (no gradient through the rollout), then one
  forward recomputes each generated block's pass at one random sampler step, with its own
  generated blocks as context, and regresses x0 on the ground truth (the world is deterministic,
  so no distillation teacher is needed).

Clips are drawn at the start of a video (the still first block as the only context: the
image-to-video step, where only the prompt says how the sprites move) a `first_prob` of the time
(default a third; the shipped self-rollout stage two thirds: a first move that is a bounce is the
hardest block of a video, and at a third the model drew it soft), else later in the stream
(moving, bouncing context); the number of visible context blocks varies
from 1 to context_blocks, so every window fill the sampler meets is trained. Sigmas come mostly
from the few-step sampler's table (PipelineConfig().sigmas = [1, 0.9375, 0.8333, 0.625]), the
rest shifted-uniform.

    # the shipped model: diffusion forcing from scratch (18 min wall on the 2 shared CPU cores), then
    # self-rollout from its model with a fresh optimizer (Self-Forcing starts from its ODE-initialised
    # generator the same way), two thirds of the clips at the image-to-video step, exporting an EMA
    python -m bcjax.toyworld.train --out df/ --stage diffusion-forcing --size 12 --max-sprites 1 \
        --block-frames 1 --batch 16 --lr 3e-3 --steps 6000 --until 5879 --snapshots
    python -m bcjax.toyworld.train --out sr/ --init df/model-diffusion-forcing --stage self-rollout \
        --batch 8 --lr 1e-3 --steps 3400 --until 2570 --first-prob 0.67 --ema 0.995 --snapshots

Restarting with the same --out continues from the last checkpoint. The folder holds
`run.json` (configs), `ckpt/` (orbax: params, optimizer state, step, loss history, the stages
run with their wall and CPU seconds), `model/` (the final DiT as a bcjax checkpoint,
`bcjax.checkpoint.restore`-able), `model-<stage>/`, `loss.png`, `summary.json`, and with
`--snapshots` a model per checkpoint under `snapshots/`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import resource
import shutil
import time
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from bcjax.model.config import WanConfig
from bcjax.model.wan import forward, init_params, text_kv
from bcjax.sampler import sample_block
from bcjax.schedule.config import PipelineConfig
from bcjax.schedule.stagger import make_stagger, stagger_table
from bcjax.toyworld.world import WorldConfig, prompt_embedding, render, sample_scene

# Training recipes, in the order of the block-causal lineage (CausVid / Self-Forcing / LongLive):
# clean-context teacher forcing, diffusion forcing (noisy context as in a cascade tick), then
# training on the model's own rollouts through the KV cache.
STAGES = ("clean", "diffusion-forcing", "self-rollout", "base", "ode-init", "stream-teacher", "stream-rollout")
# the real models' lineage (`bcjax.toyworld.lineage`): a bidirectional base, ODE init from it, then
# teacher forcing (CausVid) and self-rollout (Self-Forcing) through a rolling window with a sink
# and prompt switches
LINEAGE = ("base", "ode-init", "stream-teacher", "stream-rollout")
# Kinds of the blocks of one training forward (a "layout"): finished context (clean, t =
# context_noise, block-causal among themselves: their K/V are the clean pass's), in-flight blocks
# of a cascade tick (noisy, each at its own level), and teacher-forced targets (noisy; see only
# the clean context before them, as the sequential sampler's passes do).
CLEAN, FLIGHT, TARGET = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings. context_blocks: clean blocks before the target (the sampler's window
    minus the block itself); max_block: latest video block a target is drawn from; first_prob:
    fraction of clips whose target is the first moving block (after the still image);
    table_prob: fraction of sigmas drawn from the sampler's table (the rest: shifted-uniform).

    stage: the recipe of the steps this config drives (`STAGES`; a run may change it between
    sessions: the lineage clean -> diffusion-forcing -> self-rollout). diffusion-forcing:
    in_flight noisy blocks per clip, each at its own sigma, sorted like a cascade's stages with
    prob cascade_prob, under the bidirectional mask with prob bidirectional_prob (else causal).
    self-rollout: rollout_blocks blocks generated by the sampler, then trained on.

    cascade: a stagger name ("P4", "P4-no-clean", ...; "" for none). The diffusion-forcing stage
    then trains on that cascade's own context (`tick_layouts`): with prob cascade_prob a clip is
    one of its ticks (in_flight is the stagger's in-flight count, 5 for P4), else the sequential
    pass (one block after clean context).

    ema: decay of an exponential moving average of the weights (0: none), which is what gets
    exported (Self-Forcing's and CausVid's generators are EMA weights, decay 0.99). A tiny model
    trained at a high learning rate oscillates from checkpoint to checkpoint; the average is what
    stops it hedging between hypotheses (a soft, smeared sprite).

    The lineage (`bcjax.toyworld.lineage`): sink_blocks of the window are the video's first blocks
    (LongLive's sink); clip_blocks: blocks of a base / ode-init clip, the image included (the
    trained length); base_steps: Euler steps of the base's sampler; ode_clips: trajectories the
    ode-init stage draws from `teacher` (a base checkpoint, default --init); switch_prob: the
    stream-rollout / stream-teacher clips under a switched prompt; rollout_blocks: also the
    stream-teacher stage's targets per clip; short_clips: the fraction of base steps on 2-block
    clips (the image and the first move: the one move the base learns alone, and loses when
    trained on long clips only; docs/toyworld-study.md)."""

    steps: int = 1900
    batch: int = 8
    context_blocks: int = 2
    max_block: int = 12
    first_prob: float = 1 / 3
    lr: float = 2e-3
    warmup: int = 100
    end_lr_ratio: float = 0.05
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    table_prob: float = 0.75
    seed: int = 0
    checkpoint_every: int = 200
    stage: str = "clean"
    in_flight: int = 3
    cascade_prob: float = 0.5
    bidirectional_prob: float = 0.5
    rollout_blocks: int = 3
    ema: float = 0.0
    cascade: str = ""
    sink_blocks: int = 0
    clip_blocks: int = 5
    short_clips: float = 0.0
    base_steps: int = 20
    ode_clips: int = 512
    teacher: str = ""
    switch_prob: float = 0.0

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"training stage {self.stage!r}: expected one of {STAGES}")
        if self.in_flight < 1 or self.rollout_blocks < 1:
            raise ValueError(f"in_flight {self.in_flight} and rollout_blocks {self.rollout_blocks} must be >= 1")
        if not 0.0 <= self.short_clips <= 1.0:
            raise ValueError(f"short_clips {self.short_clips} is a fraction of the base steps: must lie in [0, 1]")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema decay {self.ema} must lie in [0, 1)")
        if self.cascade:
            if self.stage != "diffusion-forcing":
                raise ValueError(f"cascade {self.cascade!r} trains the diffusion-forcing stage; "
                                 f"stage is {self.stage!r}")
            make_stagger(self.cascade, 4)  # a bad name fails here, naming the staggers

    def flight_blocks(self, pcfg: PipelineConfig) -> int:
        """In-flight blocks of a diffusion-forcing layout: in_flight, or the cascade's in-flight count."""
        return make_stagger(self.cascade, pcfg.num_steps).in_flight if self.cascade else self.in_flight


def toy_pipeline_config(tcfg: TrainConfig | None = None, world: WorldConfig | None = None) -> PipelineConfig:
    """The sampler the toy model is trained for: the real models' 4-step sigma table, blocks of the
    world's block_frames, a window of the trained context + the block itself, no sink."""
    tcfg = tcfg or TrainConfig()
    k, sink = tcfg.context_blocks, tcfg.sink_blocks
    bf = (world or WorldConfig()).block_frames
    return PipelineConfig(block_frames=bf, window_frames=(k + sink + 1) * bf, sink_frames=sink * bf)


def toy_model_config(world: WorldConfig, **overrides) -> WanConfig:
    """A tiny Wan DiT for the toy world: patch (1, 2, 2) -> 36 tokens per 12x12 frame, head_dim 32.

    Sized for the 20-minute, 2-core CPU budget; four layers because carrying a sprite along a
    prompt's velocity takes a cross-attention hop (which velocity) before the self-attention
    hops that fetch the sprite from the right offset of the previous frames.

    rope_theta 100, not Wan's 10 000: head_dim 32 leaves each spatial axis 5 RoPE frequencies,
    and with theta 10 000 only the first two turn by a useful angle across a 6-token grid, so an
    attention score can barely tell offset v from v +- 1 (qk-norm bounds the logits). Theta 100
    spreads the 5 frequencies over periods of 6 to 250 tokens, as Wan's spread over its 30x52
    grid; measured (one sprite, 1900 steps): loss 0.145 -> 0.132, sequential sprite position
    error 9.5 -> 7.3 px.
    """
    base = {"dim": 96, "ffn_dim": 256, "num_heads": 3, "num_layers": 4, "in_channels": world.channels,
            "out_channels": world.channels, "text_dim": world.text_dim, "text_len": world.text_len,
            "rope_theta": 100.0}
    return WanConfig(**{**base, **overrides})


# -- the training forward (pure functions) ----------------------------------------------------

def context_mask(num_context: int, visible, tokens_per_block: int):
    """bool [B, K + 1, (K + 1) * tokens_per_block] key mask of one [K clean | 1 noisy] forward.

    visible int [B]: how many of the K context blocks (the newest) the sample shows. Clean block
    c sees the visible clean blocks up to itself (block-causal, as when it entered the cache); the
    noisy block sees every visible clean block and itself; a hidden block sees only itself.
    """
    k = num_context
    q = jnp.arange(k + 1)[:, None]
    kb = jnp.arange(k + 1)[None, :]
    first = (k - jnp.asarray(visible))[:, None, None]  # [B, 1, 1] first visible context block
    clean = (q < k) & (kb <= q) & (kb >= first) & (q >= first)
    noisy = (q == k) & (((kb < k) & (kb >= first)) | (kb == k))
    own = q == kb
    return jnp.repeat(clean | noisy | own, tokens_per_block, axis=2)


def context_flow(cfg: WanConfig, params, context, x_t, t_noisy, visible, text, context_noise: float = 0.0):
    """Flow prediction for a noisy block after its clean context, in one forward.

    context [B, K * bf, H, W, C] clean blocks; x_t [B, bf, H, W, C] the noisy block; t_noisy [B]
    its timestep; visible int [B] context blocks shown (the newest). Returns [B, bf, H, W, C].
    """
    b, kf, hh, ww, _ = context.shape
    bf = x_t.shape[1]
    k = kf // bf
    mask = context_mask(k, visible, bf * cfg.tokens_per_frame(hh, ww))
    seq = jnp.concatenate([context, x_t.astype(context.dtype)], axis=1)
    t = jnp.concatenate([jnp.full((b, kf), context_noise, jnp.float32),
                         jnp.broadcast_to(t_noisy.astype(jnp.float32)[:, None], (b, bf))], axis=1)
    flow, _ = forward(cfg, params, seq, t, text, jnp.arange(kf + bf), None, mask)
    return flow[:, kf:]


def sample_sigmas(key, shape, pcfg: PipelineConfig, table_prob: float):
    """(sigma, timestep) float32 [*shape]: from the sampler's table with prob table_prob, else
    shifted-uniform (sigma = shift u / (1 + (shift - 1) u)), timestep = 1000 sigma."""
    k_pick, k_idx, k_u = jax.random.split(key, 3)
    table_s, table_t = jnp.asarray(pcfg.sigmas), jnp.asarray(pcfg.timesteps)
    idx = jax.random.randint(k_idx, shape, 0, len(pcfg.sigmas))
    u = jax.random.uniform(k_u, shape)
    s_u = pcfg.shift * u / (1.0 + (pcfg.shift - 1.0) * u)
    pick = jax.random.uniform(k_pick, shape) < table_prob
    return jnp.where(pick, table_s[idx], s_u), jnp.where(pick, table_t[idx], 1000.0 * s_u)


def flow_loss(cfg: WanConfig, pcfg: PipelineConfig, table_prob: float, params, clip, visible, context, key):
    """MSE of the flow (eps - x0) on a clip's last block. clip [B, (K + 1) * bf, H, W, C];
    visible int [B]; context: prompt embeddings [B, Lt, text_dim]."""
    bf = pcfg.block_frames
    x0 = clip[:, -bf:]
    k_sig, k_eps = jax.random.split(key)
    sigma, t = sample_sigmas(k_sig, (clip.shape[0],), pcfg, table_prob)
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    s = sigma[:, None, None, None, None]
    x_t = (1.0 - s) * x0 + s * eps
    text = text_kv(cfg, params, context)
    flow = context_flow(cfg, params, clip[:, :-bf], x_t, t, visible, text, pcfg.context_noise)
    return jnp.mean((flow - (eps - x0)) ** 2)


def sample_clips(rng: np.random.Generator, world: WorldConfig, tcfg: TrainConfig, targets: int = 1):
    """(clips float32 [B, (K + targets) * bf, H, W, C], visible int32 [B], prompt embeddings [B, Lt, Dt]).

    The (first) target is video block j (j = 1, the first moving block, with prob first_prob, else
    uniform in [2, max_block]); visible ~ uniform [1, min(K, j)]. Hidden context blocks (before
    the video's start or outside `visible`) are rendered but masked out.
    """
    k, bf = tcfg.context_blocks, world.block_frames
    clips, visible, text = [], [], []
    for _ in range(tcfg.batch):
        scene = sample_scene(rng, world)
        j = 1 if rng.random() < tcfg.first_prob else int(rng.integers(2, max(tcfg.max_block, 2) + 1))
        visible.append(int(rng.integers(1, min(k, j) + 1)))
        clips.append(render(scene, (k + targets) * bf, world, start_frame=(j - k) * bf))
        text.append(prompt_embedding(scene, world))
    return np.stack(clips), np.asarray(visible, np.int32), np.stack(text)


def tick_layouts(rng: np.random.Generator, world: WorldConfig, pcfg: PipelineConfig, tcfg: TrainConfig):
    """The cascade's own context (tcfg.cascade): (clips [B, (K + M) * bf, H, W, C], visible int32
    [B], flying int32 [B], stages int32 [B, M], prompt embeddings [B, Lt, Dt]), M the stagger's
    in-flight count.

    With prob cascade_prob a clip is one tick of a generation of max_block blocks, the tick drawn
    uniformly (so fill, steady state and drain come in a generation's proportions): its in-flight
    blocks oldest first with their stages (`bcjax.schedule.stagger`; generated block b is video
    block b + 1 after the still image), the cache a real run has (min(K, j) finished blocks before
    the oldest, video block j). Else the sequential pass: one block (video block 1 with prob
    first_prob, else uniform in [2, max_block]) after min(K, j) clean blocks, stage -1 (its sigma
    drawn like the uncascaded stage's).
    """
    k, bf = tcfg.context_blocks, world.block_frames
    st = make_stagger(tcfg.cascade, pcfg.num_steps)
    m = st.in_flight
    table = stagger_table(st, tcfg.max_block)
    clips, visible, flying, stages, text = [], [], [], [], []
    for _ in range(tcfg.batch):
        scene = sample_scene(rng, world)
        stage = np.full(m, -1, np.int32)
        if rng.random() < tcfg.cascade_prob:
            tick = int(rng.integers(len(table["busy"])))
            busy = table["busy"][tick]
            order = np.argsort(table["block"][tick][busy])
            blocks, ticks_stage = table["block"][tick][busy][order], table["stage"][tick][busy][order]
            j, f = int(blocks[0]) + 1, len(blocks)
            stage[:f] = ticks_stage
        else:
            j = 1 if rng.random() < tcfg.first_prob else int(rng.integers(2, max(tcfg.max_block, 2) + 1))
            f = 1
        clips.append(render(scene, (k + m) * bf, world, start_frame=(j - k) * bf))
        visible.append(min(k, j))
        flying.append(f)
        stages.append(stage)
        text.append(prompt_embedding(scene, world))
    return (np.stack(clips), np.asarray(visible, np.int32), np.asarray(flying, np.int32), np.stack(stages),
            np.stack(text))


# -- diffusion forcing and self-rollout (pure functions) --------------------------------------

def layout_mask(index, kind, visible, bidirectional, window_blocks: int, tokens_per_block: int):
    """bool [B, N, N * tokens_per_block] key mask of one training forward over N blocks.

    index int [N] (static): each block's position in the clip (a target and the clean copy of the
    same video block share it, and their RoPE positions); kind int [N] (static): CLEAN, FLIGHT or
    TARGET; visible bool [B, N]: blocks that exist in the sample (hidden ones are no one's keys);
    bidirectional bool [B]: the mask of a cascade tick among in-flight blocks (`bcjax.cascade.masks`).

    The rules are the sampler's (`bcjax.cascade.masks.tick_key_mask` for a tick, the sequential
    pipeline's cached passes for clean context): a query block q sees older CLEAN blocks inside
    its window (the window_blocks blocks before it) -- a CLEAN query thus gets exactly the K/V
    its clean pass wrote to the cache; a FLIGHT query also sees older in-flight blocks inside its
    window and, under the bidirectional mask, every newer in-flight block; a TARGET query sees
    only the clean context; every block sees itself.
    """
    index, kind = np.asarray(index), np.asarray(kind)
    q, k = index[:, None], index[None, :]
    qk, kk = kind[:, None], kind[None, :]
    older = (k < q) & (k >= q - window_blocks)
    rule = (kk == CLEAN) & older
    rule |= (qk == FLIGHT) & (kk == FLIGHT) & older
    newer = jnp.asarray((qk == FLIGHT) & (kk == FLIGHT) & (k > q))
    mask = jnp.asarray(rule)[None] | (newer[None] & jnp.asarray(bidirectional)[:, None, None])
    mask = (mask & jnp.asarray(visible)[:, None, :]) | jnp.eye(len(index), dtype=bool)[None]
    return jnp.repeat(mask, tokens_per_block, axis=2)


def layout_flow(cfg: WanConfig, params, seq, t, index, mask, text):
    """One forward over a layout: seq [B, N * bf, H, W, C] blocks, t [B, N * bf] per-frame
    timesteps, index int [N] block positions (RoPE: frame index * bf + f), mask from
    `layout_mask`. Returns the flow [B, N * bf, H, W, C]."""
    bf = seq.shape[1] // len(index)
    frame_ids = (np.asarray(index)[:, None] * bf + np.arange(bf)[None]).reshape(-1)
    flow, _ = forward(cfg, params, seq, t, text, jnp.asarray(frame_ids, jnp.int32), None, mask)
    return flow


def _per_block(x, bf: int):
    """[B, N * bf, ...] -> [B, N, bf * ...]."""
    return x.reshape(x.shape[0], x.shape[1] // bf, -1)


def cascade_sigmas(key, shape, pcfg: PipelineConfig, tcfg: TrainConfig):
    """(sigma, timestep) float32 [B, M] of M in-flight blocks (oldest first), each its own draw of
    `sample_sigmas`; with prob cascade_prob a sample is sorted like a cascade tick's stages (older
    = less noisy), and then a quarter of the time its oldest block is in the clean stage (sigma 0,
    t = context_noise: the t_c pass of a finished x0)."""
    k_sig, k_sort, k_tc = jax.random.split(key, 3)
    sigma, t = sample_sigmas(k_sig, shape, pcfg, tcfg.table_prob)
    order = jnp.argsort(sigma, axis=1)
    ordered = jax.random.uniform(k_sort, (shape[0], 1)) < tcfg.cascade_prob
    sigma = jnp.where(ordered, jnp.take_along_axis(sigma, order, 1), sigma)
    t = jnp.where(ordered, jnp.take_along_axis(t, order, 1), t)
    clean = ordered[:, 0] & (jax.random.uniform(k_tc, (shape[0],)) < 0.25)
    sigma = sigma.at[:, 0].set(jnp.where(clean, 0.0, sigma[:, 0]))
    t = t.at[:, 0].set(jnp.where(clean, pcfg.context_noise, t[:, 0]))
    return sigma, t


def stage_sigmas(stages, pcfg: PipelineConfig):
    """(sigma, timestep) float32 of a tick's stages int [...]: stage s < n is denoising pass s (the
    sampler's table: stage 0 pure noise), stage n the clean pass (sigma 0, t = context_noise)."""
    n = pcfg.num_steps
    idx = jnp.clip(stages, 0, n)
    return (jnp.asarray((*pcfg.sigmas, 0.0), jnp.float32)[idx],
            jnp.asarray((*pcfg.timesteps, pcfg.context_noise), jnp.float32)[idx])


def diffusion_forcing_loss(cfg: WanConfig, pcfg: PipelineConfig, tcfg: TrainConfig, params, clip, visible, flying,
                           stages, context, key):
    """x0 regression of every in-flight block of a cascade-tick-shaped clip.

    clip [B, (K + M) * bf, H, W, C]: K finished context blocks (clean, `visible` [B] of them, the
    newest), then M in-flight blocks, `flying` [B] of them (the oldest; the rest hidden: pipeline
    fill and drain, and flying = 1 is the sequential sampler's pass). Each in-flight block is
    noised to its own sigma (`cascade_sigmas`), or with tcfg.cascade to its tick stage's (stages
    int [B, M], `tick_layouts`; -1: drawn as the sequential pass's); the mask is causal or
    bidirectional per sample. Loss: mean over the in-flight blocks at sigma > 0 of the MSE of
    x0 = x_t - sigma v.
    """
    bf, k, m = pcfg.block_frames, tcfg.context_blocks, tcfg.flight_blocks(pcfg)
    b = clip.shape[0]
    k_sig, k_win, k_eps = jax.random.split(key, 3)
    if tcfg.cascade:  # the tick's own levels; the sequential pass draws its sigma as the other stages do
        drawn = sample_sigmas(k_sig, (b, m), pcfg, tcfg.table_prob)
        sigma, t = (jnp.where(stages >= 0, v, d) for v, d in zip(stage_sigmas(stages, pcfg), drawn, strict=True))
    else:
        sigma, t = cascade_sigmas(k_sig, (b, m), pcfg, tcfg)
    pos = jnp.arange(k + m)[None]
    vis = (pos >= k - visible[:, None]) & (pos < k + flying[:, None])  # [B, K + M]
    bidirectional = jax.random.uniform(k_win, (b,)) < tcfg.bidirectional_prob
    x0 = clip[:, k * bf:]
    eps = jax.random.normal(k_eps, x0.shape, jnp.float32)
    s = jnp.repeat(sigma, bf, axis=1)[:, :, None, None, None]
    x_t = (1.0 - s) * x0 + s * eps
    seq = jnp.concatenate([clip[:, :k * bf], x_t], axis=1)
    tt = jnp.concatenate([jnp.full((b, k * bf), pcfg.context_noise, jnp.float32), jnp.repeat(t, bf, axis=1)], axis=1)
    hh, ww = clip.shape[2:4]
    mask = layout_mask(np.arange(k + m), np.asarray([CLEAN] * k + [FLIGHT] * m), vis, bidirectional, k,
                       bf * cfg.tokens_per_frame(hh, ww))
    flow = layout_flow(cfg, params, seq, tt, np.arange(k + m), mask, text_kv(cfg, params, context))[:, k * bf:]
    err = jnp.mean(_per_block((x_t - s * flow - x0) ** 2, bf), axis=-1)  # [B, M]
    w = (vis[:, k:] & (sigma > 0)).astype(jnp.float32)
    return jnp.sum(err * w) / jnp.maximum(jnp.sum(w), 1.0)


def rollout(cfg: WanConfig, pcfg: PipelineConfig, params, text, context, visible, key, num_blocks: int, record):
    """The few-step sampler through a KV cache, after given context, as the sequential runner runs it.

    context [B, K * bf, H, W, C] clean blocks (clip blocks 0..K-1, `visible` [B] of them, the
    newest, written by clean passes); generates clip blocks K..K + num_blocks - 1 with noise
    block_noise(key, block, step). The cache is a [layers, B, (K + num_blocks) * block tokens]
    K/V buffer with a per-sample validity mask, so samples may show different context.
    record int [B, num_blocks]: the sampler step whose input to keep per block.
    Returns (x0 [B, R * bf, H, W, C], the recorded inputs [B, R * bf, H, W, C], their sigma
    [B, R] and timestep [B, R]).
    """
    from bcjax.model.wan import KV

    bf = pcfg.block_frames
    b, kf, hh, ww, c = context.shape
    k = kf // bf
    n = k + num_blocks
    window = pcfg.cache_frames // bf
    tb = bf * cfg.tokens_per_frame(hh, ww)
    buf = jnp.zeros((cfg.num_layers, b, n * tb, cfg.num_heads, cfg.head_dim), cfg.compute_dtype)
    cache = KV(buf, buf)
    valid = jnp.zeros((b, n), bool)
    shape = (b, bf, hh, ww, c)

    def block_pass(x, t, block, cache, valid):
        keys = valid & (jnp.arange(n) >= block - window)[None] & (jnp.arange(n) < block)[None]
        key_mask = jnp.concatenate([jnp.repeat(keys, tb, axis=1), jnp.ones((b, tb), bool)], axis=1)[:, None]
        return forward(cfg, params, x, t, text, block * bf + jnp.arange(bf), cache, key_mask)

    def write(cache, kv, block):
        return KV(*(jax.lax.dynamic_update_slice_in_dim(a, u.astype(a.dtype), block * tb, axis=2)
                    for a, u in zip(cache, kv, strict=True)))

    t_clean = jnp.full((b, bf), pcfg.context_noise, jnp.float32)
    for blk in range(k):
        _, kv = block_pass(context[:, blk * bf:(blk + 1) * bf], t_clean, blk, cache, valid)
        cache = write(cache, kv, blk)
        valid = valid.at[:, blk].set(blk >= k - visible)

    timesteps, sigmas = jnp.asarray(pcfg.timesteps), jnp.asarray(pcfg.sigmas)
    outs, inputs = [], []
    for blk in range(k, n):
        def pass_fn(x, t_i, blk=blk, cache=cache, valid=valid):
            return block_pass(x, jnp.full((b, bf), t_i), blk, cache, valid)[0]

        x0, xs_in, _ = sample_block(pass_fn, pcfg, key, blk, shape)  # the inference sampler itself
        pick = record[:, blk - k]
        inputs.append(xs_in[pick, jnp.arange(b)])
        _, kv = block_pass(x0, t_clean, blk, cache, valid)
        cache = write(cache, kv, blk)
        valid = valid.at[:, blk].set(True)
        outs.append(x0)
    return (jnp.concatenate(outs, axis=1), jnp.concatenate(inputs, axis=1), sigmas[record], timesteps[record])


def self_rollout_loss(cfg: WanConfig, pcfg: PipelineConfig, tcfg: TrainConfig, params, clip, visible, context, key):
    """Self-Forcing with x0 regression: the model generates R blocks after the clip's K clean
    context blocks with the few-step sampler through the KV cache (no gradient through the
    rollout), keeping each block's input at one random sampler step; then one forward over
    [context | generated blocks as clean context | the kept noisy inputs as targets] recomputes
    exactly those passes with gradient, and their x0 regresses on the ground truth (the world is
    deterministic: no teacher). clip [B, (K + R) * bf, H, W, C]; visible [B] context blocks shown.
    """
    k_roll, k_step = jax.random.split(key)
    record = jax.random.randint(k_step, (clip.shape[0], tcfg.rollout_blocks), 0, pcfg.num_steps)
    x0, _ = self_rollout_x0(cfg, pcfg, tcfg, params, clip, visible, context, k_roll, record)
    return jnp.mean((x0 - clip[:, tcfg.context_blocks * pcfg.block_frames:]) ** 2)


def self_rollout_x0(cfg: WanConfig, pcfg: PipelineConfig, tcfg: TrainConfig, params, clip, visible, context, key,
                    record):
    """(x0 predictions with gradient [B, R * bf, H, W, C], the rollout's blocks [B, R * bf, ...]) of
    `self_rollout_loss`; record int [B, R]: the sampler step each generated block is trained at."""
    bf, k, r = pcfg.block_frames, tcfg.context_blocks, tcfg.rollout_blocks
    b, _, hh, ww, _ = clip.shape
    k_roll = key
    text = text_kv(cfg, params, context)
    frozen = jax.lax.stop_gradient((params, text))  # no gradient through the rollout
    gen, x_in, sigma, t = rollout(cfg, pcfg, *frozen, clip[:, :k * bf], visible, k_roll, r, record)
    index = np.concatenate([np.arange(k + r - 1), np.arange(k, k + r)])
    kind = np.asarray([CLEAN] * (k + r - 1) + [TARGET] * r)
    vis = jnp.concatenate([jnp.arange(k)[None] >= k - visible[:, None], jnp.ones((b, 2 * r - 1), bool)], axis=1)
    mask = layout_mask(index, kind, vis, jnp.zeros((b,), bool), k, bf * cfg.tokens_per_frame(hh, ww))
    seq = jnp.concatenate([clip[:, :k * bf], gen[:, :(r - 1) * bf], x_in], axis=1)
    tt = jnp.concatenate([jnp.full((b, (k + r - 1) * bf), pcfg.context_noise, jnp.float32),
                          jnp.repeat(t, bf, axis=1)], axis=1)
    flow = layout_flow(cfg, params, seq, tt, index, mask, text)[:, (k + r - 1) * bf:]
    s = jnp.repeat(sigma, bf, axis=1)[:, :, None, None, None]
    return x_in - s * flow, gen


# -- optimisation ------------------------------------------------------------------------------

class TrainState(NamedTuple):
    params: dict
    opt_state: optax.OptState
    step: jax.Array  # int32 []
    ema: dict  # the moving average of params (= params when TrainConfig.ema is 0)

    def export_params(self, tcfg: TrainConfig) -> dict:
        return self.ema if tcfg.ema > 0 else self.params


def make_optimizer(tcfg: TrainConfig) -> optax.GradientTransformation:
    learning_rate = optax.warmup_cosine_decay_schedule(
        0.0, tcfg.lr, min(tcfg.warmup, max(tcfg.steps - 1, 1)), max(tcfg.steps, 2), tcfg.lr * tcfg.end_lr_ratio)
    return optax.chain(optax.clip_by_global_norm(tcfg.grad_clip),
                       optax.adamw(learning_rate, b1=0.9, b2=0.99, weight_decay=tcfg.weight_decay))


def init_state(cfg: WanConfig, tcfg: TrainConfig, params=None) -> TrainState:
    """Step 0: fresh optimizer state on `params` (default: the DiT initialised from tcfg.seed)."""
    params = init_params(cfg, jax.random.key(tcfg.seed)) if params is None else params
    ema = jax.tree_util.tree_map(jnp.array, params)  # its own buffers: the step donates both
    return TrainState(params, make_optimizer(tcfg).init(params), jnp.int32(0), ema)


@functools.lru_cache(maxsize=4)
def make_train_step(cfg: WanConfig, pcfg: PipelineConfig, tcfg: TrainConfig):
    """jitted (state, *batch_for_step(...)) -> (state, loss) for tcfg.stage's loss; the state is
    donated. Cached per config, so a resumed session in the same process reuses the compiled step."""
    opt = make_optimizer(tcfg)
    from bcjax.toyworld import lineage

    if tcfg.stage == "clean":
        loss_fn = partial(flow_loss, cfg, pcfg, tcfg.table_prob)
    elif tcfg.stage == "base":
        loss_fn = partial(lineage.base_loss, cfg, pcfg)
    elif tcfg.stage == "ode-init":
        loss_fn = partial(lineage.ode_init_loss, cfg, pcfg)
    elif tcfg.stage == "stream-rollout":
        loss_fn = partial(lineage.stream_rollout_loss, cfg, pcfg, tcfg.rollout_blocks)
    elif tcfg.stage == "stream-teacher":
        loss_fn = partial(lineage.stream_teacher_loss, cfg, pcfg, tcfg.rollout_blocks)
    elif tcfg.stage == "diffusion-forcing":
        loss_fn = partial(diffusion_forcing_loss, cfg, pcfg, tcfg)
    else:
        loss_fn = partial(self_rollout_loss, cfg, pcfg, tcfg)

    def step(state: TrainState, *batch):  # batch: the data of `batch_for_step`, then the key
        loss, grads = jax.value_and_grad(loss_fn)(state.params, *batch)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = optax.incremental_update(params, state.ema, 1.0 - tcfg.ema)  # tcfg.ema = 0: ema = params
        return TrainState(params, opt_state, state.step + 1, ema), loss

    return jax.jit(step, donate_argnums=(0,))


def is_short_step(tcfg: TrainConfig, step: int) -> bool:
    """Whether this base step trains on 2-block clips (a `short_clips` fraction of the steps,
    drawn from (seed, step) so a resumed run draws what an uninterrupted one would)."""
    return (tcfg.stage == "base" and tcfg.short_clips > 0
            and bool(np.random.default_rng([tcfg.seed, step, 2]).random() < tcfg.short_clips))


def batch_for_step(world: WorldConfig, pcfg: PipelineConfig, tcfg: TrainConfig, step: int, ode: dict | None = None):
    """(*data, key) of a step for tcfg.stage's loss. They depend only on (seed, step): a resumed
    run sees what an uninterrupted one would. ode: the ode-init stage's trajectories."""
    from bcjax.toyworld import lineage

    rng = np.random.default_rng([tcfg.seed, step])
    key = jax.random.fold_in(jax.random.key(tcfg.seed + 1), step)
    if tcfg.stage == "base":
        scenes = [sample_scene(rng, world) for _ in range(tcfg.batch)]
        clips = np.stack([render(s, tcfg.clip_blocks * world.block_frames, world) for s in scenes])
        return jnp.asarray(clips), jnp.asarray(np.stack([prompt_embedding(s, world) for s in scenes])), key
    if tcfg.stage == "ode-init":
        if ode is None:
            raise ValueError("the ode-init stage needs the base's trajectories (train() computes them)")
        i = np.sort(rng.choice(len(ode["x0"]), tcfg.batch, replace=False))
        return (*(jnp.asarray(ode[k][i]) for k in ("first", "states", "x0", "text")), key)
    if tcfg.stage in ("stream-rollout", "stream-teacher"):
        clips, exists, j, ctx = lineage.stream_clips(rng, world, pcfg, tcfg.batch, tcfg.rollout_blocks,
                                                     tcfg.max_block, tcfg.first_prob, tcfg.switch_prob)
        return jnp.asarray(clips), jnp.asarray(exists), jnp.asarray(j), jnp.asarray(ctx), key
    if tcfg.stage == "clean":
        clips, visible, ctx = sample_clips(rng, world, tcfg)
        return jnp.asarray(clips), jnp.asarray(visible), jnp.asarray(ctx), key
    if tcfg.stage == "diffusion-forcing":
        if tcfg.cascade:
            clips, visible, flying, stages, ctx = tick_layouts(rng, world, pcfg, tcfg)
        else:
            clips, visible, ctx = sample_clips(rng, world, tcfg, tcfg.in_flight)
            flying = rng.integers(1, tcfg.in_flight + 1, tcfg.batch).astype(np.int32)
            stages = np.full((tcfg.batch, tcfg.in_flight), -1, np.int32)  # unused: sigmas drawn
        return (jnp.asarray(clips), jnp.asarray(visible), jnp.asarray(flying), jnp.asarray(stages), jnp.asarray(ctx),
                key)
    clips, visible, ctx = sample_clips(rng, world, tcfg, tcfg.rollout_blocks)
    return jnp.asarray(clips), jnp.asarray(visible), jnp.asarray(ctx), key


# -- the run folder ----------------------------------------------------------------------------

def _run_dict(world, cfg, pcfg, tcfg) -> dict:
    return {name: dataclasses.asdict(c) for name, c in
            (("world", world), ("model", cfg), ("pipeline", pcfg), ("train", tcfg))}


def _from_dict(cls, data: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    return cls(**{k: tuple(v) if isinstance(fields[k].default, tuple) else v for k, v in data.items()})


def load_run(out: str):
    """(world, cfg, pcfg, tcfg) of a run folder, from its run.json."""
    with open(os.path.join(out, "run.json")) as f:
        run = json.load(f)
    return (_from_dict(WorldConfig, run["world"]), _from_dict(WanConfig, run["model"]),
            _from_dict(PipelineConfig, run["pipeline"]), _from_dict(TrainConfig, run["train"]))


def _checkpoint_manager(out: str):
    import orbax.checkpoint as ocp

    return ocp.CheckpointManager(os.path.join(os.path.abspath(out), "ckpt"),
                                 options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True),
                                 item_names=("state", "meta"))


def save_state(mngr, state: TrainState, losses: list[float], extra: dict | None = None) -> None:
    import orbax.checkpoint as ocp

    step = int(state.step)
    meta = {"step": step, "losses": [float(x) for x in losses[:step]], **(extra or {})}
    mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)),
              force=True)
    mngr.wait_until_finished()


def restore_state(mngr, cfg: WanConfig, tcfg: TrainConfig):
    """(state, meta) of the newest checkpoint, or None when the folder holds none."""
    import orbax.checkpoint as ocp

    step = mngr.latest_step()
    if step is None:
        return None
    abstract = jax.eval_shape(lambda: init_state(cfg, tcfg))
    got = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                     meta=ocp.args.JsonRestore()))
    return TrainState(*got["state"]), dict(got["meta"])


def export_model(out: str, cfg: WanConfig, params, world: WorldConfig, pcfg: PipelineConfig, tcfg: TrainConfig,
                 step: int, stages: list | None = None, name: str = "model") -> str:
    """The trained DiT as a bcjax checkpoint folder out/<name> (provenance: world, sampler, training
    and the stages that trained it, with their wall and CPU seconds)."""
    from bcjax.checkpoint import save

    path = os.path.join(out, name)
    save(path, {"dit": (cfg, params)}, {"source": "bcjax.toyworld.train", "step": step,
                                         "world": dataclasses.asdict(world), "pipeline": dataclasses.asdict(pcfg),
                                         "train": dataclasses.asdict(tcfg), "stages": stages or []},
         overwrite=True)
    return path


def plot_losses(path: str, losses) -> None:
    from bcjax.toyworld.png import line_plot, write_png

    y = np.asarray(losses, np.float64)
    if not y.size:
        return
    w = max(1, len(y) // 25)  # trailing mean over 4% of the run (shorter at the start)
    csum = np.concatenate([[0.0], np.cumsum(y)])
    lo = np.maximum(np.arange(1, len(y) + 1) - w, 0)
    mean = (csum[1:] - csum[lo]) / (np.arange(1, len(y) + 1) - lo)
    write_png(path, line_plot({"loss": y, "mean": mean}, log_y=True, colours=((170, 200, 230), (20, 70, 160))))


def _cpu_seconds() -> float:
    """User + system CPU seconds of this process (all threads) so far."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def dir_size(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def init_params_from(path: str, cfg: WanConfig, world: WorldConfig) -> tuple[dict, list]:
    """(params, the training stages recorded in its provenance) of a toy-world bcjax checkpoint,
    refused unless it holds this run's model and world."""
    from bcjax.checkpoint import config_from_dict, read_config, restore
    from bcjax.toyworld.evaluate import model_path

    path = os.path.abspath(model_path(path))  # an embedded model's name too (lineage-base)
    prov = read_config(path).get("provenance", {})
    if "world" in prov and config_from_dict(WorldConfig, prov["world"]) != world:
        raise ValueError(f"--init {path} was trained on world {prov['world']}; this run's world is {world}")
    # the run's own numerics: only the architecture is compared
    got_cfg, params = restore(path, "dit", dtype=cfg.dtype, param_dtype=cfg.param_dtype, attention=cfg.attention)
    if got_cfg != cfg:
        diff = {f.name: (getattr(got_cfg, f.name), getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if getattr(got_cfg, f.name) != getattr(cfg, f.name)}
        raise ValueError(f"--init {path} holds a different DiT: (its, this run's) {diff}")
    return params, list(prov.get("stages", []))


def train(out: str, world: WorldConfig, cfg: WanConfig, pcfg: PipelineConfig, tcfg: TrainConfig,
          progress: bool = True, until: int | None = None, time_limit: float | None = None,
          snapshots: bool = False, cpu_limit: float | None = None, init: str | None = None) -> dict:
    """Train (or resume) into `out` up to tcfg.steps; stop early, checkpointed and exported, at step
    `until` (as an interrupted session would) or once this session has run `time_limit` seconds
    (or used `cpu_limit` process CPU seconds: equal-compute comparisons on a shared machine).
    snapshots: also export the model at every checkpoint to out/snapshots/step-NNNNN (for the
    curve of error against training minutes). init: a new run starts from this bcjax checkpoint's
    DiT (an earlier stage's `model-<stage>`, as Self-Forcing starts from its ODE-initialised
    generator) with a fresh optimizer; its recorded stages count towards the training time.
    Returns the summary also written to out/summary.json."""
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    run_json = os.path.join(out, "run.json")
    if os.path.isfile(run_json):
        # load_run's fourth item, the train config, may change on resume: left out of the check
        for name, was, now in zip(("world", "model", "pipeline"), load_run(out), (world, cfg, pcfg), strict=False):
            if was != now:
                raise ValueError(f"run {out} was started with {name} config {was}; got {now} (use a new folder)")
    with open(run_json, "w") as f:
        json.dump(_run_dict(world, cfg, pcfg, tcfg), f, indent=2)
    mngr = _checkpoint_manager(out)
    restored = restore_state(mngr, cfg, tcfg)
    if restored is None and init is not None:
        params, history = init_params_from(init, cfg, world)
        state = init_state(cfg, tcfg, params)
        losses: list[float] = []
        prior_wall, prior_cpu = sum(r["wall_s"] for r in history), sum(r["cpu_s"] for r in history)
    elif restored is None:
        state, losses, prior_wall, prior_cpu, history = init_state(cfg, tcfg), [], 0.0, 0.0, []
    else:
        state, meta = restored
        losses, prior_wall = list(meta["losses"]), float(meta.get("wall_s", 0.0))
        prior_cpu, history = float(meta.get("cpu_s", 0.0)), list(meta.get("stages", []))
    # Restored arrays come back committed to a device; commit fresh ones too, so a fresh and a
    # resumed session in one process share one compiled step.
    state = jax.device_put(state, jax.devices()[0])
    start = int(state.step)
    step_fn = make_train_step(cfg, pcfg, tcfg)
    short_cfg = dataclasses.replace(tcfg, clip_blocks=2)
    t_begin, cpu_begin = time.perf_counter(), _cpu_seconds()
    ode = None
    if tcfg.stage == "ode-init":  # the teacher's trajectories, once per run folder (its time is the stage's)
        from bcjax.toyworld.lineage import ode_dataset

        teacher = tcfg.teacher or init or ""
        path = os.path.join(out, "ode.npz")
        if not teacher and not os.path.isfile(path):
            raise ValueError("the ode-init stage needs --teacher (a base checkpoint; default --init)")
        ode = ode_dataset(path, world, cfg, pcfg, lambda: init_params_from(teacher, cfg, world)[0], tcfg.ode_clips,
                          tcfg.clip_blocks, tcfg.base_steps, tcfg.seed, progress=progress)
    step_times = []

    def extra():  # wall and process CPU seconds of all sessions, and which steps ran which stage
        wall, cpu = time.perf_counter() - t_begin, _cpu_seconds() - cpu_begin
        run = {"stage": tcfg.stage, "from_step": start, "to_step": int(state.step), "wall_s": wall, "cpu_s": cpu}
        return {"wall_s": prior_wall + wall, "cpu_s": prior_cpu + cpu, "stages": history + [run]}
    stop = tcfg.steps if until is None else min(until, tcfg.steps)
    bar = tqdm(total=tcfg.steps, initial=start, disable=not progress, desc="train", unit="step", dynamic_ncols=True)
    try:
        for step in range(start, stop):
            step_cfg = short_cfg if is_short_step(tcfg, step) else tcfg
            batch = batch_for_step(world, pcfg, step_cfg, step, ode)
            t0 = time.perf_counter()
            state, loss = (step_fn if step_cfg is tcfg else make_train_step(cfg, pcfg, short_cfg))(state, *batch)
            loss = float(loss)  # blocks: the step time below is the real one
            step_times.append(time.perf_counter() - t0)
            losses.append(loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}; lower --lr")
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", ms=f"{1e3 * step_times[-1]:.0f}")
            done = step + 1
            out_of_time = ((time_limit is not None and time.perf_counter() - t_begin > time_limit)
                           or (cpu_limit is not None and _cpu_seconds() - cpu_begin > cpu_limit))
            if done % tcfg.checkpoint_every == 0 or done == stop or out_of_time:
                save_state(mngr, state, losses, extra())
                plot_losses(os.path.join(out, "loss.png"), losses)
                if snapshots:
                    export_model(out, cfg, state.export_params(tcfg), world, pcfg, tcfg, done, extra()["stages"],
                                 os.path.join("snapshots", f"step-{done:05d}"))
            if out_of_time:
                print(f"stopping at step {done}: this session ran past --time-limit {time_limit} s or --cpu-limit "
                      f"{cpu_limit} s")
                break
    except KeyboardInterrupt:  # keep what was done; rerunning continues from here
        try:
            if int(state.step) > start:
                save_state(mngr, state, losses, extra())
        except (RuntimeError, ValueError, OSError) as e:  # e.g. a donated state deleted mid-dispatch
            print(f"could not checkpoint the interrupted step ({e}); resuming starts from the last checkpoint")
        raise
    finally:
        bar.close()
    totals = extra()
    if int(state.step) > start or not os.path.isdir(os.path.join(out, "model")):
        path = export_model(out, cfg, state.export_params(tcfg), world, pcfg, tcfg, int(state.step), totals["stages"])
        # each stage's last model stays, so the lineage's models can be compared (model-<stage>)
        shutil.copytree(path, os.path.join(out, f"model-{tcfg.stage}"), dirs_exist_ok=True)
        plot_losses(os.path.join(out, "loss.png"), losses)
    steady = step_times[1:] or step_times
    head = np.mean(losses[:10]) if losses else float("nan")
    tail = np.mean(losses[-50:]) if losses else float("nan")
    summary = {
        "steps": int(state.step), "planned_steps": tcfg.steps, "resumed_from": start, "batch": tcfg.batch,
        "context_blocks": tcfg.context_blocks,
        "stage": tcfg.stage, "stages": totals["stages"],
        "session_wall_s": time.perf_counter() - t_begin, "session_cpu_s": _cpu_seconds() - cpu_begin,
        "cpu_s (all sessions)": totals["cpu_s"],
        "ms_per_step": 1e3 * float(np.median(steady)) if steady else None,
        "first_step_s (compile)": step_times[0] if step_times else None,
        "wall_s (all sessions)": totals["wall_s"],
        "loss_first10": float(head), "loss_last50": float(tail),
        "params": int(sum(x.size for x in jax.tree_util.tree_leaves(state.params))),
        "model_bytes": dir_size(os.path.join(out, "model")), "ckpt_bytes": dir_size(os.path.join(out, "ckpt")),
    }
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    return summary


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run folder; an existing one is resumed")
    p.add_argument("--steps", type=int, help="total optimisation steps (default 1900)")
    for name, typ in (("batch", int), ("context-blocks", int), ("lr", float), ("first-prob", float), ("warmup", int),
                      ("seed", int),
                      ("table-prob", float), ("checkpoint-every", int), ("in-flight", int), ("rollout-blocks", int),
                      ("cascade-prob", float), ("bidirectional-prob", float), ("dim", int), ("ffn-dim", int),
                      ("sink-blocks", int), ("clip-blocks", int), ("short-clips", float), ("base-steps", int),
                      ("ode-clips", int),
                      ("switch-prob", float), ("max-block", int), ("teacher", str),
                      ("heads", int), ("layers", int), ("patch", int), ("rope-theta", float)):
        p.add_argument(f"--{name}", type=typ)
    for name in ("size", "sprite", "min-sprites", "max-sprites"):
        p.add_argument(f"--{name}", type=int, help=f"world {name.replace('-', ' ')} (new runs only)")
    p.add_argument("--block-frames", type=int,
                   help="latent frames per block, the world stepping once per block (new runs only; default 3)")
    p.add_argument("--stage", choices=STAGES,
                   help="training recipe of this session's steps (default clean; a resumed run keeps its last "
                        "unless given): clean-context teacher forcing, diffusion forcing (noisy cascade-tick "
                        "context, causal and bidirectional masks), self-rollout (Self-Forcing: trained on its "
                        "own KV-cached rollouts); the real models' lineage (bcjax.toyworld.lineage): base "
                        "(bidirectional, many-step), ode-init, stream-teacher, stream-rollout")
    p.add_argument("--until", type=int, help="stop (checkpointed) at this step; rerun to continue")
    p.add_argument("--time-limit", type=float, help="stop (checkpointed) after this many seconds of this session")
    p.add_argument("--cpu-limit", type=float,
                   help="stop (checkpointed) after this many process CPU seconds of this session")
    p.add_argument("--snapshots", action="store_true",
                   help="export the model at every checkpoint to OUT/snapshots/step-N (error-vs-minutes curves)")
    p.add_argument("--init", help="start a new run from this bcjax checkpoint's DiT (e.g. an earlier run's "
                                   "model-diffusion-forcing), fresh optimizer; its model and world configs are used")
    p.add_argument("--cascade", help="diffusion-forcing on this cascade's own ticks (P4: 5 blocks in flight at their "
                                      "stages' sigmas, newer ones visible with --bidirectional-prob 1), the rest "
                                      "(1 - --cascade-prob) the sequential pass")
    p.add_argument("--ema", type=float,
                   help="export an exponential moving average of the weights with this decay (0: none)")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    train_args = {"steps": a.steps, "batch": a.batch, "first_prob": a.first_prob, "context_blocks": a.context_blocks,
                  "lr": a.lr, "warmup": a.warmup,
                  "seed": a.seed, "table_prob": a.table_prob, "checkpoint_every": a.checkpoint_every, "stage": a.stage,
                  "in_flight": a.in_flight, "rollout_blocks": a.rollout_blocks, "cascade_prob": a.cascade_prob,
                  "bidirectional_prob": a.bidirectional_prob, "ema": a.ema, "cascade": a.cascade,
                  "sink_blocks": a.sink_blocks, "clip_blocks": a.clip_blocks, "short_clips": a.short_clips,
                  "base_steps": a.base_steps,
                  "ode_clips": a.ode_clips, "switch_prob": a.switch_prob, "max_block": a.max_block,
                  "teacher": (a.teacher or (a.init if a.stage == "ode-init" else None)) and os.path.abspath(
                      a.teacher or a.init)}
    model_args = {"dim": a.dim, "ffn_dim": a.ffn_dim, "num_heads": a.heads, "num_layers": a.layers,
                  "rope_theta": a.rope_theta, "patch_size": None if a.patch is None else (1, a.patch, a.patch)}
    world_args = {"size": a.size, "sprite": a.sprite, "min_sprites": a.min_sprites, "max_sprites": a.max_sprites}
    if a.block_frames is not None:  # the first block is the still image; the world steps once per block
        world_args.update(block_frames=a.block_frames, still_frames=a.block_frames, frames_per_step=a.block_frames)
    train_args = {k: v for k, v in train_args.items() if v is not None}
    world_args = {k: v for k, v in world_args.items() if v is not None}
    model_args = {k: v for k, v in model_args.items() if v is not None}
    if os.path.isfile(os.path.join(a.out, "run.json")):
        # Resuming: the run's configs stand; a flag may only restate them (or change --steps etc.).
        world, cfg, pcfg, tcfg = load_run(a.out)
        clash = {k: (getattr(cfg, k), v) for k, v in model_args.items() if getattr(cfg, k) != v}
        if clash:
            raise SystemExit(f"run {a.out} was started with model {({k: c[0] for k, c in clash.items()})}; "
                             f"got {({k: c[1] for k, c in clash.items()})} (use a new --out)")
        if any(getattr(world, k) != v for k, v in world_args.items()):
            raise SystemExit(f"run {a.out} was started with world {world}; world flags {world_args} cannot change it")
        tcfg = dataclasses.replace(tcfg, **train_args)
    elif a.init:  # the model and world are the checkpoint's; flags may restate them only
        from bcjax.checkpoint import config_from_dict, read_config

        meta = read_config(os.path.abspath(a.init))
        world = config_from_dict(WorldConfig, meta["provenance"]["world"])
        cfg = config_from_dict(WanConfig, meta["parts"]["dit"], attention=toy_model_config(world).attention)
        clash = {**{k: (getattr(world, k), v) for k, v in world_args.items() if getattr(world, k) != v},
                 **{k: (getattr(cfg, k), v) for k, v in model_args.items() if getattr(cfg, k) != v}}
        if clash:
            raise SystemExit(f"--init {a.init} fixes the world and model; flags {clash} (its, given) contradict it")
        # the window is the checkpoint's (its pipeline); the context and sink flags may restate it
        pcfg = config_from_dict(PipelineConfig, meta["provenance"]["pipeline"])
        bf = pcfg.block_frames
        train_args.setdefault("sink_blocks", pcfg.sink_frames // bf)
        train_args.setdefault("context_blocks", (pcfg.cache_frames - pcfg.sink_frames) // bf)
        tcfg = TrainConfig(**train_args)
        if toy_pipeline_config(tcfg, world) != pcfg:
            raise SystemExit(f"--init {a.init} was trained for the window {pcfg.window_frames} frames with sink "
                             f"{pcfg.sink_frames}; --context-blocks {tcfg.context_blocks} --sink-blocks "
                             f"{tcfg.sink_blocks} give {toy_pipeline_config(tcfg, world).window_frames}")
    else:
        world, tcfg = WorldConfig(**world_args), TrainConfig(**train_args)
        cfg, pcfg = toy_model_config(world, **model_args), toy_pipeline_config(tcfg, world)
    summary = train(a.out, world, cfg, pcfg, tcfg, progress=not a.no_progress, until=a.until, time_limit=a.time_limit,
                    snapshots=a.snapshots, cpu_limit=a.cpu_limit, init=a.init)
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
