"""bcjax's sequential pipeline against upstream Self-Forcing's `CausalInferencePipeline`, one process.

    bcjax bench upstream --self-forcing PATH [--sizes 128x2 512x4 1536x2] [--repeats 3]
                         [--attention auto|dense|chunked] [--text-dim 64] [--threads 1]

PATH is a checkout of guandeh17/Self-Forcing; it is imported only here, when the bench runs (torch
and diffusers are needed too; nothing else of its requirements). Both sides get the same random
original-layout Wan weights (bcjax through its own converter, `checkpoints_conv.wan`), the same
prompt embeddings and the same noise (bcjax's `block_noise`: upstream's initial noise tensor is
built from it and each re-noise takes it in place of upstream's `torch.randn_like`), in fp32 on the
CPU, for 7 blocks of 3 latent frames under Self-Forcing's sampler (`ports/self_forcing.py`). The
latents must agree to 1e-4 (else the bench fails). Then the two are run in turns, `--repeats`
times, alternating which goes first, and the time of each block is the median over the repeats.
The headline is the mean time of blocks 2-6: past the first blocks, while the cache fills, which is
where a fixed cache cost would show.

Both sides run on the same `--threads` processors (the process is pinned to them before JAX
starts, and torch takes as many threads): on a shared machine torch's OpenMP threads, more of them
than the cores it gets, wait on each other, and upstream's time per block swung 10x run to run
(0.5 to 9 s at 512x4 on 2 busy cores) where one thread gave 0.53-0.67 s.

Sizes are `<dim>x<layers>` with head_dim 128 (Wan's): 128x2 on 8x12 latents; 512x4 and 1536x2 (the
1.3B width, its ffn_dim 8960) on 16x16. The text projection runs in every upstream pass but once per
prompt in bcjax, so a small `--text-dim` keeps that difference out of the comparison; text_len is
Wan's 512.

What is changed in upstream at run time, and why (its code is not copied):
* its package `__init__` files are not run (`wan`, `wan.modules`, `utils`, `pipeline`,
  `demo_utils` are registered as bare packages over its folders): they import the training code,
  easydict, tqdm and CLIP, none of which inference needs;
* `demo_utils.memory` is a stand-in: upstream's calls `torch.cuda.current_device()` at import; its
  names are used only with `low_memory=True`;
* `wan.modules.t5`, `wan.modules.vae` and `wan.modules.tokenizers` are stand-ins that raise when
  called: the bench passes its own text encoder (the prompt embeddings) and VAE (the latents as
  they are), and upstream's t5 calls `torch.cuda.current_device()` at import; `einops`, if not
  installed, likewise (`wan.modules.model` imports it for a training branch);
* `wan.modules.attention.attention` / `flash_attention` as imported by `causal_model` and `model`
  become `torch.nn.functional.scaled_dot_product_attention` in the inputs' dtype: upstream's
  FlashAttention path asserts CUDA and its fallback casts q, k, v to bf16;
* `CausalWanModel.from_pretrained` returns the random-weight model (so `WanDiffusionWrapper`'s own
  constructor runs); the pipeline's `_initialize_kv_cache` is given this model's heads and
  head_dim (upstream writes 12 x 128) and a 21-frame capacity of this latent size (upstream writes
  32760 tokens, 21 frames of 480x832); `num_transformer_blocks` and `frame_seq_length` are set to
  this model's; its per-step `print` is silenced.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.machinery
import importlib.util
import os
import statistics
import sys
import time
import types
from dataclasses import dataclass
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

import ports
from bcjax.bench.sequential import _RandomStateDict, _to_device
from bcjax.model.config import WanConfig
from bcjax.runners import make_runner
from bcjax.schedule.flow import block_noise
from checkpoints_conv import wan as wan_conv

NUM_BLOCKS = 7
TIMED_BLOCKS = range(2, 7)  # blocks 2-6
TOLERANCE = 1e-4
HEAD_DIM = 128


@dataclass(frozen=True)
class Size:
    dim: int
    ffn_dim: int
    num_layers: int
    latent_hw: tuple[int, int]


SIZES = {
    "128x2": Size(128, 512, 2, (8, 12)),
    "512x4": Size(512, 2048, 4, (16, 16)),
    "1536x2": Size(1536, 8960, 2, (16, 16)),  # the 1.3B model's width, two of its 30 layers
}


# -- upstream, loaded from a checkout -------------------------------------------------------------


def _stand_in(name: str, attrs: dict | None = None, raising: tuple[str, ...] = ()) -> types.ModuleType:
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None)  # importlib.util.find_spec asks for it
    for a, v in (attrs or {}).items():
        setattr(mod, a, v)

    def missing(attr):
        if attr.startswith("__"):
            raise AttributeError(attr)

        def fail(*_, **__):
            raise RuntimeError(f"{name}.{attr} is a stand-in of `bcjax bench upstream`; upstream inference called it")
        return fail

    for a in raising:
        setattr(mod, a, missing(a))
    if not raising:  # any other name: a function that fails loudly if called
        vars(mod)["__getattr__"] = missing  # a module-level __getattr__ (PEP 562), on this module only
    return mod


def _load_upstream(path: str) -> types.SimpleNamespace:
    """Upstream's inference modules from a Self-Forcing checkout (see the module docstring)."""
    import torch

    for sub in ("wan/modules/causal_model.py", "pipeline/causal_inference.py", "utils/wan_wrapper.py"):
        if not os.path.isfile(os.path.join(path, sub)):
            raise SystemExit(f"--self-forcing {path}: no {sub}; expected a checkout of guandeh17/Self-Forcing")
    for pkg in ("wan", "wan/modules", "utils", "pipeline", "demo_utils"):
        mod = types.ModuleType(pkg.replace("/", "."))
        mod.__path__ = [os.path.join(path, pkg)]
        sys.modules[mod.__name__] = mod
    sys.modules["demo_utils.memory"] = _stand_in(
        "demo_utils.memory", {"gpu": torch.device("cpu"), "cpu": torch.device("cpu")},
        ("get_cuda_free_memory_gb", "move_model_to_device_with_memory_preservation", "DynamicSwapInstaller"))
    # the text encoder and the VAE: the bench passes its own (t5 asks for CUDA at import)
    for name, names in (("wan.modules.t5", ("umt5_xxl",)), ("wan.modules.vae", ("_video_vae",)),
                        ("wan.modules.tokenizers", ("HuggingfaceTokenizer",))):
        sys.modules[name] = _stand_in(name, raising=names)
    if importlib.util.find_spec("einops") is None:  # wan.modules.model imports it for a training branch
        sys.modules["einops"] = _stand_in("einops")

    def sdpa(q, k, v, **_):
        """[B, L, N, H] attention in the inputs' dtype (upstream's signature; no lens, no mask)."""
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2).contiguous()

    # upstream's modules: untyped, and patched below
    model_mod: Any = importlib.import_module("wan.modules.model")
    causal_mod: Any = importlib.import_module("wan.modules.causal_model")
    model_mod.flash_attention = sdpa
    causal_mod.attention = sdpa
    wrapper_mod = importlib.import_module("utils.wan_wrapper")
    pipeline_mod: Any = importlib.import_module("pipeline.causal_inference")
    pipeline_mod.print = lambda *a, **k: None
    return types.SimpleNamespace(torch=torch, CausalWanModel=causal_mod.CausalWanModel,
                                 WanDiffusionWrapper=wrapper_mod.WanDiffusionWrapper,
                                 CausalInferencePipeline=pipeline_mod.CausalInferencePipeline)


