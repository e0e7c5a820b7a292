"""The names a user picks a run by, defined once: the runners and masks check them, argparse and
the server's page (its hello message) offer them, the type checker holds code to the Literal types.
Only `typing` is imported, so the CLI's --help stays fast."""

from typing import Literal, get_args

# stagger schedules (`bcjax.schedule.stagger.make_stagger`; any "P<k>", "P<k>-no-clean" or an int
# stride works too). "-no-clean": no clean pass, a block's cache entry is its last denoising pass's K/V
Schedule = Literal["sequential", "P1", "P2", "P4", "P4-no-clean"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
# attention among the in-flight blocks of a tick (`bcjax.cascade.masks`); the last two are
# bidirectional with one training-free restriction each
Window = Literal["causal", "bidirectional", "bidirectional-clean-causal", "bidirectional-windowed"]
WINDOWS: tuple[str, ...] = get_args(Window)
# the window a cascade runs unless told otherwise (`make_runner`, `bcjax generate`/`stream`, the live
# page): the one that keeps frames clean on both toy models (docs/toyworld-study.md). On
# lineage-3f, the model made the real models' way, P4-bidirectional tracks motion better in long
# and interactive streams but makes more broken frames in every setting; on causal-1f it loses on
# every measure (-6.7 dB, a third of the crisp frames)
DEFAULT_WINDOW: Window = "causal"


def as_window(name: str) -> Window:
    """`name` as a Window, or a ValueError naming the choices (where a window arrives as text)."""
    for w in get_args(Window):
        if name == w:
            return w
    raise ValueError(f"window {name!r}: expected one of {WINDOWS}")

# the grid the toy-world harness and study run unless told otherwise: the paper's schedules and
# windows (the variants above are picked by name)
GRID_SCHEDULES = ("sequential", "P1", "P2", "P4")
GRID_WINDOWS = ("causal", "bidirectional")
# the KV cache at a prompt switch (`bcjax.pipeline.recache`)
Policy = Literal["no-recache", "recache", "recache-causal"]
POLICIES: tuple[str, ...] = get_args(Policy)
# RoPE positions of a stream (`bcjax.schedule.config.PipelineConfig.positions`)
Positions = Literal["absolute", "rolling"]
POSITIONS: tuple[str, ...] = get_args(Positions)
# what one runner step compiles (`bcjax.runners`): the cascade's tick, the sequential schedule's
# fused block, Krea's loop (its rebuilt context and VAE round trip)
Program = Literal["tick", "block", "krea"]
PROGRAMS: tuple[str, ...] = get_args(Program)
# the toy-world models embedded in the package (`bcjax demo --model`, `bcjax eval toyworld --model`,
# `bcjax serve --checkpoint NAME`, the study): "causal-1f" (trained block-causally from scratch;
# 1-frame blocks; a 3-frame window) and "lineage-3f", made the way the real ones are (a
# bidirectional many-step base -> ODE init -> teacher forcing -> self-rollout; 3-frame blocks;
# LongLive's 12-frame window with a 3-frame sink; `bcjax.toyworld.lineage`)
TOY_MODELS = ("causal-1f", "lineage-3f")
DEFAULT_TOY_MODEL = "causal-1f"
