"""The original-layout Wan converter: full key set and every shape checked, errors name the key."""

import numpy as np
import pytest

from bcjax.model import WanConfig
from checkpoints_conv import wan as wan_conv


@pytest.fixture()
def sd_np(wan_sd):
    from torch_oracle import to_numpy

    return to_numpy(wan_sd)


def test_converts_every_key_to_the_param_tree(tiny_cfg, sd_np):
    import jax

    params = wan_conv.convert(sd_np, tiny_cfg)
    expected = jax.tree_util.tree_map(lambda s: s.shape, wan_conv.param_shapes(tiny_cfg))
    got = jax.tree_util.tree_map(lambda a: a.shape, params)
    assert got == expected
    np.testing.assert_array_equal(params["blocks"]["self_attn"]["q"]["kernel"][1],
                                  sd_np["blocks.1.self_attn.q.weight"].T)
    np.testing.assert_array_equal(params["blocks"]["modulation"][0], sd_np["blocks.0.modulation"][0])


def test_prefix_is_stripped(tiny_cfg, sd_np):
    params = wan_conv.convert({"model.diffusion_model." + k: v for k, v in sd_np.items()}, tiny_cfg,
                              prefix="model.diffusion_model.")
    np.testing.assert_array_equal(params["head"]["modulation"], sd_np["head.modulation"][0])


def test_missing_key_is_named(tiny_cfg, sd_np):
    sd = dict(sd_np)
    del sd["blocks.1.cross_attn.norm_k.weight"]
    with pytest.raises(ValueError, match=r"missing key blocks\.1\.cross_attn\.norm_k\.weight \(layers \[1\]"):
        wan_conv.convert(sd, tiny_cfg)


def test_wrong_shape_is_named(tiny_cfg, sd_np):
    sd = dict(sd_np)
    sd["blocks.0.ffn.0.weight"] = np.zeros((7, tiny_cfg.dim), np.float32)
    with pytest.raises(ValueError, match=r"key blocks\.0\.ffn\.0\.weight has shape \(64, 7\)"):
        wan_conv.convert(sd, tiny_cfg)


def test_unexpected_key_and_wrong_config_are_named(tiny_cfg, sd_np):
    sd = dict(sd_np, **{"img_emb.proj.0.weight": np.zeros((3,), np.float32)})
    with pytest.raises(ValueError, match=r"unexpected key img_emb\.proj\.0\.weight"):
        wan_conv.convert(sd, tiny_cfg)
    # a 2-layer checkpoint for a 3-layer config: every block key of layer 2 is missing
    with pytest.raises(ValueError,
                       match=r"27 problems(.|\n)*missing key blocks\.2\.ffn\.0\.weight \(layers \[2\] of 3\)"):
        wan_conv.convert(sd_np, WanConfig.preset("tiny", num_layers=3))


def test_bf16_is_preserved(tiny_cfg, sd_np):
    import dataclasses

    import jax.numpy as jnp

    params = wan_conv.convert(sd_np, dataclasses.replace(tiny_cfg, param_dtype="bfloat16"))
    assert params["blocks"]["ffn_0"]["kernel"].dtype == jnp.bfloat16


def test_config_is_inferred_from_any_layout(tiny_cfg, sd_np):
    import torch
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    overrides = dict(num_heads=2, text_len=tiny_cfg.text_len, attention=tiny_cfg.attention)
    assert wan_conv.infer_config(sd_np, **overrides) == tiny_cfg
    nested = {"generator_ema": {"model." + k: v for k, v in sd_np.items()}}
    assert wan_conv.infer_config(nested, **overrides) == tiny_cfg
    diffusers_sd = convert_wan_transformer_to_diffusers({k: torch.from_numpy(v) for k, v in sd_np.items()})
    assert wan_conv.infer_config({k: v.numpy() for k, v in diffusers_sd.items()}, **overrides) == tiny_cfg
    assert wan_conv.infer_config(sd_np).num_heads == 1  # Wan's 128-channel heads: 64 // 128 -> at least 1
    with pytest.raises(ValueError, match="no key ending in patch_embedding.weight"):
        wan_conv.infer_config({"x.weight": np.zeros(3)})
