"""The names a user picks a run by, defined once: the runners and masks check them, argparse and
the server's page (its hello message) offer them, the type checker holds code to the Literal types.
Only `typing` is imported, so the CLI's --help stays fast.

Each word means one thing (docs/concepts/glossary.md): a block's *stage* is how far it is
denoised; the *stagger* is when blocks enter (how many are in flight); the *mask* is what the
in-flight blocks of a tick see of each other; the *window* is the cache span a query attends to
(`PipelineConfig.window_frames`: sink + rolling frames); the *tokens* mesh axis splits a tick's
tokens over devices; the *denoising schedule* is the sampler's sigmas; a *prompt schedule* is
which prompt is in force from which block."""

from typing import Literal, get_args

# the mesh axis that splits a tick's query tokens over devices (`bcjax.cascade.tokens`; the
# sequential stagger on several devices is context parallelism) and the one that splits heads and
# FFN (`bcjax.model.tensor_parallel`)
MeshAxis = Literal["tokens", "model"]
TOKENS: MeshAxis = "tokens"
MODEL: MeshAxis = "model"
MESH_AXES: tuple[MeshAxis, ...] = get_args(MeshAxis)

# staggers (`bcjax.schedule.stagger.make_stagger`; any "P<k>", "P<k>-no-clean" or an int stride
# works too). "-no-clean": no clean pass, a block's cache entry is its last denoising pass's K/V
StaggerName = Literal["sequential", "P1", "P2", "P4", "P4-no-clean"]
STAGGERS: tuple[StaggerName, ...] = get_args(StaggerName)
SEQUENTIAL: StaggerName = "sequential"
# what the in-flight blocks of a tick see of each other (`bcjax.cascade.masks`); the last two are
# bidirectional with one training-free restriction each
Mask = Literal["causal", "bidirectional", "bidirectional-clean-causal", "bidirectional-windowed"]
MASKS: tuple[Mask, ...] = get_args(Mask)
# the mask a cascade runs unless told otherwise (`make_runner`, `bcjax generate`/`stream`, the live
# page): the one that keeps frames clean on both toy models (docs/toyworld-study.md). On
# lineage-3f, the model made the real models' way, P4-bidirectional tracks motion better in long
# and interactive streams but makes more broken frames in every setting; on causal-1f it loses on
# every measure (-6.7 dB, a third of the crisp frames)
DEFAULT_MASK: Mask = "causal"


def as_mask(name: str) -> Mask:
    """`name` as a Mask, or a ValueError naming the choices (where a mask arrives as text)."""
    for m in get_args(Mask):
        if name == m:
            return m
    raise ValueError(f"mask {name!r}: expected one of {MASKS}")

# the grid the toy-world harness and study run unless told otherwise: the paper's staggers and
# masks (the variants above are picked by name)
GRID_STAGGERS = ("sequential", "P1", "P2", "P4")
GRID_MASKS = ("causal", "bidirectional")
# the KV cache at a prompt switch (`bcjax.pipeline.recache`)
Policy = Literal["no-recache", "recache", "recache-causal"]
POLICIES: tuple[Policy, ...] = get_args(Policy)
# RoPE positions of a stream (`bcjax.schedule.config.PipelineConfig.positions`)
Positions = Literal["absolute", "rolling"]
POSITIONS: tuple[Positions, ...] = get_args(Positions)
# what a block attends to besides itself (`bcjax.schedule.config.PipelineConfig.context`): a cache
# written by a clean pass, Krea's context rebuilt before every block, or a cache written by the
# last denoising pass (no clean pass)
Context = Literal["clean-pass", "rebuild", "last-pass"]
CONTEXTS: tuple[Context, ...] = get_args(Context)
# attention backends (`bcjax.model.attention`; `WanConfig.attention`, `--attention`): "auto" picks by
# platform; "dense" (alias "xla"), "chunked", "splash" (TPU), "pallas_gpu" / "cudnn" (GPU), "tokamax"
# (GPU or TPU: openxla/tokamax's flash kernels, the `tokamax` extra), and the kernels run anywhere:
# by the Pallas interpreter, or for tokamax (no interpreter) its XLA reference
Backend = Literal["auto", "dense", "xla", "chunked", "splash", "pallas_gpu", "cudnn", "tokamax", "splash-interpret",
                  "pallas_gpu-interpret", "tokamax-interpret"]
BACKENDS: tuple[Backend, ...] = get_args(Backend)
# quantized DiT weights and matmuls (`bcjax.model.quant`, through qwix; `WanConfig.quant`, `--quant`):
# "-weight" modes store int8/fp8 weights and compute in the compute dtype; "int8"/"fp8" quantize each
# matmul's input per token too, so the contraction runs at 8 bits
Quant = Literal["none", "int8-weight", "int8", "fp8-weight", "fp8"]
QUANTS: tuple[Quant, ...] = get_args(Quant)


def as_quant(name: str) -> Quant:
    """`name` as a Quant, or a ValueError naming the choices (where a mode arrives as text)."""
    for q in get_args(Quant):
        if name == q:
            return q
    raise ValueError(f"quant={name!r}: expected one of {QUANTS}")

# the upstream pipelines ported (`ports/`, one module each: its sampler, block, window and sink)
PortName = Literal["self_forcing", "causvid", "longlive", "krea_14b", "krea_14b_clean_pass"]
PORTS: tuple[PortName, ...] = get_args(PortName)
# what one runner step compiles (`bcjax.runners`): the cascade's tick, the sequential stagger's
# fused block, Krea's loop (its rebuilt context and VAE round trip)
Program = Literal["tick", "block", "krea"]
PROGRAMS: tuple[Program, ...] = get_args(Program)
# the toy-world models embedded in the package (`bcjax demo --model`, `bcjax eval toyworld --model`,
# `bcjax serve --checkpoint NAME`, the study): "causal-1f" (trained block-causally from scratch;
# 1-frame blocks; a 3-frame window) and "lineage-3f", made the way the real ones are (a
# bidirectional many-step base -> ODE init -> teacher forcing -> self-rollout; 3-frame blocks;
# LongLive's 12-frame window with a 3-frame sink; `bcjax.toyworld.lineage`)
TOY_MODELS = ("causal-1f", "lineage-3f")
DEFAULT_TOY_MODEL = "causal-1f"


def as_backend(name: str) -> Backend:
    """`name` as a Backend, or a ValueError naming the choices (where a backend arrives as text:
    a stored `bcjax tune` winner)."""
    for b in get_args(Backend):
        if name == b:
            return b
    raise ValueError(f"attention backend {name!r}: expected one of {BACKENDS}")
