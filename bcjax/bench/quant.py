"""The error of each quantization mode, measured against an fp32 reference from the same noise.

    bcjax bench quant [--preset wan2.1-1.3b] [--layers 2] [--latent-hw 16 16] [--blocks 3]
                      [--quant int8-weight int8 fp8-weight fp8] [--seed 0]

Self-Forcing-shaped random weights by default (the 1.3B's width, 2 layers, 16x16 latents, a
512-token prompt of random umT5-sized embeddings). Two tables, max and mean abs error:

* per layer: the DiT's flow prediction for one noisy block (t = 1000, 750, 500 on its frames)
  through its first k layers (the head on the residual stream after layer k), for bf16 and each
  mode (bf16 compute) against fp32;
* per block: the x0 of each block the sequential pipeline (Self-Forcing's sampler: 4 steps and
  the clean pass) generates from the same noise, against fp32's, so the error carried through the
  KV cache from block to block shows.

The columns "vs bf16" are each mode's difference to the unquantized bf16 run: what quantizing
adds to what bf16 already costs. Nothing is timed.
"""

from __future__ import annotations

import argparse
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from bcjax.names import QUANTS


def _stats(a, b) -> tuple[float, float]:
    d = np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))
    return float(d.max()), float(d.mean())


def for_mode(cfg, params, mode: str):
    """(config, params) a row runs: "fp32" as given, "bf16" cast, a quantization mode cast and
    quantized (bf16 compute)."""
    from bcjax.model import quant

    if mode == "fp32":
        return cfg, params
    c = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16", quant="none" if mode == "bf16" else mode)
    return c, quant.quantize(jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params), c.quant)


def per_layer(cfg, params, prompt, x, modes) -> list[dict]:
    """Rows {"layers": k, mode: (max, mean) vs fp32, mode + " vs bf16": ...} for k = 1..L."""
    from bcjax.model import forward, text_kv

    t = jnp.linspace(1000.0, 500.0, x.shape[1])[None]
    ids = jnp.arange(x.shape[1])
    rows = []
    for k in range(1, cfg.num_layers + 1):
        head = dataclasses.replace(cfg, num_layers=k)
        cut = {**params, "blocks": jax.tree_util.tree_map(lambda a, k=k: a[:k], params["blocks"])}
        out = {}
        for mode in ("fp32", "bf16", *modes):
            c, p = for_mode(head, cut, mode)
            out[mode] = forward(c, p, x, t, text_kv(c, p, prompt), ids)[0]
        row: dict = {"layers": k, "bf16": _stats(out["bf16"], out["fp32"])}
        for mode in modes:
            row[mode] = _stats(out[mode], out["fp32"])
            row[mode + " vs bf16"] = _stats(out[mode], out["bf16"])
        rows.append(row)
    return rows


def per_block(cfg, params, prompt, hw, blocks: int, modes, key) -> list[dict]:
    """Rows {"block": i, mode: (max, mean) of its x0 vs fp32's, ...} of one sequential generation."""
    from bcjax.runners import make_runner
    from bcjax.schedule import PipelineConfig

    out = {}
    for mode in ("fp32", "bf16", *modes):
        c, p = for_mode(cfg, params, mode)
        run = make_runner(c, PipelineConfig(), hw)
        out[mode] = np.asarray(run.generate(p, run.text_kv(p, prompt), key, num_blocks=blocks), np.float32)
    bf = PipelineConfig().block_frames
    rows = []
    for i in range(blocks):
        sl = slice(i * bf, (i + 1) * bf)
        row: dict = {"block": i, "bf16": _stats(out["bf16"][:, sl], out["fp32"][:, sl])}
        for mode in modes:
            row[mode] = _stats(out[mode][:, sl], out["fp32"][:, sl])
            row[mode + " vs bf16"] = _stats(out[mode][:, sl], out["bf16"][:, sl])
        rows.append(row)
    return rows


