"""bcjax checkpoints: orbax round trip (bf16 kept), restore onto a mesh, atomic writes, clear errors."""

import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import pytest

from bcjax import checkpoint
from bcjax.cascade import make_mesh
from bcjax.text.umt5 import UMT5Config
from bcjax.text.umt5 import init_params as text_init


def _trees_equal(a, b):
    same = jax.tree_util.tree_map(lambda x, y: x.dtype == y.dtype and bool(jnp.array_equal(x, y)), a, b)
    return all(jax.tree_util.tree_leaves(same))


def test_round_trip_onto_a_mesh_keeps_bf16(tmp_path, tiny_cfg, tiny_params):
    cfg16 = dataclasses.replace(tiny_cfg, param_dtype="bfloat16", dtype="bfloat16")
    dit16 = jax.tree_util.tree_map(lambda a: a.astype(jnp.bfloat16), tiny_params)
    tcfg = UMT5Config.preset("tiny")
    text = text_init(tcfg, jax.random.key(0))
    tok = tmp_path / "spiece.model"
    tok.write_bytes(b"not really a sentencepiece model")
    dst = tmp_path / "ckpt"
    checkpoint.save(str(dst), {"dit": (cfg16, dit16), "text": (tcfg, text)}, {"layout": "wan", "source": "test"},
                    files={"tokenizer/spiece.model": str(tok)})
    meta = checkpoint.read_config(str(dst))
    # config.json holds the architecture; its run-time fields are the class defaults until `restore`
    runtime = dict(dtype="float32", param_dtype="float32")
    assert meta["configs"]["dit"] == dataclasses.replace(cfg16, **runtime, attention="auto")
    assert meta["configs"]["text"] == dataclasses.replace(tcfg, **runtime)
    assert meta["provenance"]["layout"] == "wan" and "bcjax" in meta["provenance"]
    assert (dst / "tokenizer" / "spiece.model").read_bytes() == tok.read_bytes()

    mesh = make_mesh(5) if jax.device_count() >= 5 else None
    cfg, params = checkpoint.restore(str(dst), "dit", mesh=mesh, attention=cfg16.attention)
    assert cfg == cfg16 and _trees_equal(params, dit16)  # param_dtype and dtype: the weights' bf16
    leaf = params["blocks"]["ffn_0"]["kernel"]
    assert leaf.dtype == jnp.bfloat16
    if mesh is not None:
        assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 5
    _, text_back = checkpoint.restore(str(dst), "text")
    assert _trees_equal(text_back, text)


def test_existing_destination_is_kept_and_errors_are_named(tmp_path, tiny_cfg, tiny_params):
    dst = tmp_path / "ckpt"
    checkpoint.save(str(dst), {"dit": (tiny_cfg, tiny_params)}, {"layout": "wan"})
    with pytest.raises(FileExistsError, match="exists"):
        checkpoint.save(str(dst), {"dit": (tiny_cfg, tiny_params)}, {"layout": "wan"})
    # a failed save (params that do not fit the config) leaves the old checkpoint untouched, no temp folders
    bad = dataclasses.replace(tiny_cfg, num_layers=3)
    with pytest.raises(ValueError, match="part 'dit': parameters do not match"):
        checkpoint.save(str(dst), {"dit": (bad, tiny_params)}, {"layout": "wan"}, overwrite=True)
    assert sorted(os.listdir(tmp_path)) == ["ckpt"]
    assert checkpoint.read_config(str(dst))["configs"]["dit"] == dataclasses.replace(tiny_cfg, attention="auto")
    with pytest.raises(ValueError, match="holds parts \\['dit'\\]; no 'vae'"):
        checkpoint.restore(str(dst), "vae")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        checkpoint.read_config(str(tmp_path))
    meta = json.loads((dst / "config.json").read_text())
    meta["parts"]["dit"]["mystery"] = 1
    (dst / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"WanConfig has no field\(s\) \['mystery'\]"):
        checkpoint.read_config(str(dst))
