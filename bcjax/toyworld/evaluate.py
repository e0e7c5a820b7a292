"""The quality harness: a trained toy-world DiT under every stagger, scored against ground truth.

Image-to-video: the world's first block (the still image) is given, written to the cache by the
clean pass; the model generates the next blocks from the prompt. Every generated block has an
exact ground-truth render, so for N fixed-seed prompts x {sequential, P1, P2, P4} x {causal,
bidirectional mask} (sequential has no in-flight neighbours: one row) this reports per block:

- mse / psnr against the ground truth (psnr peak-to-peak 2 * amplitude);
- pos_err: mean pixel distance between the sprites' read-back and true corners;
- jump: temporal consistency across block boundaries, |read-back step - true step| between a
  block's first frame and the previous block's last frame (flicker / teleporting at the seams
  where cascading changes what a block saw);
- div_seq: MSE against the sequential output for the same prompt and seed (what the stagger
  changed), 0 for sequential itself;
- colour: fraction of frames in which every sprite shows in its own colour (`colour_correct`:
  found, and at least half of its box in its colour);
- crisp: fraction of frames that are a clean render of the world at the read-back corners
  (`crisp_frames`: no pixel off by half the amplitude -- no smear, blotch or ghost).

Baselines: "still" (the given image held: no motion learned), "init" (the same network at its
initialisation). Outputs: `table.md`, `metrics.csv`, `mse_per_block.png`, `pos_err_per_block.png`, `frames.png`.

    bcjax eval toyworld [--checkpoint DIR] [--num-prompts 8] [--blocks 8] [--out eval/]
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.model.config import WanConfig
from bcjax.model.quant import quantize
from bcjax.model.wan import init_params, text_kv
from bcjax.names import (
    DEFAULT_TOY_MODEL,
    GRID_MASKS,
    GRID_STAGGERS,
    MASKS,
    SEQUENTIAL,
    STAGGERS,
    TOY_MODELS,
    Policy,
    as_mask,
)
from bcjax.schedule.config import PipelineConfig
from bcjax.toyworld.world import (
    Scene,
    Segments,
    WorldConfig,
    colour_correct,
    crisp_frames,
    prompt_embedding,
    read_positions,
    render,
    render_stream,
    sample_scene,
    scene_of_frames,
    switch_positions,
    switch_scene,
)

EVAL_SEED = 12345  # prompts are drawn from default_rng([EVAL_SEED, i]); training uses [seed, step]
FIELDS = ("mse", "psnr", "pos_err", "jump", "div_seq", "colour", "crisp")
_HERE = os.path.dirname(__file__)
SHIPPED = os.path.join(_HERE, "checkpoint")
LINEAGE = os.path.join(_HERE, "lineage-3f")
# the embedded checkpoints by name: the block-causal models (`bcjax.names.TOY_MODELS`) and
# lineage-3f's teacher, the bidirectional many-step base (`bcjax.toyworld.lineage`, `--init`)
EMBEDDED = {"causal-1f": SHIPPED, "lineage-3f": LINEAGE, "lineage-base": os.path.join(_HERE, "lineage-base")}


@dataclasses.dataclass
class ToyModel:
    world: WorldConfig
    cfg: WanConfig
    pcfg: PipelineConfig
    params: dict
    provenance: dict
    path: str = ""


def model_path(name_or_path: str | None = None) -> str:
    """The folder of an embedded model's name (`TOY_MODELS`; None: the default one) or of a path."""
    name_or_path = name_or_path or DEFAULT_TOY_MODEL
    if name_or_path in EMBEDDED:
        return EMBEDDED[name_or_path]
    if not os.path.exists(name_or_path) and os.sep not in name_or_path and "." not in name_or_path:
        raise ValueError(f"toy model {name_or_path!r}: not one of the embedded {', '.join(TOY_MODELS)} "
                         "and no such folder")
    return name_or_path


def checkpoint_folder(name_or_path: str | None = None) -> str:
    """The absolute checkpoint folder of an embedded model's name or of a path: a training run's
    folder (`python -m bcjax.toyworld.train --out RUN`) holds its checkpoint in RUN/model."""
    path = os.path.abspath(os.path.expanduser(model_path(name_or_path)))  # orbax reads absolute paths only
    if os.path.isdir(os.path.join(path, "model")) and not os.path.isfile(os.path.join(path, "config.json")):
        path = os.path.join(path, "model")
    return path


