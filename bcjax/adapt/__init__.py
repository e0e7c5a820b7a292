"""Cascade adaptation without data (issue 36): a low-rank adapter trained so that a cascade's tick
reproduces the model's own sequential output (`bcjax adapt`).

`teacher`: the sequential trajectory and the teacher-forced tick loss; `train`: the optax/orbax
training loop; `step`: one real-size step (one teacher-forced tick) on the generation mesh;
`store`: the adapter folder, its metadata and the mismatch checks; `toy`: prompts
of the toy world. The adapter's forward is qwix's LoRA on the block projections
(`bcjax.model.lora`), run by the cascade's tick only (`make_runner(..., adapter=)`).
"""

from bcjax.adapt.step import AdaptStep, make_adapt_step
from bcjax.adapt.store import Adapter, load
from bcjax.adapt.teacher import Trajectory, forced_tick_loss, teacher_trajectory
from bcjax.adapt.train import AdaptConfig, adapt

__all__ = ["AdaptConfig", "AdaptStep", "Adapter", "Trajectory", "adapt", "forced_tick_loss", "load", "make_adapt_step",
           "teacher_trajectory"]
