"""Quantized DiT projections through qwix (`bcjax.model.quant`): what is quantized and how, the
weight-only modes against the unquantized model on the dequantized weights (an oracle: the same
arithmetic by the plain code path), the weights+activations modes' 8-bit dots, the cascade on 5
and (5, 2) devices against one device, checkpoints stored quantized, and the bad inputs."""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from cli_helpers import one_line
from jax.sharding import PartitionSpec as P
from shared import runner

from bcjax import checkpoint, targets
from bcjax.bench.compile import contractions, dit_lowering
from bcjax.cascade import make_mesh
from bcjax.model import WanConfig, init_params, quant, text_kv
from bcjax.model.wan import forward, param_shapes
from bcjax.schedule import PipelineConfig

HW = (4, 6)
CFG = WanConfig.preset("tiny", num_heads=4, attention="xla")
PCFG = PipelineConfig(window_frames=9, sink_frames=3)
WEIGHT_ONLY = ("int8-weight", "fp8-weight")
# what absmax maps a channel's largest weight to: qwix spans int8 symmetrically as [-127.5, 127.5]
# (clipped to [-128, 127]: the largest weight is half a step off), float8_e4m3fn up to its largest, 448
QTYPE_MAX = {"int8": 127.5, "fp8": 448.0}


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0), HW)


@pytest.fixture(scope="module")
def prompt():
    return jnp.asarray(np.random.default_rng(0).standard_normal((1, CFG.text_len, CFG.text_dim)), jnp.float32)


@pytest.mark.parametrize("mode", ["int8-weight", "fp8-weight"])
def test_every_projection_is_quantized_per_output_channel_and_nothing_else(params, mode):
    qp = quant.quantize(params, mode)
    kind = mode.split("-")[0]
    for path, node in quant.kernels(qp["blocks"]):
        k = node["kernel"]
        full = params["blocks"]
        for key in path:
            full = full[key]
        w = np.asarray(full["kernel"])  # [L, in, out]
        assert k[quant.QVALUE].dtype == jnp.dtype(quant.qtype(mode)) and k[quant.QVALUE].shape == w.shape
        assert k[quant.SCALE].shape == (w.shape[0], 1, w.shape[2])  # one scale per layer and output channel
        # absmax calibration: each channel's largest weight lands on the type's largest value
        np.testing.assert_allclose(np.asarray(k[quant.SCALE])[:, 0], np.abs(w).max(axis=1) / QTYPE_MAX[kind], rtol=1e-6)
        deq = np.asarray(k[quant.QVALUE].astype(jnp.float32) * k[quant.SCALE])
        if kind == "int8":  # rounding to the nearest level: at most half a step off
            assert (np.abs(deq - w) <= np.asarray(k[quant.SCALE]) / 2 + 1e-7).all(), path
        else:  # e4m3: 3 mantissa bits, relative error at most 2^-4 (above the subnormals)
            big = np.abs(w) > np.asarray(k[quant.SCALE]) * 2.0**-6
            assert (np.abs(deq - w)[big] <= np.abs(w)[big] * 2.0**-4 + 1e-7).all(), path
    # embeddings, norms, modulation, biases and the head are the unquantized arrays themselves
    assert qp["embed"] is params["embed"] and qp["head"] is params["head"]
    for name in ("modulation", "norm3"):
        assert qp["blocks"][name] is params["blocks"][name] or np.array_equal(
            jax.tree_util.tree_leaves(qp["blocks"][name])[0], jax.tree_util.tree_leaves(params["blocks"][name])[0])
    assert jax.tree_util.tree_structure(param_shapes(dataclasses.replace(CFG, quant=mode))) == \
        jax.tree_util.tree_structure(qp)


@pytest.mark.parametrize("mode", WEIGHT_ONLY)
def test_weight_only_runs_the_dequantized_weights_through_the_plain_model(params, prompt, mode):
    """Oracle: qwix's weight-only path equals the unquantized code on the dequantized weights."""
    qc, qp = dataclasses.replace(CFG, quant=mode), quant.quantize(params, mode)
    x = jax.random.normal(jax.random.key(1), (1, 3, *HW, CFG.in_channels))
    t, ids = jnp.array([[1000.0, 750.0, 500.0]]), jnp.arange(3)
    got, kv = forward(qc, qp, x, t, text_kv(qc, qp, prompt), ids)
    deq = quant.dequantized(qp)
    want, kv_want = forward(CFG, deq, x, t, text_kv(CFG, deq, prompt), ids)
    np.testing.assert_allclose(got, want, atol=2e-5)
    np.testing.assert_allclose(kv.k, kv_want.k, atol=2e-5)
    full, _ = forward(CFG, params, x, t, text_kv(CFG, params, prompt), ids)
    assert 0 < float(jnp.abs(got - full).max()) < (0.05 if mode == "int8-weight" else 0.3)


