"""The `bcjax` command line: info, demo, generate, convert, bench."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

from bcjax.errors import one_line
from bcjax.flags import OldName as _OldName
from bcjax.flags import positive as _positive
from bcjax.flags import positive_seconds as _positive_float
from bcjax.names import (
    DEFAULT_MASK,
    DEFAULT_TOY_MODEL,
    MASKS,
    POLICIES,
    POSITIONS,
    QUANTS,
    SEQUENTIAL,
    STAGGERS,
    TOKENS,
    TOY_MODELS,
    as_backend,
)
from bcjax.paths import check_output


def _info(args) -> int:
    import importlib.metadata as md

    import jax

    versions = {}
    for pkg in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "chex", "numpy", "safetensors", "torch",
                "diffusers"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = "not installed"
    devices = jax.devices()
    print(f"bcjax {md.version('bcjax')}  python {sys.version.split()[0]}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    from bcjax import compile_cache

    print(f"backend: {jax.default_backend()}  processes: {jax.process_count()} (this: {jax.process_index()})  "
          f"devices: {len(devices)} ({jax.local_device_count()} local)")
    print(f"compile cache: {compile_cache.current() or 'off'}")
    for d in devices:
        print(f"  {d.id}: {d.device_kind} ({d.platform})")
    n = len(devices)
    print(f"mesh: ('{TOKENS}',) = ({n},): a tick's tokens (5 blocks for a 4-step P4 cascade, 1 block for "
          f"sequential) are split over the {n} device(s) of the '{TOKENS}' axis")
    return 0


def _primary() -> bool:
    """Whether this process writes outputs (always, on one host; process 0 of a multi-host job)."""
    import jax

    return jax.process_index() == 0


def _save_atomic(path: str, array) -> None:
    import numpy as np

    from bcjax.app.video import publish

    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".npy", delete=False) as f:
        np.save(f, np.asarray(array))
        tmp = f.name
    publish(tmp, path)


def _setup(args):
    """Random-weight model, prompt and port for demo/generate (real checkpoints: --checkpoint)."""
    import jax

    import ports
    from bcjax.model import WanConfig, init_params, text_kv
    from bcjax.model.quant import quantize

    port = ports.get(args.sampler or "self_forcing")
    cfg = WanConfig.preset(args.preset, **_numerics(args))
    key = jax.random.key(args.seed)
    params = quantize(init_params(cfg, jax.random.fold_in(key, 1), tuple(args.latent_hw)), cfg.quant)
    prompt = jax.random.normal(jax.random.fold_in(key, 2), (1, cfg.text_len, cfg.text_dim))
    return port, cfg, params, text_kv(cfg, params, prompt), jax.random.fold_in(key, 3)


def _numerics(args) -> dict:
    """--dtype, --attention and --quant as WanConfig fields; flags left out are left to the config's defaults
    (random weights) or the checkpoint's weights (`bcjax.checkpoint.restore`)."""
    return {k: v for k, v in (("dtype", args.dtype), ("attention", args.attention), ("quant", args.quant))
            if v is not None}


def _pipeline(port, args):
    """The port's sampler, with --positions applied."""
    import dataclasses

    return dataclasses.replace(port.pipeline, positions=args.positions)