class _Upstream:
    """Upstream's pipeline over the bench's weights, prompt and noise; `run()` -> (latents, s per block)."""

    def __init__(self, up, cfg: WanConfig, pcfg, hw, state_dict, context: np.ndarray, noise, renoise):
        torch = self.torch = up.torch
        model = up.CausalWanModel(
            model_type="t2v", patch_size=cfg.patch_size, text_len=cfg.text_len, in_dim=cfg.in_channels, dim=cfg.dim,
            ffn_dim=cfg.ffn_dim, freq_dim=cfg.freq_dim, text_dim=cfg.text_dim, out_dim=cfg.out_channels,
            num_heads=cfg.num_heads, num_layers=cfg.num_layers, qk_norm=cfg.qk_norm,
            cross_attn_norm=cfg.cross_attn_norm, eps=cfg.eps)
        model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in state_dict.items()}, strict=True)
        model.eval().requires_grad_(False)
        pretrained = up.CausalWanModel.from_pretrained
        up.CausalWanModel.from_pretrained = classmethod(lambda cls, *a, **k: model)
        try:
            generator = up.WanDiffusionWrapper(timestep_shift=pcfg.shift, is_causal=True)
        finally:
            up.CausalWanModel.from_pretrained = pretrained
        prompt = torch.from_numpy(context)
        module_base: Any = torch.nn.Module  # torch is not typed here (an optional dependency)

        class Text(module_base):
            def forward(self, text_prompts):
                return {"prompt_embeds": prompt}

        class Latents(module_base):  # the VAE: latents back as they are (return_latents gives them)
            def decode_to_pixel(self, latent, use_cache=False):
                return latent

        args = types.SimpleNamespace(
            denoising_step_list=list(pcfg.denoising_steps), warp_denoising_step=pcfg.warp_denoising_step,
            num_frame_per_block=pcfg.block_frames, independent_first_frame=False, context_noise=pcfg.context_noise)
        pipe = up.CausalInferencePipeline(args, device="cpu", generator=generator, text_encoder=Text(), vae=Latents())
        p = cfg.tokens_per_frame(*hw)
        pipe.num_transformer_blocks, pipe.frame_seq_length = cfg.num_layers, p

        def init_kv_cache(batch_size, dtype, device):
            shape = [batch_size, pcfg.window_frames * p, cfg.num_heads, cfg.head_dim]
            pipe.kv_cache1 = [{"k": torch.zeros(shape, dtype=dtype), "v": torch.zeros(shape, dtype=dtype),
                               "global_end_index": torch.tensor([0]), "local_end_index": torch.tensor([0])}
                              for _ in range(cfg.num_layers)]

        pipe._initialize_kv_cache = init_kv_cache
        # each re-noise takes the bench's noise for (block, step) in upstream's order
        add_noise = pipe.scheduler.add_noise
        calls: list = []
        per_block = pcfg.num_steps - 1

        def bench_noise(x0, _noise, t):
            i = len(calls)
            calls.append(i)
            return add_noise(x0, renoise[i // per_block][i % per_block].reshape(x0.shape), t)

        pipe.scheduler.add_noise = bench_noise
        self.calls, self.pipe, self.noise = calls, pipe, noise
        # a block is num_steps denoising passes and one clean pass: its time ends with its last pass
        self.ends: list[float] = []
        generator.register_forward_hook(lambda *_: self.ends.append(time.perf_counter()))
        self.passes = pcfg.num_steps + 1

    def run(self):
        torch = self.torch
        self.calls.clear()
        self.ends.clear()
        with torch.no_grad():
            t0 = time.perf_counter()
            _, latents = self.pipe.inference(self.noise, ["bench"], return_latents=True)
        marks = [t0] + self.ends[self.passes - 1::self.passes]
        return latents.permute(0, 1, 3, 4, 2).numpy(), np.diff(marks)


# -- bcjax ----------------------------------------------------------------------------------------


def _bcjax_runner(cfg, pcfg, hw, params, context, key):
    pipe = make_runner(cfg, pcfg, hw)
    text = jax.block_until_ready(pipe.text_kv(params, jnp.asarray(context)))

    def run():
        times, out = [], []
        t0 = time.perf_counter()
        for _, x0 in pipe.blocks(params, text, key, num_blocks=NUM_BLOCKS):
            out.append(np.asarray(jax.block_until_ready(x0)))
            t1 = time.perf_counter()
            times.append(t1 - t0)
            t0 = t1
        return np.concatenate(out, axis=1), np.asarray(times)

    return run


# -- the comparison ------------------------------------------------------------------------------


def _compare(up, name: str, size: Size, args) -> dict:
    cfg = WanConfig(dim=size.dim, ffn_dim=size.ffn_dim, num_heads=size.dim // HEAD_DIM, num_layers=size.num_layers,
                    text_dim=args.text_dim, attention=args.attention)
    pcfg, hw = ports.get("self_forcing").pipeline, size.latent_hw
    state_dict = _RandomStateDict(cfg)
    params = _to_device(wan_conv.convert(state_dict, cfg))
    context = np.random.default_rng(2).standard_normal((1, cfg.text_len, cfg.text_dim), np.float32)
    key = jax.random.key(0)
    shape = (1, pcfg.block_frames, *hw, cfg.in_channels)
    # upstream's layout [B, F, C, H, W]; renoise[b][k] is block b's noise for sampler step k + 1
    to_torch = lambda a: up.torch.from_numpy(np.asarray(a).transpose(0, 1, 4, 2, 3).copy())
    noise = to_torch(jnp.concatenate([block_noise(key, b, 0, shape) for b in range(NUM_BLOCKS)], axis=1))
    renoise = [[to_torch(block_noise(key, b, k, shape)) for k in range(1, pcfg.num_steps)] for b in range(NUM_BLOCKS)]
    upstream = _Upstream(up, cfg, pcfg, hw, state_dict, context, noise, renoise)
    ours = _bcjax_runner(cfg, pcfg, hw, params, context, key)
    print(f"\n{name}: dim {cfg.dim} ffn {cfg.ffn_dim} heads {cfg.num_heads} layers {cfg.num_layers} | latent "
          f"{hw[0]}x{hw[1]} ({cfg.tokens_per_frame(*hw)} tokens/frame) | attention {cfg.attention}", flush=True)
    lat_up, _ = upstream.run()  # warm-up (bcjax compiles here) and the equality check
    lat_bc, _ = ours()
    err = float(np.max(np.abs(lat_up - lat_bc)))
    print(f"{name}: max |latents bcjax - upstream| = {err:.2e} over {NUM_BLOCKS} blocks (tolerance {TOLERANCE:g})",
          flush=True)
    times: dict[str, list[np.ndarray]] = {"upstream": [], "bcjax": []}  # seconds per block, per run
    for r in range(args.repeats):
        for side in (("upstream", "bcjax") if r % 2 == 0 else ("bcjax", "upstream")):
            times[side].append((upstream.run() if side == "upstream" else ours())[1])
    row = {"err": err}
    for side, runs in times.items():
        per_block = 1e3 * np.median(np.stack(runs), axis=0)
        row[side] = statistics.median(1e3 * float(np.mean(t[list(TIMED_BLOCKS)])) for t in runs)
        print(f"{name}: {side:8} ms per block 0-{NUM_BLOCKS - 1} (median of {args.repeats}): "
              + " ".join(f"{t:.1f}" for t in per_block), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="bcjax bench upstream", description=__doc__.split("\n")[0])
    ap.add_argument("--self-forcing", required=True, metavar="PATH", help="a checkout of guandeh17/Self-Forcing")
    ap.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side, interleaved")
    ap.add_argument("--attention", default="auto", choices=("auto", "dense", "xla", "chunked"),
                    help="bcjax's attention backend (CPU ones)")
    ap.add_argument("--text-dim", type=int, default=64, help="prompt embedding width (Wan's is 4096)")
    ap.add_argument("--threads", type=int, default=1, help="processors both sides run on (the first of this "
                    "process's); 0: all, unpinned")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats} must be >= 1")
    cpus = sorted(os.sched_getaffinity(0))
    if not 0 <= args.threads <= len(cpus):
        ap.error(f"--threads {args.threads}: this process may run on {len(cpus)} processors")
    if args.threads:  # before JAX sizes its thread pool by the processors it may use
        os.sched_setaffinity(0, cpus[:args.threads])
    up = _load_upstream(os.path.abspath(args.self_forcing))
    if args.threads:
        up.torch.set_num_threads(args.threads)
    print(f"device {jax.devices()} | jax {jax.__version__} | torch {up.torch.__version__} "
          f"({up.torch.get_num_threads()} threads) | processors {sorted(os.sched_getaffinity(0))} | "
          f"{NUM_BLOCKS} blocks, Self-Forcing sampler, fp32", flush=True)
    rows = {name: _compare(up, name, SIZES[name], args) for name in args.sizes}
    print("\n| size | latent | upstream ms/block (blocks 2-6) | bcjax ms/block | bcjax / upstream | max abs diff |\n"
          "|---|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        hw = SIZES[name].latent_hw
        print(f"| {name} | {hw[0]}x{hw[1]} | {r['upstream']:.1f} | {r['bcjax']:.1f} | "
              f"{r['bcjax'] / r['upstream']:.2f}x | {r['err']:.1e} |")
    bad = [name for name, r in rows.items() if not r["err"] <= TOLERANCE]
    if bad:
        print(f"latents differ by more than {TOLERANCE:g} at {', '.join(bad)}: the timings compare different "
              "computations", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