def test_weights_and_activations_contract_in_int8(params, prompt):
    """int8: every projection's matmul compiles to an s8 x s8 dot (XLA:CPU here; the TPU and GPU
    compilers in test_compile_targets), and the error stays near the weight-only one."""
    rows = {}
    for mode in ("none", "int8-weight", "int8"):
        cfg = dataclasses.replace(CFG, quant=mode)
        rows[mode] = contractions(dit_lowering("sequential", cfg, PCFG, HW, None)().compile().as_text())
    assert "s8" not in rows["none"] and "s8" not in rows["int8-weight"]
    n_s8 = int(rows["int8"].split("s8 x ")[1].split(",")[0])
    assert n_s8 >= len(quant.PROJECTIONS), rows  # q k v o twice and the FFN's two, per compiled layer body
    x = jax.random.normal(jax.random.key(1), (1, 3, *HW, CFG.in_channels))
    t, ids = jnp.array([[1000.0, 750.0, 500.0]]), jnp.arange(3)
    err = {}
    full, _ = forward(CFG, params, x, t, text_kv(CFG, params, prompt), ids)
    for mode in ("int8-weight", "int8"):
        qc, qp = dataclasses.replace(CFG, quant=mode), quant.quantize(params, mode)
        err[mode] = float(jnp.abs(forward(qc, qp, x, t, text_kv(qc, qp, prompt), ids)[0] - full).max())
    assert err["int8-weight"] < err["int8"] < 3 * err["int8-weight"], err


def test_the_cascade_on_5_and_5x2_devices_equals_one_device_with_quantized_weights(params, prompt):
    """Weight-only: the token split and the `model` split of the scales change nothing (the bound
    of the unquantized case, tests/test_token_split.py)."""
    qc = dataclasses.replace(CFG, quant="int8-weight")
    qp = quant.quantize(params, "int8-weight")
    key = jax.random.key(3)
    out = {}
    for name, mesh in (("1", None), ("5x1", make_mesh(5, 1)), ("5x2", make_mesh(5, 2))):
        run = runner(qc, PCFG, HW, "P4", "causal", mesh)
        out[name] = np.asarray(run.generate(qp, run.text_kv(qp, prompt), key, num_blocks=5))
    assert np.abs(out["5x1"] - out["1"]).max() < 1e-5
    assert np.abs(out["5x2"] - out["1"]).max() < 1e-5
    # unquantized params are quantized where they are placed (quantize-at-load)
    run = runner(qc, PCFG, HW, "P4", "causal", make_mesh(5, 1))
    np.testing.assert_array_equal(np.asarray(run.generate(params, run.text_kv(params, prompt), key, num_blocks=5)),
                                  out["5x1"])


