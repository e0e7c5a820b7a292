"""The Wan2.1 VAE against diffusers' AutoencoderKLWan (tiny, random, fp32), both checkpoint layouts,
streamed decode == whole-clip decode with one compilation, and errors that name the problem."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.compile_count import CompileCounter
from bcjax.vae import VAEConfig, decode, decode_step, encode, init_decode_state
from checkpoints_conv import wan_vae as vae_conv

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

LATENT_HW = (4, 4)


@pytest.fixture(scope="module")
def cfg():
    return VAEConfig.preset("tiny")


def _to_wan_key(key: str) -> str:
    """diffusers name -> Wan `.pth` name for Wan2.1's block structure (2 resnets per encoder level,
    3 + a resample per decoder level); checked below against diffusers' own Wan -> diffusers map."""
    for src, dst in [(r"\.norm1\.gamma$", ".residual.0.gamma"), (r"\.conv1\.", ".residual.2."),
                     (r"\.norm2\.gamma$", ".residual.3.gamma"), (r"\.conv2\.", ".residual.6."),
                     (r"\.conv_shortcut\.", ".shortcut.")]:
        key = re.sub(src, dst, key)  # leaves of residual blocks only: nothing else is named so in diffusers
    m = re.match(r"decoder\.up_blocks\.(\d)\.(resnets\.(\d)|upsamplers\.0)\.(.*)", key)
    if m:
        flat = 4 * int(m.group(1)) + (int(m.group(3)) if m.group(3) else 3)
        return f"decoder.upsamples.{flat}.{m.group(4)}"
    for src, dst in [(r"^quant_conv\.", "conv1."), (r"^post_quant_conv\.", "conv2."),
                     (r"^(\w+)\.conv_in\.", r"\1.conv1."), (r"^(\w+)\.norm_out\.", r"\1.head.0."),
                     (r"^(\w+)\.conv_out\.", r"\1.head.2."), (r"^(\w+)\.mid_block\.resnets\.0\.", r"\1.middle.0."),
                     (r"^(\w+)\.mid_block\.attentions\.0\.", r"\1.middle.1."),
                     (r"^(\w+)\.mid_block\.resnets\.1\.", r"\1.middle.2."),
                     (r"^encoder\.down_blocks\.", "encoder.downsamples.")]:
        key = re.sub(src, dst, key)
    return key


@pytest.fixture(scope="module")
def oracle(cfg):
    """(vae, diffusers-layout numpy state dict, Wan-layout numpy state dict), same random weights."""
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    torch.manual_seed(0)
    vae = AutoencoderKLWan(
        base_dim=cfg.base_dim, z_dim=cfg.z_dim, dim_mult=list(cfg.dim_mult), num_res_blocks=cfg.num_res_blocks,
        temperal_downsample=list(cfg.temperal_downsample), latents_mean=list(cfg.latents_mean),
        latents_std=list(cfg.latents_std),
    ).float().eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):  # norm scales and biases away from their 1 / 0 init
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
            else:
                p.mul_(1.5)
    sd = {k: v.detach().numpy().copy() for k, v in vae.state_dict().items()}
    wan_sd = {_to_wan_key(k): v for k, v in sd.items()}
    # the Wan-layout dict is what diffusers' own converter turns back into this exact model
    back = convert_wan_vae_to_diffusers(wan_sd)
    assert set(back) == set(sd) and all(back[k] is sd[k] for k in sd)
    return vae, sd, wan_sd


@pytest.fixture(scope="module")
def params(cfg, oracle):
    return jax.tree_util.tree_map(jnp.asarray, vae_conv.convert_diffusers(oracle[1], cfg))


def _latents(cfg, frames, batch=1, seed=0):
    return np.random.default_rng(seed).standard_normal((batch, frames, *LATENT_HW, cfg.z_dim)).astype(np.float32)


def _oracle_decode(cfg, vae, z):
    raw = z * np.asarray(cfg.latents_std, np.float32) + np.asarray(cfg.latents_mean, np.float32)
    with torch.no_grad():
        out = vae.decode(torch.from_numpy(raw).permute(0, 4, 1, 2, 3)).sample
    return out.permute(0, 2, 3, 4, 1).numpy()


def test_whole_clip_decode_matches_diffusers(cfg, oracle, params):
    vae = oracle[0]
    z = _latents(cfg, 7, batch=2)  # frame 0 + two blocks of 3
    ref = _oracle_decode(cfg, vae, z)
    out = np.asarray(decode(cfg, params, jnp.asarray(z)))
    assert out.shape == ref.shape == (2, 25, 32, 32, 3)
    assert np.mean(np.abs(ref) < 0.999) > 0.3, "random weights saturate the clamp; the test would see little"
    err = np.abs(out - ref).max()
    print(f"whole-clip decode vs diffusers: max abs err {err:.2e}, unclamped {np.mean(np.abs(ref) < 0.999):.0%}")
    assert err <= 1e-4


def test_streamed_blocks_equal_whole_clip_and_compile_once(cfg, params):
    z = _latents(cfg, 9, seed=1)  # three cascade blocks of 3 latent frames
    whole = np.asarray(decode(cfg, params, jnp.asarray(z)))
    state = init_decode_state(cfg, 1, LATENT_HW)
    chunks = []
    with CompileCounter() as cc:
        for b in range(3):
            state, video = decode_step(cfg, params, state, z[:, 3 * b: 3 * b + 3])
            chunks.append(np.asarray(video))
    assert cc.count == 1, f"decode_step compiled {cc.count} times over 3 blocks"
    assert [c.shape[1] for c in chunks] == [12, 12, 12]
    assert int(state.frames) == 9
    pad = cfg.first_chunk_padding
    np.testing.assert_array_equal(chunks[0][:, :pad], 0.0)
    streamed = np.concatenate(chunks, axis=1)[:, pad:]
    assert streamed.shape == whole.shape == (1, 33, 32, 32, 3)
    err = np.abs(streamed - whole).max()
    print(f"streamed (blocks of 3) vs whole-clip decode: max abs err {err:.2e}")
    assert err <= 1e-5


