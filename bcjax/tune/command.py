"""The `bcjax tune` command: build the model of a preset or checkpoint, measure, print, store."""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys

from bcjax.names import DEFAULT_MASK, MASKS, QUANTS, TOY_MODELS
from bcjax.tune.measure import STAGGERS, Setup, candidates, decode_table, table, tune
from bcjax.tune.store import ENV, TuneKey, cache_dir


def _random_text(cfg, params, seed: int):
    """Text K/V of a random prompt embedding: attention's cost does not depend on the prompt."""
    import jax

    from bcjax.model.wan import text_kv

    emb = jax.random.normal(jax.random.key(seed), (1, cfg.text_len, cfg.text_dim))
    return text_kv(cfg, params, emb)


def build_setup(*, preset: str | None, checkpoint: str | None, devices: int, model: int, latent_hw, dtype: str | None,
                quant: str | None, sampler: str | None, mask: str, seed: int = 0) -> tuple[Setup, str]:
    """(the shared Setup, a readable model name) for a preset (random weights) or a checkpoint: a
    toy-world model runs its own weights; a converted real checkpoint's architecture gets random
    weights in its stored dtype (speed does not depend on their values)."""
    import jax

    import ports
    from bcjax.cascade import make_mesh
    from bcjax.model import WanConfig, init_params
    from bcjax.model.quant import quantize

    if devices * model > jax.device_count():
        raise ValueError(f"--devices {devices} x --model {model} = {devices * model} devices; only "
                         f"{jax.device_count()} available")
    numerics = {k: v for k, v in (("dtype", dtype), ("quant", quant)) if v is not None}
    toy = checkpoint is not None and _is_toy(checkpoint)
    pcfg_for = None
    if toy:
        from bcjax.toyworld.evaluate import load_model

        m = load_model(checkpoint, dtype=dtype, quant=quant)
        cfg, pcfg, params = m.cfg, m.pcfg, m.params
        hw, frames = (m.world.size, m.world.size), m.world.block_frames
        name = checkpoint if checkpoint in TOY_MODELS else os.path.basename(m.path.rstrip("/"))
        if latent_hw is not None and tuple(latent_hw) != hw:
            raise ValueError(f"--latent-hw {tuple(latent_hw)}: the toy-world model draws {hw[0]}x{hw[1]} latents")
    else:
        if checkpoint is not None:
            cfg, port, pcfg_for, name = checkpoint_model(checkpoint, dtype, quant, sampler)
        else:
            preset = preset or "tiny"
            cfg = WanConfig.preset(preset, **numerics)
            port, name = ports.get(sampler or "self_forcing"), preset
        pcfg = port.pipeline
        hw = tuple(latent_hw) if latent_hw is not None else ((8, 8) if name == "tiny" else (60, 104))
        params = quantize(init_params(cfg, jax.random.key(seed), hw), cfg.quant)
        frames = pcfg.block_frames * 4  # the Wan VAE's (and TAEHV's) temporal scale
    mesh = make_mesh(devices, model, cfg=cfg) if devices * model > 1 else None
    return Setup(cfg, pcfg, (int(hw[0]), int(hw[1])), mask, mesh, params, _random_text(cfg, params, seed + 1),
                 frames, pcfg_for), name


def checkpoint_model(checkpoint: str, dtype: str | None, quant: str | None, sampler: str | None):
    """(WanConfig, port, sampler per stagger or None, name) of a converted checkpoint, read from its
    config.json alone: its architecture in `dtype` (default: the stored weights') and `quant`; its
    own port unless `sampler` is given (Krea: its own loop when sequential, the clean-pass sampler
    in a cascade, so the port here is the cascade's)."""
    import ports
    from bcjax.checkpoint import read_config, stored_dtype

    meta = read_config(checkpoint)
    prov = meta["provenance"]
    dtype = dtype or stored_dtype(checkpoint, "dit")
    cfg = dataclasses.replace(meta["configs"]["dit"], dtype=dtype, param_dtype=dtype,
                              **({"quant": quant} if quant is not None else {}))
    if sampler:
        return cfg, ports.get(sampler), None, os.path.basename(os.path.abspath(checkpoint))

    def pcfg_for(stagger):
        return ports.for_checkpoint(prov, stagger).pipeline

    return cfg, ports.for_checkpoint(prov, None), pcfg_for, os.path.basename(os.path.abspath(checkpoint))


def _is_toy(checkpoint: str) -> bool:
    from bcjax.checkpoint import read_config

    if checkpoint in TOY_MODELS:
        return True
    from bcjax.toyworld.evaluate import checkpoint_folder

    return "world" in read_config(checkpoint_folder(checkpoint)).get("provenance", {})


