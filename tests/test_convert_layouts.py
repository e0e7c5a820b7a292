"""One converter per upstream DiT checkpoint layout, each fed a tiny file written in that layout.

Every layout is built from the same original-layout `wan_sd` fixture, so every conversion must
equal the plain `checkpoints_conv.wan.convert` of it. The diffusers layout is produced by
diffusers itself (`convert_wan_transformer_to_diffusers`, `save_pretrained` sharding), the
independent oracle for our inverse rename table.
"""

import dataclasses
import json
import re

import chex
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from checkpoints_conv import causvid, diffusers_wan, io, krea, longlive, self_forcing
from checkpoints_conv import wan as wan_conv

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

# Every nn.Linear inside a CausalWanAttentionBlock: LongLive's LoRA target_modules.
_LORA_TARGETS = [f"{a}.{p}" for a in ("self_attn", "cross_attn") for p in "qkvo"] + ["ffn.0", "ffn.2"]


@pytest.fixture(scope="module")
def ref(tiny_cfg, wan_sd):
    """The plain conversion every layout must reproduce."""
    from torch_oracle import to_numpy

    return wan_conv.convert(to_numpy(wan_sd), tiny_cfg)


def _prefixed(sd, prefix="model."):
    return {prefix + k: v for k, v in sd.items()}


def _save_safetensors(sd, path):
    safetensors_torch.save_file({k: v.contiguous() for k, v in sd.items()}, str(path))


# ---- Self-Forcing / CausVid ------------------------------------------------------------------


def test_self_forcing_takes_ema_by_default_and_strips_wrappers(tiny_cfg, wan_sd, ref, tmp_path):
    # generator_ema as FSDP can leave it: `_fsdp_wrapped_module.` inside every block key
    ema = {re.sub(r"^(blocks\.\d+\.)", r"\1_fsdp_wrapped_module.", k): v for k, v in wan_sd.items()}
    ckpt = {"generator": _prefixed({k: v + 1 for k, v in wan_sd.items()}), "generator_ema": _prefixed(ema),
            "critic": {"model.head.head.weight": torch.zeros(3)}}
    torch.save(ckpt, tmp_path / "self_forcing_dmd.pt")
    chex.assert_trees_all_equal(self_forcing.convert(tmp_path / "self_forcing_dmd.pt", tiny_cfg), ref)
    plain = self_forcing.convert(tmp_path / "self_forcing_dmd.pt", tiny_cfg, ema=False)
    np.testing.assert_allclose(plain["head"]["head"]["bias"], ref["head"]["head"]["bias"] + 1, rtol=1e-6)


def test_causvid_reads_generator(tiny_cfg, wan_sd, ref, tmp_path):
    torch.save({"generator": _prefixed(wan_sd), "critic": {}}, tmp_path / "model.pt")
    chex.assert_trees_all_equal(causvid.convert(tmp_path / "model.pt", tiny_cfg), ref)
    with pytest.raises(ValueError, match=r"no 'generator_ema' dict \(top-level keys: \['critic', 'generator'\]\)"
                                         r".*pass ema=False"):
        causvid.convert(tmp_path / "model.pt", tiny_cfg, ema=True)


def test_generator_dicts_absent_names_top_level_keys(tiny_cfg, wan_sd, tmp_path):
    torch.save({"critic": _prefixed(wan_sd), "step": 600}, tmp_path / "critic_only.pt")
    with pytest.raises(ValueError, match=re.escape(
            f"Self-Forcing checkpoint {tmp_path / 'critic_only.pt'} has no 'generator_ema' dict "
            "(top-level keys: ['critic', 'step'])")):
        self_forcing.convert(tmp_path / "critic_only.pt", tiny_cfg)
    with pytest.raises(ValueError, match=r"looks like a bare state dict.*wan\.convert"):
        self_forcing.convert(_prefixed(wan_sd), tiny_cfg)


# ---- LongLive: base + LoRA -------------------------------------------------------------------


