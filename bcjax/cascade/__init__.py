"""Block Cascading: stagger, tick, scan and mesh."""

from bcjax.cascade.cascade import Cascade, generate, make_mesh
from bcjax.cascade.masks import tick_key_mask
from bcjax.cascade.tick import CascadeState, tick

__all__ = ["Cascade", "CascadeState", "generate", "make_mesh", "tick", "tick_key_mask"]
