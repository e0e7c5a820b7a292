"""bcjax's programs compile with the real accelerator compilers, from abstract values only.

XLA:TPU (libtpu's compile-only v5e topology: Mosaic compiles the splash kernel) and XLA:GPU (the
CUDA plugin's deviceless H100: Triton compiles the pallas_gpu kernel, cuDNN its fused attention).
No accelerator is needed and nothing runs; a kernel or compiler refusal, a kernel that silently fell
back to the chunked path, or a runner that puts a concrete array on a device fails here. The test
extra installs `jax[tpu]` and `jax[cuda13]` at the installed jax version.
"""

import dataclasses
import warnings
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bcjax import targets
from bcjax.bench import compile as bench_compile
from bcjax.cascade import make_mesh
from bcjax.model.config import WanConfig
from bcjax.schedule.config import PipelineConfig

pytestmark = pytest.mark.slow  # real XLA:TPU / XLA:GPU compiles: about 90 s

# head_dim 128: the TPU splash kernel takes nothing smaller (tiny's 32 would fall back to chunked)
KERNEL_TINY = WanConfig.preset("tiny", dim=256, ffn_dim=256, num_heads=2, dtype="bfloat16", param_dtype="bfloat16")
HW = (8, 8)
# the custom call each kernel leaves in the optimised HLO: proof that the kernel itself compiled
KERNEL_MARK = {"splash": "tpu_custom_call", "pallas_gpu": "__gpu$xla.gpu.triton", "cudnn": "__cudnn$fmha"}
CASES = [("v5e-8", "splash"), ("h100", "cudnn"), ("h100", "pallas_gpu")]


def _lower(case, cfg, target, backend, mesh_shape, hw=HW, pcfg=None):
    """The lowered program; a kernel that refused the shapes (it warns at trace time and falls back
    to chunked) fails here."""
    cfg = dataclasses.replace(cfg, attention=backend)
    mesh = make_mesh(*mesh_shape, devices=target.devices(), cfg=cfg)
    lower = bench_compile.dit_lowering(case, cfg, pcfg or PipelineConfig(), hw, mesh)
    from bcjax.model import attention

    attention._warned.clear()  # a kernel refuses a shape with one warning per process: see it here
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lowered = lower()
    fallbacks = [str(w.message) for w in caught if "using 'chunked'" in str(w.message)]
    assert not fallbacks, fallbacks
    return lowered


def _compile(case, cfg, target, backend, mesh_shape, hw=HW, pcfg=None):
    return _lower(case, cfg, target, backend, mesh_shape, hw, pcfg).compile()


@pytest.mark.parametrize("target_name,backend", CASES)
def test_tiny_programs_compile_with_the_kernel(target_name, backend):
    target = targets.get(target_name)
    programs = [("sequential", (1, 1)), ("p4", (5, 1)), ("p4", (2, 2)), ("krea", (1, 1))]
    lowered = [_lower(case, KERNEL_TINY, target, backend, mesh_shape) for case, mesh_shape in programs]
    with ThreadPoolExecutor(2) as pool:  # independent programs: two compile at once (XLA releases the GIL)
        compiled_all = list(pool.map(lambda lo: lo.compile(), lowered))
    for (case, mesh_shape), compiled in zip(programs, compiled_all, strict=True):
        hlo = compiled.as_text()
        assert KERNEL_MARK[backend] in hlo, (case, mesh_shape, backend)
        m = compiled.memory_analysis()
        assert m.argument_size_in_bytes > 0 and m.temp_size_in_bytes > 0
        if case == "p4":  # the stage all-gather of the tick's K/V is in the compiled program
            assert "all-gather" in hlo, (mesh_shape, backend)
        # compiled for the target's devices (and its whole-slice rule), not this process's CPU
        shardings = jax.tree_util.tree_leaves(compiled.input_shardings)
        assert shardings and all(sh.device_set <= set(target.devices()) for sh in shardings)