def _longlive_split(wan_sd, rank=4, alpha=8.0, seed=1):
    """(base, lora) whose merge W - delta + (alpha / rank) B @ A is exactly wan_sd's W again."""
    g = torch.Generator().manual_seed(seed)
    base, lora = dict(wan_sd), {}
    blocks = sorted({int(m[1]) for k in wan_sd if (m := re.match(r"blocks\.(\d+)\.", k))})
    for i in blocks:
        for target in _LORA_TARGETS:
            module = f"blocks.{i}.{target}"
            w = wan_sd[module + ".weight"]
            a = torch.randn(rank, w.shape[1], generator=g) * 0.1  # [r, in]
            b = torch.randn(w.shape[0], rank, generator=g) * 0.1  # [out, r]
            base[module + ".weight"] = w - (alpha / rank) * (b @ a)
            # peft.get_peft_model_state_dict key: the PeftModel wraps generator.model
            lora[f"base_model.model.{module}.lora_A.weight"] = a
            lora[f"base_model.model.{module}.lora_B.weight"] = b
    return base, lora


def test_longlive_merges_lora_into_base(tiny_cfg, wan_sd, ref, tmp_path):
    base, lora = _longlive_split(wan_sd)
    torch.save({"generator": _prefixed(base), "critic": {}}, tmp_path / "longlive_base.pt")
    torch.save({"generator_lora": lora, "critic_lora": {}, "step": 3000}, tmp_path / "lora.pt")
    merged = longlive.convert(tmp_path / "longlive_base.pt", tmp_path / "lora.pt", tiny_cfg, rank=4, alpha=8)
    chex.assert_trees_all_close(merged, ref, atol=1e-6, rtol=0)
    unmerged = wan_conv.convert(
        self_forcing.strip_wrappers(io.read_state_dict(tmp_path / "longlive_base.pt", "generator")), tiny_cfg)
    assert np.abs(unmerged["blocks"]["ffn_2"]["kernel"] - ref["blocks"]["ffn_2"]["kernel"]).max() > 1e-2

    # a bare adapter dict with peft's in-model names (`lora_A.default.weight`), rank inferred
    live = {k.replace(".weight", ".default.weight"): v for k, v in lora.items()}
    chex.assert_trees_all_close(longlive.convert(tmp_path / "longlive_base.pt", live, tiny_cfg, alpha=8), ref,
                                atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match=r"LoRA alpha is not recorded .*rank 256, alpha 256"):
        longlive.convert(tmp_path / "longlive_base.pt", tmp_path / "lora.pt", tiny_cfg)
    with pytest.raises(ValueError, match=r"self_attn\.q\.lora_A\.weight has rank 4; expected 8"):
        longlive.convert(tmp_path / "longlive_base.pt", tmp_path / "lora.pt", tiny_cfg, rank=8, alpha=8)


def test_longlive_lora_target_missing_from_base_is_named(tiny_cfg, wan_sd, tmp_path):
    base, lora = _longlive_split(wan_sd)
    lora["base_model.model.blocks.0.self_attn.qkv.lora_A.weight"] = torch.zeros(4, tiny_cfg.dim)
    lora["base_model.model.blocks.0.self_attn.qkv.lora_B.weight"] = torch.zeros(3 * tiny_cfg.dim, 4)
    lora["base_model.model.blocks.1.ffn.0.lora_B.weight"] = torch.zeros(7, 4)
    with pytest.raises(ValueError, match=r"2 problems(.|\n)*"
                       r"base_model\.model\.blocks\.0\.self_attn\.qkv\.lora_A\.weight "
                       r"targets blocks\.0\.self_attn\.qkv\.weight, "
                       r"which the base checkpoint lacks(.|\n)*"
                       r"lora_B \(7, 4\) do not make a delta of blocks\.1\.ffn\.0\.weight's shape \(128, 64\)"):
        longlive.convert({"generator": _prefixed(base)}, {"generator_lora": lora}, tiny_cfg, alpha=8)


