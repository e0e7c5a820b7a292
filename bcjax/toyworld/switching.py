"""Prompt switches in the toy world: ground truth after a switch, and how fast a stream adheres.

A switch at block s gives every sprite a new direction and speed (same colours, same drawing
order): from block s on it moves from where it was at the end of block s - 1 under the new
prompt. So after a switch there are two references: the new prompt's continuation (what a
stream should show) and the old prompt's (what it shows if it ignores the switch). Adherence
per block = position error against each; blocks-to-adherence = the first block after the switch
whose frames are closer to the new continuation than to the old one.

    python -m bcjax.toyworld.switching [--checkpoint DIR] [--prompts 8] [--blocks 8] [--switch-at 3]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.pipeline.recache import POLICIES
from bcjax.toyworld.evaluate import ToyModel, eval_scenes, load_model
from bcjax.toyworld.world import (
    DIRECTIONS,
    Scene,
    Sprite,
    WorldConfig,
    positions,
    prompt_embedding,
    read_positions,
    render,
)

FLIP = dict(zip(DIRECTIONS, list(DIRECTIONS)[4:] + list(DIRECTIONS)[:4], strict=True))  # the opposite direction


def switched(scene: Scene, at_block: int, world: WorldConfig, new_moves=None) -> Scene:
    """The scene in force from block `at_block`: sprites start where they were at the end of block
    at_block - 1 and move per new_moves [(direction, speed)] (default: turn round, same speed)."""
    last = positions(scene, 1, world, start_frame=at_block * world.block_frames - 1)[0]
    moves = new_moves or [(FLIP[s.direction], s.speed) for s in scene]
    return tuple(Sprite(s.colour, d, v, int(r), int(c)) for s, (d, v), (r, c) in zip(scene, moves, last, strict=True))


def render_switched(scene: Scene, new: Scene, at_block: int, num_frames: int, world: WorldConfig) -> np.ndarray:
    """[F, H, W, 3]: the old scene up to the switch, then the new one, stepping from the switch block."""
    cut = at_block * world.block_frames
    after = render(new, num_frames - cut, world, start_frame=world.still_frames)  # world step 1 at the switch block
    return np.concatenate([render(scene, cut, world), after])


def adherence(model: ToyModel, scenes: list[Scene], num_blocks: int, at_block: int, seed: int = 0,
              runner_kind: str = "sequential", policy: str = "no-recache") -> dict:
    """Per generated block after the given image: position error against the new prompt's
    continuation and against the old one ([blocks] means over prompts), and blocks-to-adherence."""
    from bcjax.interactive import stream
    from bcjax.model.wan import encode_text
    from bcjax.runners import make_runner

    world, cfg, pcfg = model.world, model.cfg, model.pcfg
    bf, hw = world.block_frames, (world.size, world.size)
    news = [switched(s, at_block, world) for s in scenes]

    def text(sc):
        return encode_text(cfg, model.params, jnp.asarray(np.stack([prompt_embedding(s, world) for s in sc])))

    runner = make_runner(cfg, pcfg, hw, runner_kind, "bidirectional")
    first = jnp.asarray(np.stack([render(s, bf, world) for s in scenes]))
    events = list(stream(runner, model.params, [(0, text(scenes)), (at_block, text(news))], jax.random.key(seed),
                         num_blocks, policy=policy, context=first))
    lat = np.concatenate([np.asarray(first)] + [e.x0 for e in events], axis=1)
    f = lat.shape[1]
    err_new, err_old = np.zeros((len(scenes), num_blocks)), np.zeros((len(scenes), num_blocks))
    for i, (old, new) in enumerate(zip(scenes, news, strict=True)):
        cut = at_block * bf
        new_pos = np.concatenate([positions(old, cut, world),
                                  positions(new, f - cut, world, start_frame=world.still_frames)])
        for truth_pos, out in ((new_pos, err_new), (positions(old, f, world), err_old)):
            err = _errors(lat[i], truth_pos, old, world)
            out[i] = err.reshape(-1, bf * len(old))[1:].mean(1)
    mean_new, mean_old = err_new.mean(0), err_old.mean(0)
    after = np.arange(1, num_blocks + 1) >= at_block
    closer = np.nonzero(after & (mean_new < mean_old))[0]
    return {"err_new": mean_new.tolist(), "err_old": mean_old.tolist(),
            "blocks_to_adherence": int(closer[0] + 1 - at_block) if closer.size else None,
            "switch_block": at_block, "runner": runner_kind, "policy": policy}


def _errors(frames, truth_pos, scene, world):
    """[F, S] pixel distance of the read-back corners from given true corners (canvas size where unseen)."""
    err = np.linalg.norm(read_positions(frames, scene, world) - truth_pos.astype(np.float64), axis=-1)
    return np.where(np.isnan(err), float(world.size), err)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint")
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--blocks", type=int, default=8, help="generated blocks after the given image (block 0)")
    p.add_argument("--switch-at", type=int, default=3, help="block id where the new prompt starts")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    model = load_model(a.checkpoint)
    scenes = eval_scenes(model.world, a.prompts)
    out = {}
    for kind in ("sequential", "P4"):
        for policy in POLICIES:
            r = adherence(model, scenes, a.blocks, a.switch_at, a.seed, kind, policy)
            out[f"{kind}/{policy}"] = r
            print(f"{kind:<10s} {policy:<11s} blocks to adherence {r['blocks_to_adherence']}  "
                  f"pos err vs new prompt {' '.join(f'{v:5.2f}' for v in r['err_new'])}  "
                  f"vs old {' '.join(f'{v:5.2f}' for v in r['err_old'])}")
    print(json.dumps({k: v["blocks_to_adherence"] for k, v in out.items()}))
    return out


if __name__ == "__main__":
    main()
