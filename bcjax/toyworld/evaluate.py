"""Score a trained toy-world DiT against ground truth: generate from the prompt alone, compare per block.

The prompt fixes the whole video (first frame included), so every generated block has an exact
ground-truth render. For a few prompts with fixed seeds this reports per-block MSE, PSNR and the
sprites' position error for the trained model, for the same network at its initialisation, and
for "predict the background" (all zeros), under the sequential pipeline and optionally the cascade.

    python -m bcjax.toyworld.evaluate --run /tmp/toyrun --prompts 4 --blocks 6 --cascade P4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.model.config import WanConfig
from bcjax.model.wan import encode_text, init_params
from bcjax.pipeline.config import PipelineConfig
from bcjax.pipeline.sequential import SequentialPipeline
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
             pcfg: PipelineConfig, schedule: str = "sequential", window: str = "causal") -> np.ndarray:
    """Latents [B, num_blocks * block_frames, H, W, C] for the scenes' prompts (one batch)."""
    context = jnp.asarray(np.stack([prompt_embedding(s, world) for s in scenes]))
    text = encode_text(cfg, params, context)
    hw = (world.size, world.size)
    if schedule == "sequential":
        out = SequentialPipeline(cfg, pcfg, hw).generate(params, text, num_blocks, key)
    else:
        from bcjax.cascade.cascade import Cascade

        out = Cascade(cfg, pcfg, hw, schedule=schedule, window=window).generate(params, text, num_blocks, key)
    return np.asarray(out)


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
             window: str = "bidirectional") -> tuple[dict, dict]:
    """(metrics {name: block_metrics}, latents {name: [B, F, H, W, C]}) for the trained model
    (sequential, optionally the cascade), its initialisation, and the all-background baseline."""
    pcfg = pcfg or PipelineConfig()
    key = jax.random.key(seed)
    lat = {"trained/sequential": generate(cfg, params, world, scenes, num_blocks, key, pcfg)}
    if cascade:
        lat[f"trained/{cascade}-{window}"] = generate(cfg, params, world, scenes, num_blocks, key, pcfg, cascade, window)
    lat["init/sequential"] = generate(cfg, init_params(cfg, jax.random.key(init_seed)), world, scenes, num_blocks, key, pcfg)
    lat["zeros"] = np.zeros_like(lat["trained/sequential"])
    return {name: block_metrics(x, scenes, world) for name, x in lat.items()}, lat


def report(metrics: dict) -> str:
    """A text table: for each method, per-block MSE / PSNR / position error averaged over prompts."""
    lines = []
    nb = next(iter(metrics.values()))["mse"].shape[1]
    head = "".join(f"  blk{b:<2d}" for b in range(nb))
    for field, fmt in (("mse", "{:7.4f}"), ("psnr", "{:7.2f}"), ("pos_err", "{:7.2f}")):
        lines.append(f"{field:<28s}{head}    mean")
        for name, m in metrics.items():
            per_block = m[field].mean(0)
            lines.append(f"  {name:<26s}" + "".join(" " + fmt.format(v) for v in per_block)
                         + "  " + fmt.format(per_block.mean()))
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
    p.add_argument("--out", help="folder for eval.json and frames.png (default RUN/eval)")
    a = p.parse_args(argv)
    world, cfg, params, init_seed = load_model(a.run)
    scenes = eval_scenes(world, a.prompts, a.prompt)
    metrics, latents = evaluate(world, cfg, params, scenes, a.blocks, a.seed, init_seed=init_seed,
                                cascade=a.cascade, window=a.window)
    out = a.out or os.path.join(a.run, "eval")
    os.makedirs(out, exist_ok=True)
    from bcjax.toyworld.png import write_png

    write_png(os.path.join(out, "frames.png"), frame_strip(latents, scenes, world))
    result = {"prompts": [prompt_text(s) for s in scenes], "blocks": a.blocks, "seed": a.seed,
              "rows_in_frames_png": ["ground truth", *[n for n in latents if n != "zeros"]],
              "world": dataclasses.asdict(world),
              "metrics": {n: {k: v.tolist() for k, v in m.items()} for n, m in metrics.items()}}
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(result, f, indent=2)
    for i, s in enumerate(scenes):
        print(f"prompt {i}: {prompt_text(s)}")
    print(report(metrics))
    print(f"wrote {out}/eval.json and {out}/frames.png")
    return result


if __name__ == "__main__":
    main()