def _run(cfg, port, params, text, key, args, stagger, mask):
    """Generate block by block, printing each block's latency. Returns (latents, seconds per block)."""
    import jax
    import jax.numpy as jnp

    from bcjax.runners import make_runner

    hw = tuple(args.latent_hw)
    pcfg = _pipeline(port, args)
    # Krea's loop for a rebuilt context (latent only, so R = the latent); several `tokens` devices
    # split each tick's tokens (context parallelism for the sequential stagger)
    runner = make_runner(cfg, pcfg, hw, stagger, mask, _mesh(args, cfg), token_group=getattr(args, "token_group", None),
                         adapter=_load_adapter(args, cfg, params))
    stream = runner.blocks(params, text, key, num_blocks=args.blocks)
    label = runner.label + (", R = latent" if runner.takes_round_trip else "")
    blocks, times = [], []
    t0 = time.perf_counter()
    for b, x0 in stream:
        blocks.append(jax.block_until_ready(x0))
        times.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        if args.verbose:
            print(f"  block {b}: {1e3 * times[-1]:8.1f} ms")
    steady = sorted(times[2:] or times)
    per_block = steady[len(steady) // 2]  # median over steady state
    frames = _video_frames_per_block(pcfg)
    print(f"{label:<60} first block {1e3 * times[0]:7.0f} ms (compile incl.), steady {1e3 * per_block:7.1f} ms/block "
          f"= {frames / per_block:7.1f} FPS")
    return jnp.concatenate(blocks, axis=1), per_block


def _auto(args, cfg, pcfg, latent_hw, mesh, model: str, pcfg_for=None):
    """--stagger auto / --attention auto resolved (`bcjax.tune.resolve`): the flags in `args` are
    set to the choice (args.token_group to the tuned group), its one line printed; returns cfg with
    the chosen attention."""
    import dataclasses

    from bcjax.tune import AUTO, resolve

    args.token_group = None
    if AUTO not in (args.stagger, args.attention):
        return cfg
    choice = resolve(cfg, pcfg, latent_hw, args.mask, mesh, stagger=args.stagger, attention=args.attention,
                     model=model, pcfg_for=pcfg_for)
    if _primary():
        print(choice.line, flush=True)
    args.stagger, args.token_group = choice.stagger, choice.group
    if choice.decode_device is not None and getattr(args, "decode_device", "given") is None:
        args.decode_device = choice.decode_device  # the placement `bcjax tune --decoder` measured best
        if _primary():
            print(f"bcjax: decoding on --decode-device {choice.decode_device} (measured by `bcjax tune`)", flush=True)
    if args.attention == AUTO and choice.attention is not None:
        args.attention = choice.attention
        cfg = dataclasses.replace(cfg, attention=as_backend(choice.attention))
    return cfg


def _checkpoint_auto(args) -> None:
    """_auto for a converted checkpoint: its architecture in the dtype and quant this run uses, at
    --size over its VAE's spatial scale."""
    from bcjax.checkpoint import read_config
    from bcjax.tune import AUTO
    from bcjax.tune.command import checkpoint_model

    if AUTO not in (args.stagger, args.attention):
        args.token_group = None
        return
    vae = read_config(args.checkpoint)["configs"].get("vae")
    scale = vae.spatial_scale if vae is not None else 8  # the Wan VAE's
    latent_hw = (args.size[0] // scale, args.size[1] // scale)
    cfg, port, pcfg_for, name = checkpoint_model(args.checkpoint, args.dtype, args.quant, args.sampler)
    _auto(args, cfg, port.pipeline, latent_hw, _mesh(args, cfg), name, pcfg_for)


def _video_frames_per_block(pcfg) -> int:
    """A random-weight Wan DiT's block in video frames: its latents are the Wan VAE's."""
    from bcjax.app.video import frames_per_block
    from bcjax.vae.wan_vae import VAEConfig

    return frames_per_block(pcfg.block_frames, VAEConfig.preset("wan2.1").temporal_scale)


def _mesh(args, cfg=None):
    """The (tokens = --devices, model = --model) mesh, or None for one device; `cfg` checks that
    --model divides its heads and FFN width before anything compiles."""
    import jax

    from bcjax.cascade import make_mesh

    model = getattr(args, "model", 1)
    if args.devices * model > jax.device_count():
        raise ValueError(f"--devices {args.devices} x --model {model} = {args.devices * model} devices; only "
                         f"{jax.device_count()} available")
    return make_mesh(args.devices, model, cfg=cfg) if args.devices * model > 1 else None


def _demo(args) -> int:
    from bcjax.toyworld import demo

    demo.run(out=args.out, report=args.report, checkpoint=args.checkpoint or args.toy_model, prompts=args.prompts,
             blocks=args.blocks, seed=args.seed, devices=args.devices)
    return 0


def _stream(args) -> int:
    from bcjax.toyworld import demo

    try:
        _stream_run(demo, args)
    except KeyboardInterrupt:  # the mp4 holds every block written so far (it is finished on the way out)
        print(f"bcjax stream: interrupted; {args.out} holds the blocks made so far", file=sys.stderr)
        return 130
    return 0


def _stream_run(demo, args) -> None:
    demo.stream_run(args.prompts, out=args.out, checkpoint=args.checkpoint or args.toy_model, blocks=args.blocks,
                    stagger=args.stagger,
                    mask=args.mask, policy=args.policy, seed=args.seed, devices=args.devices,
                    positions=args.positions, interpolate=args.interpolate, adapter=args.adapter, **_numerics(args))


def _serve(args) -> int:
    try:
        from bcjax.serve import CheckpointBackend, ToyBackend, bind, make_app, server
    except ImportError as e:
        raise ValueError(f"bcjax serve needs the serve extra (pip install 'bcjax[serve]'): {e}") from None
    from bcjax.checkpoint import read_config

    mesh = _mesh(args)
    toy_name = args.checkpoint if args.checkpoint in TOY_MODELS else None
    if toy_name:
        args.checkpoint = None
    _check_checkpoint(args.checkpoint)
    if args.checkpoint:
        read_config(args.checkpoint)  # a bad config.json is named before the port is taken
    with bind(args.host, args.port) as sock:  # a port in use is named before a model loads
        if args.checkpoint and "world" not in read_config(args.checkpoint).get("provenance", {}):
            backend: CheckpointBackend | ToyBackend = CheckpointBackend(
                args.checkpoint, args.sampler, tuple(args.size), mesh, decoder=args.decoder,
                decode_device=args.decode_device, verify=args.verify, **_numerics(args))
        else:  # the shipped toy-world model, or another toy-world checkpoint
            backend = ToyBackend(args.checkpoint or toy_name, mesh, **_numerics(args))
        _serve_auto(args, backend)
        backend.adapter = _load_adapter(args, backend.cfg, backend.params)
        app = make_app(backend, queue=args.queue, max_sessions=args.max_tabs,
                       allow_origins=tuple(args.allow_origin or ()), idle=args.idle_timeout)
        srv, _ = server(app, sock=sock)
        host, port = sock.getsockname()[:2]
        print(f"bcjax serve: {backend.describe()['title']} "
              f"on http://{'[' + host + ']' if ':' in host else host}:{port}/ (Ctrl-C stops)", flush=True)
        srv.run(sockets=[sock])
    return 0


def _serve_auto(args, backend) -> None:
    """The page's default stagger (--stagger; auto: `bcjax tune`'s winner for these devices under
    the default mask, else the model's prediction) and, under --attention auto, the tuned backend."""
    import dataclasses

    from bcjax.tune import AUTO, resolve

    backend.default_stagger, backend.token_groups = args.stagger, {}
    if AUTO not in (args.stagger, args.attention):
        return
    choice = resolve(backend.cfg, backend.pcfg, backend.latent_hw, DEFAULT_MASK, backend.mesh, stagger=args.stagger,
                     attention=args.attention, model=args.checkpoint or "toy world")
    print(choice.line, flush=True)
    backend.default_stagger = choice.stagger
    if choice.group is not None:
        backend.token_groups = {choice.stagger: choice.group}
    if args.attention == AUTO and choice.attention is not None:
        backend.cfg = dataclasses.replace(backend.cfg, attention=as_backend(choice.attention))


def _adapt(args) -> int:
    """`bcjax adapt`: an adapter trained so that the cascade's tick reproduces the model's own
    sequential output, from prompts and seeds only (`bcjax.adapt`)."""
    import jax

    from bcjax.adapt import AdaptConfig, adapt
    from bcjax.adapt.toy import read_prompts, toy_source
    from bcjax.names import as_mask

    if args.stagger == "auto":
        raise ValueError("--stagger auto: an adapter is made for one stagger; name it (P1, P2, P4, P4-no-clean)")
    acfg = AdaptConfig(stagger=args.stagger, mask=as_mask(args.mask), rank=args.rank, steps=args.steps,
                       batch=args.batch, blocks=args.blocks, lr=args.lr, seed=args.seed, save_every=args.save_every)
    if args.devices > 1:
        raise ValueError(f"--devices {args.devices}: adapt trains on one device for now "
                         "(its step is a plain jitted function; a sharded step over the runner's mesh is to come)")
    if os.path.isfile(args.out):
        raise ValueError(f"--out {args.out}: is a file; an adapter is a folder")
    args.prompts = os.path.expanduser(args.prompts)
    prompts = read_prompts(args.prompts)  # before any model loads: bad lines are named first
    checkpoint = args.checkpoint or args.toy_model
    if checkpoint not in TOY_MODELS:
        _check_checkpoint(checkpoint)
        from bcjax.checkpoint import read_config

        if "world" not in read_config(checkpoint).get("provenance", {}):
            raise ValueError(f"--checkpoint {checkpoint}: a converted Wan checkpoint; adapt trains toy-world models "
                             "for now (a Wan model's prompts need its umT5 encoder in the loop, to come)")
    from bcjax.toyworld.evaluate import load_model

    model = load_model(checkpoint, **_numerics(args))
    source = toy_source(model.world, prompts, acfg.batch, args.prompts)
    hw = (model.world.size, model.world.size)
    print(f"bcjax adapt: {checkpoint} ({model.cfg.num_layers} layers, dim {model.cfg.dim}), "
          f"{args.stagger} {args.mask}, rank {args.rank}, {args.steps} steps of {args.batch} prompts x {args.blocks} "
          f"blocks, on {jax.default_backend()}", flush=True)
    try:
        adapter = adapt(args.out, model.cfg, model.pcfg, model.params, hw, source, acfg,
                        extra={"base": os.path.basename(checkpoint.rstrip("/"))})
    except KeyboardInterrupt:
        print(f"bcjax adapt: interrupted; {args.out} keeps its checkpoints (run the same command to resume)",
              file=sys.stderr)
        return 130
    m = adapter.meta
    print(f"wrote {args.out}: teacher-forced loss {m['loss_first']:.4g} (first 10 steps) -> {m['loss_last']:.4g} "
          f"(last 10); use it with --adapter {args.out}")
    return 0


def _load_adapter(args, cfg, params):
    """--adapter DIR for this model and weights (stagger, mask and sampler: checked by make_runner)."""
    if not getattr(args, "adapter", None):
        return None
    from bcjax.adapt import load

    return load(args.adapter, cfg, params)


def _adapter_flag(s) -> None:
    s.add_argument("--adapter", metavar="DIR", help="an adapter from `bcjax adapt` for this model, stagger and mask: "
                   "run by the cascade's tick only (the sequential stagger is unchanged by it)")


def _toy_model_flags(s) -> None:
    s.add_argument("--model", dest="toy_model", default=DEFAULT_TOY_MODEL, choices=TOY_MODELS,
                   help="the embedded toy-world model (causal-1f: trained block-causally from scratch, 1-frame "
                        "blocks; docs/toyworld-study.md)")
    s.add_argument("--checkpoint", help="another toy-world checkpoint or training run (instead of --model), e.g. a "
                                        "lineage run's model (`python -m bcjax.toyworld.train --stage base` ...)")


def _eval(args) -> int:
    from bcjax.toyworld import evaluate

    evaluate.main(args.rest)
    return 0


def _generate(args) -> int:
    import jax

    if args.devices * args.model > jax.device_count():
        raise ValueError(f"--devices {args.devices} x --model {args.model}: "
                         f"only {jax.device_count()} device(s) available")
    if args.video and not args.checkpoint:
        raise ValueError("--video needs --checkpoint (its VAE encodes the input video)")
    if args.prompt and not args.checkpoint:
        raise ValueError("--prompt needs --checkpoint: a random-weight model has no text encoder (it runs on a "
                         "random prompt embedding)")
    if args.out and not args.checkpoint and args.out.lower().endswith(".mp4"):
        raise ValueError(f"--out {args.out}: without --checkpoint, generate writes latents (.npy); an .mp4 needs "
                         "--checkpoint (its VAE decodes the latents to pixels)")
    if args.out:  # before anything is computed
        check_output(args.out)
    if args.checkpoint:
        return _generate_video(args)
    port, cfg, params, text, key = _setup(args)
    cfg = _auto(args, cfg, _pipeline(port, args), tuple(args.latent_hw), _mesh(args, cfg), args.preset)
    print(f"bcjax generate: {args.preset} random-weight model, {port.name} sampling, {args.blocks} blocks "
          f"(pass --checkpoint for a converted model and an mp4)")
    latents, _ = _run(cfg, port, params, text, key, args, args.stagger, args.mask)
    if args.out and _primary():
        _save_atomic(args.out, latents)
        print(f"latents [B, F, H, W, C] {tuple(latents.shape)} written to {args.out}")
    return 0


def _generate_video(args) -> int:
    import ports
    from bcjax.app.t2v import TextToVideo

    if not args.prompt:
        raise ValueError("--checkpoint needs --prompt")
    if not args.out or not args.out.lower().endswith(".mp4"):
        raise ValueError(f"--checkpoint writes a video: --out must name an .mp4 file (got {args.out!r})")
    _check_checkpoint(args.checkpoint)
    mesh = _mesh(args)
    from bcjax.checkpoint import read_config

    _checkpoint_auto(args)
    # the checkpoint's own sampler unless told (Krea's loop for a Krea checkpoint, `ports.for_checkpoint`)
    port = ports.get(args.sampler) if args.sampler else \
        ports.for_checkpoint(read_config(args.checkpoint).get("provenance", {}), args.stagger)
    pcfg = _pipeline(port, args)
    if args.video:
        from bcjax.app.prompts import with_strength

        if args.stagger != SEQUENTIAL:
            raise ValueError(f"--video runs sequentially for now; got --stagger {args.stagger}")
        pcfg = with_strength(pcfg, args.strength)
    t2v = TextToVideo(args.checkpoint, pcfg, tuple(args.size), args.stagger, args.mask, mesh,
                      decoder=args.decoder or "wan", decode_device=args.decode_device, verify=args.verify,
                      token_group=args.token_group, adapter=args.adapter, **_numerics(args))
    source = t2v.encode_video(args.video) if args.video else None
    before = _stat(args.out)
    try:
        t = t2v.write_mp4(args.prompt, args.blocks, args.out if _primary() else None, seed=args.seed, source=source)
    except KeyboardInterrupt:  # the mp4 is finished on the way out with every block written so far
        after = _stat(args.out)
        print(f"bcjax generate: interrupted; {args.out} holds the blocks made so far" if after and after != before
              else f"bcjax generate: interrupted before the first block; nothing written to {args.out}",
              file=sys.stderr)
        return 130
    print(f"wrote {args.out}: {t['frames']} frames {args.size[0]}x{args.size[1]} at 16 fps | "
          f"encode {t['encode_s']:.2f} s | denoise {t['denoise_fps']:.2f} FPS steady "
          f"(first block {t['denoise_s'][0]:.2f} s incl. compile) | "
          f"decode ({t2v.decoder} on {t2v.pixels.device}) {sum(t['decode_s']):.2f} s, "
          f"{t['decodes'] / max(t['blocks'], 1):.0f} per block | end-to-end {t['end_to_end_fps']:.2f} FPS | "
          f"first frame after {t['first_frame_s']:.2f} s")
    return 0


def _stat(path: str) -> tuple[int, int] | None:
    """(inode, mtime) of a file, None when there is none: whether a run wrote it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns


def _convert(args) -> int:
    from checkpoints_conv.bundle import convert_bundle

    for flag in ("src", "lora", "text_encoder", "tokenizer", "vae", "taehv"):
        path = getattr(args, flag)
        if path and not os.path.exists(path):
            raise ValueError(f"{flag.replace('_', '-')} {path}: no such file or folder")
    summary = convert_bundle(
        args.layout, args.src, args.dst, lora=args.lora, lora_alpha=args.lora_alpha, ema=args.ema,
        num_heads=args.num_heads, dtype=args.dtype, text_encoder=args.text_encoder, text_layout=args.text_layout,
        text_preset=args.text_preset, tokenizer=args.tokenizer, vae=args.vae, vae_preset=args.vae_preset,
        taehv=args.taehv, overwrite=args.overwrite, quant=args.quant)
    cfg = summary["dit_config"]
    parts = ", ".join(f"{k} {v / 1e6:.1f}M params" for k, v in summary["parts"].items())
    print(f"wrote {summary['dst']}: {parts}; DiT dim {cfg.dim}, {cfg.num_layers} layers, {cfg.num_heads} heads, "
          f"{cfg.param_dtype} | {summary['seconds']:.1f} s, peak host memory {summary['peak_rss_gb']:.2f} GB")
    return 0


def _tune(args) -> int:
    from bcjax.tune.command import run

    return run(args)


def _bench(args) -> int:
    import importlib

    importlib.import_module(f"bcjax.bench.{args.what}").main(args.rest)  # prints its figures
    return 0


BENCHES = ("sequential", "cascade", "comm", "convert", "switch", "startup", "compile", "gpu", "decode", "upstream",
           "quant")


def _bench_name(text: str) -> str:
    """argparse type of `bench`'s first argument: a removed bench's name says what replaced it."""
    if text == "memory":  # folded into `bench compile`: XLA:CPU is its target "cpu"
        raise argparse.ArgumentTypeError("`bench memory` is `bcjax bench compile --target cpu` now")
    return text


def _check_checkpoint(path: str | None) -> None:
    """--checkpoint names a folder (`bcjax convert` makes one)."""
    if path and os.path.isfile(path):
        raise ValueError(f"--checkpoint {path}: is a file; a checkpoint is a folder (make one with `bcjax convert`)")
    if path and not os.path.isdir(path):
        raise ValueError(f"--checkpoint {path}: no such folder (make one with `bcjax convert`)")


def _decoder_flags(s, default: str) -> None:
    from bcjax.vae.decoders import DECODERS

    s.add_argument("--decoder", choices=DECODERS, default=None,
                   help="pixel decoder (with a real checkpoint): the Wan VAE or TAEHV, the tiny preview decoder; "
                        f"{default}")
    s.add_argument("--decode-device", default=None, metavar="auto|cpu|ID",
                   help="where decoding runs: auto (default: a device outside the tokens x model mesh, else the "
                        "host CPU), cpu, or a jax device id (one inside the mesh is allowed with a warning)")


def _verify_flag(s) -> None:
    s.add_argument("--no-verify", dest="verify", action="store_false",
                   help="skip checking the weights against the checkpoint's manifest (checksums, NaN/Inf) when "
                        "loading: faster start, corruption unnoticed (README, Checkpoints, gives the cost)")


def _stagger_flags(s) -> None:
    """--stagger and --mask (a cascade's choices), with their deprecated spellings --schedule and --window."""
    s.add_argument("--stagger", "--schedule", dest="stagger", default="P4", choices=(*STAGGERS, "auto"),
                   action=_OldName, new="--stagger", help="when blocks enter: sequential (one in flight) or a cascade "
                   "(P1, P2, P4, P4-no-clean); auto: the fastest `bcjax tune` measured on these devices (else the "
                   "model's prediction); --schedule: its deprecated name")
    s.add_argument("--mask", "--window", dest="mask", default=DEFAULT_MASK, choices=MASKS, action=_OldName,
                   new="--mask", help="what a cascade's in-flight blocks see of each other; --window: its deprecated "
                   "name (window is the cache span)")


def _numerics_flags(s) -> None:
    """The run's numerics; not saved in checkpoints (architecture only), so every run may choose."""
    from bcjax.names import BACKENDS
    from bcjax.presets import DTYPES

    s.add_argument("--dtype", choices=DTYPES, default=None,
                   help="DiT compute dtype (default: the checkpoint's weights' dtype; random weights: float32)")
    s.add_argument("--attention", choices=BACKENDS, default=None,
                   help="attention backend (default: the platform's kernel; auto: the fastest `bcjax tune` measured "
                        "on these devices, else the platform's kernel; see README, Attention backends)")
    s.add_argument("--quant", choices=QUANTS, default=None,
                   help="quantized DiT projections through qwix: int8/fp8 weights ('-weight': computed in the "
                        "compute dtype) or weights and activations (default: as the checkpoint stores them)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bcjax", description="Block Cascading for block-causal Wan video models, in JAX.")
    g = p.add_argument_group("runtime (options before the command)")
    g.add_argument("--coordinator", metavar="HOST:PORT", help="multi-host: process 0's address, with --num-processes "
                   "and --process-id (every process runs the same command)")
    g.add_argument("--num-processes", type=_positive, help="multi-host: processes in the job")
    g.add_argument("--process-id", type=int, help="multi-host: this process's rank, 0 .. num-processes - 1")
    g.add_argument("--distributed", action="store_true",
                   help="multi-host with jax.distributed's auto-detection (TPU pod slices, SLURM, Open MPI)")
    g.add_argument("--compile-cache", metavar="DIR", help="persistent compilation cache (default: $BCJAX_COMPILE_CACHE "
                   "or ~/.cache/bcjax/jax-compile)")
    g.add_argument("--no-compile-cache", action="store_true", help="compile everything afresh, cache nothing")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="devices, mesh and versions")
    s.set_defaults(fn=_info)

    def common(s, blocks):
        s.add_argument("--blocks", "--num-blocks", dest="blocks", type=_positive, default=blocks)
        s.add_argument("--sampler", "--port", dest="sampler", default=None, action=_OldName, new="--sampler",
                       why="--port is serve's TCP port",
                       help="sampling preset: self_forcing (default), causvid, longlive, krea_14b (Krea's loop; the "
                            "default for a Krea checkpoint), krea_14b_clean_pass (--port: its deprecated name)")
        s.add_argument("--preset", default="tiny", help="model shape: tiny, wan2.1-1.3b, wan2.1-14b (random weights)")
        s.add_argument("--latent-hw", type=_positive, nargs=2, default=(8, 8), metavar=("H", "W"))
        s.add_argument("--devices", type=_positive, default=1, help="devices on the 'tokens' mesh axis")
        s.add_argument("--model", type=_positive, default=1,
                       help="devices on the 'model' mesh axis: tensor-parallel weights (heads and FFN split), "
                            "devices x model in all")
        s.add_argument("--positions", default="absolute", choices=POSITIONS,
                       help="RoPE positions: absolute (streams end at the 1024-frame table) or rolling (no end)")
        s.add_argument("--seed", type=int, default=0)
        s.add_argument("--out", help="output: latents .npy (random weights) or .mp4 (--checkpoint); written atomically")
        s.add_argument("-v", "--verbose", action="store_true", help="print every block's latency")
        _numerics_flags(s)

    s = sub.add_parser("demo", help="the shipped toy-world model: sequential vs cascade as a labelled mp4 + report")
    s.add_argument("--out", default="bcjax-demo.mp4", help="the video (written atomically)")
    s.add_argument("--report", help="markdown report (default: beside the video, .md)")
    _toy_model_flags(s)
    s.add_argument("--num-prompts", "--prompts", dest="prompts", type=_positive, default=3, metavar="N",
                   action=_OldName, new="--num-prompts", why="--prompts is stream's prompt schedule",
                   help="how many fixed-seed prompts (rows of the video); --prompts: its deprecated name")
    s.add_argument("--blocks", "--num-blocks", dest="blocks", type=_positive,
                   help="blocks generated after the given first block (default: about 40 frames, 5 s at 8 fps)")
    s.add_argument("--devices", type=_positive, default=1, help="devices on the 'tokens' mesh axis for the cascade")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=_demo)

    s = sub.add_parser("stream", help="toy world: a stream whose prompt switches between blocks, appended to an mp4")
    s.add_argument("--prompts", required=True,
                   help="prompt schedule 'PROMPT@BLOCK;...', e.g. 'red east fast@0;red west slow@5' "
                        "(block ids; block 0 = the image)")
    s.add_argument("--out", default="bcjax-stream.mp4")
    _toy_model_flags(s)
    s.add_argument("--blocks", "--num-blocks", dest="blocks", type=_positive, default=12)
    _stagger_flags(s)
    s.add_argument("--policy", default="no-recache", choices=POLICIES,
                   help="KV cache at a switch: keep it (Block Cascading), or LongLive v1.0's recache (bidirectional, "
                        "as upstream runs it) or its block-causal variant")
    s.add_argument("--positions", default="absolute", choices=POSITIONS,
                   help="RoPE positions: rolling streams past the model's position table")
    s.add_argument("--devices", type=_positive, default=1)
    s.add_argument("--seed", type=int, default=0, help="noise and the sprites' start positions")
    s.add_argument("--interpolate", type=int, default=0, metavar="N",
                   help="Krea's prompt interpolation: each switch ramps the prompt embeddings over N >= 2 blocks")
    _adapter_flag(s)
    _numerics_flags(s)
    s.set_defaults(fn=_stream)

    s = sub.add_parser("serve", help="a local web page: the video streams live, the prompt changes mid-stream")
    s.add_argument("--checkpoint", help="a converted real model (`bcjax convert`), a toy-world checkpoint, or an "
                   f"embedded toy-world model's name ({', '.join(TOY_MODELS)}; default {DEFAULT_TOY_MODEL}: CPU, "
                   "no download)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback by default)")
    s.add_argument("--port", type=int, default=8000, help="TCP port (0: any free one, printed)")
    s.add_argument("--sampler", default=None,
                   help="real model: sampling preset (self_forcing, causvid, longlive, krea_14b_clean_pass; default: "
                        "the checkpoint's own, Self-Forcing's or, for a Krea checkpoint, krea_14b_clean_pass)")
    s.add_argument("--size", type=_positive, nargs=2, default=(480, 832), metavar=("HEIGHT", "WIDTH"),
                   help="real model: video size in pixels")
    s.add_argument("--devices", type=_positive, default=1, help="devices on the 'tokens' mesh axis for the cascade")
    s.add_argument("--stagger", "--schedule", dest="stagger", default="P4", choices=(*STAGGERS, "auto"),
                   action=_OldName, new="--stagger",
                   help="the page's default stagger (each tab may pick another); auto: the fastest `bcjax tune` "
                        "measured on these devices, else the model's prediction; --schedule: its deprecated name")
    s.add_argument("--model", type=_positive, default=1,
                   help="devices on the 'model' mesh axis (tensor-parallel weights)")
    _decoder_flags(s, "default: taehv when the checkpoint has it (not for Krea's loop), else wan")
    s.add_argument("--queue", type=_positive, default=8,
                   help="messages that may wait per tab before its generation waits")
    s.add_argument("--max-tabs", type=_positive, default=8, help="tabs (connections) served at once")
    s.add_argument("--idle-timeout", type=_positive_float, default=120.0, metavar="SECONDS",  # app.IDLE_S
                   help="a tab with no message and nothing to generate (no stream, a stopped one) is closed after "
                        "this long, freeing its place; the page says so and reconnects on start")
    s.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                   help="another page allowed to open the stream's WebSocket, e.g. http://localhost:3000 (repeatable; "
                        "by default only the page this server serves)")
    _verify_flag(s)
    _adapter_flag(s)
    _numerics_flags(s)
    s.set_defaults(fn=_serve)

    s = sub.add_parser("eval", help="quality harness (`bcjax eval toyworld --help`)")
    s.add_argument("what", choices=["toyworld"])
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the harness")
    s.set_defaults(fn=_eval)

    s = sub.add_parser("generate", help="text to video from a converted checkpoint (or latents from random weights)")
    common(s, 8)
    s.add_argument("--checkpoint", help="a bcjax checkpoint folder from `bcjax convert` (dit + text + vae + tokenizer)")
    s.add_argument("--prompt", help="the text prompt (with --checkpoint)")
    s.add_argument("--size", type=_positive, nargs=2, default=(480, 832), metavar=("HEIGHT", "WIDTH"),
                   help="video size in pixels (with --checkpoint)")
    _stagger_flags(s)
    s.add_argument("--video", help="video-to-video (with --checkpoint, --stagger sequential): an mp4 of --size "
                   "whose latents, noised to --strength, start the blocks (Krea's / StreamDiffusionV2's strength)")
    s.add_argument("--strength", type=float, default=0.6, help="video-to-video: 1 = pure noise, lower keeps more of "
                   "the input (the step list spread over [strength * 1000, 0])")
    _decoder_flags(s, "default: wan")
    _verify_flag(s)
    _adapter_flag(s)
    s.set_defaults(fn=_generate)

    s = sub.add_parser("adapt", help="train an adapter so that a cascade reproduces the model's own sequential output "
                                     "(no data: prompts and seeds)")
    _toy_model_flags(s)
    s.add_argument("--prompts", required=True, help="a text file, one prompt per line (toy world: sprite phrases, "
                   "e.g. 'red east fast, blue west slow')")
    s.add_argument("--out", required=True, help="the adapter folder (its checkpoints too: a stopped run resumes)")
    _stagger_flags(s)
    s.add_argument("--rank", type=_positive, default=16, help="adapter rank r (A [in, r], B [r, out] per projection)")
    s.add_argument("--steps", type=_positive, default=300)
    s.add_argument("--batch", type=_positive, default=4, help="prompts per step")
    s.add_argument("--blocks", type=_positive, default=8, help="blocks per teacher generation (every tick scored)")
    s.add_argument("--lr", type=float, default=2e-3, help="AdamW peak learning rate (warmup, cosine decay)")
    s.add_argument("--save-every", type=_positive, default=50, help="steps between checkpoints")
    s.add_argument("--seed", type=int, default=0, help="prompts drawn, start corners and noise per step")
    s.add_argument("--devices", type=_positive, default=1, help="devices (one for now)")
    _numerics_flags(s)
    s.set_defaults(fn=_adapt)

    s = sub.add_parser("convert", help="upstream checkpoint files -> a bcjax checkpoint folder")
    s.add_argument("--from", dest="layout", required=True,
                   choices=["wan", "self-forcing", "causvid", "longlive", "krea", "diffusers"])
    s.add_argument("src", help="the DiT checkpoint (file, or folder for diffusers/sharded safetensors)")
    s.add_argument("dst", help="the bcjax checkpoint folder to write (atomically)")
    s.add_argument("--lora", help="LongLive: the LoRA file merged into the base at conversion")
    s.add_argument("--lora-alpha", type=float, help="LongLive: LoRA alpha (default: LongLive's recorded 256)")
    s.add_argument("--ema", action=argparse.BooleanOptionalAction, default=None,
                   help="take generator_ema (default: Self-Forcing yes, CausVid/LongLive no)")
    s.add_argument("--num-heads", type=_positive, help="attention heads (default: dim / 128, as every Wan2.1)")
    s.add_argument("--dtype", default="keep", choices=["keep", "float32", "bfloat16"], help="parameter dtype")
    s.add_argument("--quant", default="none", choices=QUANTS,
                   help="store the DiT's projections quantized (int8 or fp8 with per-channel scales; the "
                        "'-weight' and weights+activations modes of one type store the same arrays)")
    s.add_argument("--text-encoder", help="umT5 encoder weights (Wan .pth or transformers files) to bundle")
    s.add_argument("--text-layout", default="wan", choices=["wan", "transformers"])
    s.add_argument("--text-preset", default="umt5-xxl", help="UMT5Config preset (umt5-xxl, tiny)")
    s.add_argument("--tokenizer", help="umT5 sentencepiece model (file or folder holding spiece.model)")
    s.add_argument("--vae", help="Wan2.1 VAE weights (Wan .pth or diffusers files) to bundle")
    s.add_argument("--vae-preset", default="wan2.1", help="VAEConfig preset (wan2.1, tiny)")
    s.add_argument("--taehv", help="TAEHV taew2_1 weights (.pth or .safetensors) to bundle: the tiny streaming "
                   "preview decoder (--decoder taehv)")
    s.add_argument("--overwrite", action="store_true")
    s.set_defaults(fn=_convert)

    s = sub.add_parser("tune", help="measure staggers, token groups and attention backends on these devices; "
                                    "store the fastest for --stagger auto / --attention auto")
    from bcjax.tune.command import add_arguments

    add_arguments(s)
    s.set_defaults(fn=_tune)

    s = sub.add_parser("bench", help="benchmarks (e.g. `bcjax bench sequential --preset tiny`)")
    s.add_argument("what", type=_bench_name, choices=BENCHES, metavar="BENCH", help=f"one of: {', '.join(BENCHES)}")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="arguments of the benchmark")
    s.set_defaults(fn=_bench)
    return p