def load_model(path: str | None = None, *, dtype: str | None = None, attention: str | None = None,
               quant: str | None = None, pipeline: PipelineConfig | None = None) -> ToyModel:
    """A toy-world DiT from an embedded model's name (`bcjax.names.TOY_MODELS`, default
    `DEFAULT_TOY_MODEL`), a bcjax checkpoint folder or a training run's folder; dtype, attention
    and quant: this run's numerics (default: the weights' dtype, "auto", as stored), see
    `bcjax.checkpoint.restore`. pipeline: a sampler config the caller means to run; refused
    (naming both values) when its block_frames, window_frames or sink_frames are not the model's."""
    from bcjax.checkpoint import config_from_dict, read_config, restore

    path = checkpoint_folder(path)
    prov = read_config(path)["provenance"]
    if "world" not in prov:
        raise ValueError(f"{path} is not a toy-world checkpoint: its provenance has no 'world' config")
    cfg, params = restore(path, "dit", dtype=dtype, attention=attention, quant=quant)
    world = config_from_dict(WorldConfig, prov["world"])
    if "pipeline" in prov:
        pcfg = config_from_dict(PipelineConfig, prov["pipeline"])
    else:  # early runs recorded only the training config; the window follows from it
        pcfg = PipelineConfig(window_frames=(prov["train"]["context_blocks"] + 1) * world.block_frames)
    if pcfg.block_frames != world.block_frames:
        raise ValueError(f"{path}: its sampler's block_frames {pcfg.block_frames} is not its world's "
                         f"block_frames {world.block_frames}")
    if pipeline is not None:
        check_pipeline(path, pcfg, pipeline)
    return ToyModel(world, cfg, pcfg, params, prov, path)


def check_pipeline(path: str, model: PipelineConfig, given: PipelineConfig) -> None:
    """One error naming both values when a given sampler config's block, window or sink is not
    the one the checkpoint was trained for."""
    for field in ("block_frames", "window_frames", "sink_frames"):
        if getattr(model, field) != getattr(given, field):
            raise ValueError(f"{path} was trained with {field}={getattr(model, field)}; the pipeline config "
                             f"given has {field}={getattr(given, field)}")


def trained_blocks(model: ToyModel) -> int:
    """The model's trained length in blocks, the image included: a lineage student's clip (the
    base's), else the latest block the trainer drew a target from, plus the image."""
    from bcjax.toyworld.train import LINEAGE

    train = model.provenance.get("train", {})
    if any(s.get("stage") in LINEAGE for s in model.provenance.get("stages", [])):
        return int(train.get("clip_blocks", 5))
    return int(train.get("max_block", 12)) + 1


def eval_scenes(world: WorldConfig, n: int) -> list[Scene]:
    return [sample_scene(np.random.default_rng([EVAL_SEED, i]), world) for i in range(n)]


def settings(staggers=GRID_STAGGERS, masks=GRID_MASKS) -> list[tuple[str, str | None]]:
    """(stagger, mask) pairs; sequential has no mask (one block in flight). By default the paper's
    grid; the variants (`bcjax.names`: P4-no-clean, the restricted bidirectional masks) by name."""
    return [(s, None) if s == SEQUENTIAL else (s, m)
            for s in staggers for m in ((None,) if s == SEQUENTIAL else masks)]


def setting_name(stagger: str, mask: str | None) -> str:
    """A run's label, e.g. "sequential", "P4-bidirectional" (the study's and the demo's keys)."""
    return stagger if mask is None else f"{stagger}-{mask}"


def generate(model: ToyModel, scenes: list[Scene], num_blocks: int, key, stagger: str = SEQUENTIAL,
             mask: str | None = None, params=None, mesh=None) -> np.ndarray:
    """[B, (1 + num_blocks) * bf, H, W, C]: the given still first block, then num_blocks generated
    by the public runner API (`bcjax.runners.make_runner`, `context=` the first block)."""
    world, cfg, pcfg = model.world, model.cfg, model.pcfg
    params = model.params if params is None else params
    bf, hw = pcfg.block_frames, (world.size, world.size)
    first = jnp.asarray(np.stack([render(s, bf, world) for s in scenes]))
    text = text_kv(cfg, params, jnp.asarray(np.stack([prompt_embedding(s, world) for s in scenes])))
    runner = _runner(cfg, pcfg, hw, stagger, mask or "bidirectional", mesh)
    out = runner.generate(params, text, key, num_blocks=num_blocks, context=first)
    return np.concatenate([np.asarray(first), np.asarray(out)], axis=1)


