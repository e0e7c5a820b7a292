"""The runner seam: `make_runner` builds the one `Runner` type every caller uses (CLI, server,
toy world, benches, `bcjax.generate`); `make_mesh` the ('tokens', 'model') mesh it runs on."""

from bcjax.cascade.cascade import make_mesh
from bcjax.runners.runner import Runner, choose_program, generate, make_runner
from bcjax.stepping import Block, Step, StepState

__all__ = ["Block", "Runner", "Step", "StepState", "choose_program", "generate", "make_mesh", "make_runner"]
