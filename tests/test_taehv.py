"""TAEHV (taew2_1) against upstream madebyollin/taehv: stored reference outputs on seeded random
weights (tests/data/make_taehv_reference.py), streamed == whole clip with one compilation, bf16,
and the converter's key and shape checks (a taew2_2 file is refused, naming its channels)."""

import importlib.util
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bcjax.compile_count import CompileCounter
from bcjax.vae import taehv
from checkpoints_conv import taehv as taehv_conv

DATA = os.path.join(os.path.dirname(__file__), "data")


def _reference_module():
    spec = importlib.util.spec_from_file_location("make_taehv_reference", os.path.join(DATA, "make_taehv_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def upstream_random_state_dict(seed: int | None = None) -> dict[str, np.ndarray]:
    """Seeded random taew2_1 weights in upstream's key layout (the reference's, by default)."""
    module = _reference_module()
    shapes = taehv_conv.upstream_shapes(taehv.TAEHVConfig.preset("taew2_1"))
    return module.random_state_dict(shapes, module.SEED if seed is None else seed)


@pytest.fixture(scope="module")
def cfg():
    return taehv.TAEHVConfig.preset("taew2_1")


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(os.path.join(DATA, "taehv_reference.npz")))


@pytest.fixture(scope="module")
def upstream_sd(cfg, ref):
    shapes = taehv_conv.upstream_shapes(cfg)
    return _reference_module().random_state_dict(shapes, int(ref["seed"]))


@pytest.fixture(scope="module")
def params(cfg, upstream_sd):
    return jax.tree_util.tree_map(jnp.asarray, taehv_conv.convert(upstream_sd, cfg))


def test_converter_table_is_upstreams_key_set(cfg, ref):
    stored = {k: tuple(int(n) for n in s.split(","))
              for k, s in zip(ref["keys"].tolist(), ref["shapes"].tolist(), strict=True)}
    assert taehv_conv.upstream_shapes(cfg) == stored


def test_whole_clip_decode_matches_upstream(cfg, params, ref):
    out = (np.asarray(taehv.decode(cfg, params, jnp.asarray(ref["latents"]))) + 1) / 2
    want = ref["decoded"]
    assert out.shape == want.shape == (1, 13, 24, 32, 3)
    assert np.mean((want > 0) & (want < 1)) > 0.5, "random weights saturate the clamp; the test would see little"
    err = np.abs(out - want).max()
    print(f"TAEHV whole-clip decode vs upstream decode_video: max abs err {err:.2e}")
    assert err <= 1e-4


def test_streamed_decode_matches_upstream_and_whole_clip_with_one_compile(cfg, params, ref):
    z = ref["latents"]  # numpy: slicing it compiles nothing
    state = taehv.init_decode_state(cfg, 1, z.shape[2:4])
    chunks = []
    with CompileCounter() as cc:
        for b in range(2):
            state, video = taehv.decode_step(cfg, params, state, z[:, 2 * b: 2 * b + 2])
            chunks.append(np.asarray(video))
    assert cc.count == 1, f"decode_step compiled {cc.count} times over 2 blocks"
    assert int(state.frames) == 4
    pad = cfg.first_chunk_padding
    np.testing.assert_array_equal(chunks[0][:, :pad], 0.0)
    streamed = np.concatenate(chunks, axis=1)[:, pad:]
    err_up = np.abs((streamed + 1) / 2 - ref["streamed"]).max()
    whole = np.asarray(taehv.decode(cfg, params, jnp.asarray(z)))
    err_self = np.abs(streamed - whole).max()
    print(f"TAEHV streamed (blocks of 2) vs upstream StreamingTAEHV: max abs err {err_up:.2e}; "
          f"vs own whole clip {err_self:.2e}")
    assert err_up <= 1e-4
    assert err_self <= 2e-5  # the same math on differently batched convs: float rounding only


def test_encode_matches_upstream(cfg, params, ref):
    out = np.asarray(taehv.encode(cfg, params, jnp.asarray(ref["video"]) * 2 - 1))
    want = ref["encoded"]
    assert out.shape == want.shape == (1, 3, 3, 4, 16)
    err = np.abs(out - want).max()
    print(f"TAEHV encode vs upstream encode_video: max abs err {err:.2e} (|latents| up to {np.abs(want).max():.1f})")
    assert err <= 1e-4


def test_bf16_decode_close_to_fp32(cfg, upstream_sd, ref):
    cfg16 = taehv.TAEHVConfig.preset("taew2_1", dtype="bfloat16", param_dtype="bfloat16")
    p16 = jax.tree_util.tree_map(jnp.asarray, taehv_conv.convert(upstream_sd, cfg16))
    assert all(leaf.dtype == jnp.bfloat16 for leaf in jax.tree_util.tree_leaves(p16))
    out = np.asarray(taehv.decode(cfg16, p16, jnp.asarray(ref["latents"])))
    assert out.dtype == np.float32
    err = np.abs((out + 1) / 2 - ref["decoded"]).max()
    assert err < 0.1, f"bf16 TAEHV decode is {err:.3f} from the fp32 reference"


def test_converter_refuses_taew2_2(cfg, upstream_sd):
    # taew2_2 (Wan2.2-5B): 48 latent channels and patch size 2 (12 image channels at both ends)
    sd = dict(upstream_sd)
    for key, shape in [("decoder.1.weight", (256, 48, 3, 3)), ("encoder.17.weight", (48, 64, 3, 3)),
                       ("encoder.17.bias", (48,)), ("encoder.0.weight", (64, 12, 3, 3)),
                       ("decoder.22.weight", (12, 64, 3, 3)), ("decoder.22.bias", (12,))]:
        sd[key] = np.zeros(shape, np.float32)
    with pytest.raises(ValueError) as e:
        taehv_conv.convert(sd, cfg)
    msg = str(e.value)
    assert "48-channel latents" in msg and "taew2_2" in msg
    assert "key decoder.1.weight has shape (256, 48, 3, 3); expected (256, 16, 3, 3)" in msg
    assert "6 problems" in msg


def test_converter_names_missing_unexpected_and_tgrow_patch(cfg, upstream_sd, params):
    sd = dict(upstream_sd)
    del sd["decoder.3.conv.2.weight"]
    sd["decoder.99.weight"] = np.zeros((3,), np.float32)
    with pytest.raises(ValueError, match=r"missing key decoder\.3\.conv\.2\.weight \(shape \(256, 256, 3, 3\)\)") as e:
        taehv_conv.convert(sd, cfg)
    assert "unexpected key decoder.99.weight (shape (3,))" in str(e.value)
    # upstream's patch_tgrow_layers: a TGrow trained with 2x time keeps its last C output channels
    sd = dict(upstream_sd)
    w = sd["decoder.7.conv.weight"]
    sd["decoder.7.conv.weight"] = np.concatenate([np.ones_like(w), w])
    patched = taehv_conv.convert(sd, cfg)
    np.testing.assert_array_equal(patched["decoder"]["stage_0_tgrow"]["kernel"],
                                  params["decoder"]["stage_0_tgrow"]["kernel"])
    dec = taehv_conv.convert({k: v for k, v in upstream_sd.items() if k.startswith("decoder.")}, cfg, decoder_only=True)
    assert set(dec) == {"decoder"}


def test_bad_latents_are_named(cfg, params):
    state = taehv.init_decode_state(cfg, 1, (3, 4))
    with pytest.raises(ValueError,
                       match=r"channels-last \[batch, frames, height, width, 16\]; got shape \(1, 2, 3, 4, 48\)"):
        taehv.decode_step(cfg, params, state, jnp.zeros((1, 2, 3, 4, 48)))
    with pytest.raises(ValueError, match="made for batch 1, latent 3x4"):
        taehv.decode_step(cfg, params, state, jnp.zeros((1, 2, 4, 4, 16)))


def test_decode_device_outside_the_mesh(cfg, params, ref):
    """On the suite's 10 fake CPU devices: a 4-stage mesh leaves device 4 for decoding; a full mesh
    leaves the host; a device inside the mesh is allowed with a warning that names the cost."""
    from bcjax.cascade import make_mesh
    from bcjax.vae.decoders import PixelDecoder, decode_device

    assert jax.device_count() == 10, "conftest sets 10 fake CPU devices before jax starts (tests/shared.py)"
    mesh4 = make_mesh(4)
    device = decode_device(None, mesh4)
    assert device == jax.devices()[4] and decode_device("auto", mesh4) == device
    assert decode_device(None, make_mesh(10)) == jax.devices("cpu")[0]
    assert decode_device(None, None) == jax.devices()[1]  # one-device runs decode beside device 0
    with pytest.warns(UserWarning, match="mesh position 0 of the denoising mesh.*lockstep"):
        assert decode_device("0", mesh4) == jax.devices()[0]
    with pytest.raises(ValueError, match=r"--decode-device 10: no such device; ids are \[0, 1, 2, .*, 9\]"):
        decode_device("10", mesh4)
    with pytest.raises(ValueError, match="expected auto, cpu or a device id"):
        decode_device("gpu", mesh4)
    pixels = PixelDecoder("taehv", cfg, params, device)
    z = ref["latents"][:, :2]
    state, video = pixels.step(pixels.init_state(1, z.shape[2:4]), z)
    assert video.devices() == {device} and state.cache["stage_0_mem_0"].devices() == {device}
    _, here = taehv.decode_step(cfg, params, taehv.init_decode_state(cfg, 1, z.shape[2:4]), z)
    np.testing.assert_allclose(np.asarray(video), np.asarray(here), atol=1e-6)


def test_bench_decode_flops_agree_with_a_hand_count(cfg):
    """`bcjax bench decode`'s jaxpr count against the conv shapes written out, and XLA's count."""
    from bcjax.bench.decode import flops

    h, w, f = 2, 3, 3
    widths, px = cfg.decoder_widths, h * w
    hand = f * px * 9 * 16 * widths[0]  # conv_in
    frames = f
    for i in range(cfg.stages):
        c = widths[i]
        hand += 3 * frames * px * 9 * c * (2 * c + c + c)  # MemBlocks: conv(2C -> C), conv(C -> C) twice
        px *= 4
        stride = 2 if cfg.decoder_time_upscale[i] else 1
        hand += frames * px * c * stride * c  # TGrow
        frames *= stride
        hand += frames * px * 9 * c * widths[i + 1]  # conv to the next width
    hand += frames * px * 9 * widths[-1] * 3  # conv_out
    counted, xla = flops(taehv, cfg, (h, w))
    assert counted == 2 * hand
    # XLA leaves out the taps that fall on the zero padding: a fifth of them on a 2x3 latent, 0.3% at 60x104
    assert 0.75 < xla / counted <= 1.0, (xla, counted)


def test_bench_compile_has_a_taehv_row_whose_memory_is_its_buffers(cfg, capsys):
    """`bench compile --cases taehv`: the streaming step compiled for a target (XLA:CPU here; h100
    and v5e the same way, see the README), its arguments exactly the weights + state + one block,
    its output the state + 4F frames at 8x the latent size."""
    from bcjax import targets
    from bcjax.bench import compile as bench_compile

    hw, bf = (8, 8), 3
    sharding = jax.sharding.SingleDeviceSharding(targets.get("cpu").devices()[0])
    lower = bench_compile.taehv_lowering(hw, bf, "float32", sharding)

    def nbytes(tree):
        return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize for a in jax.tree_util.tree_leaves(tree))

    weights = nbytes(taehv.param_shapes(cfg)["decoder"])  # the encoder's weights are pruned: unused
    state = nbytes(jax.eval_shape(lambda: taehv.init_decode_state(cfg, 1, hw)))
    block = 1 * bf * 8 * 8 * 16 * 4
    video = jax.ShapeDtypeStruct((1, 4 * bf, 64, 64, 3), jnp.float32)
    _, out = lower().out_info
    assert (out.shape, out.dtype) == (video.shape, video.dtype)
    row = bench_compile.compile_row("taew2_1 TAEHV", "decode", "1 device", "-", lower, None)
    assert row.error is None, row.error
    assert row.args == weights + state + block and weights > 30 * 2**20  # taew2_1's decoder, fp32
    assert 0 <= row.out - (state + nbytes(video)) < 1024 and row.temp > 0  # + the output tuple's pointer table
    assert bench_compile.main(["--target", "cpu", "--preset", "tiny", "--cases", "taehv", "--latent-hw", "8", "8"]) == 0
    table = capsys.readouterr().out
    assert "| taew2_1 TAEHV | decode 3 latent frames | 1 device | - |" in table and "refused" not in table, table


