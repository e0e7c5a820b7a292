"""One adaptation step at real size: the optimizer step of one teacher-forced tick, on the
generation mesh.

The teacher's trajectory is precomputed by the sequential pipeline (no gradient) and fed one tick
at a time, so the step holds one tick's forward and backward (each DiT layer rematerialised), not
K + 1 caches. Its inputs are exactly what that tick needs:

    adapt_step(state, params, text, key, num_blocks, tick_state, target) -> (state, loss)

* state: `TrainState` (the factors, float32, and the optimizer state), donated;
* params: the frozen base weights in their stored dtype (never differentiated);
* text: the prompt's cross-attention K/V (`text_kv`);
* key, num_blocks: the generation's noise key and length (the tick re-noises from them);
* tick_state: `CascadeState` of the tick as the teacher forces it (`teacher.forced_state`): each
  in-flight slot's teacher x0 of its previous stage, and the teacher's clean cache;
* target: [M, B, bf, H, W, C] the teacher's x0 of each slot (`teacher.forced_targets`).

Sharding (`AdaptStep` on a ('tokens', 'model') mesh): the tick's own shard_map path
(`TickProgram._distribute`). Weights, text K/V and the cache by `Layout` (heads and FFN columns
over `model`); the factors by `tensor_parallel.lora_specs` (A whole and B column-split for
column-split kernels, A row-split and B whole for row-split ones). Inside the shard_map every
device computes the same loss (the tick all-gathers its flow over `tokens`), so with
`check_vma=False` its gradient is that of the sum of every device's copy: the step psums each
factor's gradient over the axes that replicate it (`tokens` always, `model` for the factors kept
whole) and divides by the device count. The optimizer update (global-norm clipping, AdamW) runs
outside the shard_map on the global factors, so the norm spans every shard.
"""

from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

from bcjax.adapt.teacher import tick_errors
from bcjax.adapt.train import AdaptConfig, TrainState, apply_grads, make_optimizer
from bcjax.cascade.tick import CascadeState, TickSpec
from bcjax.model import lora
from bcjax.model.tensor_parallel import Layout
from bcjax.names import MODEL, TOKENS


def loss_and_grads(spec: TickSpec, factors, params, text, key, num_blocks, tick_state: CascadeState, target,
                   axis: str | None = None, model_axis: str | None = None, factor_specs=None):
    """(loss, gradient of the factors) of one teacher-forced tick: the mean over its denoising
    slots of the x0 error. Under shard_map (axis, model_axis set): every device's figures are the
    global ones (see the module docstring; factor_specs says which factors are split on `model`)."""

    def loss(f):
        s, c = tick_errors(spec, lora.adapted(params, f, spec.cfg.compute_dtype), text, key, num_blocks, tick_state,
                           target, axis, model_axis)
        return s / jnp.maximum(c, 1)

    value, grads = jax.value_and_grad(loss)(factors)
    if axis is None and model_axis is None:
        return value, grads
    axes = tuple(a for a in (axis, model_axis) if a is not None)
    copies = 1
    for a in axes:
        copies *= jax.lax.psum(1, a)

    def reduce(g, s):  # psum over the axes along which this factor is replicated
        over = tuple(a for a in axes if a not in tuple(s))
        return jax.lax.psum(g, over) / copies if over else g / copies

    return value, jax.tree_util.tree_map(reduce, grads, factor_specs, is_leaf=lambda x: isinstance(x, P))