def as_segments(item) -> list:
    """A scene, or a switched stream's segments [(first block, scene)], as segments."""
    return list(item) if isinstance(item, list) else [(0, item)]


def frame_readout(frames, segments: Segments, world: WorldConfig):
    """Per frame of a (switched) stream's latents [F, H, W, C], each segment read with its own
    scene's colours: (read-back corners [F, S, 2], true corners [F, S, 2], valid [F, S] where the
    readout recovers the truth from the truth's own render, colour right [F, S], crisp [F])."""
    frames = np.asarray(frames)
    f = len(frames)
    true = switch_positions(segments, f, world).astype(np.float64)
    truth = render_stream(segments, f, world)
    s = true.shape[1]
    read, valid = np.full((f, s, 2), np.nan), np.zeros((f, s), bool)
    colour, crisp = np.zeros((f, s), bool), np.zeros(f, bool)
    for a, b, scene in scene_of_frames(segments, f, world):
        read[a:b] = read_positions(frames[a:b], scene, world)
        valid[a:b] = np.all(read_positions(truth[a:b], scene, world) == true[a:b], axis=-1)
        colour[a:b] = colour_correct(frames[a:b], scene, world)
        crisp[a:b] = crisp_frames(frames[a:b], scene, world)
    return read, true, valid, colour, crisp


@functools.lru_cache(maxsize=32)
def _runner(cfg: WanConfig, pcfg: PipelineConfig, hw: tuple[int, int], stagger: str, mask: str, mesh):
    """One runner per setting for the whole process: a study's seeds and models of one shape reuse
    its compiled programs."""
    from bcjax.runners import make_runner

    return make_runner(cfg, pcfg, hw, stagger, as_mask(mask), mesh)


def block_metrics(latents, scenes, world: WorldConfig, reference=None) -> dict[str, np.ndarray]:
    """{field: [B, blocks]} over the generated blocks (the given first block excluded). scenes: a
    Scene per sample, or a switched stream's segments [(first block, scene)] (`render_stream`)."""
    latents = np.asarray(latents)
    bf = world.block_frames
    f = latents.shape[1]
    nb = f // bf - 1
    out = {k: np.zeros((len(scenes), nb)) for k in FIELDS}
    for i, item in enumerate(scenes):
        segments = as_segments(item)
        truth = render_stream(segments, f, world)
        gen = latents[i, bf:]
        out["mse"][i] = ((gen - truth[bf:]) ** 2).reshape(nb, -1).mean(1)
        read, true, valid_f, colour, crisp = frame_readout(latents[i], segments, world)
        err = np.linalg.norm(read - true, axis=-1)
        err = np.where(np.isnan(err), float(world.size), err)
        err, valid = err[bf:].reshape(nb, bf, -1), valid_f[bf:].reshape(nb, bf, -1)
        out["pos_err"][i] = (err * valid).sum((1, 2)) / np.maximum(valid.sum((1, 2)), 1)
        ok = colour[bf:].reshape(nb, bf, -1) | ~valid  # covered: not judged
        out["colour"][i] = ok.all(-1).mean(-1)
        out["crisp"][i] = crisp[bf:].reshape(nb, bf).mean(-1)
        # seams: the step from each block's predecessor's last frame into its first frame
        seam = np.arange(bf, f, bf)
        true_read = np.where(valid_f[..., None], true, np.nan)  # the truth's own readout
        d_read, d_true = read[seam] - read[seam - 1], true_read[seam] - true_read[seam - 1]
        jump = np.linalg.norm(d_read - d_true, axis=-1)  # [nb, S]
        ok_seam = np.isfinite(d_true).all(-1)
        jump = np.where(np.isfinite(jump), jump, float(world.size))  # lost in the generated frames
        out["jump"][i] = (jump * ok_seam).sum(1) / np.maximum(ok_seam.sum(1), 1)
        if reference is not None:
            out["div_seq"][i] = ((gen - np.asarray(reference)[i, bf:]) ** 2).reshape(nb, -1).mean(1)
    out["psnr"] = 10 * np.log10((2 * world.amplitude) ** 2 / np.maximum(out["mse"], 1e-12))
    return out