def test_chunked_scan_decode_equals_whole_clip(cfg, params):
    z = jnp.asarray(_latents(cfg, 7, seed=2))
    whole = np.asarray(decode(cfg, params, z))
    per_two = np.asarray(decode(cfg, params, z, chunk=2))  # 3 scanned steps + a 1-frame remainder
    assert np.abs(per_two - whole).max() <= 1e-5


def test_wan_layout_matches_diffusers_layout(cfg, oracle, params):
    vae, _, wan_sd = oracle
    from_wan = vae_conv.convert_wan(wan_sd, cfg)
    assert vae_conv.detect_layout(wan_sd) == "wan"
    jax.tree_util.tree_map(np.testing.assert_array_equal, from_wan, jax.tree_util.tree_map(np.asarray, params))
    z = _latents(cfg, 7, batch=2)
    out = np.asarray(decode(cfg, jax.tree_util.tree_map(jnp.asarray, from_wan), jnp.asarray(z)))
    assert np.abs(out - _oracle_decode(cfg, vae, z)).max() <= 1e-4


def test_encode_matches_diffusers(cfg, oracle, params):
    vae = oracle[0]
    video = np.random.default_rng(3).uniform(-1, 1, (1, 9, 32, 32, 3)).astype(np.float32)
    with torch.no_grad():
        mu = vae.encode(torch.from_numpy(video).permute(0, 4, 1, 2, 3)).latent_dist.mode()
    ref = (mu.permute(0, 2, 3, 4, 1).numpy() - np.asarray(cfg.latents_mean)) / np.asarray(cfg.latents_std)
    out = np.asarray(encode(cfg, params, jnp.asarray(video)))
    assert out.shape == ref.shape == (1, 3, 4, 4, 16)
    err = np.abs(out - ref).max()
    print(f"encode vs diffusers: max abs err {err:.2e}")
    assert err <= 1e-4


def test_decoder_only_conversion(cfg, oracle, params):
    sd = {k: v for k, v in oracle[1].items() if not k.startswith(("encoder.", "quant_conv."))}
    with pytest.raises(ValueError, match=r"missing key encoder\.conv_in\.weight"):
        vae_conv.convert_diffusers(sd, cfg)
    tree = vae_conv.convert_diffusers(sd, cfg, decoder_only=True)
    assert set(tree) == {"decoder", "post_quant_conv"}
    assert set(vae_conv.convert_diffusers(oracle[1], cfg, decoder_only=True)) == {"decoder", "post_quant_conv"}
    with pytest.raises(ValueError, match="no 'encoder'"):
        encode(cfg, tree, jnp.zeros((1, 1, 8, 8, 3)))


def test_bad_checkpoints_are_named(cfg, oracle):
    sd, wan_sd = dict(oracle[1]), dict(oracle[2])
    del sd["decoder.up_blocks.1.resnets.0.conv_shortcut.weight"]
    sd["decoder.conv_in.weight"] = np.zeros((32, 15, 3, 3, 3), np.float32)
    sd["decoder.extra.weight"] = np.zeros((2,), np.float32)
    with pytest.raises(ValueError) as e:
        vae_conv.convert_diffusers(sd, cfg)
    msg = str(e.value)
    assert "(3 problems)" in msg
    assert "missing key decoder.up_blocks.1.resnets.0.conv_shortcut.weight (shape (32, 16, 1, 1, 1))" in msg
    assert "key decoder.conv_in.weight has shape (32, 15, 3, 3, 3); expected (32, 16, 3, 3, 3)" in msg
    assert "unexpected key decoder.extra.weight (shape (2,))" in msg

    wan_sd["decoder.middle.1.norm.gamma"] = np.ones((32, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match=r"key decoder\.middle\.1\.norm\.gamma has shape \(32, 1, 1, 1\); "
                                         r"expected \(32, 1, 1\)"):
        vae_conv.convert_wan(wan_sd, cfg)
    # a checkpoint for another width: every key is named, not just the first
    with pytest.raises(ValueError, match=r"problems"):
        vae_conv.convert_diffusers(oracle[1], VAEConfig.preset("tiny", base_dim=4))


def test_bad_latents_are_named(cfg, params):
    with pytest.raises(ValueError, match=r"latents have 15 channels .*expects 16"):
        decode(cfg, params, jnp.zeros((1, 2, 4, 4, 15)))
    with pytest.raises(ValueError, match=r"channels-last"):
        decode(cfg, params, jnp.zeros((1, 2, 4, 16)))
    state = init_decode_state(cfg, 1, LATENT_HW)
    with pytest.raises(ValueError, match=r"latent 8x8\) do not match the decode state, made for batch 1, latent 4x4"):
        decode_step(cfg, params, state, jnp.zeros((1, 3, 8, 8, 16)))
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        encode(cfg, params, jnp.zeros((1, 8, 32, 32, 3)))
    with pytest.raises(ValueError, match=r"latents_std has 3 entries; z_dim is 16"):
        VAEConfig.preset("tiny", latents_std=(1.0, 1.0, 1.0))
