"""The quality study: several toy models (training recipes) x every stagger, with confidence intervals.

For each model, each sampler seed and the fixed evaluation prompts, `evaluate.run_grid` scores
{sequential, P1, P2, P4} x {causal, bidirectional} (or the `--setting`s given) against the ground truth. A sample is one
(prompt, seed) pair's mean over the generated blocks; a cell reports mean +- the 95% confidence
half-width (Student t over the samples), and for the cascades the paired difference to sequential
on the same (prompt, seed) with its own interval -- a difference whose interval excludes 0 is a
significant change. Outputs: study.md (tables), study.json, per_block.csv, and per model
pos_err_per_block-<model>.png.

    python -m bcjax.toyworld.study --model clean=CKPT --model df=RUN/model-diffusion-forcing ...
        [--prompts 16 --seeds 3 --blocks 10 --out study/]
    python -m bcjax.toyworld.study --model ... --setting sequential --setting P4:causal \
        --setting P4:bidirectional-windowed --setting P4-no-clean:causal   # STAGGER[:MASK] each
    python -m bcjax.toyworld.study --curve RUN [--prompts 16 --blocks 10]   # error vs training minutes
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

import numpy as np

from bcjax.toyworld.evaluate import FIELDS, eval_scenes, load_model, run_grid, setting_name, settings

# Two-sided 95% Student t quantiles by degrees of freedom (scipy is not a dependency).
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        15: 2.131, 20: 2.086, 30: 2.042, 40: 2.021, 60: 2.000, 120: 1.980}


def t95(dof: int) -> float:
    """The 95% two-sided Student t quantile (the nearest tabulated dof at or below; 1.96 past 120)."""
    if dof < 1:
        return float("nan")
    if dof > 120:
        return 1.96
    return _T95[max(d for d in _T95 if d <= dof)]


def mean_ci(x) -> tuple[float, float]:
    """(mean, 95% confidence half-width) of the samples x [N]."""
    x = np.asarray(x, np.float64).ravel()
    if x.size < 2:
        return float(x.mean()) if x.size else float("nan"), float("nan")
    return float(x.mean()), float(t95(x.size - 1) * x.std(ddof=1) / np.sqrt(x.size))


def parse_setting(spec: str) -> tuple[str, str | None]:
    """'STAGGER[:MASK]' -> (stagger, mask); sequential takes no mask, a cascade defaults to the
    bidirectional one. Names are checked against `bcjax.names`."""
    from bcjax.names import MASKS, SEQUENTIAL, STAGGERS

    stagger, _, mask = spec.partition(":")
    if stagger not in STAGGERS:
        raise ValueError(f"--setting {spec!r}: stagger {stagger!r} is not one of {', '.join(STAGGERS)}")
    if stagger == SEQUENTIAL:
        if mask:
            raise ValueError(f"--setting {spec!r}: sequential has no mask (one block in flight)")
        return stagger, None
    mask = mask or "bidirectional"
    if mask not in MASKS:
        raise ValueError(f"--setting {spec!r}: mask {mask!r} is not one of {', '.join(MASKS)}")
    return stagger, mask


def run_model(path: str, prompts: int, seeds: int, blocks: int, progress=print, grid=None, **numerics) -> dict:
    """{setting: {field: [seeds, prompts, blocks]}} for one model over the grid's settings
    (default: every stagger x mask of `evaluate.settings`); sequential always runs (the
    paired differences are to it). numerics: `load_model`'s dtype, attention and quant."""
    grid = list(grid or settings())
    if ("sequential", None) not in grid:
        grid.insert(0, ("sequential", None))
    model = load_model(path, **numerics)
    scenes = eval_scenes(model.world, prompts)
    out: dict[str, dict[str, list]] = {}
    for seed in range(seeds):
        t0 = time.perf_counter()
        metrics, _, _ = run_grid(model, scenes, blocks, seed, grid, baselines=seed == 0, progress=None)
        for name, m in metrics.items():
            for k in FIELDS:
                out.setdefault(name, {}).setdefault(k, []).append(m[k])
        if progress:
            progress(f"  {path}: seed {seed} in {time.perf_counter() - t0:.0f} s")
    peak2 = (2 * model.world.amplitude) ** 2
    res = {name: {k: np.stack(v) for k, v in m.items()} for name, m in out.items()}
    for m in res.values():  # a sample's PSNR is of its mean MSE (as the harness's summary)
        m["psnr_sample"] = 10 * np.log10(peak2 / np.maximum(m["mse"].mean(-1), 1e-12))
    return res