# within this distance of the new prompt's corners, in its colours, a block follows a switch
FOLLOW_PX = 1.0


def switch_metrics(latents, streams: list, world: WorldConfig) -> dict[str, np.ndarray]:
    """Switch adherence of switched streams: {field: [B, switches]}. For the switch at block s (the
    segment s..e-1 up to the next switch or the end): `adherence` blocks from s to the first block
    whose every frame shows every sprite in its new colour within FOLLOW_PX of the new prompt's
    corners (e - s if none: censored), `switch_err` the mean position error over the segment's
    blocks, `switch_colour` the fraction of its frames with the new colours right."""
    latents = np.asarray(latents)
    bf = world.block_frames
    f = latents.shape[1]
    n = max(len(as_segments(x)) - 1 for x in streams)
    out = {k: np.zeros((len(streams), n)) for k in ("adherence", "switch_err", "switch_colour")}
    for i, item in enumerate(streams):
        segments = as_segments(item)
        read, true, _, colour, _ = frame_readout(latents[i], segments, world)
        err = np.linalg.norm(read - true, axis=-1)
        err = np.where(np.isnan(err), float(world.size), err)  # [F, S]
        follows = ((err <= FOLLOW_PX) & colour).all(-1).reshape(-1, bf).all(-1)  # [blocks]
        per_block_err = err.reshape(-1, bf * err.shape[1]).mean(-1)
        per_block_colour = colour.all(-1).reshape(-1, bf).mean(-1)
        for k in range(1, len(segments)):
            s0 = segments[k][0]
            e0 = segments[k + 1][0] if k + 1 < len(segments) else f // bf
            hit = np.nonzero(follows[s0:e0])[0]
            out["adherence"][i, k - 1] = hit[0] if hit.size else e0 - s0
            out["switch_err"][i, k - 1] = per_block_err[s0:e0].mean()
            out["switch_colour"][i, k - 1] = per_block_colour[s0:e0].mean()
    return out


def eval_streams(world: WorldConfig, n: int, every: int, num_blocks: int) -> list[list]:
    """The interactive setting's streams: the evaluation scenes (`eval_scenes`), each switched every
    `every` blocks (`switch_scene`: a new colour and a direction the old prompt would not take),
    drawn from default_rng([EVAL_SEED, i, 1])."""
    out = []
    for i, scene in enumerate(eval_scenes(world, n)):
        rng = np.random.default_rng([EVAL_SEED, i, 1])
        segments = [(0, scene)]
        for at in range(every, num_blocks, every):
            segments.append((at, switch_scene(rng, segments[-1][1], at, world, segments)))
        out.append(segments)
    return out


def generate_stream(model: ToyModel, streams: list[list], num_blocks: int, key, stagger: str = SEQUENTIAL,
                    mask: str | None = None, policy: Policy = "no-recache", mesh=None) -> np.ndarray:
    """`generate` for switched streams (all switching at the same blocks): the prompt schedule
    through `bcjax.app.interactive.stream` under `policy`."""
    from bcjax.app.interactive import stream

    world, cfg, pcfg = model.world, model.cfg, model.pcfg
    bf, hw = pcfg.block_frames, (world.size, world.size)
    starts = [b for b, _ in streams[0]]
    if any([b for b, _ in st] != starts for st in streams):
        raise ValueError("every stream of a batch must switch at the same blocks")
    first = jnp.asarray(np.stack([render(st[0][1], bf, world) for st in streams]))
    prompt_schedule_kv = [(b, text_kv(cfg, model.params, jnp.asarray(np.stack([prompt_embedding(st[k][1], world)
                                                                               for st in streams]))))
                          for k, b in enumerate(starts)]
    runner = _runner(cfg, pcfg, hw, stagger, mask or "bidirectional", mesh)
    events = list(stream(runner, model.params, prompt_schedule_kv, key, num_blocks, policy=policy, context=first))
    return np.concatenate([np.asarray(first)] + [e.x0 for e in events], axis=1)


def still_baseline(scenes: list[Scene], world: WorldConfig, num_blocks: int) -> np.ndarray:
    """The given image held for the whole video."""
    bf = world.block_frames
    first = np.stack([render(s, bf, world) for s in scenes])
    return np.concatenate([first, np.repeat(first[:, -1:], num_blocks * bf, axis=1)], axis=1)