def test_a_checkpoint_stored_quantized_restores_as_stored_and_split_over_model(params, tmp_path):
    qc = dataclasses.replace(CFG, quant="int8-weight")
    qp = quant.quantize(params, "int8-weight")
    checkpoint.save(str(tmp_path / "q"), {"dit": (qc, qp)}, {"layout": "test"})
    checkpoint.save(str(tmp_path / "f"), {"dit": (CFG, params)}, {"layout": "test"})
    meta = json.loads((tmp_path / "q" / "config.json").read_text())
    assert meta["stored_quant"] == {"dit": "int8"} and "quant" not in meta["parts"]["dit"]
    cfg, got = checkpoint.restore(str(tmp_path / "q"))
    assert cfg.quant == "int8-weight"
    jax.tree_util.tree_map(np.testing.assert_array_equal, got, qp)
    # the weights+activations mode of the stored type runs the same arrays; quantize-at-load of the
    # unquantized checkpoint gives them too
    cfg, on_mesh = checkpoint.restore(str(tmp_path / "q"), quant="int8", mesh=make_mesh(5, 2))
    assert cfg.quant == "int8"
    ffn_0, ffn_2 = on_mesh["blocks"]["ffn_0"]["kernel"], on_mesh["blocks"]["ffn_2"]["kernel"]
    assert ffn_0["qvalue"].sharding.spec == ffn_0["scale"].sharding.spec == P(None, None, "model")  # column split
    assert ffn_2["qvalue"].sharding.spec == P(None, "model", None) and ffn_2["scale"].sharding.spec == P()  # row split
    assert ffn_0["qvalue"].addressable_shards[0].data.shape == (CFG.num_layers, CFG.dim, CFG.ffn_dim // 2)
    _, loaded = checkpoint.restore(str(tmp_path / "f"), quant="int8-weight")
    jax.tree_util.tree_map(np.testing.assert_array_equal, loaded, qp)
    with pytest.raises(ValueError, match=r"stored quantized as int8 .*--quant fp8 asks for fp8"):
        checkpoint.restore(str(tmp_path / "q"), quant="fp8")
    with pytest.raises(ValueError, match=r"stored quantized as int8 .*asks for unquantized weights"):
        checkpoint.restore(str(tmp_path / "q"), quant="none")


def test_quantizing_quantized_weights_to_another_type_names_both(params):
    qp = quant.quantize(params, "fp8-weight")
    assert quant.quantize(qp, "fp8") is qp  # the same storage: nothing to do
    with pytest.raises(ValueError, match=r"stored quantized as fp8 .*quant='int8' asks for int8"):
        quant.quantize(qp, "int8")
    with pytest.raises(ValueError, match=r"quant='int4'"):
        quant.check("int4")


def test_params_that_are_not_quantized_are_named_not_traced_into(params, prompt):
    with pytest.raises(ValueError, match=r"WanConfig.quant='int8' but these DiT params are not quantized"):
        text_kv(dataclasses.replace(CFG, quant="int8"), params, prompt)


def test_without_qwix_the_error_names_the_extra(params, monkeypatch):
    monkeypatch.setitem(sys.modules, "qwix", None)  # as if not installed
    with pytest.raises(ValueError, match=r'pip install "\.\[quant\]"'):
        quant.quantize(params, "int8")


def test_fp8_matmuls_are_refused_on_a_tpu_naming_it():
    targets.check_quant(targets.get("h100"), "fp8")
    targets.check_quant(targets.get("v5e-8"), "fp8-weight")  # 8-bit storage, bf16 matmuls: anywhere
    with pytest.raises(ValueError, match=r"target v5e-8 .* has no fp8 matmuls; use --quant fp8-weight"):
        targets.check_quant(targets.get("v5e-8"), "fp8")


def test_the_cli_names_both_types_in_one_line(params, tmp_path, capsys):
    from bcjax.cli import main
    from bcjax.toyworld.evaluate import model_path

    src = model_path("lineage-3f")
    cfg, toy = checkpoint.restore(src)
    provenance = checkpoint.read_config(src)["provenance"]
    qc = dataclasses.replace(cfg, quant="int8-weight")
    checkpoint.save(str(tmp_path / "toy-int8"), {"dit": (qc, quant.quantize(toy, "int8-weight"))}, provenance)
    out = str(tmp_path / "s.mp4")
    assert main(["stream", "--prompts", "red east fast@0", "--blocks", "2", "--out", out, "--checkpoint",
                 str(tmp_path / "toy-int8"), "--quant", "fp8"]) == 2
    one_line(capsys, "stored quantized as int8", "fp8")


def test_bench_quant_prints_each_modes_error_per_layer_and_block(capsys):
    from bcjax.bench import quant as bench_quant

    assert bench_quant.main(["--preset", "tiny", "--latent-hw", "4", "6", "--blocks", "2", "--quant",
                             "int8-weight"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| layer")
            and not line.startswith("| block")]
    assert len(rows) == 2 + 2 + 2, out  # 2 layers deep, each layer alone, 2 blocks
    for line in rows:  # every cell a measured max / mean, max >= mean > 0
        for cell in line.strip("|").split("|")[1:]:
            hi, lo = (float(v) for v in cell.split("/"))
            assert hi >= lo > 0, line


def test_the_quant_study_pairs_each_mode_with_bf16_on_the_same_samples():
    from bcjax.toyworld import quant_study
    from bcjax.toyworld.study import mean_ci

    rng = np.random.default_rng(0)
    base = {f: rng.normal(size=6) for f, _, _ in quant_study.COLUMNS}
    shifted = {f: v + 0.5 + 0.01 * rng.normal(size=6) for f, v in base.items()}
    table = quant_study.rows({"none": {"sequential": base}, "int8": {"sequential": shifted}})
    assert [(r["mode"], r["setting"]) for r in table] == [("bf16", "sequential"), ("int8", "sequential")]
    for f, _, _ in quant_study.COLUMNS:
        assert table[0][f] == mean_ci(base[f])
        mean, ci = table[1][f]
        assert (mean, ci) == mean_ci(shifted[f] - base[f]) and abs(mean - 0.5) < 0.02 and ci < 0.05  # paired
    assert "[+0.50 +- 0.01*]" in quant_study.markdown("m", table)
