"""`bcjax bench comm`: the token-sharded tick's bytes (formula = compiled HLO) and the FPS model's
invariants (no communication: N devices give N x one device's throughput; the calibrated MFU gives
the paper's 16 FPS exactly)."""

import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ports
from bcjax.bench import comm
from bcjax.model.config import WanConfig
from bcjax.names import MASKS
from bcjax.schedule.config import PipelineConfig

CFG = WanConfig.preset("tiny", num_heads=4, attention="xla")  # fp32: XLA:CPU moves the bytes the formula counts
PCFG = PipelineConfig(window_frames=9, sink_frames=3)
HW = (4, 6)
BIG = {p: WanConfig.preset(p, dtype="bfloat16", param_dtype="bfloat16") for p in ("wan2.1-1.3b", "wan2.1-14b")}
SF = ports.get("self_forcing").pipeline
FULL = (60, 104)


# P4 on 5 (15 frames of 6 tokens deal evenly), P2 on 4 with 2-token groups (27 groups: one padding
# group), the sequential stagger as context parallelism on 3, and tensor parallelism alone.
@pytest.mark.parametrize("stagger,mask,mesh,group", [
    ("P4", "bidirectional", (5, 1), None), ("P4", "causal", (5, 1), None), ("P2", "bidirectional", (4, 1), 2),
    ("sequential", "causal", (3, 1), None), ("sequential", "causal", (1, 2), None),
    ("P4", "bidirectional", (1, 2), None)])