def test_vae_decode_step_compiles():
    def row(target_name):
        dev = targets.get(target_name).devices()[0]
        return bench_compile.compile_row("vae", "decode", "1", "-", bench_compile.vae_lowering(
            (8, 8), 3, "bfloat16", jax.sharding.SingleDeviceSharding(dev), preset="tiny"), None)

    with ThreadPoolExecutor(2) as pool:  # XLA:TPU and XLA:GPU compile at once
        rows = dict(zip(("v5e-8", "h100"), pool.map(row, ("v5e-8", "h100")), strict=True))
    for name, r in rows.items():
        assert r.error is None, (name, r.error)
        assert r.temp > 0, name


@pytest.mark.parametrize("target_name,backend", CASES)
def test_one_real_size_layer_compiles(target_name, backend):
    """One 1.3B layer at 480x832 (4680 queries a block over an 18-frame cache): the shapes the
    kernels must take for real (splash needs its query padding, Triton its block sizes)."""
    cfg = WanConfig.preset("wan2.1-1.3b", num_layers=1, dtype="bfloat16", param_dtype="bfloat16")
    compiled = _compile("sequential", cfg, targets.get(target_name), backend, (1, 1), hw=(60, 104))
    assert KERNEL_MARK[backend] in compiled.as_text()
    # a whole layer stays far under one device: its attention must not materialise [T, S] logits
    assert compiled.memory_analysis().temp_size_in_bytes < 3 * 2**30


def test_whole_slice_rule_and_padded_meshes():
    v5e32, v5e16 = targets.get("v5e-32").devices(), targets.get("v5e-16").devices()
    assert targets.whole_slice_required(v5e32) and not targets.whole_slice_required(v5e16)
    assert not targets.whole_slice_required(targets.get("h100").devices())

    def two_device_program(devices):
        mesh = Mesh(np.asarray(devices[:2]), ("x",))
        x = jax.ShapeDtypeStruct((8, 128), "float32", sharding=NamedSharding(mesh, P("x")))
        return jax.jit(lambda a: a * 2).lower(x).compile()

    two_device_program(v5e16)  # a part of a 16-chip v5e slice is fine
    with pytest.raises(Exception, match="all slice devices"):  # the compiler's own rule, pinned
        two_device_program(v5e32)
    cfg = WanConfig.preset("wan2.1-14b")
    assert make_mesh(5, 4, devices=v5e32, cfg=cfg).devices.shape == (8, 4)  # padded: 3 idle `tokens` devices
    assert make_mesh(3, 4, devices=v5e16, cfg=cfg).devices.shape == (3, 4)  # no rule: as asked
    with pytest.raises(ValueError, match=r"must be used whole.*'model' = 3 does not divide 32"):
        make_mesh(5, 3, devices=v5e32)
    with pytest.raises(ValueError, match=r"needs 40 devices; 32 available"):
        make_mesh(10, 4, devices=v5e32)


def test_bench_compile_rows_on_a_whole_slice_target(capsys):
    """`bench compile --target v5e-32`: a tiny P4 asked for on 5x2 is grown to the slice and
    compiles, and the row says so."""
    assert bench_compile.main(["--target", "v5e-32", "--preset", "tiny", "--latent-hw", "8", "8", "--cases", "p4",
                               "--meshes", "5x2", "--backends", "chunked"]) == 0
    out = capsys.readouterr().out
    assert "programs must use the whole slice" in out
    assert "| tiny | p4 | 5x2 (grown to 16x2: whole slice) | chunked |" in out, out
    assert "refused" not in out


@pytest.mark.parametrize("target_name,mode,kind", [("v5e-8", "int8", "s8"), ("h100", "fp8", "f8")])
def test_weights_and_activations_compile_to_8_bit_matmuls(target_name, mode, kind):
    """`--quant int8` on a TPU is an s8 x s8 dot, `--quant fp8` on an H100 an f8 GEMM, in the
    optimised HLO: the contraction itself runs at 8 bits, not a dequantize-then-bf16 dot."""
    cfg = dataclasses.replace(KERNEL_TINY, quant=mode)
    compiled = _compile("sequential", cfg, targets.get(target_name), "chunked", (1, 1))
    found = bench_compile.contractions(compiled.as_text())
    assert f"{kind} x " in found, found
    assert int(found.split(f"{kind} x ")[1].split(",")[0]) >= 12, found  # q k v o twice, ffn_0, ffn_2, per layer body
