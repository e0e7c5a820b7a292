"""What quantization does to generation quality: each `--quant` mode x {sequential, the default
cascade} on the toy world, as paired differences to the unquantized bf16 run (same prompts, seeds
and noise), with 95% confidence intervals.

    python -m bcjax.toyworld.quant_study [--model lineage-3f --model causal-1f] [--num-prompts 16]
        [--seeds 3] [--blocks 8] [--quant int8-weight int8 fp8-weight fp8] [--out quant-study]

Every run computes in bf16 (the models' weights are fp32; `--dtype bfloat16` is what an
accelerator runs); the baseline row is bf16 with unquantized weights. A sample is one
(prompt, seed) pair's mean over the generated blocks (`evaluate.block_metrics`); `*` marks a
difference whose interval excludes 0. Writes quant.md and quant.json to --out.
"""

from __future__ import annotations

import argparse
import json
import os

import numpy as np

from bcjax.names import DEFAULT_MASK, QUANTS, SEQUENTIAL, TOY_MODELS
from bcjax.toyworld.evaluate import setting_name
from bcjax.toyworld.study import mean_ci, run_model

SETTINGS = ((SEQUENTIAL, None), ("P4", DEFAULT_MASK))
COLUMNS = (("pos_err", "pos px", 2), ("psnr", "PSNR dB", 2), ("crisp", "crisp", 2), ("colour", "colour", 2))


def samples(path: str, mode: str, prompts: int, seeds: int, blocks: int) -> dict[str, dict[str, np.ndarray]]:
    """{setting: {field: [seeds * prompts]}} per-sample means over blocks for one mode ("none": bf16),
    from the study's own runs (`study.run_model`: a sample's PSNR is of its mean MSE)."""
    metrics = run_model(path, prompts, seeds, blocks, progress=None, grid=SETTINGS, dtype="bfloat16", quant=mode)
    names = [setting_name(s, m) for s, m in SETTINGS]
    return {name: {field: (metrics[name]["psnr_sample"] if field == "psnr" else metrics[name][field].mean(-1)).ravel()
                   for field, _, _ in COLUMNS} for name in names}


def rows(results: dict[str, dict]) -> list[dict]:
    """Table rows: the bf16 baseline as mean +- CI, each mode as its paired difference to it."""
    base = results["none"]
    out = []
    for mode, res in results.items():
        for name, m in res.items():
            row = {"mode": "bf16" if mode == "none" else mode, "setting": name}
            for field, _, _ in COLUMNS:
                if mode == "none":
                    row[field] = mean_ci(m[field])
                else:
                    row[field] = mean_ci(m[field] - base[name][field])
            out.append(row)
    return out


def markdown(model: str, table: list[dict]) -> str:
    head = "| mode | setting | " + " | ".join(label for _, label, _ in COLUMNS) + " |"
    lines = [f"#### {model}", "", head, "|---|---|" + "---:|" * len(COLUMNS)]
    for r in table:
        cells = []
        for field, _, nd in COLUMNS:
            mean, ci = r[field]
            if r["mode"] == "bf16":
                cells.append(f"{mean:.{nd}f} +- {ci:.{nd}f}")
            else:
                star = "*" if abs(mean) > ci else ""
                cells.append(f"[{mean:+.{nd}f} +- {ci:.{nd}f}{star}]")
        lines.append(f"| {r['mode']} | {r['setting']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bcjax.toyworld.quant_study", description=__doc__.split("\n")[0])
    ap.add_argument("--model", action="append", choices=TOY_MODELS, help="toy models (default: every one)")
    ap.add_argument("--num-prompts", type=int, default=16, dest="prompts")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--blocks", type=int, default=8, help="blocks generated after the given first block")
    ap.add_argument("--quant", nargs="+", default=list(QUANTS[1:]), choices=QUANTS[1:])
    ap.add_argument("--out", default="quant-study")
    a = ap.parse_args(argv)
    os.makedirs(a.out, exist_ok=True)
    doc, data = [], {}
    for model in a.model or TOY_MODELS:
        results = {mode: samples(model, mode, a.prompts, a.seeds, a.blocks) for mode in ("none", *a.quant)}
        table = rows(results)
        data[model] = table
        doc.append(markdown(model, table))
        print(doc[-1] + "\n", flush=True)
    note = (f"{a.prompts} prompts x {a.seeds} seeds, {a.blocks} blocks; bf16 rows: mean +- 95% CI; quantized rows: "
            f"the paired difference to bf16 in the same setting, `*` where its 95% interval excludes 0; "
            f"settings: {', '.join(setting_name(s, m) for s, m in SETTINGS)}")
    with open(os.path.join(a.out, "quant.md"), "w") as f:
        f.write("\n\n".join(doc) + "\n\n" + note + "\n")
    with open(os.path.join(a.out, "quant.json"), "w") as f:
        json.dump({"note": note, "models": data}, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