def test_compiled_collectives_are_the_formulas_bytes(stagger, mask, mesh, group):
    assert jax.device_count() >= mesh[0] * mesh[1]
    hlo = comm.compiled_tick_collectives(CFG, PCFG, HW, stagger, mask, *mesh, group=group)
    formula = comm.tick_bytes(CFG, PCFG, HW, stagger, *mesh, group=group)
    assert set(hlo) == set(formula) == {a for a, n in zip(("tokens", "model"), mesh, strict=True) if n > 1}
    for axis in formula:
        for k in ("payload", "wire"):
            assert hlo[axis][k] == pytest.approx(formula[axis][k], rel=1e-9), (axis, k)
    if "tokens" in formula:  # 2 all-gathers (K, V) per layer and the flow's, no all-reduce over tokens
        assert hlo["tokens"]["kinds"] == formula["tokens"]["kinds"] == {"all-gather": 2 * CFG.num_layers + 1}
        lay = comm.tick_layout(CFG, PCFG, HW, stagger, mesh[0], group)
        kv = 2 * CFG.num_layers * lay.padded_tokens * (CFG.num_heads // mesh[1]) * CFG.head_dim * 4
        assert formula["tokens"]["payload"] - kv == pytest.approx(lay.padded_tokens * CFG.patch_features * 4)


def test_tokens_fall_in_whole_groups_of_one_frame():
    p = CFG.tokens_per_frame(*FULL)
    for stagger, in_flight in (("sequential", 1), ("P1", 2), ("P2", 3), ("P4", 5)):
        for tokens in comm.TOKENS_SIZES:
            lay = comm.tick_layout(BIG["wan2.1-1.3b"], SF, FULL, stagger, tokens)
            assert lay.tokens == in_flight * 3 * p and p % lay.group == 0
            assert lay.device_tokens % lay.group == 0 and lay.padded_tokens == tokens * lay.device_tokens
            assert 0 <= lay.padded_tokens - lay.tokens <= max(0.01 * lay.tokens, tokens * lay.group)
    # P4 on 8: 23 400 tokens in groups of 195 (1560 / 8), 15 per device, no padding
    lay = comm.tick_layout(BIG["wan2.1-1.3b"], SF, FULL, "P4", 8)
    assert (lay.group, lay.device_tokens, lay.padded_tokens) == (195, 2925, 23400)


def test_tokens_bytes_are_the_tick_kv_over_the_model_heads():
    cfg = BIG["wan2.1-14b"]
    pcfg = ports.get("krea_14b_clean_pass").pipeline
    for stagger in comm.STAGGERS:
        for tokens in (2, 5, 8):
            lay = comm.tick_layout(cfg, pcfg, FULL, stagger, tokens)
            by_model = {m: comm.tick_bytes(cfg, pcfg, FULL, stagger, tokens, m) for m in (1, 2, 4)}
            flow = lay.padded_tokens * cfg.patch_features * 4
            for m, b in by_model.items():
                kv = cfg.num_layers * 2 * lay.padded_tokens * (cfg.num_heads // m) * cfg.head_dim * 2
                assert b["tokens"]["payload"] == kv + flow
                assert b["tokens"]["wire"] == pytest.approx((kv + flow) * (tokens - 1) / tokens)
                assert b["tokens"]["ops"] == 2 * cfg.num_layers + 1
            assert "model" not in by_model[1] and by_model[4]["model"]["payload"] == by_model[2]["model"]["payload"]
    # sequential on 1 device moves nothing
    assert comm.tick_bytes(cfg, pcfg, FULL, "sequential", 1, 1) == {}


def test_visible_keys_follow_the_cascade_masks():
    """The FPS model's keys per query block are what `tick_key_mask` lets it see in a long stream."""
    from bcjax.cascade.masks import tick_key_mask

    pcfg = ports.get("longlive").pipeline  # a sink and a rolling window
    bf, sink, rolling = pcfg.block_frames, pcfg.sink_frames, pcfg.cache_frames - pcfg.sink_frames
    for in_flight in (1, 2, 3, 5):
        first = 20  # the oldest in-flight block: the cache holds the sink and the rolling frames before it
        blocks = jnp.arange(first, first + in_flight)
        cache = jnp.concatenate([jnp.arange(sink), first * bf - rolling + jnp.arange(rolling)])
        for mask in MASKS:  # the oldest block in the clean stage
            keys = tick_key_mask(jnp.arange(in_flight), blocks, jnp.ones(in_flight, bool), cache, block_frames=bf,
                                 tokens_per_frame=1, sink=sink, rolling=rolling, mask=mask,
                                 clean=jnp.arange(in_flight) == 0)
            seen = np.asarray(keys[0].sum(axis=1))
            want = [comm._visible_frames(pcfg, mask, in_flight, age) for age in range(in_flight)]
            assert seen.tolist() == want, (in_flight, mask)


@pytest.mark.parametrize("preset", ["wan2.1-1.3b", "wan2.1-14b"])
def test_without_communication_n_devices_give_n_times_one(preset):
    """The causal mask gives every query the same keys: with no padding, N devices each do 1/N
    of the tick, and with no communication the FPS is exactly N x one device's."""
    cfg = BIG[preset]
    for stagger in comm.STAGGERS:
        lay1 = comm.tick_layout(cfg, SF, FULL, stagger, 1)
        one = comm.tick_flops(cfg, SF, FULL, stagger, "causal", 1, 1)
        fps1 = comm.model_fps(one["device"], {}, comm.HARDWARE["1 H100"], 0.4, lay1.stride)["fps"]
        for tokens in (2, 4, 5, 8):
            f = comm.tick_flops(cfg, SF, FULL, stagger, "causal", tokens, 1)
            assert comm.tick_layout(cfg, SF, FULL, stagger, tokens).padded_tokens == lay1.tokens
            assert f["total"] == pytest.approx(one["total"], rel=1e-12)
            assert f["device"] * tokens == pytest.approx(one["device"], rel=1e-12)
            fps = comm.model_fps(f["device"], {}, comm.HARDWARE["1 H100"], 0.4, lay1.stride)["fps"]
            assert fps == pytest.approx(tokens * fps1, rel=1e-12)
        # the bidirectional mask: older blocks see the newer ones, so the oldest block's device is the busiest
        if lay1.in_flight > 1:
            bi = comm.tick_flops(cfg, SF, FULL, stagger, "bidirectional", 5, 1)
            assert bi["total"] > one["total"] and bi["device"] > bi["total"] / 5


def test_calibrated_mfu_gives_the_papers_sequential_16_fps_and_more_devices_help():
    rows = {(r.hardware.name, r.stagger): r for r in comm.fps_rows("wan2.1-1.3b", FULL, "bidirectional")}
    seq = rows[("1 H100", "sequential")]
    mfu = comm.calibrated_mfu(seq, 16.0)
    assert 0 < mfu < 1
    assert comm.model_fps(seq.flops["device"], seq.comm, seq.hardware, mfu, seq.layout.stride)["fps"] == pytest.approx(
        16.0, rel=1e-12)
    assert seq.comm == {} and seq.layout.stride == SF.num_steps + 1

    def fps(key):
        r = rows[key]
        return comm.model_fps(r.flops["device"], r.comm, r.hardware, mfu, r.layout.stride)["fps"]

    # on one NVLink node more devices never lower the FPS, and 5 GPUs beat 1 for every stagger
    assert fps(("1 H100", "sequential")) < fps(("5 H100", "sequential")) < fps(("8 H100", "sequential"))
    assert fps(("1 H100", "P4")) < fps(("5 H100", "P4")) < fps(("8 H100", "P4"))
    # communication grows with the tokens devices but stays under the ring's (N-1)/N of the tick's K/V
    assert 0 < rows[("5 H100", "P4")].comm["tokens"]["wire"] < rows[("8 H100", "P4")].comm["tokens"]["wire"]


def test_bench_comm_help_from_the_command_line():
    out = subprocess.run([sys.executable, "-m", "bcjax.cli", "bench", "comm", "--help"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0 and "usage: bcjax bench comm" in out.stdout, out.stderr


def test_bench_comm_prints_bytes_and_the_fps_model(capsys):
    from bcjax.cli import main

    assert main(["bench", "comm", "--staggers", "sequential", "P4", "--tokens", "1", "5", "8"]) == 0
    out = capsys.readouterr().out
    # 1.3B, Self-Forcing's sampler, 480x832, bf16: per layer K and V of 23 400 tokens x 12 heads x 128 = 143.8 MB,
    # 30 layers, plus the flow [23 400, 64] f32 once per tick
    kv_flow = 30 * 2 * 23400 * 12 * 128 * 2 + 23400 * 64 * 4
    assert f"| P4 | (5, 1) | 23400 / 4680 (g 1560) | {comm._fmt(kv_flow)} / {comm._fmt(kv_flow * 4 / 5)} |" in out, out
    fps = {(m[1], m[2], m[3]): (float(m[4]), float(m[5])) for m in re.finditer(
        r"^\| (wan2\.1-[\d.]+b) \| ([^|]+?) \| (\S+) \|(?: [^|]+ \|){7} ([\d.]+) \| ([\d.]+) \|", out, re.M)}
    assert fps[("wan2.1-1.3b", "1 H100", "sequential")][1] == pytest.approx(16.0, abs=0.05)  # the calibration
    assert len(fps) == 2 * len(comm.FPS_ROWS)
    assert "MFU" in out and "v5e-32" in out and "v6e-16" in out and "v5p-16" in out


@pytest.mark.parametrize("tokens", [1, 5, 8])
def test_p4_causal_costs_what_context_parallel_sequential_costs_per_block(tokens):
    """Under the causal mask every query sees the same keys in P4 and in the sequential pass, and
    P4's tick is n + 1 sequential passes at once: per block the FLOPs and bytes are equal, so the
    model gives them the same FPS on any device count that deals the tokens evenly."""
    cfg = BIG["wan2.1-1.3b"]
    hw = comm.HARDWARE["8 H100"]
    fps = {}
    for stagger in ("sequential", "P4"):
        lay = comm.tick_layout(cfg, SF, FULL, stagger, tokens)
        f = comm.tick_flops(cfg, SF, FULL, stagger, "causal", tokens, 1)
        fps[stagger] = comm.model_fps(f["device"], comm.tick_bytes(cfg, SF, FULL, stagger, tokens, 1), hw, 0.3,
                                       lay.stride)["fps"]
    assert fps["P4"] == pytest.approx(fps["sequential"], rel=1e-9)


def test_int8_and_fp8_run_the_projections_at_the_chips_8_bit_peak():
    """FLOPs at precision: the projections' share of a tick at the 8-bit peak, the rest at bf16;
    fp8 on a TPU (none there) and the weight-only modes stay bf16."""
    cfg = BIG["wan2.1-1.3b"]
    f = comm.tick_flops(cfg, SF, FULL, "P4", "causal", 5, 1)
    d, lay = cfg.dim, comm.tick_layout(cfg, SF, FULL, "P4", 5)
    assert f["device_projections"] == lay.device_tokens * cfg.num_layers * (12 * d * d + 4 * d * cfg.ffn_dim)
    # at 480x832 over a 21-frame cache attention outweighs them: about 29% of the 1.3B's P4 tick
    assert 0.2 < f["device_projections"] / f["device"] < 0.4
    h100, v5e = comm.HARDWARE["5 H100"], comm.HARDWARE["TPU v5e-32"]
    for quant in ("none", "int8-weight", "fp8-weight"):
        assert comm.at_precision(f, h100, quant) == f["device"]
    assert comm.at_precision(f, h100, "fp8") == pytest.approx(f["device"] - f["device_projections"] / 2, rel=1e-3)
    assert comm.at_precision(f, v5e, "int8") == pytest.approx(f["device"] - f["device_projections"] / 2, rel=1e-9)
    assert comm.at_precision(f, v5e, "fp8") == f["device"]
    rows = {(r.hardware.name, r.stagger): r for r in comm.fps_rows("wan2.1-1.3b", FULL, "causal", quant="int8")}
    r = rows[("5 H100", "P4")]
    assert r.flops["matmul"] == f["device"] and r.flops["device"] == comm.at_precision(f, h100, "int8")
