"""The names a user picks a run by, defined once: the runners and masks check them, argparse and
the server's page (its hello message) offer them. No imports, so the CLI's --help stays fast."""

# stagger schedules (`bcjax.schedule.stagger.make_stagger`; any "P<k>" or an int stride works too)
SCHEDULES = ("sequential", "P1", "P2", "P4")
# attention among the in-flight blocks of a tick (`bcjax.cascade.masks`)
WINDOWS = ("causal", "bidirectional")
# the KV cache at a prompt switch (`bcjax.pipeline.recache`)
POLICIES = ("no-recache", "recache", "recache-causal")
# RoPE positions of a stream (`bcjax.schedule.config.PipelineConfig.positions`)
POSITIONS = ("absolute", "rolling")
