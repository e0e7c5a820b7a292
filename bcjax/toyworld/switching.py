"""Prompt switches in the toy world: how fast a stream follows a switch that always shows.

A switch at block s gives every sprite a new colour and a direction whose first step differs from
where the old prompt would have taken it (`bcjax.toyworld.world.switch_scene`); from block s on it
moves from where it was at the end of block s - 1. So the new prompt changes the video visibly
from the switch block on, and no model can follow it without reading the prompt (the frames
before it show the old colour). The truth of a switched stream is the world's
(`render_stream`); adherence (`evaluate.switch_metrics`): blocks until every frame of a block
shows every sprite in its new colour within a pixel of the new prompt's corners, the position
error over the switched segment, and the fraction of its frames in the new colour.

    python -m bcjax.toyworld.switching [--model NAME | --checkpoint DIR] [--prompts 8] [--blocks 8]
        [--switch-at 3]
"""

from __future__ import annotations

import argparse
import json

import jax
import numpy as np

from bcjax.names import DEFAULT_TOY_MODEL, POLICIES, TOY_MODELS, Policy
from bcjax.toyworld.evaluate import ToyModel, eval_scenes, generate_stream, load_model, switch_metrics
from bcjax.toyworld.world import Scene, WorldConfig, switch_scene


def switched(scene: Scene, at_block: int, world: WorldConfig, seed: int = 0) -> Scene:
    """The scene in force from block `at_block` (`switch_scene` with default_rng([seed, at_block]))."""
    return switch_scene(np.random.default_rng([seed, at_block]), scene, at_block, world)


def adherence(model: ToyModel, scenes: list[Scene], num_blocks: int, at_block: int, seed: int = 0,
              stagger: str = "sequential", policy: Policy = "no-recache", mask: str = "bidirectional") -> dict:
    """One switch at `at_block` for every scene: blocks to adherence, error after the switch and
    new-colour fraction, per scene, under a stagger (and a cascade's mask) and recache policy."""
    world = model.world
    streams = [[(0, s), (at_block, switched(s, at_block, world, i))] for i, s in enumerate(scenes)]
    lat = generate_stream(model, streams, num_blocks, jax.random.key(seed), stagger,
                          None if stagger == "sequential" else mask, policy)
    m = switch_metrics(lat, streams, world)
    return {"adherence": m["adherence"][:, 0].tolist(), "switch_err": m["switch_err"][:, 0].tolist(),
            "switch_colour": m["switch_colour"][:, 0].tolist(), "switch_block": at_block, "runner": stagger,
            "policy": policy, "latents": lat, "streams": streams}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_TOY_MODEL, choices=TOY_MODELS)
    p.add_argument("--checkpoint", help="another toy-world checkpoint (instead of --model)")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--blocks", type=int, default=8, help="generated blocks after the given image (block 0)")
    p.add_argument("--switch-at", type=int, default=3, help="block id where the new prompt starts")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model = load_model(a.checkpoint or a.model)
    scenes = eval_scenes(model.world, a.prompts)
    out = {}
    for stagger in ("sequential", "P4"):
        for policy in POLICIES:
            r = adherence(model, scenes, a.blocks, a.switch_at, a.seed, stagger, policy)
            out[f"{stagger}/{policy}"] = {k: v for k, v in r.items() if k not in ("latents", "streams")}
            print(f"{stagger:<10s} {policy:<14s} blocks to follow {np.mean(r['adherence']):.2f}  "
                  f"err after the switch {np.mean(r['switch_err']):.2f} px  "
                  f"new colour {np.mean(r['switch_colour']):.2f}")
    print(json.dumps({k: float(np.mean(v["adherence"])) for k, v in out.items()}))
    return out


if __name__ == "__main__":
    main()