def run_grid(model: ToyModel, scenes: list[Scene], num_blocks: int, seed: int = 0, grid=None,
             baselines: bool = True, mesh=None, progress=print) -> tuple[dict, dict, dict]:
    """(metrics {setting: {field: [B, blocks]}}, latents {setting: [B, F, H, W, C]}, seconds
    {setting: wall time incl. compile}) for every setting of the grid, plus the baselines."""
    key = jax.random.key(seed)
    lat, secs = {}, {}
    for stagger, mask in grid or settings():
        name = setting_name(stagger, mask)
        t0 = time.perf_counter()
        lat[name] = generate(model, scenes, num_blocks, key, stagger, mask, mesh=mesh)
        secs[name] = time.perf_counter() - t0
        if progress:
            progress(f"  {name:<20s} {secs[name]:6.1f} s")
    ref = lat.get("sequential")
    metrics = {name: block_metrics(x, scenes, model.world, ref) for name, x in lat.items()}
    if baselines:
        lat["still"] = still_baseline(scenes, model.world, num_blocks)
        init = init_params(model.cfg, jax.random.key(int(model.provenance.get("train", {}).get("seed", 0))))
        init = quantize(init, model.cfg.quant)  # the untrained baseline under the model's own numerics
        lat["init"] = generate(model, scenes, num_blocks, key, params=init)
        for name in ("still", "init"):
            metrics[name] = block_metrics(lat[name], scenes, model.world, ref)
    return metrics, lat, secs


def summary(metrics: dict, world: WorldConfig) -> dict[str, dict[str, float]]:
    """{setting: {field: mean over prompts and blocks}}; psnr of the mean MSE (a block that is exact
    by chance, e.g. the still baseline when every sprite is back at its start, would make the
    mean of per-block PSNRs meaningless)."""
    out = {name: {k: float(np.mean(m[k])) for k in FIELDS} for name, m in metrics.items()}
    for name in metrics:
        out[name]["psnr"] = float(10 * np.log10((2 * world.amplitude) ** 2 / max(out[name]["mse"], 1e-12)))
    return out


def table_md(metrics: dict, world: WorldConfig) -> str:
    """Markdown: the means per setting, relative MSE vs sequential, then per-block MSE."""
    s = summary(metrics, world)
    base = s.get("sequential", {}).get("mse")
    lines = ["| setting | MSE | vs sequential | PSNR dB | position err px | seam jump px | MSE to sequential | "
             "colour right % | crisp frames % |", "|---|---|---|---|---|---|---|---|---|"]
    for name, v in s.items():
        rel = f"{100 * (v['mse'] / base - 1):+.1f}%" if base else "-"
        lines.append(f"| {name} | {v['mse']:.4f} | {rel} | {v['psnr']:.2f} | {v['pos_err']:.2f} | {v['jump']:.2f} | "
                     f"{v['div_seq']:.4f} | {100 * v['colour']:.1f} | {100 * v['crisp']:.1f} |")
    nb = next(iter(metrics.values()))["mse"].shape[1]
    lines += ["", "MSE per generated block (mean over prompts):", "",
              "| setting | " + " | ".join(f"b{b + 1}" for b in range(nb)) + " |", "|---" * (nb + 1) + "|"]
    for name, m in metrics.items():
        lines.append(f"| {name} | " + " | ".join(f"{v:.3f}" for v in m["mse"].mean(0)) + " |")
    return "\n".join(lines)


