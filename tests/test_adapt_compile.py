"""The real-size adaptation step (`bcjax.adapt.step`, issue 36): one optimizer step of one
teacher-forced tick lowers from abstract inputs and compiles on a ('tokens', 'model') mesh of fake
CPU devices with the gradient reduced over `tokens`, and the sharded step's loss, gradients and
update equal the one-device step's."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.adapt import AdaptConfig, teacher_trajectory
from bcjax.adapt.step import loss_and_grads, make_adapt_step
from bcjax.adapt.teacher import forced_state, forced_targets
from bcjax.adapt.train import init_state
from bcjax.bench.hlo import hlo_collectives
from bcjax.cascade import make_mesh
from bcjax.model import WanConfig, init_params, lora, text_kv
from bcjax.model.kv_cache import init_cache
from bcjax.schedule.config import PipelineConfig

CFG = WanConfig.preset("tiny", in_channels=4, out_channels=4, text_len=4, attention="dense")
PCFG = PipelineConfig(block_frames=1, window_frames=3)
HW = (4, 4)
ACFG = AdaptConfig(stagger="P4", mask="bidirectional", rank=4, blocks=6, lr=1e-2, warmup=1, steps=4)


def test_the_step_lowers_from_abstract_inputs_and_reduces_over_tokens():
    """(2, 2) mesh: compiled from ShapeDtypeStructs alone; the HLO all-reduces over `tokens` (the
    factors' gradient) and over `model` (the row-parallel sublayers)."""
    mesh = make_mesh(2, 2, devices=jax.devices()[:4])
    step = make_adapt_step(CFG, PCFG, HW, ACFG, mesh)
    compiled = step.lower(*step.abstract_inputs(2)).compile()
    coll = hlo_collectives(compiled.as_text(), mesh)
    assert coll["tokens"]["ops"] > 0 and coll["model"]["ops"] > 0, coll
    assert "all-reduce" in compiled.as_text()


@pytest.mark.parametrize("shape", [(2, 1), (2, 2)])
def test_sharded_step_equals_one_device(shape):
    """Loss, gradients and the updated factors of one teacher-forced tick, on a mesh and on one
    device (B random, so every factor has a gradient), to 1e-5."""
    params = init_params(CFG, jax.random.key(0), HW)
    text = text_kv(CFG, params, jax.random.normal(jax.random.key(1), (2, CFG.text_len, CFG.text_dim)))
    key = jax.random.key(3)
    cache = init_cache(CFG, 2, PCFG.cache_frames, CFG.tokens_per_frame(*HW))
    traj = teacher_trajectory(CFG, PCFG, params, text, key, ACFG.blocks, HW, cache)
    one = make_adapt_step(CFG, PCFG, HW, ACFG)
    tau = 5  # P4: every slot busy
    tick_state, target = forced_state(one.spec, traj, tau, 0), forced_targets(one.spec, traj, tau)
    state = init_state(CFG, ACFG)
    leaves, tree = jax.tree_util.tree_flatten(state.lora)
    b = [0.1 * jax.random.normal(jax.random.fold_in(key, i), a.shape) for i, a in enumerate(leaves)]
    state = state._replace(lora=jax.tree_util.tree_unflatten(tree, b))
    nb = jnp.int32(ACFG.blocks)

    ref_loss, ref_grads = jax.jit(loss_and_grads, static_argnums=0)(one.spec, state.lora, params, text, key, nb,
                                                                   tick_state, target)
    assert float(ref_loss) > 0
    ref_state, loss1 = one(jax.tree_util.tree_map(jnp.copy, state), params, text, key, nb, tick_state, target)
    np.testing.assert_allclose(float(loss1), float(ref_loss), rtol=1e-6)

    mesh = make_mesh(*shape, devices=jax.devices()[:shape[0] * shape[1]])
    sharded = make_adapt_step(CFG, PCFG, HW, ACFG, mesh)
    lay = sharded.layout
    inputs = (sharded.place_state(state), lay.place_params(params), lay.place_text(text), key, nb,
              tick_state._replace(cache=lay.place_cache(tick_state.cache)),
              target)
    # the gradients themselves, as the step reduces them
    _, grads = sharded.loss_and_grads(jax.tree_util.tree_map(jnp.copy, inputs[0].lora), *inputs[1:])
    new, loss = sharded(*inputs)
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-5)
    # the update from the reduced gradients: AdamW's first step moves each factor by ~lr * sign(grad)
    for a, r in zip(jax.tree_util.tree_leaves(new.lora), jax.tree_util.tree_leaves(ref_state.lora), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(r), atol=1e-5)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree_util.tree_leaves(ref_grads))
    for g, r in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(ref_grads), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=1e-5 * scale)
    assert lora.rank(new.lora) == ACFG.rank


def test_an_adapter_runs_under_tensor_parallelism():
    """The cascade with an adapter on a (2, 2) mesh (factors split like their kernels) generates
    what it generates on one device."""
    from bcjax.adapt import store
    from bcjax.runners import make_runner

    params = init_params(CFG, jax.random.key(0), HW)
    text = text_kv(CFG, params, jax.random.normal(jax.random.key(1), (1, CFG.text_len, CFG.text_dim)))
    factors = lora.init(CFG, jax.random.key(2), 4)
    leaves, tree = jax.tree_util.tree_flatten(factors)
    factors = jax.tree_util.tree_unflatten(tree, [0.2 * jax.random.normal(jax.random.fold_in(jax.random.key(4), i),
                                                                          a.shape) for i, a in enumerate(leaves)])
    adapter = store.Adapter(factors, {**store.describe(CFG, PCFG, params, 4, "P4", "bidirectional"), "complete": True})

    def generate(mesh):
        runner = make_runner(CFG, PCFG, HW, "P4", "bidirectional", mesh, adapter=adapter)
        return np.asarray(runner.generate(params, text, jax.random.key(3), num_blocks=4))

    np.testing.assert_allclose(generate(make_mesh(2, 2, devices=jax.devices()[:4])), generate(None), atol=1e-5)