# what shows that a machine has an accelerator, as jax._src.hardware_utils looks for it: NVIDIA's
# device nodes (WSL2's /dev/dxg), AMD's KFD node, and Google's PCI vendor id (TPU chips)
_GPU_NODES = ("dev/nvidia0", "dev/nvidiactl", "dev/dxg", "dev/kfd")
_GOOGLE_PCI_VENDOR = "0x1ae0"


def _accelerators(root: str = "/") -> list[str]:
    """The kinds of accelerator this machine shows ('gpu', 'tpu'); [] for a CPU-only one."""
    import glob

    found = ["gpu"] if any(os.path.exists(os.path.join(root, n)) for n in _GPU_NODES) else []
    for vendor in glob.glob(os.path.join(root, "sys/bus/pci/devices/*/vendor")):
        with open(vendor) as f:
            if f.read().strip() == _GOOGLE_PCI_VENDOR:
                return [*found, "tpu"]
    return found


def _cpu_unless_accelerated() -> None:
    """JAX's platforms = cpu on a Linux machine with no accelerator, unless JAX_PLATFORMS says
    otherwise. Without it, jax initialises every installed plugin first: the CUDA plugin's version
    check prints a cuPTI traceback and libtpu its TPU_ACCELERATOR_TYPE / TPU_WORKER_HOSTNAMES
    warnings (`pip install ".[test]"` brings both). A plugin bcjax cannot vouch for (not CUDA's)
    leaves the choice to jax."""
    import pkgutil
    from importlib.metadata import entry_points

    if "JAX_PLATFORMS" in os.environ or sys.platform != "linux" or _accelerators():
        return
    try:
        import jax_plugins

        plugins = {name for _, name, _ in pkgutil.iter_modules(jax_plugins.__path__)}
    except ImportError:  # no plugin package installed: no namespace
        plugins = set()
    plugins |= {e.value.rpartition(".")[2] for e in entry_points(group="jax_plugins")}
    if any("cuda" not in name for name in plugins):
        return
    import jax

    if not jax.config.values.get("jax_platforms"):  # unless the program chose already
        jax.config.update("jax_platforms", "cpu")