def layer_alone(cfg, params, prompt, x, modes) -> list[dict]:
    """Rows {"layer": i, mode: (max, mean)}: the flow prediction with only layer i's kernels
    quantized (weight-only, the rest bf16) against the all-bf16 one: which layers are sensitive
    enough to keep in bf16 (the first and the last are the usual suspects)."""
    from bcjax.model import forward, quant, text_kv

    t = jnp.linspace(1000.0, 500.0, x.shape[1])[None]
    ids = jnp.arange(x.shape[1])
    c = dataclasses.replace(cfg, dtype="bfloat16", param_dtype="bfloat16")
    bf = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), params)
    ref = forward(c, bf, x, t, text_kv(c, bf, prompt), ids)[0]
    # the weights a weight-only mode computes with
    deq = {mode: quant.dequantized(quant.quantize(bf, mode))["blocks"] for mode in modes}
    rows = []
    for i in range(cfg.num_layers):
        row: dict = {"layer": i}
        for mode in modes:
            blocks = jax.tree_util.tree_map(lambda a, b, i=i: a.at[i].set(b[i]), bf["blocks"], deq[mode])
            p = {**bf, "blocks": blocks}
            row[mode] = _stats(forward(c, p, x, t, text_kv(c, p, prompt), ids)[0], ref)
        rows.append(row)
    return rows


def table(rows: list[dict], first: str, modes) -> str:
    cols = ["bf16", *(c for m in modes for c in (m, m + " vs bf16"))]
    head = f"| {first} | " + " | ".join(f"{c}: max / mean" for c in cols) + " |"
    lines = [head, "|---|" + "---:|" * len(cols)]
    for r in rows:
        lines.append(f"| {r[first]} | " + " | ".join(f"{r[c][0]:.2e} / {r[c][1]:.2e}" for c in cols) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    from bcjax.model import WanConfig, init_params

    ap = argparse.ArgumentParser(prog="bcjax bench quant", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan2.1-1.3b", choices=WanConfig.preset_names())
    ap.add_argument("--layers", type=int, default=2, help="DiT layers (default 2)")
    ap.add_argument("--latent-hw", nargs=2, type=int, default=(16, 16), metavar=("H", "W"))
    ap.add_argument("--blocks", type=int, default=3, help="blocks the sequential pipeline generates (default 3)")
    ap.add_argument("--quant", nargs="+", default=[q for q in QUANTS if q != "none"], choices=QUANTS[1:])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--checkpoint", help="trained weights instead of random ones: a bcjax checkpoint or a toy-world "
                                         "model's name (lineage-3f, causal-1f); --preset and --layers are then its")
    args = ap.parse_args(argv)
    hw = tuple(args.latent_hw)
    key = jax.random.key(args.seed)
    if args.checkpoint:
        from bcjax.checkpoint import restore
        from bcjax.toyworld.evaluate import model_path

        cfg, params = restore(model_path(args.checkpoint), "dit", dtype="float32", param_dtype="float32")
        args.preset = args.checkpoint
    else:
        cfg = WanConfig.preset(args.preset, num_layers=args.layers)
        params = init_params(cfg, jax.random.fold_in(key, 0), hw)
    prompt = jax.random.normal(jax.random.fold_in(key, 1), (1, cfg.text_len, cfg.text_dim))
    x = jax.random.normal(jax.random.fold_in(key, 2), (1, 3, *hw, cfg.in_channels))
    weights = "trained weights" if args.checkpoint else "random weights"
    print(f"{args.preset} width, {cfg.num_layers} layers, {weights}, latent {hw[0]}x{hw[1]}; abs error "
          "against fp32 (the same weights and noise); 'vs bf16': against the unquantized bf16 run", flush=True)
    print("\nper layer: the flow prediction of one block (t = 1000, 750, 500) through the first k layers\n")
    print(table(per_layer(cfg, params, prompt, x, args.quant), "layers", args.quant), flush=True)
    weight_modes = [m for m in args.quant if m.endswith("-weight")]
    if weight_modes:
        print("\none layer quantized alone (the rest bf16): the flow prediction against all-bf16\n")
        rows = layer_alone(cfg, params, prompt, x, weight_modes)
        lines = ["| layer | " + " | ".join(f"{m}: max / mean" for m in weight_modes) + " |",
                 "|---|" + "---:|" * len(weight_modes)]
        lines += [f"| {r['layer']} | " + " | ".join(f"{r[m][0]:.2e} / {r[m][1]:.2e}" for m in weight_modes) + " |"
                  for r in rows]
        print("\n".join(lines), flush=True)
    print(f"\nper block: the x0 of each of {args.blocks} blocks the sequential pipeline generates\n")
    print(table(per_block(cfg, params, prompt, hw, args.blocks, args.quant, jax.random.fold_in(key, 3)), "block",
                args.quant), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