def test_real_taew2_1_weights_decode(cfg):
    """The published taew2_1 (madebyollin/taehv), when BCJAX_TAEW2_1 names the file (.pth or
    .safetensors; it cannot be downloaded in CI): converted with every key and shape checked,
    a streamed decode of smooth latents gives frames of the right shape and range, equal to the
    whole-clip decode."""
    path = os.environ.get("BCJAX_TAEW2_1")
    if not path:
        pytest.skip("set BCJAX_TAEW2_1=/path/to/taew2_1.pth (or .safetensors) to check the real weights")
    if not os.path.isfile(path):
        pytest.fail(f"BCJAX_TAEW2_1={path!r} is not a file")
    params = jax.tree_util.tree_map(jnp.asarray, taehv_conv.convert_file(path, cfg))
    # smooth latents of Wan2.1's normalised scale: a decode of real weights is not noise
    t, y, x = np.meshgrid(np.arange(6), np.arange(8), np.arange(12), indexing="ij")
    phase = np.arange(16)[None, None, None, :]
    z = jnp.asarray(np.sin(0.3 * t[..., None] + 0.4 * y[..., None] + 0.25 * x[..., None] + phase)[None], jnp.float32)
    state, parts = taehv.init_decode_state(cfg, 1, (8, 12)), []
    for i in range(0, 6, 3):
        state, video = taehv.decode_step(cfg, params, state, z[:, i:i + 3])
        parts.append(np.asarray(video))
    streamed = np.concatenate(parts, 1)[:, cfg.first_chunk_padding:]
    assert streamed.shape == (1, cfg.video_frames(6), 64, 96, 3)
    assert np.isfinite(streamed).all() and streamed.min() >= -1 and streamed.max() <= 1
    assert streamed.std() > 0.01  # not a constant image: the weights did something
    np.testing.assert_allclose(streamed, np.asarray(taehv.decode(cfg, params, z)), atol=1e-4)