def write_outputs(out: str, metrics: dict, lat: dict, scenes: list[Scene], world: WorldConfig, extra: dict) -> None:
    from bcjax.toyworld.png import image_grid, line_plot, write_png
    from bcjax.toyworld.world import prompt_text, to_rgb

    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(table_md(metrics, world) + "\n")
    with open(os.path.join(out, "metrics.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["setting", "prompt", "block", *FIELDS])
        for name, m in metrics.items():
            for i in range(m["mse"].shape[0]):
                for b in range(m["mse"].shape[1]):
                    w.writerow([name, i, b + 1, *(f"{m[k][i, b]:.6g}" for k in FIELDS)])
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({**extra, "prompts": [prompt_text(s) for s in scenes], "summary": summary(metrics, world)}, f,
                  indent=2)
    series = {n: m["mse"].mean(0) for n, m in metrics.items() if n != "init"}
    palette = ((0, 0, 0), (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
               (152, 223, 138), (150, 150, 150))
    write_png(os.path.join(out, "mse_per_block.png"), line_plot(series, log_y=False, colours=palette, legend=True))
    series = {n: m["pos_err"].mean(0) for n, m in metrics.items() if n != "init"}
    write_png(os.path.join(out, "pos_err_per_block.png"), line_plot(series, log_y=False, colours=palette, legend=True))
    f = next(iter(lat.values())).shape[1]
    rows = []
    for i, scene in enumerate(scenes[:4]):
        rows.append(to_rgb(render(scene, f, world), world))
        rows += [to_rgb(x[i], world) for n, x in lat.items() if n not in ("init",)]
    write_png(os.path.join(out, "frames.png"), image_grid(rows, scale=3))


def publish(src: str, dst: str, record: dict) -> None:
    """Copy checkpoint folder src to dst with `record` as its metrics.json, atomically (a copy
    beside dst renamed over it: an interrupted ship leaves the old checkpoint whole)."""
    import shutil

    tmp = dst.rstrip("/") + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(src, tmp)
    with open(os.path.join(tmp, "metrics.json"), "w") as f:
        json.dump(record, f, indent=2)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def rerun_recorded(model: ToyModel, recorded: dict) -> tuple[dict, dict]:
    """(per-block metrics, summary) of a shipped model re-evaluated exactly as its metrics.json
    records (grid, prompts, blocks, seed): what the shipped-checkpoint tests compare."""
    grid = [tuple(g) for g in recorded["grid"]]
    scenes = eval_scenes(model.world, recorded["prompts"])
    metrics, _, _ = run_grid(model, scenes, recorded["blocks"], recorded["seed"], grid, baselines=False,
                             progress=None)
    return metrics, summary(metrics, model.world)


def main(argv=None) -> dict:
    import argparse

    from bcjax.flags import OldName, positive

    p = argparse.ArgumentParser(prog="bcjax eval toyworld", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=DEFAULT_TOY_MODEL, choices=TOY_MODELS, help="the embedded toy-world model")
    p.add_argument("--checkpoint", help="another toy-world checkpoint or training run folder (instead of --model)")
    p.add_argument("--num-prompts", "--prompts", dest="prompts", type=positive, default=8, metavar="N", action=OldName,
                   new="--num-prompts", why="--prompts is `bcjax stream`'s prompt schedule",
                   help="how many fixed-seed evaluation prompts (--prompts: its deprecated name)")
    p.add_argument("--blocks", type=positive, default=8, help="blocks generated after the given first block")
    p.add_argument("--seed", type=int, default=0, help="sampler noise seed")
    p.add_argument("--staggers", "--schedules", dest="staggers", default=",".join(GRID_STAGGERS), action=OldName,
                   new="--staggers", help=f"comma list of {','.join(STAGGERS)} (--schedules: its deprecated name)")
    p.add_argument("--masks", "--windows", dest="masks", default=",".join(GRID_MASKS), action=OldName,
                   new="--masks", help=f"comma list of {','.join(MASKS)}: what a cascade's in-flight blocks see of "
                   "each other (--windows: its deprecated name)")
    p.add_argument("--out", default="eval-toyworld", help="folder for table.md, metrics.csv, PNGs")
    a = p.parse_args(argv)
    staggers = [s for s in a.staggers.split(",") if s]
    for s in staggers:
        if s not in STAGGERS:
            raise SystemExit(f"--staggers: unknown stagger {s!r}; expected some of {STAGGERS}")
    masks = [m for m in a.masks.split(",") if m]
    for m in masks:
        if m not in MASKS:
            raise SystemExit(f"--masks: unknown mask {m!r}; expected some of {MASKS}")
    model = load_model(a.checkpoint or a.model)
    scenes = eval_scenes(model.world, a.prompts)
    print(f"toy world: {a.prompts} prompts x {a.blocks} blocks after the given image, seed {a.seed}")
    metrics, lat, secs = run_grid(model, scenes, a.blocks, a.seed, settings(staggers, masks))
    write_outputs(a.out, metrics, lat, scenes, model.world,
                  {"blocks": a.blocks, "seed": a.seed, "seconds": secs, "checkpoint": a.checkpoint or a.model})
    print(table_md(metrics, model.world))
    print(f"wrote {a.out}/table.md, metrics.csv, summary.json, mse_per_block.png, pos_err_per_block.png, frames.png")
    return summary(metrics, model.world)


if __name__ == "__main__":
    main()
