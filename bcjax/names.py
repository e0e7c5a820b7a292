"""The names a user picks a run by, defined once: the runners and masks check them, argparse and
the server's page (its hello message) offer them. No imports, so the CLI's --help stays fast."""

# stagger schedules (`bcjax.schedule.stagger.make_stagger`; any "P<k>", "P<k>-no-clean" or an int
# stride works too). "-no-clean": no clean pass, a block's cache entry is its last denoising pass's K/V
SCHEDULES = ("sequential", "P1", "P2", "P4", "P4-no-clean")
# attention among the in-flight blocks of a tick (`bcjax.cascade.masks`); the last two are
# bidirectional with one training-free restriction each
WINDOWS = ("causal", "bidirectional", "bidirectional-clean-causal", "bidirectional-windowed")
# the window a cascade runs unless told otherwise (Cascade, `bcjax generate`/`stream`, the live
# page): the one that keeps frames clean on both toy models (docs/toyworld-study.md). On
# lineage-3f, the model made the real models' way, P4-bidirectional tracks motion better in long
# and interactive streams but makes more broken frames in every setting; on causal-1f it loses on
# every measure (-6.7 dB, a third of the crisp frames)
DEFAULT_WINDOW = "causal"
# the grid the toy-world harness and study run unless told otherwise: the paper's schedules and
# windows (the variants above are picked by name)
GRID_SCHEDULES = ("sequential", "P1", "P2", "P4")
GRID_WINDOWS = ("causal", "bidirectional")
# the KV cache at a prompt switch (`bcjax.pipeline.recache`)
POLICIES = ("no-recache", "recache", "recache-causal")
# RoPE positions of a stream (`bcjax.schedule.config.PipelineConfig.positions`)
POSITIONS = ("absolute", "rolling")
# the toy-world models embedded in the package (`bcjax demo --model`, `bcjax eval toyworld --model`,
# `bcjax serve --checkpoint NAME`, the study): "causal-1f" (trained block-causally from scratch;
# 1-frame blocks; a 3-frame window) and "lineage-3f", made the way the real ones are (a
# bidirectional many-step base -> ODE init -> teacher forcing -> self-rollout; 3-frame blocks;
# LongLive's 12-frame window with a 3-frame sink; `bcjax.toyworld.lineage`)
TOY_MODELS = ("causal-1f", "lineage-3f")
DEFAULT_TOY_MODEL = "causal-1f"