# ---- Krea ------------------------------------------------------------------------------------


def test_krea_safetensors(tiny_cfg, wan_sd, ref, tmp_path):
    _save_safetensors(_prefixed(wan_sd), tmp_path / "krea-realtime-video-14b.safetensors")
    chex.assert_trees_all_equal(krea.convert(tmp_path / "krea-realtime-video-14b.safetensors", tiny_cfg), ref)
    chex.assert_trees_all_equal(krea.convert(wan_sd, tiny_cfg), ref)  # unprefixed, in memory


# ---- diffusers -------------------------------------------------------------------------------


def _diffusers_sd(wan_sd):
    from diffusers.loaders.single_file_utils import convert_wan_transformer_to_diffusers

    return convert_wan_transformer_to_diffusers({k: v.clone() for k, v in wan_sd.items()})


def test_diffusers_single_file_matches_plain_conversion_and_oracle(tiny_cfg, wan_sd, ref, oracle, tmp_path):
    from bcjax.model import forward, text_kv

    sd = _diffusers_sd(wan_sd)
    assert "blocks.0.norm2.weight" in sd and "blocks.0.ffn.net.0.proj.weight" in sd  # really diffusers names
    _save_safetensors(sd, tmp_path / "diffusion_pytorch_model.safetensors")
    params = diffusers_wan.convert(tmp_path / "diffusion_pytorch_model.safetensors", tiny_cfg)
    chex.assert_trees_all_equal(params, ref)

    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 3, 4, 6, tiny_cfg.in_channels)).astype(np.float32)
    ctx = rng.standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)).astype(np.float32)
    t = np.full((1, 3), 750.0, np.float32)
    p = jax.tree_util.tree_map(jnp.asarray, params)
    ours, _ = forward(tiny_cfg, p, jnp.asarray(x), jnp.asarray(t), text_kv(tiny_cfg, p, jnp.asarray(ctx)),
                      jnp.arange(3))
    want = oracle(x, t[:, 0], ctx)
    assert np.abs(np.asarray(ours) - want).max() <= 1e-4
    assert np.abs(want).max() > 0.1


def test_diffusers_sharded_folder(tiny_cfg, wan_sd, ref, tmp_path):
    sd = _diffusers_sd(wan_sd)
    names = sorted(sd)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": names[: len(names) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": names[len(names) // 2:]}
    folder = tmp_path / "Wan2.1-T2V-1.3B-Diffusers" / "transformer"
    folder.mkdir(parents=True)
    for shard, keys in shards.items():
        _save_safetensors({k: sd[k] for k in keys}, folder / shard)
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map}))
    chex.assert_trees_all_equal(diffusers_wan.convert(folder, tiny_cfg), ref)
    chex.assert_trees_all_equal(diffusers_wan.convert(folder.parent, tiny_cfg), ref)  # pipeline root
    chex.assert_trees_all_equal(krea.convert(folder, tiny_cfg), ref)  # Krea's HF transformer/ folder route

    # a shard the index names but the folder lacks
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError,
                       match=re.escape(str(folder / "diffusion_pytorch_model-00002-of-00002.safetensors"))):
        diffusers_wan.convert(folder, tiny_cfg)


def test_diffusers_save_pretrained_folder(tiny_cfg, ref, oracle, tmp_path):
    """The exact files diffusers writes: save_pretrained's shards and index json."""
    oracle.model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="150KB")
    assert len(list(tmp_path.glob("diffusion_pytorch_model-*.safetensors"))) >= 2
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    chex.assert_trees_all_equal(diffusers_wan.convert(tmp_path, tiny_cfg), ref)