@dataclasses.dataclass
class AdaptStep:
    """The adaptation step of a cascade's tick program (`make_runner(...).tick_program`): its
    TickSpec (rematerialised), layout and mesh; `lower` compiles it ahead from `abstract_inputs`."""

    program: Any  # a `bcjax.cascade.TickProgram` without an adapter
    acfg: AdaptConfig

    def __post_init__(self):
        prog = self.program
        self.spec = dataclasses.replace(prog.spec, remat=True)
        self.layout: Layout = prog.layout
        self.mesh = prog.mesh
        self.opt = make_optimizer(self.acfg)
        self._factors = jax.eval_shape(lambda: lora.init(self.spec.cfg, jax.random.key(0), self.acfg.rank))
        self._grads = self._mapped()
        opt, grads_fn = self.opt, self._grads

        def step(state, params, text, key, num_blocks, tick_state, target):
            loss, grads = grads_fn(state.lora, params, text, key, num_blocks, tick_state, target)
            return apply_grads(opt, state, grads), loss

        self._step = jax.jit(step, donate_argnums=(0,))

    def _mapped(self):
        """(factors, params, text, key, num_blocks, tick_state, target) -> (loss, grads): on the
        mesh, the tick's shard_map over ('tokens', 'model') with the gradients reduced."""
        if self.mesh is None:
            return partial(loss_and_grads, self.spec)
        lay = self.layout
        fspecs = self.factor_specs
        tick_spec = CascadeState(P(), lay.cache, P(), P())  # type: ignore[arg-type]  # specs, not arrays
        model_axis = MODEL if lay.model > 1 else None
        return jax.shard_map(
            partial(loss_and_grads, self.spec, axis=TOKENS, model_axis=model_axis, factor_specs=fspecs),
            mesh=self.mesh, in_specs=(fspecs, lay.params, lay.text, P(), P(), tick_spec, P()),
            out_specs=(P(), fspecs), check_vma=False)

    @property
    def factor_specs(self):
        return self.layout.lora(self._factors)

    def __call__(self, state: TrainState, params, text, key, num_blocks, tick_state: CascadeState, target):
        """(state, loss): one AdamW step of the factors on one teacher-forced tick (state donated)."""
        return self._step(state, params, text, key, num_blocks, tick_state, target)

    def loss_and_grads(self, factors, params, text, key, num_blocks, tick_state: CascadeState, target):
        """(loss, gradient of the factors) the step applies, jitted (no update)."""
        return jax.jit(self._grads)(factors, params, text, key, num_blocks, tick_state, target)

    def place_state(self, state: TrainState) -> TrainState:
        """A TrainState on the mesh: the factors and their optimizer moments by `factor_specs`."""
        if self.mesh is None:
            return state
        from bcjax.model.tensor_parallel import place

        return jax.tree_util.tree_map(lambda a, s: place(a, self.mesh, s), state, self._state_specs(state))

    def _state_specs(self, state):
        fspecs = self.factor_specs
        opt_specs = optax.tree_map_params(self.opt, lambda _, s: s, state.opt_state, fspecs,
                                          transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
        return TrainState(P(), fspecs, opt_specs)  # type: ignore[arg-type]  # specs shaped like the state

    def abstract_inputs(self, batch: int = 1) -> tuple:
        """(state, params, text, key, num_blocks, tick_state, target) as ShapeDtypeStructs placed
        as the step takes them; nothing of model size is allocated."""
        lay, prog = self.layout, self.program
        state = jax.eval_shape(lambda f: TrainState(jnp.int32(0), f, self.opt.init(f)), self._factors)
        if self.mesh is None:
            state = lay.abstract(state)
        else:
            state = jax.tree_util.tree_map(lambda a, s: lay.abstract(a, s), state, self._state_specs(state))
        params, text, key, num_blocks, tick_state = prog.abstract_inputs(batch)
        target = lay.abstract(jax.ShapeDtypeStruct(tick_state.x.shape, jnp.float32))
        return state, params, text, key, num_blocks, tick_state, target

    def lower(self, *inputs) -> jax.stages.Lowered:
        """The step lowered for these inputs, concrete or abstract (`abstract_inputs`)."""
        return self._step.lower(*inputs)


def make_adapt_step(cfg, pcfg, latent_hw, acfg: AdaptConfig, mesh=None) -> AdaptStep:
    """The adaptation step for a model, sampler and latent size on `mesh` (None: one device)."""
    from bcjax.runners import make_runner

    return AdaptStep(make_runner(cfg, pcfg, latent_hw, acfg.stagger, acfg.mask, mesh).tick_program, acfg)
