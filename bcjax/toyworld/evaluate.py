"""Score a trained toy-world DiT against ground truth: generate from the prompt, compare per block.

The prompt fixes the whole video (first frame included), so every generated block has an exact
ground-truth render. For a few prompts with fixed seeds this reports per-block MSE, PSNR and the
sprites' position error for the trained model, for the same network at its initialisation, and
for "predict the background" (all zeros), under the sequential pipeline and optionally the cascade.

Two settings: text-to-video (every block from noise and the prompt) and, with --given-blocks k,
the first k ground-truth blocks written to the cache by clean passes (as an image-to-video prompt
would be) and the rest generated. The second isolates the dynamics: Wan's RoPE is relative and its
patch embedding position-free, so placing block 0's sprites at absolute positions ("top-left") can
only be learned from the canvas borders, the hardest part of the task for a small model.

    python -m bcjax.toyworld.evaluate --run /tmp/toyrun --prompts 4 --blocks 6 --cascade P4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.model.config import WanConfig
from bcjax.model.kv_cache import write_frames
from bcjax.model.wan import encode_text, init_params
from bcjax.pipeline.config import PipelineConfig
from bcjax.pipeline.sequential import SequentialPipeline, cached_pass, denoise_block
from bcjax.toyworld.world import (
    Scene,
    WorldConfig,
    parse_prompt,
    position_error,
    prompt_embedding,
    prompt_text,
    render,
    sample_scene,
    to_rgb,
)

EVAL_SEED = 12345  # prompts are drawn from default_rng([EVAL_SEED, i]); training uses [seed, step]


def load_model(run: str):
    """(world, cfg, params, train_seed) of a run folder's exported model (out/model)."""
    from bcjax.checkpoint import read_config, restore

    path = os.path.join(run, "model")
    meta = read_config(path)
    cfg, params = restore(path, "dit")
    prov = meta["provenance"]
    return WorldConfig(**prov["world"]), cfg, params, int(prov["train"]["seed"])


def eval_scenes(world: WorldConfig, n: int, prompts: list[str] | None = None) -> list[Scene]:
    if prompts:
        return [parse_prompt(p, world) for p in prompts]
    return [sample_scene(np.random.default_rng([EVAL_SEED, i]), world) for i in range(n)]


def generate(cfg: WanConfig, params, world: WorldConfig, scenes: list[Scene], num_blocks: int, key,
             pcfg: PipelineConfig, schedule: str = "sequential", window: str = "causal",
             given_blocks: int = 0) -> np.ndarray:
    """Latents [B, num_blocks * block_frames, H, W, C] for the scenes' prompts (one batch); the
    first given_blocks blocks are the ground truth (sequential only)."""
    context = jnp.asarray(np.stack([prompt_embedding(s, world) for s in scenes]))
    text = encode_text(cfg, params, context)
    hw = (world.size, world.size)
    if given_blocks:
        if schedule != "sequential":
            raise ValueError(f"given_blocks={given_blocks} needs the sequential pipeline; got schedule {schedule!r}")
        return _generate_after_given(cfg, params, world, scenes, num_blocks, key, pcfg, text, given_blocks)
    if schedule == "sequential":
        out = SequentialPipeline(cfg, pcfg, hw).generate(params, text, num_blocks, key)
    else:
        from bcjax.cascade.cascade import Cascade

        out = Cascade(cfg, pcfg, hw, schedule=schedule, window=window).generate(params, text, num_blocks, key)
    return np.asarray(out)


def _generate_after_given(cfg, params, world, scenes, num_blocks, key, pcfg, text, given_blocks):
    bf, hw = pcfg.block_frames, (world.size, world.size)
    truth = jnp.asarray(np.stack([render(s, given_blocks * bf, world) for s in scenes]))
    pipe = SequentialPipeline(cfg, pcfg, hw)
    cache = pipe.init_cache(len(scenes))
    clean = jax.jit(cached_pass, static_argnums=0)
    for b in range(given_blocks):  # the clean pass the sampler runs after a block, on the true frames
        ids = b * bf + jnp.arange(bf)
        t_ctx = jnp.full((len(scenes), bf), pcfg.context_noise, jnp.float32)
        _, kv = clean(cfg, params, truth[:, b * bf:(b + 1) * bf], t_ctx, text, cache, ids)
        cache = write_frames(cache, kv, ids, pcfg.sink_frames)
    step = jax.jit(partial(denoise_block, cfg, pcfg, latent_hw=hw))  # what SequentialPipeline compiles
    out = [truth]
    for b in range(given_blocks, num_blocks):
        cache, x0 = step(params, text, cache, key, jnp.int32(b))
        out.append(x0)
    return np.asarray(jnp.concatenate(out, axis=1))


