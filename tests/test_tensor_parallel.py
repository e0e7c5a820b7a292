"""Tensor-parallel weights (the `model` mesh axis): split latents equal one device's, tensors live
split by heads, orbax restores straight into the split layout, and bad sizes are named."""

import jax
import pytest
from jax.sharding import PartitionSpec as P

from bcjax.cascade import make_mesh
from bcjax.model import WanConfig
from bcjax.model.tensor_parallel import MODEL, param_specs
from bcjax.model.wan import param_shapes
from bcjax.pipeline import PipelineConfig
from bcjax.runners import make_runner


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """tensor_parallel_case.py's figures (all 10 of the suite's devices)."""
    if jax.device_count() < 10:
        pytest.skip("needs 10 devices (tests/shared.py gives the suite 10)")
    import tensor_parallel_case

    return tensor_parallel_case.report(str(tmp_path_factory.mktemp("tp") / "ckpt"))


@pytest.mark.slow
def test_split_meshes_give_one_devices_latents(report):
    assert report["devices"] == 10
    expected = {f"{kind} {mesh}" for kind in ("sequential", "causal", "bidirectional")
                for mesh in ("1x2", "5x1", "5x2")}
    expected.add("krea 1x2")  # Krea's own loop
    assert set(report["max_abs"]) == expected
    for case, err in report["max_abs"].items():
        assert err <= 1e-5, (case, err)


@pytest.mark.slow
def test_tensors_live_split_by_heads(report):
    # tiny with 4 heads of 16 on model = 2: each device holds 2 heads of q, the cache and the text K/V
    assert report["restored_q_spec"] == "P(None, None, 'model')"
    assert report["restored_q_shard"] == [2, 64, 32]
    assert report["cache_shape"][3] == 4 and report["cache_shard"][3] == 2
    assert report["cache_shard"][:3] == report["cache_shape"][:3]
    assert report["text_shard"][3] == 2


@pytest.mark.slow
def test_restored_bytes_per_device_follow_the_specs(report):
    cfg = WanConfig.preset("tiny", num_heads=4, attention="xla")
    shapes, specs = param_shapes(cfg), param_specs(param_shapes(cfg))
    per_device = sum(a.size * a.dtype.itemsize // (2 if MODEL in s else 1)
                     for a, s in zip(jax.tree_util.tree_leaves(shapes),
                                     jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, P)), strict=True))
    assert report["full_bytes"] == sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(shapes))
    assert report["restored_bytes_per_device"] == per_device < report["full_bytes"]


@pytest.mark.slow
def test_compiled_collectives_are_the_formulas_bytes(report):
    """Every byte the compiled tick moves is the `tokens` all-gather of K/V (this device's heads) or a
    model psum, as `bcjax.bench.comm.tick_bytes` states."""
    for mesh, axes in (("5x1", {"tokens"}), ("1x2", {"model"}), ("5x2", {"tokens", "model"})):
        got = report["comm"][mesh]
        assert set(got["hlo"]) == set(got["formula"]) == axes, mesh
        for axis in axes:
            assert got["hlo"][axis] == pytest.approx(got["formula"][axis], rel=1e-9), (mesh, axis)
    # model = 2 halves the heads each `tokens` all-gather moves
    assert got["formula"]["tokens"][0] < report["comm"]["5x1"]["formula"]["tokens"][0]


def test_specs_split_heads_and_ffn_and_replicate_the_rest():
    specs = param_specs(param_shapes(WanConfig.preset("tiny")))
    blocks = specs["blocks"]
    for attn in ("self_attn", "cross_attn"):
        for proj in "qkv":
            assert blocks[attn][proj] == {"kernel": P(None, None, MODEL), "bias": P(None, MODEL)}
        assert blocks[attn]["o"] == {"kernel": P(None, MODEL, None), "bias": P()}
        assert blocks[attn]["norm_q"]["scale"] == blocks[attn]["norm_k"]["scale"] == P(None, MODEL)
    assert blocks["ffn_0"] == {"kernel": P(None, None, MODEL), "bias": P(None, MODEL)}
    assert blocks["ffn_2"] == {"kernel": P(None, MODEL, None), "bias": P()}
    assert blocks["modulation"] == P() and blocks["norm3"]["scale"] == P()
    assert all(s == P() for s in jax.tree_util.tree_leaves(
        {"embed": specs["embed"], "head": specs["head"]}, is_leaf=lambda x: isinstance(x, P)))


def test_a_model_size_that_does_not_divide_is_named_before_compiling():
    if jax.device_count() < 3:
        pytest.skip("needs 3 devices")
    cfg = WanConfig.preset("tiny", attention="xla")  # 2 heads, FFN 128
    mesh = make_mesh(1, 3)
    with pytest.raises(ValueError, match=r"'model' = 3 must divide num_heads = 2 and ffn_dim = 128"
                                         r".*does not divide num_heads and ffn_dim"):
        make_runner(cfg, PipelineConfig(), (4, 6), "P4", "bidirectional", mesh, program="tick")
    with pytest.raises(ValueError, match=r"'model' = 3 must divide num_heads = 2"):
        make_runner(cfg, PipelineConfig(), (4, 6), mesh=mesh, program="block")
    with pytest.raises(ValueError, match=r"num_heads = 40 and ffn_dim = 13824.*does not divide num_heads$"):
        make_mesh(1, 3, cfg=WanConfig.preset("wan2.1-14b"))
    make_mesh(1, 2, cfg=WanConfig.preset("wan2.1-14b"))  # 2 divides both
    with pytest.raises(ValueError, match="ffn_dim = 8960.*does not divide ffn_dim$"):
        make_mesh(1, 3, cfg=WanConfig.preset("wan2.1-1.3b", num_heads=12))