def test_diffusers_errors_name_diffusers_keys(tiny_cfg, wan_sd):
    sd = {k: v.numpy() for k, v in _diffusers_sd(wan_sd).items()}
    del sd["blocks.1.norm2.weight"]  # Wan's norm3
    sd["blocks.0.attn2.to_out.0.weight"] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match=r"diffusers-layout checkpoint does not match(.|\n)*"
                       r"key blocks\.0\.attn2\.to_out\.0\.weight has shape \(3, 3\)(.|\n)*"
                       r"missing key blocks\.1\.norm2\.weight \(layers \[1\] of 2\)"):
        diffusers_wan.convert(sd, tiny_cfg)
    with pytest.raises(ValueError, match=r"holds original Wan-layout keys \['blocks\.0\.norm3\.weight'\]"):
        diffusers_wan.convert({**sd, "blocks.0.norm3.weight": np.ones(tiny_cfg.dim, np.float32)}, tiny_cfg)


# ---- bf16 and the reader ---------------------------------------------------------------------


def test_bf16_safetensors_and_pt_stay_bf16(tiny_cfg, wan_sd, ref, tmp_path):
    cfg16 = dataclasses.replace(tiny_cfg, param_dtype="bfloat16")
    sd16 = {k: v.to(torch.bfloat16) for k, v in wan_sd.items()}
    want = jax.tree_util.tree_map(lambda a: a.astype(ml_dtypes.bfloat16), ref)  # both round to nearest even

    _save_safetensors(_prefixed(sd16), tmp_path / "krea16.safetensors")
    read = io.read_state_dict(tmp_path / "krea16.safetensors")
    assert read["model.blocks.0.ffn.0.weight"].dtype == np.dtype(ml_dtypes.bfloat16)
    np.testing.assert_array_equal(read["model.head.modulation"].astype(np.float32),
                                  sd16["head.modulation"].float().numpy())
    params = krea.convert(tmp_path / "krea16.safetensors", cfg16)
    assert params["blocks"]["ffn_0"]["kernel"].dtype == np.dtype(ml_dtypes.bfloat16)
    chex.assert_trees_all_equal(params, want)

    torch.save({"generator_ema": _prefixed(sd16)}, tmp_path / "sf16.pt")
    assert (io.load(tmp_path / "sf16.pt")["generator_ema"]["model.patch_embedding.weight"].dtype
            == np.dtype(ml_dtypes.bfloat16))
    chex.assert_trees_all_equal(self_forcing.convert(tmp_path / "sf16.pt", cfg16), want)


def test_reader_errors_name_the_path(tiny_cfg, tmp_path):
    for fn in (io.read_state_dict, lambda p: self_forcing.convert(p, tiny_cfg), lambda p: krea.convert(p, tiny_cfg),
               lambda p: diffusers_wan.convert(p, tiny_cfg), lambda p: longlive.convert(p, p, tiny_cfg, alpha=1)):
        with pytest.raises(FileNotFoundError, match=re.escape(f"checkpoint {tmp_path / 'nope.pt'} does not exist")):
            fn(tmp_path / "nope.pt")
    (tmp_path / "weights.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=re.escape(f"checkpoint {tmp_path / 'weights.npz'}: unknown extension '.npz'")):
        io.load(tmp_path / "weights.npz")
    (tmp_path / "cut.safetensors").write_bytes((1000).to_bytes(8, "little") + b"{}")
    with pytest.raises(ValueError, match=r"cut\.safetensors is truncated: header of 1000 bytes"):
        io.load(tmp_path / "cut.safetensors")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty has no \.safetensors files"):
        io.load(tmp_path / "empty")
    torch.save({"generator": {"w": torch.zeros(2)}, "step": 1}, tmp_path / "nested.pt")
    with pytest.raises(KeyError, match=r"nested\.pt\['generator'\] has no key 'model'; its keys: \['w'\]"):
        io.read_state_dict(tmp_path / "nested.pt", "generator", "model")
    with pytest.raises(ValueError, match=r"is not a flat state dict: entries \['generator', 'step'\]"):
        io.read_state_dict(tmp_path / "nested.pt")