def teacher_forced_x0_error(world: WorldConfig, cfg: WanConfig, params, num_blocks: int = 4, batch: int = 8,
                           seed: int = 0, pcfg: PipelineConfig | None = None) -> dict:
    """What the sampler's first pass sees, without its own errors fed back: x0 MSE per block
    [num_blocks] of one teacher-forced pass (true clean blocks as context) at each of the sampler's
    sigmas, beside the all-zeros prediction. {"sigma=...": [...], "zeros": [...]}."""
    from bcjax.toyworld.train import teacher_forced_flow
    from bcjax.toyworld.world import sample_batch

    pcfg = pcfg or PipelineConfig()
    x0, ctx = sample_batch(np.random.default_rng([EVAL_SEED, 10**6]), world, batch, num_blocks * pcfg.block_frames)
    x0 = jnp.asarray(x0)
    text = encode_text(cfg, params, jnp.asarray(ctx))
    eps = jax.random.normal(jax.random.key(seed), x0.shape)
    flow_fn = jax.jit(teacher_forced_flow, static_argnums=(0, 1))

    def per_block(err):  # [B, F, H, W, C] -> [num_blocks]
        return np.asarray(err).reshape(batch, num_blocks, -1).mean((0, 2))

    out = {}
    for sigma, t in zip(pcfg.sigmas, pcfg.timesteps):
        x_t = (1.0 - sigma) * x0 + sigma * eps
        flow = flow_fn(cfg, pcfg, params, x0, x_t, jnp.full(x0.shape[:2], t), text)
        out[f"sigma={sigma:.4f}"] = per_block((x_t - sigma * flow - x0) ** 2)
    out["zeros"] = per_block(x0**2)
    return out


def block_metrics(latents, scenes: list[Scene], world: WorldConfig) -> dict:
    """Per-block metrics [B, num_blocks] against the ground-truth renders: mse, psnr (peak-to-peak
    2 * amplitude), pos_err (mean pixel distance of the sprites' corners, occluded ones skipped)."""
    latents = np.asarray(latents)
    bf = world.block_frames
    nb = latents.shape[1] // bf
    mse = np.zeros((len(scenes), nb))
    pos = np.zeros((len(scenes), nb))
    for i, scene in enumerate(scenes):
        truth = render(scene, latents.shape[1], world)
        mse[i] = ((latents[i] - truth) ** 2).reshape(nb, -1).mean(1)
        err, valid = position_error(latents[i], scene, world)
        err, valid = err.reshape(nb, -1), valid.reshape(nb, -1)
        pos[i] = (err * valid).sum(1) / np.maximum(valid.sum(1), 1)
    psnr = 10 * np.log10((2 * world.amplitude) ** 2 / np.maximum(mse, 1e-12))
    return {"mse": mse, "psnr": psnr, "pos_err": pos}


def evaluate(world: WorldConfig, cfg: WanConfig, params, scenes: list[Scene], num_blocks: int, seed: int = 0,
             pcfg: PipelineConfig | None = None, init_seed: int = 0, cascade: str | None = None,
             window: str = "bidirectional", given_blocks: int = 0) -> tuple[dict, dict]:
    """(metrics {name: block_metrics}, latents {name: [B, F, H, W, C]}) for the trained model
    (sequential, optionally the cascade; text-to-video, and after `given_blocks` true blocks when
    > 0), its initialisation, and the all-background baseline. Given blocks' metrics are NaN."""
    pcfg = pcfg or PipelineConfig()
    key = jax.random.key(seed)
    init = init_params(cfg, jax.random.key(init_seed))
    lat = {"trained/sequential": generate(cfg, params, world, scenes, num_blocks, key, pcfg)}
    if cascade:
        lat[f"trained/{cascade}-{window}"] = generate(cfg, params, world, scenes, num_blocks, key, pcfg, cascade, window)
    lat["init/sequential"] = generate(cfg, init, world, scenes, num_blocks, key, pcfg)
    lat["zeros"] = np.zeros_like(lat["trained/sequential"])
    metrics = {name: block_metrics(x, scenes, world) for name, x in lat.items()}
    if given_blocks:
        g = f"given{given_blocks}"
        lat[f"trained/sequential/{g}"] = generate(cfg, params, world, scenes, num_blocks, key, pcfg, given_blocks=given_blocks)
        lat[f"init/sequential/{g}"] = generate(cfg, init, world, scenes, num_blocks, key, pcfg, given_blocks=given_blocks)
        for name in (f"trained/sequential/{g}", f"init/sequential/{g}"):
            m = block_metrics(lat[name], scenes, world)
            metrics[name] = {k: np.where(np.arange(num_blocks) < given_blocks, np.nan, v) for k, v in m.items()}
    return metrics, lat


