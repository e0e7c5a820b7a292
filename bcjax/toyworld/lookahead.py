"""What reading newer frames does to a model, apart from the cascade.

In a P4 tick the block at stage s shares the forward with the newer blocks at stages < s (noisier):
the bidirectional mask shows them to it, the causal mask hides them. This measures the
model alone, teacher-forced on the world's truth, so nothing a cascade generated enters: for a
steady-state tick at video block j (in flight: j at the clean stage, j + 1 .. j + 4 at stages
3 .. 0), every in-flight block is the truth noised to its stage's sigma (fresh noise per seed),
the cache is the truth's clean blocks inside the window (the sink and the rolling blocks before
j, written block-causally as their clean passes wrote them), and each in-flight block's x0
error is measured with the newer blocks hidden (the causal rows) and visible (the bidirectional
rows), on the same inputs. If visible is worse, the model cannot read the future; if it is not,
what the cascade loses under the bidirectional mask comes from the tick itself (the context
it generates), not from reading newer frames.

    python -m bcjax.toyworld.lookahead [--model lineage-3f --model causal-1f] [--prompts 16 --seeds 3]
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.flags import OldName
from bcjax.model.wan import forward, text_kv
from bcjax.schedule.stagger import make_stagger
from bcjax.toyworld.evaluate import ToyModel, eval_scenes, load_model
from bcjax.toyworld.study import mean_ci
from bcjax.toyworld.world import prompt_embedding, render


def tick_layout(model: ToyModel, j: int, stagger: str = "P4"):
    """(video blocks [N] of [cache | in flight oldest first], is_cache bool [N], stages [N] (-1 for
    the cache), rolling blocks, sink blocks) of the steady-state tick whose oldest in-flight block
    is video block j."""
    pcfg = model.pcfg
    bf = pcfg.block_frames
    rolling, sink = (pcfg.cache_frames - pcfg.sink_frames) // bf, pcfg.sink_frames // bf
    m = make_stagger(stagger, pcfg.num_steps).in_flight
    cache = sorted(set(range(sink)) | set(range(max(j - rolling, 0), j)))
    flight = list(range(j, j + m))
    stages = [-1] * len(cache) + [pcfg.num_steps - i for i in range(m)]  # oldest: the clean stage (n)
    return (np.asarray(cache + flight), np.asarray([True] * len(cache) + [False] * m), np.asarray(stages),
            rolling, sink)


def block_mask(video, is_cache, rolling: int, sink: int, newer_visible: bool) -> np.ndarray:
    """bool [N, N] block-level key mask: a block sees itself, the sink blocks and the blocks of the
    `rolling` before it (the model's window: cache blocks as their clean passes saw them, older
    in-flight blocks as the tick shows them); an in-flight block also sees the newer in-flight
    blocks when newer_visible (the bidirectional tick's rows, `bcjax.cascade.masks`)."""
    q, k = video[:, None], video[None, :]
    m = (k == q) | ((k < q) & ((k >= q - rolling) | (k < sink)))
    if newer_visible:
        m |= (~is_cache[:, None]) & (~is_cache[None, :]) & (k > q)
    return m


def x0_errors(model: ToyModel, scenes, seed: int, j: int, stagger: str = "P4") -> dict:
    """{"stage": [n stages], "sigma": [...], "hidden": [B, n], "visible": [B, n]}: x0 MSE of the
    in-flight blocks at the denoising stages 0..n-1, newer blocks hidden vs visible."""
    world, cfg, pcfg = model.world, model.cfg, model.pcfg
    bf = pcfg.block_frames
    video, is_cache, stages, rolling, sink = tick_layout(model, j, stagger)
    n_frames = (int(video.max()) + 1) * bf
    truth = np.stack([render(s, n_frames, world) for s in scenes])  # [B, F, H, W, C]
    x0 = np.concatenate([truth[:, v * bf:(v + 1) * bf] for v in video], axis=1)
    sig_table = np.asarray([*pcfg.sigmas, 0.0], np.float32)
    t_table = np.asarray([*pcfg.timesteps, pcfg.context_noise], np.float32)
    sigma = np.where(stages < 0, 0.0, sig_table[np.clip(stages, 0, None)])
    t = np.where(stages < 0, pcfg.context_noise, t_table[np.clip(stages, 0, None)])
    eps = np.asarray(jax.random.normal(jax.random.key(seed), x0.shape, jnp.float32))
    s_f = np.repeat(sigma, bf)[None, :, None, None, None]
    x_t = (1 - s_f) * x0 + s_f * eps
    tt = np.broadcast_to(np.repeat(t, bf)[None], (len(scenes), len(video) * bf))
    frame_ids = (video[:, None] * bf + np.arange(bf)[None]).reshape(-1)
    text = text_kv(cfg, model.params, jnp.asarray(np.stack([prompt_embedding(s, world) for s in scenes])))
    tpb = bf * cfg.tokens_per_frame(world.size, world.size)
    out: dict = {}
    for label, visible in (("hidden", False), ("visible", True)):
        mask = np.repeat(block_mask(video, is_cache, rolling, sink, visible), tpb, axis=1)[None]
        flow, _ = forward(cfg, model.params, jnp.asarray(x_t), jnp.asarray(tt), text, jnp.asarray(frame_ids), None,
                          jnp.asarray(mask))
        pred = x_t - s_f * np.asarray(flow)
        err = ((pred - x0) ** 2).reshape(len(scenes), len(video), -1).mean(-1)  # [B, N]
        out[label] = np.stack([err[:, np.nonzero(stages == s)[0][0]] for s in range(pcfg.num_steps)], axis=1)
    out["stage"] = list(range(pcfg.num_steps))
    out["sigma"] = [float(v) for v in pcfg.sigmas]
    return out


def run(models: dict[str, str], prompts: int = 16, seeds: int = 3, stagger: str = "P4") -> tuple[dict, str]:
    """Every model's table: per denoising stage, x0 MSE with newer blocks hidden and visible (mean
    +- 95% CI over prompts x seeds) and the paired difference (visible - hidden)."""
    results, lines = {}, []
    for name, path in models.items():
        model = load_model(path)
        rolling = (model.pcfg.cache_frames - model.pcfg.sink_frames) // model.pcfg.block_frames
        sink = model.pcfg.sink_frames // model.pcfg.block_frames
        j = sink + rolling + 2  # the window full and rolled (past the image)
        scenes = eval_scenes(model.world, prompts)
        runs = [x0_errors(model, scenes, seed, j, stagger) for seed in range(seeds)]
        hidden = np.concatenate([r["hidden"] for r in runs])
        visible = np.concatenate([r["visible"] for r in runs])
        rows = []
        for s in range(hidden.shape[1]):
            h, v, d = mean_ci(hidden[:, s]), mean_ci(visible[:, s]), mean_ci(visible[:, s] - hidden[:, s])
            rows.append({"stage": s, "sigma": runs[0]["sigma"][s], "hidden": h, "visible": v, "diff": d,
                         "newer_blocks": s})
        results[name] = {"tick_block": j, "rows": rows}
        lines += [f"{name} (steady {stagger} tick at video block {j}; {hidden.shape[0]} samples):", "",
                  "| stage | sigma | newer blocks | x0 MSE, newer hidden | x0 MSE, newer visible | visible - hidden |",
                  "|---|---|---|---|---|---|"]
        for r in rows:
            sig = "*" if abs(r["diff"][0]) > r["diff"][1] else ""
            lines.append(f"| {r['stage']} | {r['sigma']:.4f} | {r['newer_blocks']} | {r['hidden'][0]:.4f} +- "
                         f"{r['hidden'][1]:.4f} | {r['visible'][0]:.4f} +- {r['visible'][1]:.4f} | "
                         f"{r['diff'][0]:+.4f} +- {r['diff'][1]:.4f}{sig} |")
        lines.append("")
    return results, "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="NAME or NAME=CHECKPOINT (repeat; default both "
                                                                  "embedded models)")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--stagger", "--schedule", dest="stagger", default="P4", action=OldName, new="--stagger",
                   help="the cascade's stagger (--schedule: its deprecated name)")
    p.add_argument("--out", help="write the table (markdown) and the numbers (json next to it)")
    a = p.parse_args(argv)
    from bcjax.names import TOY_MODELS

    specs = a.model or list(TOY_MODELS)
    models = dict(s.partition("=")[::2] if "=" in s else (s, s) for s in specs)
    results, text = run(models, a.prompts, a.seeds, a.stagger)
    print(text)
    if a.out:
        with open(a.out, "w") as f:
            f.write(text + "\n")
        with open(a.out.rsplit(".", 1)[0] + ".json", "w") as f:
            json.dump(results, f, indent=2)
    return results


if __name__ == "__main__":
    main()
