"""Checkpoints hold the architecture only: dtype, param_dtype and attention are the run's choice
(flags, `restore` arguments), never written to config.json; old files that hold them still load."""

import dataclasses
import json

import jax
import jax.numpy as jnp

from bcjax import checkpoint
from bcjax.cli import _numerics, _setup, build_parser
from bcjax.toyworld.evaluate import SHIPPED, load_model

RUNTIME = set(checkpoint.RUNTIME_FIELDS)


def _save(tmp_path, tiny_cfg, tiny_params, dtype=jnp.float32):
    cfg = dataclasses.replace(tiny_cfg, param_dtype=jnp.dtype(dtype).name, dtype=jnp.dtype(dtype).name)
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), tiny_params)
    checkpoint.save(str(tmp_path / "ckpt"), {"dit": (cfg, params)}, {"layout": "test"})
    return tmp_path / "ckpt"


def test_save_writes_no_runtime_fields(tmp_path, tiny_cfg, tiny_params):
    dst = _save(tmp_path, tiny_cfg, tiny_params)
    written = json.loads((dst / "config.json").read_text())["parts"]["dit"]
    assert not RUNTIME & set(written) and written["dim"] == tiny_cfg.dim


def test_shipped_toy_checkpoint_holds_no_runtime_fields():
    import os

    with open(os.path.join(SHIPPED, "config.json")) as f:
        assert not RUNTIME & set(json.load(f)["parts"]["dit"])


def test_old_config_with_runtime_fields_loads_and_the_caller_decides(tmp_path, tiny_cfg, tiny_params):
    dst = _save(tmp_path, tiny_cfg, tiny_params, jnp.bfloat16)
    meta = json.loads((dst / "config.json").read_text())
    meta["parts"]["dit"].update(dtype="float32", param_dtype="bfloat16", attention="chunked")  # as older versions wrote
    (dst / "config.json").write_text(json.dumps(meta))
    cfg, params = checkpoint.restore(str(dst), "dit")
    # the old keys are ignored: the weights' dtype, compute in it, the default backend
    assert (cfg.param_dtype, cfg.dtype, cfg.attention) == ("bfloat16", "bfloat16", "auto")
    assert jax.tree_util.tree_leaves(params)[0].dtype == jnp.bfloat16
    cfg, _ = checkpoint.restore(str(dst), "dit", dtype="float32", attention="dense")
    assert (cfg.param_dtype, cfg.dtype, cfg.attention) == ("bfloat16", "float32", "dense")
    assert dataclasses.replace(cfg, dtype="float32", param_dtype="float32", attention="xla") == tiny_cfg


def test_attention_and_dtype_flags_reach_the_model_config():
    for command in (["generate"], ["stream", "--prompts", "red east fast@0"], ["serve"]):
        args = build_parser().parse_args([*command, "--attention", "chunked", "--dtype", "bfloat16"])
        assert _numerics(args) == {"dtype": "bfloat16", "attention": "chunked"}
        assert _numerics(build_parser().parse_args(command)) == {}  # left out: the checkpoint's / config's defaults
    _, cfg, *_ = _setup(build_parser().parse_args(["generate", "--attention", "chunked", "--dtype", "bfloat16"]))
    assert (cfg.attention, cfg.dtype) == ("chunked", "bfloat16")
    model = load_model(attention="chunked", dtype="bfloat16")  # the path `bcjax stream` and the toy `serve` take
    assert (model.cfg.attention, model.cfg.dtype, model.cfg.param_dtype) == ("chunked", "bfloat16", "float32")