def add_arguments(s: argparse.ArgumentParser) -> None:
    from bcjax.names import BACKENDS
    from bcjax.presets import DTYPES

    src = s.add_mutually_exclusive_group()
    src.add_argument("--preset", help="model shape with random weights: tiny (default), wan2.1-1.3b, wan2.1-14b")
    src.add_argument("--checkpoint", help="a converted checkpoint (its architecture, stored dtype and sampler) or a "
                                          "toy-world model (a name such as causal-1f, or a folder)")
    s.add_argument("--devices", type=int, default=1, help="devices on the 'tokens' mesh axis")
    s.add_argument("--model", type=int, default=1, help="devices on the 'model' axis (tensor parallel)")
    s.add_argument("--latent-hw", type=int, nargs=2, metavar=("H", "W"),
                   help="latent size (default: 60 104 = 480x832; tiny: 8 8; a toy-world model: its own)")
    s.add_argument("--dtype", choices=DTYPES, default=None,
                   help="compute dtype (default: the checkpoint's weights', random weights float32)")
    s.add_argument("--quant", choices=QUANTS, default=None, help="quantized DiT projections (bcjax.model.quant)")
    s.add_argument("--sampler", help="the sampler (port) whose steps and cache the blocks use (default: the "
                                     "checkpoint's, else self_forcing)")
    s.add_argument("--mask", default=DEFAULT_MASK, choices=MASKS, help="the cascades' mask")
    s.add_argument("--staggers", nargs="+", default=list(STAGGERS), help="staggers to measure")
    s.add_argument("--attention", nargs="+", choices=[b for b in BACKENDS if b not in ("auto", "xla")],
                   help="attention backends to measure (default: every backend of the platform, tokamax's where "
                        "installed)")
    s.add_argument("--groups", nargs="+", type=int, help="token group sizes to measure (default: the least-padding "
                                                         "split, a whole frame, the smallest group; several devices)")
    s.add_argument("--decoder", choices=("wan", "taehv"),
                   help="also time where this decoder runs (a mesh device, one outside it, the host) against the "
                        "winner; stored for --decode-device under --stagger auto")
    s.add_argument("--ticks", type=int, default=5, help="timed steps per candidate after warm-up (median)")
    s.add_argument("--budget", type=float, default=600.0, metavar="SECONDS",
                   help="stop starting candidates after this long (the likeliest winners go first)")
    s.add_argument("--cache", help=f"folder of stored tunings (default: ${ENV} or ~/.cache/bcjax/tune)")
    s.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    import jax

    from bcjax.bench import comm
    from bcjax.model import attention

    for flag, v in (("--devices", args.devices), ("--model", args.model), ("--ticks", args.ticks)):
        if v < 1:
            raise ValueError(f"{flag} {v}: expected a positive count")
    if args.budget <= 0:
        raise ValueError(f"--budget {args.budget}: expected a positive number of seconds")
    from bcjax.schedule.stagger import make_stagger

    for stagger in args.staggers:  # a bad name is refused before anything compiles, naming it
        if stagger != "sequential":
            try:
                make_stagger(stagger, 4)
            except ValueError as e:
                raise ValueError(f"--staggers {stagger}: {e}") from None
    setup, name = build_setup(preset=args.preset, checkpoint=args.checkpoint, devices=args.devices, model=args.model,
                              latent_hw=args.latent_hw, dtype=args.dtype, quant=args.quant, sampler=args.sampler,
                              mask=args.mask)
    devices = list(setup.mesh.devices.flat) if setup.mesh is not None else jax.devices()[:1]
    platform = attention.platform_of(devices)
    backends = args.attention or list(attention.installed_backends(platform))
    for b in backends:
        attention.check_backend(b, platform)
    key = TuneKey.make(setup.cfg, setup.pcfg, device_kind=devices[0].device_kind, devices=len(devices),
                       model_devices=args.model, model=name, mask=args.mask, latent_hw=setup.latent_hw,
                       dtype=str(setup.cfg.dtype), quant=setup.cfg.quant)
    hardware = comm.hardware_for(key.device_kind, key.devices)
    cands = candidates(setup, args.staggers, backends, args.groups)
    print(f"bcjax tune: {name} | {setup.latent_hw[0]}x{setup.latent_hw[1]} latent | {setup.cfg.dtype} | quant "
          f"{setup.cfg.quant} | mask {args.mask} | {key.describe()} (tokens {args.devices} x model {args.model}) | "
          f"{len(cands)} candidates, budget {args.budget:.0f} s | predicted by "
          f"{hardware.name + ' (bcjax bench comm)' if hardware else 'FLOPs only (no speed model for this device)'}",
          flush=True)
    decoder = None
    if args.decoder:
        from bcjax.tune.decode import decoder_for

        decoder = (args.decoder, decoder_for(args.decoder, args.checkpoint, name, str(setup.cfg.dtype)))
    try:
        record = tune(setup, key, cands, budget_s=args.budget, ticks=args.ticks, folder=args.cache,
                      hardware=hardware, decoder=decoder)
    except KeyboardInterrupt:
        print(f"bcjax tune: interrupted; what was measured is kept in {cache_dir(args.cache)}/{key.filename()} "
              "(not used until a tune finishes: the same command resumes it)", file=sys.stderr)
        return 130
    print(table(record))
    if record.get("decode"):
        print("\n" + decode_table(record))
    best = record["winner"]
    if best is None:
        print("bcjax tune: no candidate ran; nothing stored for --stagger auto", file=sys.stderr)
        return 1
    print(f"winner: {best['stagger']}, attention {best['attention']}"
          f"{', token group ' + str(best['group']) if best['group'] else ''}: {best['block_ms']:.2f} ms per block"
          f"{_decode_words(record)}; "
          f"stored in {record['path']} for `--stagger auto` / `--attention auto` "
          f"({time_s(record['measured_s'])} measuring)")
    return 0


def time_s(s: float) -> str:
    return f"{s:.0f} s" if s >= 10 else f"{s:.1f} s"


def _decode_words(record: dict) -> str:
    d = (record.get("decode") or {}).get("winner")
    return f", decode on --decode-device {d['spec']} ({d['where']})" if d else ""