def _runtime(args) -> None:
    """Compile cache and multi-host set-up, before anything touches a device."""
    from bcjax import compile_cache

    _cpu_unless_accelerated()
    if args.no_compile_cache:
        compile_cache.disable()
    elif args.compile_cache:
        compile_cache.enable(args.compile_cache)
    else:  # the command's default (importing bcjax changes no JAX setting; a command owns its process)
        compile_cache.enable_unless_configured()
    if args.distributed or any(v is not None for v in (args.coordinator, args.num_processes, args.process_id)):
        from bcjax import distributed

        if args.distributed and args.coordinator:
            raise ValueError("--distributed auto-detects the cluster; drop it when giving --coordinator")
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)


# flags naming a file or folder bcjax reads: `~` expanded (the shell leaves `--flag=~/x` alone);
# they stay relative for messages, and bcjax.checkpoint makes them absolute before orbax sees them
_PATH_FLAGS = ("checkpoint", "src", "dst", "lora", "text_encoder", "tokenizer", "vae", "taehv", "video", "adapter")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in _PATH_FLAGS:
        if isinstance(getattr(args, flag, None), str):
            setattr(args, flag, os.path.expanduser(getattr(args, flag)))
    try:
        _runtime(args)
        return args.fn(args)
    # bad input: one clear line
    except (ValueError, KeyError, FileNotFoundError, FileExistsError, ConnectionError) as e:
        message = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"bcjax {args.command}: error: {one_line(str(message))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bcjax {args.command}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as e:  # a harness's or bench's own `raise SystemExit("message")`: the same one line
        if not isinstance(e.code, str):  # argparse's exits (--help, a bad flag) have said what they had to
            raise
        print(f"bcjax {args.command}: error: {one_line(e.code)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