def cells(metrics: dict, field: str) -> dict[str, dict]:
    """{setting: {mean, ci, diff, diff_ci}} of one field: per-sample means over blocks; diff is the
    paired difference to sequential (same prompt and seed)."""
    def samples(m):  # [seeds, prompts]
        return m["psnr_sample"] if field == "psnr" and "psnr_sample" in m else m[field].mean(-1)

    seq = samples(metrics["sequential"])
    out = {}
    for name, m in metrics.items():
        x = samples(m)
        mean, ci = mean_ci(x)
        cell = {"mean": mean, "ci": ci, "n": int(x.size)}
        if name not in ("sequential", "still", "init") and x.shape == seq.shape:
            cell["diff"], cell["diff_ci"] = mean_ci(x - seq)
        out[name] = cell
    return out


def study_md(results: dict, blocks: int) -> str:
    names = list(dict.fromkeys(n for r in results.values() for n in r if n not in ("still", "init"))) + ["still"]
    lines = []
    for field, label in (("pos_err", "sprite position error, px"), ("psnr", "PSNR, dB"), ("mse", "MSE"),
                         ("colour", "frames with the sprite's colour right"), ("crisp", "crisp frames"),
                         ("jump", "seam jump, px")):
        lines += [f"### {label}: mean +- 95% CI (paired difference to sequential in brackets)", "",
                  "| setting | " + " | ".join(results) + " |", "|---" * (len(results) + 1) + "|"]
        per_model = {m: cells(r, field) for m, r in results.items()}
        for name in names:
            row = []
            for m in results:
                c = per_model[m].get(name)
                if c is None:
                    row.append("-")
                    continue
                s = f"{c['mean']:.3f} +- {c['ci']:.3f}"
                if "diff" in c:
                    sig = "*" if abs(c["diff"]) > c["diff_ci"] else ""
                    s += f" [{c['diff']:+.3f} +- {c['diff_ci']:.3f}{sig}]"
                row.append(s)
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    lines += ["`*`: the paired difference's 95% interval excludes 0. "
              "A sample is one (prompt, seed); its PSNR is of its mean MSE.", "",
              f"Position error per block (mean over prompts and seeds), blocks 1..{blocks}:", "",
              "| model | setting | " + " | ".join(f"b{b + 1}" for b in range(blocks)) + " |",
              "|---" * (blocks + 2) + "|"]
    for m, r in results.items():
        for name in names:
            if name in r:
                lines.append(f"| {m} | {name} | "
                             + " | ".join(f"{v:.2f}" for v in r[name]["pos_err"].mean((0, 1))) + " |")
    return "\n".join(lines) + "\n"