def report(metrics: dict) -> str:
    """A text table: for each method, per-block MSE / PSNR / position error averaged over prompts."""
    lines = []
    nb = next(iter(metrics.values()))["mse"].shape[1]
    head = "".join(f"  blk{b:<2d}" for b in range(nb))
    for field, fmt in (("mse", "{:7.4f}"), ("psnr", "{:7.2f}"), ("pos_err", "{:7.2f}")):
        lines.append(f"{field:<32s}{head}    mean")
        for name, m in metrics.items():
            per_block = m[field].mean(0)
            cells = ["  given" if np.isnan(v) else fmt.format(v) for v in per_block]
            lines.append(f"  {name:<30s}" + "".join(" " + c for c in cells) + "  " + fmt.format(np.nanmean(per_block)))
    return "\n".join(lines)


def frame_strip(latents: dict, scenes: list[Scene], world: WorldConfig, scale: int = 4) -> np.ndarray:
    """uint8 image: per prompt, rows = ground truth then each method; columns = frames."""
    from bcjax.toyworld.png import image_grid

    rows = []
    f = next(iter(latents.values())).shape[1]
    for i, scene in enumerate(scenes):
        rows.append(to_rgb(render(scene, f, world), world))
        rows += [to_rgb(x[i], world) for name, x in latents.items() if name != "zeros"]
    return image_grid(rows, scale=scale)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a bcjax.toyworld.train output folder")
    p.add_argument("--prompts", type=int, default=4, help="number of fixed-seed evaluation prompts")
    p.add_argument("--prompt", action="append", help="explicit prompt(s) instead, e.g. 'red top-left east fast'")
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--seed", type=int, default=0, help="sampler noise seed")
    p.add_argument("--cascade", help="also run Block Cascading with this schedule (P1, P2, P4)")
    p.add_argument("--window", default="bidirectional", choices=("causal", "bidirectional"))
    p.add_argument("--given-blocks", type=int, default=1,
                   help="also generate after this many ground-truth blocks in the cache (0: off)")
    p.add_argument("--out", help="folder for eval.json and frames.png (default RUN/eval)")
    a = p.parse_args(argv)
    world, cfg, params, init_seed = load_model(a.run)
    scenes = eval_scenes(world, a.prompts, a.prompt)
    metrics, latents = evaluate(world, cfg, params, scenes, a.blocks, a.seed, init_seed=init_seed,
                                cascade=a.cascade, window=a.window, given_blocks=a.given_blocks)
    out = a.out or os.path.join(a.run, "eval")
    os.makedirs(out, exist_ok=True)
    from bcjax.toyworld.png import write_png

    write_png(os.path.join(out, "frames.png"), frame_strip(latents, scenes, world))
    result = {"prompts": [prompt_text(s) for s in scenes], "blocks": a.blocks, "seed": a.seed,
              "given_blocks": a.given_blocks,
              "rows_in_frames_png": ["ground truth", *[n for n in latents if n != "zeros"]],
              "world": dataclasses.asdict(world),
              "metrics": {n: {k: np.where(np.isnan(v), None, v).tolist() for k, v in m.items()}
                          for n, m in metrics.items()}}
    tf = teacher_forced_x0_error(world, cfg, params, seed=a.seed)
    tf_init = teacher_forced_x0_error(world, cfg, init_params(cfg, jax.random.key(init_seed)), seed=a.seed)
    result["teacher_forced_x0_mse"] = {"trained": {k: v.tolist() for k, v in tf.items()},
                                       "init": {k: v.tolist() for k, v in tf_init.items()}}
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    for i, s in enumerate(scenes):
        print(f"prompt {i}: {prompt_text(s)}")
    print(report(metrics))
    print("teacher-forced x0 MSE per block (true clean context, one pass; 8 fresh prompts):")
    for name, rows in (("trained", tf), ("init", tf_init)):
        for k, v in rows.items():
            if name == "init" and k == "zeros":
                continue
            print(f"  {name + ' ' + k if k != 'zeros' else 'zeros':<24s}" + "".join(f" {x:7.4f}" for x in v))
    print(f"wrote {out}/eval.json and {out}/frames.png")
    return result


if __name__ == "__main__":
    main()
