"""Block Cascading: stagger, tick, scan and mesh (run one through `bcjax.runners.make_runner`)."""

from bcjax.cascade.cascade import TickProgram, make_mesh
from bcjax.cascade.masks import tick_key_mask
from bcjax.cascade.tick import CascadeState, tick

__all__ = ["CascadeState", "TickProgram", "make_mesh", "tick", "tick_key_mask"]