def write_study(out: str, results: dict, blocks: int, extra: dict) -> str:
    from bcjax.toyworld.png import line_plot, write_png

    os.makedirs(out, exist_ok=True)
    text = study_md(results, blocks)
    with open(os.path.join(out, "study.md"), "w") as f:
        f.write(text)
    summary = {m: {k: cells(r, k) for k in FIELDS} for m, r in results.items()}
    with open(os.path.join(out, "study.json"), "w") as f:
        json.dump({**extra, "cells": summary}, f, indent=2)
    with open(os.path.join(out, "per_block.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["model", "setting", "block", *(f"{k}_mean" for k in FIELDS)])
        for m, r in results.items():
            for name, v in r.items():
                for b in range(blocks):
                    w.writerow([m, name, b + 1, *(f"{v[k][..., b].mean():.6g}" for k in FIELDS)])
    palette = ((0, 0, 0), (31, 119, 180), (174, 199, 232), (255, 127, 14), (255, 187, 120), (44, 160, 44),
               (152, 223, 138), (150, 150, 150))
    for m, r in results.items():
        series = {n: v["pos_err"].mean((0, 1)) for n, v in r.items() if n != "init"}
        write_png(os.path.join(out, f"pos_err_per_block-{m}.png"),
                  line_plot(series, log_y=False, colours=palette, legend=True))
    return text


# -- the three settings of the paper's evaluation (short, long, interactive) ----------------------

# the study's settings: sequential, P2 and P4 under the three masks, and P4 with no clean pass
STUDY_GRID = (("sequential", None), ("P2", "causal"), ("P2", "bidirectional"), ("P2", "bidirectional-clean-causal"),
              ("P4", "causal"), ("P4", "bidirectional"), ("P4", "bidirectional-clean-causal"),
              ("P4-no-clean", "bidirectional"))
SETTINGS = ("short", "long", "interactive")
# the recache policies run on these (no-recache on every setting of the grid)
POLICY_GRID = (("sequential", None), ("P4", "causal"), ("P4", "bidirectional"))
LONG_FACTOR, SWITCH_EVERY, INTERACTIVE_BLOCKS = 4, 8, 24
SWITCH_FIELDS = ("adherence", "switch_err", "switch_colour")


def setting_blocks(model, setting: str) -> int:
    """Generated blocks after the image: the trained length (short), LONG_FACTOR times it (long,
    the cache window rolling), INTERACTIVE_BLOCKS with a switch every SWITCH_EVERY blocks."""
    from bcjax.toyworld.evaluate import trained_blocks

    if setting not in SETTINGS:
        raise ValueError(f"setting {setting!r}: expected one of {SETTINGS}")
    n = trained_blocks(model)
    return {"short": n - 1, "long": LONG_FACTOR * n - 1, "interactive": INTERACTIVE_BLOCKS}[setting]


def run_setting(path: str, setting: str, prompts: int, seeds: int, grid=STUDY_GRID, policies: bool = True,
                progress=print) -> dict:
    """{name: {field: [seeds, prompts, blocks]}} of one model in one setting; the interactive
    setting adds SWITCH_FIELDS [seeds, prompts, switches], and the recache policies on POLICY_GRID
    (names 'SETTING+POLICY')."""
    import jax

    from bcjax.names import POLICIES, Policy
    from bcjax.toyworld.evaluate import block_metrics, eval_streams, generate_stream, switch_metrics

    model = load_model(path)
    blocks = setting_blocks(model, setting)
    scenes = eval_scenes(model.world, prompts)
    runs: list[tuple[str, str | None, Policy]] = [(stagger, mask, "no-recache") for stagger, mask in grid]
    if setting == "interactive" and policies:
        runs += [(stagger, mask, pol) for pol in POLICIES[1:] for stagger, mask in POLICY_GRID]
    streams: list = eval_streams(model.world, prompts, SWITCH_EVERY, blocks) if setting == "interactive" else scenes
    out: dict[str, dict[str, list]] = {}
    for seed in range(seeds):
        t0 = time.perf_counter()
        key, lat = jax.random.key(seed), {}
        for stagger, mask, pol in runs:
            name = setting_name(stagger, mask) + ("" if pol == "no-recache" else f"+{pol}")
            if setting == "interactive":
                lat[name] = generate_stream(model, streams, blocks, key, stagger, mask, pol)
            else:
                from bcjax.toyworld.evaluate import generate

                lat[name] = generate(model, scenes, blocks, key, stagger, mask)
        for name, x in lat.items():
            m = block_metrics(x, streams, model.world, lat["sequential"])
            if setting == "interactive":
                m.update(switch_metrics(x, streams, model.world))
            for k, v in m.items():
                out.setdefault(name, {}).setdefault(k, []).append(v)
        if progress:
            progress(f"  {path} {setting}: seed {seed}, {len(runs)} runs of {blocks} blocks in "
                     f"{time.perf_counter() - t0:.0f} s")
    peak2 = (2 * model.world.amplitude) ** 2
    res = {name: {k: np.stack(v) for k, v in m.items()} for name, m in out.items()}
    for m in res.values():
        m["psnr_sample"] = 10 * np.log10(peak2 / np.maximum(m["mse"].mean(-1), 1e-12))
    return res


def _cell(c: dict, fmt: str) -> str:
    if "diff" not in c:
        return f"{c['mean']:{fmt}} +- {c['ci']:{fmt}}"
    sig = "*" if abs(c["diff"]) > c["diff_ci"] else ""
    return f"[{c['diff']:+{fmt}} +- {c['diff_ci']:{fmt}}{sig}]"


def settings_cells(results: dict) -> dict:
    """results {model: {setting: run_setting's}} -> {model: {setting: {field: cells}}} (what
    settings.json keeps and `settings_md` prints)."""
    return {m: {k: {f: cells(r, f) for f in (*FIELDS, *SWITCH_FIELDS) if f in next(iter(r.values()))}
                for k, r in v.items()} for m, v in results.items()}


def settings_md(summary: dict) -> str:
    """`settings_cells`' {model: {setting: {field: cells}}} -> one markdown table per setting: per
    model the position error, PSNR and crisp frames (and switch adherence, error and colour in
    the interactive setting); sequential as mean +- 95% CI, every other row the paired difference
    to it in brackets (`*`: the interval excludes 0)."""
    lines = []
    for setting in SETTINGS:
        models = [m for m in summary if setting in summary[m]]
        if not models:
            continue
        fields = [("pos_err", "pos px", ".2f"), ("psnr", "PSNR dB", ".2f"), ("crisp", "crisp", ".2f")]
        if setting == "interactive":
            fields += [("adherence", "blocks to follow", ".2f"), ("switch_err", "err after switch px", ".2f"),
                       ("switch_colour", "new colour", ".2f")]
        head = [f"{m}: {label}" for m in models for _, label, _ in fields]
        lines += [f"### {setting}", "", "| setting | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
        cells_of = {(m, f): summary[m][setting][f] for m in models for f, _, _ in fields}
        names = list(dict.fromkeys(n for m in models for n in cells_of[m, "pos_err"]))
        for name in names:
            row = [(_cell(cells_of[m, f][name], fmt) if name in cells_of[m, f] else "-")
                   for m in models for f, _, fmt in fields]
            lines.append(f"| {name} | " + " | ".join(row) + " |")
        lines.append("")
    lines.append("Sequential: mean +- 95% CI over (prompt, seed) samples; other rows: the paired difference to "
                 "sequential, `*` where its 95% interval excludes 0.")
    return "\n".join(lines) + "\n"


def merge_settings(paths: list[str]) -> dict:
    """settings.json files of separate runs (per model or per setting) -> one, same layout."""
    merged: dict = {"models": {}, "prompts": None, "seeds": None, "cells": {}}
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        for key in ("prompts", "seeds"):
            if merged[key] not in (None, d[key]):
                raise ValueError(f"{path}: {key} {d[key]} differs from the others' {merged[key]}")
            merged[key] = d[key]
        merged["models"].update(d["models"])
        for m, by_setting in d["cells"].items():
            merged["cells"].setdefault(m, {}).update(by_setting)
    return merged


def write_settings(out: str, record: dict) -> str:
    """settings.md (the tables of record["cells"]) and settings.json (the record) in out; the tables."""
    text = settings_md(record["cells"])
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "settings.md"), "w") as f:
        f.write(text)
    with open(os.path.join(out, "settings.json"), "w") as f:
        json.dump(record, f, indent=2)
    return text


def curve(run: str, prompts: int, blocks: int, seed: int = 0) -> list[dict]:
    """Sequential error of every snapshot of a run (`train --snapshots`) against its training
    minutes (wall and process CPU, all sessions), and the final model's."""
    from bcjax.checkpoint import read_config
    from bcjax.toyworld.evaluate import summary

    root = os.path.join(run, "snapshots")
    paths = [os.path.join(root, d) for d in sorted(os.listdir(root))] if os.path.isdir(root) else []
    rows = []
    for path in paths:
        prov = read_config(path)["provenance"]
        stages = prov.get("stages", [])
        model = load_model(path)
        scenes = eval_scenes(model.world, prompts)
        metrics, _, _ = run_grid(model, scenes, blocks, seed, [("sequential", None)], baselines=False, progress=None)
        s = summary(metrics, model.world)["sequential"]
        rows.append({"step": prov["step"], "stage": stages[-1]["stage"] if stages else "?",
                     "wall_min": sum(x["wall_s"] for x in stages) / 60, "cpu_min": sum(x["cpu_s"] for x in stages) / 60,
                     "pos_err": s["pos_err"], "pos_err_last": float(metrics["sequential"]["pos_err"][:, -1].mean()),
                     "psnr": s["psnr"], "colour": s["colour"], "crisp": s["crisp"]})
        print(json.dumps(rows[-1]))
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", default=[], help="NAME=CHECKPOINT (repeat); a run folder or model dir")
    p.add_argument("--curve", help="a training run folder with snapshots/: error against training minutes")
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--blocks", type=int, default=10)
    p.add_argument("--setting", action="append", default=[],
                   help="STAGGER[:MASK] (repeat; default the paper's grid, sequential always included)")
    p.add_argument("--out", default="study")
    p.add_argument("--settings", help=f"comma list of {','.join(SETTINGS)}: the study's grid (STUDY_GRID and "
                                      "the recache policies) in the paper's three settings; --setting ignored")
    p.add_argument("--merge", help="comma list of settings.json files (e.g. one per model or setting): one "
                                   "settings.md and settings.json in --out, models side by side")
    a = p.parse_args(argv)
    try:
        grid = [parse_setting(spec) for spec in a.setting] or None
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if a.merge:  # separate runs' tables as one (models side by side)
        try:
            merged = merge_settings(a.merge.split(","))
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"--merge: {e}") from None
        print(write_settings(a.out, merged))
        return {"merged": merged}
    if a.curve:
        rows = curve(a.curve, a.prompts, a.blocks)
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "curve.json"), "w") as f:
            json.dump(rows, f, indent=2)
        return {"curve": rows}
    if not a.model:
        raise SystemExit("give --model NAME=CHECKPOINT (one or more) or --curve RUN")
    models = {}
    for spec in a.model:
        name, sep, path = spec.partition("=")
        if not sep:
            raise SystemExit(f"--model {spec!r}: expected NAME=CHECKPOINT")
        models[name] = path
    if a.settings:
        kinds = [k for k in a.settings.split(",") if k]
        for k in kinds:
            if k not in SETTINGS:
                raise SystemExit(f"--settings: unknown setting {k!r}; expected some of {SETTINGS}")
        by_model = {name: {k: run_setting(path, k, a.prompts, a.seeds) for k in kinds} for name, path in models.items()}
        text = write_settings(a.out, {"models": models, "prompts": a.prompts, "seeds": a.seeds,
                                      "cells": settings_cells(by_model)})
        # every sample, for comparisons the tables do not make (e.g. two masks paired directly)
        np.savez(os.path.join(a.out, "settings.npz"), **{f"{m}|{k}|{name}|{f}": arr for m, v in by_model.items()
                                                          for k, r in v.items() for name, fs in r.items()
                                                          for f, arr in fs.items()})
        print(text)
        return {"settings": by_model}
    results = {}
    for name, path in models.items():
        results[name] = run_model(path, a.prompts, a.seeds, a.blocks, grid=grid)
    text = write_study(a.out, results, a.blocks, {"models": models, "prompts": a.prompts, "seeds": a.seeds,
                                                  "blocks": a.blocks,
                                                  "settings": [setting_name(*g) for g in grid or settings()]})
    print(text)
    return {"results": results}


if __name__ == "__main__":
    main()
