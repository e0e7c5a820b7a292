"""Communication of a cascade tick whose `tokens` axis shards the tick's tokens, and the FPS it allows.

    bcjax bench comm [--preset wan2.1-1.3b] [--port self_forcing] [--latent-hw 60 104]
                     [--staggers sequential P1 P2 P4] [--tokens 1 2 4 5 8 16] [--models 1]
                     [--group G] [--hlo] [--fps-presets wan2.1-1.3b wan2.1-14b] [--mask bidirectional]
                     [--mfu 0.4] [--memory TARGET]

The tick (the token-sharded tick of `bcjax.cascade.tick`): one joint DiT pass over every in-flight
block, T = in_flight x block_frames x tokens_per_frame query tokens (in_flight = ceil((n + 1) /
stride): P4 5, P2 3, P1 2, "sequential" 1, whose stride n + 1 makes n + 1 passes per block). The
tokens are cut into groups of g tokens (g divides tokens_per_frame: a group never straddles a
latent frame); each of the N `tokens` devices takes ceil(groups / N) groups, idle padding groups
only where N does not divide them, so T_pad = N ceil(T / (g N)) g. Sequential on N devices is
context parallelism of one block; P4 on 8 or 16 is the cascade and context parallelism at once.

Bytes per tick and per device, two sources that must agree:
* the formula (`tick_bytes`), per layer: the `tokens` all-gather of the tick's K and V ([B, T_pad,
  heads / model, head_dim] each, compute dtype), the `model` psums of o, cross-attention o and ffn_2
  ([B, T_pad / N, dim] each) and qk-norm's three sum-of-squares psums ([B, T_pad / N, 1] f32);
  once per tick the `tokens` all-gather of the flow ([B, T_pad, patch_features] f32);
* the compiled program (`--hlo`, `hlo_collectives`): every all-gather / all-reduce of the tick's
  optimised HLO, each counted as often as its loop runs, assigned to the mesh axis its replica
  groups span (compiled on fake CPU devices; nothing runs).
"Wire" bytes are what one device receives with ring collectives: all-gather R (N-1)/N of its
result R, all-reduce 2 S (N-1)/N of its operand S.

The FPS model (`model_fps`, `tick_range`, `predict`): a tick takes the matmul FLOPs of its busiest
device / (peak bf16 FLOP/s x MFU) plus, per mesh axis, its wire bytes / its link bandwidth and its
collectives x a per-collective latency, of which a fraction may hide under compute; the stream
emits one block (12 video frames) every `stride` ticks, FPS = 12 / (stride x tick). MFU depends on
the shard: query tokens per device t, MFU(t) = MFU_cal x min(1, c(t) / c(t_cal)), c(t) = t / (t +
k), so a short shard pays fixed per-layer costs (launches, tail waves, syncs) worth k tokens of work
(`shard_mfu`); MFU_cal is calibrated on the paper's 16 FPS for 1.3B sequential on one H100 (t_cal
4680 tokens). Two assumption sets bound every figure (`RANGE`): pessimistic (k 700 tokens, the
machine's high per-collective latency, no overlap; 4 H100s at 1170 tokens per GPU then give about
the 66% parallel efficiency xDiT measured for Flux there) and optimistic (k 200, low latency, half
of the communication hidden). FLOPs count the keys each query sees in the steady state of a long
stream (full cache, every in-flight block busy): the sink and `rolling` frames before its block,
its own block, and under the bidirectional mask the newer in-flight blocks. That is the cost of an
attention that skips invisible keys (`bcjax.model.attention`); groups go to devices in token order
(oldest block first). docs/performance/comm.md states each assumption's source.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
from typing import Any

import numpy as np

from bcjax.bench._common import VIDEO_FRAMES_PER_BLOCK, force_host_devices
from bcjax.bench.hlo import hlo_collectives
from bcjax.flags import OldName
from bcjax.names import DEFAULT_MASK, MASKS, QUANTS, STAGGERS, Mask

TOKENS_SIZES = (1, 2, 4, 5, 8, 16)  # sizes of the `tokens` axis in the bytes table
# the sampler each preset's FPS rows use: Self-Forcing's for 1.3B (the paper's 16 / 30 FPS), Krea's
# clean-pass sampler for 14B (the paper's 14B is Krea Realtime 14B)
PORT_OF = {"wan2.1-1.3b": "self_forcing", "wan2.1-14b": "krea_14b_clean_pass"}


@dataclasses.dataclass(frozen=True)
class TickLayout:
    """How one tick's query tokens fall on the `tokens` axis."""

    stride: int  # ticks between block entries: one block is emitted every `stride` ticks
    in_flight: int  # blocks in one joint pass
    block_tokens: int  # block_frames x tokens_per_frame
    group: int  # tokens per group (divides tokens_per_frame)
    devices: int  # devices on the `tokens` axis
    num_stages: int  # passes per block: n + 1, or n with no clean pass ("-no-clean")
    emit_passes: int  # passes from a block's noise to its x0 (n)

    @property
    def tokens(self) -> int:  # T
        return self.in_flight * self.block_tokens

    @property
    def groups(self) -> int:
        return self.tokens // self.group

    @property
    def device_tokens(self) -> int:  # query tokens per device, padding included
        return -(-self.groups // self.devices) * self.group

    @property
    def padded_tokens(self) -> int:  # T_pad
        return self.devices * self.device_tokens


def tick_layout(cfg, pcfg, latent_hw, stagger: str, tokens: int, group: int | None = None) -> TickLayout:
    from bcjax.cascade.tokens import token_split
    from bcjax.schedule.stagger import make_stagger

    st = make_stagger(stagger, pcfg.num_steps)
    p = cfg.tokens_per_frame(*latent_hw)
    split = token_split(st.in_flight * pcfg.block_frames, p, tokens, group)  # the runner's own split
    return TickLayout(st.stride, st.in_flight, pcfg.block_frames * p, split.group, tokens, st.num_stages,
                      st.emit_stage + 1)


def tick_bytes(cfg, pcfg, latent_hw, stagger: str, tokens: int, model: int, batch: int = 1,
               group: int | None = None) -> dict[str, dict]:
    """Collectives of one tick per device, by mesh axis: {axis: {ops, payload, wire}} (module
    docstring)."""
    import jax.numpy as jnp

    dt = jnp.dtype(cfg.compute_dtype).itemsize
    layers, heads = cfg.num_layers, cfg.num_heads // model
    lay = tick_layout(cfg, pcfg, latent_hw, stagger, tokens, group)
    t_all, t_dev = lay.padded_tokens, lay.device_tokens
    tick_op = ("all-gather", batch * t_all * cfg.patch_features * 4)  # the flow, f32
    gather = 2 * batch * t_all * heads * cfg.head_dim * dt  # K and V of one layer
    out = {}
    if tokens > 1:
        ring = (tokens - 1) / tokens
        kind, nbytes = tick_op
        out["tokens"] = {"ops": 2 * layers + 1, "payload": layers * gather + nbytes,
                        "wire": (layers * gather + nbytes * (2 if kind == "all-reduce" else 1)) * ring,
                        "kinds": {"all-gather": 2 * layers + (kind == "all-gather"),
                                  **({kind: 1} if kind != "all-gather" else {})}}
    if model > 1:
        norms = 3 if cfg.qk_norm else 0
        payload = layers * (3 * batch * t_dev * cfg.dim * dt + norms * batch * t_dev * 4)
        out["model"] = {"ops": layers * (3 + norms), "payload": payload, "wire": 2 * payload * (model - 1) / model,
                        "kinds": {"all-reduce": layers * (3 + norms)}}
    return out


def _visible_frames(pcfg, mask: Mask, in_flight: int, age: int) -> int:
    """Key frames a query of the in-flight block `age` blocks younger than the oldest sees in a
    long stream's steady state (`bcjax.cascade.masks`): the sink, the `rolling` frames before its
    block (cache or older in-flight blocks), its own block, and under `bidirectional` every newer
    in-flight block (never cut by the window). `bidirectional-clean-causal`: the same, but the
    oldest block, in the clean stage when the sampler has one, sees none newer;
    `bidirectional-windowed`: newer frames take the place of the oldest, so the count is the
    causal one (the window is full either way deep in a stream)."""
    rolling = pcfg.cache_frames - pcfg.sink_frames
    newer = in_flight - 1 - age
    if mask in ("causal", "bidirectional-windowed") or (
            mask == "bidirectional-clean-causal" and age == 0 and pcfg.clean_pass):
        newer = 0
    return pcfg.sink_frames + rolling + (1 + newer) * pcfg.block_frames


def tick_flops(cfg, pcfg, latent_hw, stagger: str, mask: Mask, tokens: int, model: int,
               group: int | None = None) -> dict[str, float]:
    """Matmul FLOPs of one tick: {"total": the joint pass, "device": the busiest device's share}.

    Per query token and layer: q, k, v, o (8 dim^2), cross-attention q and o (4 dim^2; its K/V are
    cached per prompt), the FFN (4 dim ffn), self-attention over its visible keys (4 dim keys) and
    cross-attention over the prompt (4 dim text_len); once per token the patch embedding and the
    head. Groups go to devices in token order, oldest block first; a padding token costs the
    matmuls and attention over the tick's own tokens (an upper bound). `model` divides all of it
    (heads and FFN columns split)."""
    lay = tick_layout(cfg, pcfg, latent_hw, stagger, tokens, group)
    p = cfg.tokens_per_frame(*latent_hw)
    d = cfg.dim
    dense = 12 * d * d + 4 * d * cfg.ffn_dim + 4 * d * cfg.text_len
    embed_head = 2 * cfg.patch_features * d + 2 * d * cfg.out_channels * cfg.patch_size[1] * cfg.patch_size[2]

    def per_token(keys: int) -> float:
        return float(cfg.num_layers * (dense + 4 * d * keys) + embed_head)

    # [padded tokens] FLOPs of each query token, oldest block first
    ages = np.minimum(np.arange(lay.padded_tokens) // lay.block_tokens, lay.in_flight)
    keys = np.array([_visible_frames(pcfg, mask, lay.in_flight, a) * p for a in range(lay.in_flight)]
                    + [pcfg.cache_frames * p + lay.tokens])
    flops = cfg.num_layers * (dense + 4 * d * keys[ages].astype(np.float64)) + embed_head
    real = flops[: lay.tokens].sum()
    device = flops.reshape(tokens, lay.device_tokens).sum(axis=1).max()
    assert per_token(keys[0]) == flops[0]
    # the share `--quant int8/fp8` contracts at 8 bits: the projections (q k v o, cross q o, FFN)
    projections = lay.device_tokens * cfg.num_layers * (12 * d * d + 4 * d * cfg.ffn_dim)
    return {"total": real / model, "device": device / model, "device_projections": projections / model}


def at_precision(flops: dict, hw: Hardware, quant: str) -> float:
    """The busiest device's FLOPs as bf16 FLOPs of equal time: under `--quant int8`/`fp8` the
    projections run at the chip's 8-bit peak (where it has one; fp8 on a TPU stays bf16), the rest
    (attention, embeddings, head) at its bf16 peak. Weight-only modes compute in bf16."""
    peak = {"int8": hw.int8_tflops, "fp8": hw.fp8_tflops}.get(quant)
    if not peak:
        return flops["device"]
    proj = flops["device_projections"]
    return flops["device"] - proj + proj * hw.tflops / peak


@dataclasses.dataclass(frozen=True)
class Hardware:
    """A machine of the FPS model: published peaks (bf16 dense FLOP/s; link GB/s one direction) and
    an assumed time per collective beyond its bytes (`latency_us`; sources in the comment above `HARDWARE`)."""

    name: str
    devices: int
    chip: str
    tflops: float
    hbm_gib: float
    tokens_gbs: float  # the link a `tokens` ring crosses (its slowest hop)
    model_gbs: float  # the link a `model` group's psums cross
    target: str | None  # the `bcjax bench compile` target with these devices
    note: str
    int8_tflops: float | None = None  # dense int8 peak (TOP/s); None: no int8 matmuls
    fp8_tflops: float | None = None  # dense fp8 peak; None: no fp8 matmuls
    # (low, high) microseconds one collective costs beyond bytes / bandwidth (launch, protocol,
    # the wait for the slowest device): the optimistic and the pessimistic assumption
    latency_us: tuple[float, float] = (10.0, 30.0)


_H100: dict[str, Any] = dict(chip="H100 SXM", tflops=989.0, hbm_gib=80.0, model_gbs=450.0, target="h100",
                             int8_tflops=1979.0, fp8_tflops=1979.0)
_H200: dict[str, Any] = {**_H100, "chip": "H200 SXM", "hbm_gib": 141.0, "target": "h200"}
_V5E: dict[str, Any] = dict(chip="TPU v5e", tflops=197.0, hbm_gib=16.0, tokens_gbs=50.0, model_gbs=50.0,
                            int8_tflops=394.0, latency_us=(3.0, 10.0))
_V5P: dict[str, Any] = dict(chip="TPU v5p", tflops=459.0, hbm_gib=95.0, tokens_gbs=100.0, model_gbs=100.0,
                            int8_tflops=918.0, latency_us=(3.0, 10.0))
_V6E: dict[str, Any] = dict(chip="TPU v6e", tflops=918.0, hbm_gib=32.0, tokens_gbs=100.0, model_gbs=100.0,
                            int8_tflops=1836.0, latency_us=(3.0, 10.0))
# Sources: NVIDIA H100 SXM datasheet (989 TFLOP/s dense bf16, 1979 dense fp8 and int8; NVLink 4
# 900 GB/s per GPU = 450 GB/s each way, through NVSwitch inside a node); H200 SXM: the same peaks and
# NVLink, 141 GB; ConnectX-7 400 Gb/s = 50 GB/s per GPU between nodes. Google Cloud TPU system
# architecture pages (docs.cloud.google.com/tpu/docs/v5e, v5p, v6e): peak bf16 per chip (int8: twice
# it; no fp8), HBM, and bidirectional ICI per chip over its ports: v5e 400 GB/s over 4 ports, v5p
# 1200 GB/s over 6, v6e 800 GB/s over 4, i.e. 50, 100, 100 GB/s per link each way. A ring over an
# axis is modelled on one link each way (a bidirectional ring would halve its time).
# Per-collective latency, stated assumptions (not measured here): an NCCL all-gather / all-reduce
# inside one NVSwitch node costs 10-30 us beyond its bytes; across InfiniBand 20-60 us; a TPU ICI
# collective, issued by XLA inside one program with no host in the loop, 3-10 us.
_IB_LATENCY_US = (20.0, 60.0)
HARDWARE = {h.name: h for h in (
    Hardware("1 H100", 1, tokens_gbs=450.0, note="one GPU: no communication", **_H100),
    Hardware("5 H100", 5, tokens_gbs=450.0, note="one node, NVLink 450 GB/s each way (the paper's setup)", **_H100),
    Hardware("8 H100", 8, tokens_gbs=450.0, note="one node, NVLink 450 GB/s each way", **_H100),
    Hardware("16 H100", 16, tokens_gbs=50.0, note="two nodes: the `tokens` ring crosses InfiniBand, 50 GB/s per GPU",
             latency_us=_IB_LATENCY_US, **_H100),
    Hardware("TPU v5e-32", 32, target="v5e-32", note="ICI 50 GB/s per link each way; XLA:TPU needs the whole slice",
             **_V5E),
    Hardware("TPU v5p-16", 8, target="v5p-16", note="8 chips, ICI 100 GB/s per link each way", **_V5P),
    Hardware("TPU v6e-16", 16, target="v6e-16", note="ICI 100 GB/s per link each way", **_V6E),
)}
# (hardware, stagger, `tokens` devices or None = the whole machine over the smallest `model` that fits)
FPS_ROWS = (
    ("1 H100", "sequential", 1), ("1 H100", "P4", 1),
    ("5 H100", "sequential", 5), ("5 H100", "P2", 5), ("5 H100", "P4", 5),
    ("8 H100", "sequential", 8), ("8 H100", "P2", 8), ("8 H100", "P4", 8),
    ("16 H100", "P4", 16),
    ("TPU v5e-32", "sequential", None), ("TPU v5e-32", "P4", None),
    ("TPU v5p-16", "sequential", None), ("TPU v5p-16", "P4", None),
    ("TPU v6e-16", "sequential", None), ("TPU v6e-16", "P4", None),
)
# the paper's measured FPS (paper.md, section 1): H100s with FlashAttention 3
PAPER_FPS = {("wan2.1-1.3b", "1 H100", "sequential"): 16.0, ("wan2.1-1.3b", "5 H100", "P4"): 30.0,
             ("wan2.1-14b", "1 H100", "sequential"): 4.5, ("wan2.1-14b", "5 H100", "P4"): 12.5}
CALIBRATION = ("wan2.1-1.3b", "1 H100", "sequential")  # the MFU of the calibrated column comes from here
PAPER_LATENT_HW = (60, 104)  # 480x832: the paper's measurements, so the calibration, are at this size
PAPER_VIDEO_BLOCKS = 7  # an 81-frame video (21 latent frames), Self-Forcing's default length


def hardware_for(device_kind: str, count: int) -> Hardware | None:
    """The FPS model's machine of `count` devices of a jax `device.device_kind` ("NVIDIA H100 80GB
    HBM3", "NVIDIA H200", "TPU v5 lite", "TPU v5p", "TPU v6 lite"), with the link figures of
    `HARDWARE`'s entries: GPUs within one NVLink node up to 8, beyond that the `tokens` ring crosses
    InfiniBand; TPUs over ICI. None for a chip the model has no figures for (a CPU, an A100, a v4)."""
    if count < 1:
        raise ValueError(f"hardware_for: {count} devices; expected at least 1")
    kind = device_kind.lower()
    gpu = _H200 if "h200" in kind else _H100 if "h100" in kind else None
    if gpu is not None:
        if count <= 8:
            link = "no communication" if count == 1 else "one node, NVLink 450 GB/s each way"
            return Hardware(f"{count} {gpu['chip'].split()[0]}", count, tokens_gbs=450.0, note=link, **gpu)
        return Hardware(f"{count} {gpu['chip'].split()[0]}", count, tokens_gbs=50.0, latency_us=_IB_LATENCY_US,
                        note="several nodes: the `tokens` ring crosses InfiniBand, 50 GB/s per GPU", **gpu)
    if "tpu" not in kind:
        return None
    # the spellings of bcjax.targets._kinds: v5e is "TPU v5 lite", v5p "TPU v5" or "TPU v5p", v6e "TPU v6 lite"
    if "v5 lite" in kind or "v5e" in kind or "v5litepod" in kind:
        chip = _V5E
    elif "v6" in kind:
        chip = _V6E
    elif "v5p" in kind or kind.strip().endswith("v5"):
        chip = _V5P
    else:
        return None
    return Hardware(f"{count} {chip['chip']}", count, target=None, note="ICI, one link each way per ring", **chip)


@dataclasses.dataclass(frozen=True)
class Assumptions:
    """One end of the FPS model's range: how steeply a short shard loses MFU, which of a machine's
    per-collective latencies applies, how much communication hides under compute."""

    name: str
    half_tokens: float  # k of `shard_mfu`: query tokens per device whose fixed costs equal their work
    latency: int  # index into Hardware.latency_us: 0 the low figure, 1 the high one
    overlap: float  # fraction of a tick's communication time hidden under its compute, in [0, 1]


# k 700: 1.3B sequential on 4 H100s (1170 tokens per GPU) at about xDiT's 66% parallel efficiency for
# Flux on 4 H100s at 1152 tokens per GPU (tests/test_bench_comm.py pins the band); k 200 and half the
# communication hidden: a stack that overlaps and launches well (XLA's async collectives)
PESSIMISTIC = Assumptions("pessimistic", half_tokens=700.0, latency=1, overlap=0.0)
OPTIMISTIC = Assumptions("optimistic", half_tokens=200.0, latency=0, overlap=0.5)
RANGE = (PESSIMISTIC, OPTIMISTIC)  # low FPS first


def shard_mfu(mfu: float, device_tokens: int, half_tokens: float, anchor_tokens: int) -> float:
    """MFU of a device holding `device_tokens` query tokens, given `mfu` at `anchor_tokens` (the
    calibration's shard): on the saturating curve c(t) = t / (t + k) below the anchor, a fixed
    per-layer cost worth k = `half_tokens` tokens of work; never above `mfu` (a longer shard is not
    assumed to beat the measured one)."""
    if device_tokens < 1 or anchor_tokens < 1:
        raise ValueError(f"shard_mfu: {device_tokens} tokens per device, anchor {anchor_tokens}; expected >= 1")
    curve = device_tokens * (anchor_tokens + half_tokens) / (anchor_tokens * (device_tokens + half_tokens))
    return mfu * min(1.0, curve)


def model_fps(flops_per_device: float, comm: dict, hw: Hardware, mfu: float, stride: int, *,
              latency_us: float = 0.0, overlap: float = 0.0) -> dict[str, float]:
    """One tick's time and the FPS of one block (12 frames) every `stride` ticks. The tick: compute
    at `mfu`, plus per axis its wire bytes over its link and `latency_us` per collective, of which
    the fraction `overlap` hides under compute (never more than the compute). The defaults (no
    latency, no overlap) are the bytes-only model of `calibrated_mfu`."""
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"model_fps: overlap {overlap}; expected a fraction in [0, 1]")
    compute = flops_per_device / (hw.tflops * 1e12 * mfu)
    links = {"tokens": hw.tokens_gbs, "model": hw.model_gbs}
    axes = {a: comm.get(a, {}).get("wire", 0.0) / (gbs * 1e9) + comm.get(a, {}).get("ops", 0) * latency_us * 1e-6
            for a, gbs in links.items()}
    hidden = min(overlap * sum(axes.values()), compute)
    tick = compute + sum(axes.values()) - hidden
    return {"compute_ms": 1e3 * compute, "tokens_ms": 1e3 * axes["tokens"], "model_ms": 1e3 * axes["model"],
            "hidden_ms": 1e3 * hidden, "tick_ms": 1e3 * tick, "mfu": mfu,
            "fps": VIDEO_FRAMES_PER_BLOCK / (stride * tick)}


def tick_range(flops_per_device: float, comm: dict, hw: Hardware, mfu: float, stride: int, device_tokens: int,
               anchor_tokens: int) -> dict[str, dict[str, float]]:
    """`model_fps` under each assumption set of `RANGE`, {name: result}: `mfu` is the MFU at the
    calibration's `anchor_tokens` per device, moved along each set's `shard_mfu` curve."""
    return {a.name: model_fps(flops_per_device, comm, hw, shard_mfu(mfu, device_tokens, a.half_tokens, anchor_tokens),
                              stride, latency_us=hw.latency_us[a.latency], overlap=a.overlap) for a in RANGE}


def _weights_bytes(cfg) -> float:
    import jax
    import jax.numpy as jnp

    from bcjax.model.wan import param_shapes

    return sum(int(np.prod(a.shape)) * jnp.dtype(a.dtype).itemsize
               for a in jax.tree_util.tree_leaves(param_shapes(cfg)))


def row_mesh(cfg, hw: Hardware, tokens: int | None) -> tuple[int, int]:
    """(tokens, model) of an FPS row: `model` the smallest size splitting heads and FFN whose weights
    take at most half a device (`bench compile`'s rule); tokens None = every device."""
    valid = [m for m in (1, 2, 4, 8, 16) if cfg.num_heads % m == 0 and cfg.ffn_dim % m == 0 and m <= hw.devices]
    fitting = [m for m in valid if _weights_bytes(cfg) / m <= hw.hbm_gib * 2**30 / 2]
    model = (fitting or valid[-1:])[0]
    return (tokens if tokens is not None else hw.devices // model), model


@dataclasses.dataclass
class FpsRow:
    preset: str
    port: str
    hardware: Hardware
    stagger: str
    mask: Mask
    mesh: tuple[int, int]
    layout: TickLayout
    flops: dict
    comm: dict


def fps_rows(preset: str, latent_hw, mask: Mask, dtype: str = "bfloat16", rows=FPS_ROWS, port: str | None = None,
             group: int | None = None, quant: str = "none") -> list[FpsRow]:
    """The FPS table's rows; under `quant` int8/fp8 each row's device FLOPs are `at_precision`'s
    bf16 equivalent (the unscaled count stays in flops["matmul"])."""
    import ports
    from bcjax.model.config import WanConfig

    cfg = WanConfig.preset(preset, dtype=dtype, param_dtype=dtype)
    port = port or PORT_OF.get(preset, "self_forcing")
    pcfg = ports.get(port).pipeline
    out = []
    for name, stagger, tokens in rows:
        hw = HARDWARE[name]
        mesh = row_mesh(cfg, hw, tokens)
        row_mask = "causal" if stagger == "sequential" else mask  # one block in flight: the masks agree
        flops = tick_flops(cfg, pcfg, latent_hw, stagger, row_mask, *mesh, group=group)
        flops = {**flops, "matmul": flops["device"], "device": at_precision(flops, hw, quant)}
        out.append(FpsRow(preset, port, hw, stagger, row_mask, mesh,
                          tick_layout(cfg, pcfg, latent_hw, stagger, mesh[0], group), flops,
                          tick_bytes(cfg, pcfg, latent_hw, stagger, *mesh, group=group)))
    return out


def calibrated_mfu(row: FpsRow, fps: float) -> float:
    """The MFU at which `row` gives the measured `fps` (its communication taken as modelled)."""
    exposed = model_fps(row.flops["device"], row.comm, row.hardware, 1.0, row.layout.stride)
    compute_s = VIDEO_FRAMES_PER_BLOCK / (fps * row.layout.stride) - 1e-3 * (exposed["tokens_ms"] + exposed["model_ms"])
    return row.flops["device"] / (row.hardware.tflops * 1e12 * compute_s)


@functools.cache
def calibration() -> tuple[float, int]:
    """(MFU, query tokens per device) of `CALIBRATION`'s row at the paper's 480x832: the MFU at
    which 1.3B sequential on one H100 gives the paper's measured 16 FPS, and the shard it was
    measured on, the anchor of every row's `shard_mfu`."""
    preset, hw, stagger = CALIBRATION
    row = fps_rows(preset, PAPER_LATENT_HW, "causal", rows=((hw, stagger, 1),))[0]
    return calibrated_mfu(row, PAPER_FPS[CALIBRATION]), row.layout.device_tokens


def row_range(row: FpsRow, mfu: float | None = None) -> dict[str, dict[str, float]]:
    """`tick_range` of an FPS row: at the calibrated MFU, or at `mfu` on the calibration's shard."""
    cal, anchor = calibration()
    return tick_range(row.flops["device"], row.comm, row.hardware, cal if mfu is None else mfu, row.layout.stride,
                      row.layout.device_tokens, anchor)


def predict(cfg, pcfg, latent_hw, stagger: str, mask: str, tokens: int, model: int, hw: Hardware,
            group: int | None = None, quant: str = "none") -> dict:
    """The modelled speed of one candidate (stagger, mask, `tokens` x `model` mesh, token group,
    precision) on `hw`, at the calibrated MFU, as (low, high) ranges over `RANGE`:
    {"tick_ms": one joint pass, "block_ms": the time per emitted block (`stride` ticks),
    "latency_ms": from a block's noise to its x0 (n ticks), "fps": 12 frames per block_ms (low FPS
    pairs with high ms), "mfu": the shard's MFU, "layout": the TickLayout}. For `bcjax tune` to rank
    candidates it has not measured."""
    if tokens < 1 or model < 1 or tokens * model > hw.devices:
        raise ValueError(f"predict: a ({tokens}, {model}) mesh on {hw.name}; expected at most {hw.devices} devices")
    if mask not in MASKS:
        raise ValueError(f"predict: mask {mask!r}; expected one of {', '.join(MASKS)}")
    cal, anchor = calibration()
    lay = tick_layout(cfg, pcfg, latent_hw, stagger, tokens, group)
    flops = tick_flops(cfg, pcfg, latent_hw, stagger, mask, tokens, model, group)
    comm = tick_bytes(cfg, pcfg, latent_hw, stagger, tokens, model, group=group)
    ends = tick_range(at_precision(flops, hw, quant), comm, hw, cal, lay.stride, lay.device_tokens, anchor)
    low, high = ends[PESSIMISTIC.name], ends[OPTIMISTIC.name]

    def ms(scale: int) -> tuple[float, float]:  # (low, high) ms: the optimistic end first
        return float(scale * high["tick_ms"]), float(scale * low["tick_ms"])

    return {"tick_ms": ms(1), "block_ms": ms(lay.stride), "latency_ms": ms(lay.emit_passes),
            "fps": (float(low["fps"]), float(high["fps"])), "mfu": (float(low["mfu"]), float(high["mfu"])),
            "layout": lay}


def compiled_tick_collectives(cfg, pcfg, latent_hw, stagger: str, mask: Mask, tokens: int, model: int,
                              group: int | None = None) -> dict:
    """hlo_collectives of the cascade's compiled tick (`Runner.lower`) on a (tokens, model) mesh of
    fake CPU devices, from abstract inputs: nothing of the model's size is allocated."""
    import jax

    from bcjax.runners import make_mesh, make_runner

    n = tokens * model
    if jax.device_count() < n:
        raise RuntimeError(f"a {tokens}x{model} mesh needs {n} devices; jax has {jax.device_count()} (run this module "
                           "as its own process so it can force 64 host devices)")
    mesh = make_mesh(tokens, model, devices=jax.devices()[:n], cfg=cfg)
    cas = make_runner(cfg, pcfg, latent_hw, stagger, mask, mesh, program="tick", token_group=group)
    hlo = cas.lower(*cas.abstract_inputs()).compile().as_text()
    if hlo is None:
        raise RuntimeError(f"the {tokens}x{model} cascade compiled without an HLO text to count collectives in")
    return hlo_collectives(hlo, mesh)


def _fmt(b: float) -> str:
    return f"{b / 2**20:,.1f} MiB" if b >= 2**20 else f"{b / 2**10:,.1f} KiB"


def _bytes_cells(d: dict) -> str:
    s, m = d.get("tokens", {}), d.get("model", {})
    return (f"{_fmt(s.get('payload', 0))} / {_fmt(s.get('wire', 0))} | {_fmt(m.get('payload', 0))} / "
            f"{_fmt(m.get('wire', 0))} | {s.get('ops', 0)} / {m.get('ops', 0)}")


def _same(a: dict, b: dict) -> bool:
    keys = ("payload", "wire")
    return set(a) == set(b) and all(abs(a[x][k] - b[x][k]) <= 1e-9 * max(1.0, b[x][k]) for x in b for k in keys)


def print_bytes(cfg, pcfg, hw, staggers, tokens_sizes, models, group, hlo: bool, mask: Mask) -> None:
    import jax

    print("| stagger | mesh | T / per device (groups of g) | tokens all-gathers (payload / wire) | "
          "model psums (payload / wire) | ops tokens / model | source |")
    print("|---|---|---|---|---|---|---|")
    for stagger in staggers:
        for tokens in tokens_sizes:
            for model in models:
                lay = tick_layout(cfg, pcfg, hw, stagger, tokens, group)
                f = tick_bytes(cfg, pcfg, hw, stagger, tokens, model, group=group)
                pad = lay.padded_tokens - lay.tokens
                shape = f"{lay.tokens} / {lay.device_tokens} (g {lay.group}{f', {pad} padding' if pad else ''})"
                print(f"| {stagger} | ({tokens}, {model}) | {shape} | {_bytes_cells(f)} | formula |", flush=True)
                if not hlo:
                    continue
                try:
                    h = compiled_tick_collectives(cfg, pcfg, hw, stagger, mask, tokens, model, group)
                except Exception as e:  # noqa: BLE001 - a mesh today's cascade refuses is one row saying why
                    print(f"| {stagger} | ({tokens}, {model}) | | not compiled: {str(e).splitlines()[0]} | | | "
                          f"compiled HLO |", flush=True)
                    continue
                agree = "= formula" if _same(h, f) else "≠ formula"
                print(f"| {stagger} | ({tokens}, {model}) | | {_bytes_cells(h)} | compiled HLO "
                      f"({jax.default_backend()}), {agree} |", flush=True)


def _span(a: float, b: float, digits: int = 1, unit: str = "") -> str:
    """'low–high' of two figures in either order; one figure where they print the same."""
    lo, hi = (f"{x:.{digits}f}{unit}" for x in sorted((a, b)))
    return lo if lo == hi else f"{lo}–{hi}"


def _ends(rng: dict, key: str, scale: float = 1.0, digits: int = 1, unit: str = "") -> str:
    return _span(scale * rng[PESSIMISTIC.name][key], scale * rng[OPTIMISTIC.name][key], digits, unit)


def print_fps(presets, latent_hw, mask: Mask, mfu: float, dtype: str, group: int | None, quant: str = "none") -> dict:
    """The FPS table of every preset; returns {preset: [(row, range at mfu, range calibrated)]}, each
    range `tick_range`'s {assumption name: model_fps result}. quant: int8/fp8 run the projections
    at the hardware's 8-bit peak (`at_precision`); the calibration stays bf16 (the paper's
    measurement) at the paper's 480x832 whatever `latent_hw`."""
    tables = {p: fps_rows(p, latent_hw, mask, dtype, group=group, quant=quant) for p in presets}
    cal, anchor = calibration()
    p, o = PESSIMISTIC, OPTIMISTIC
    print(f"\nModelled FPS at {latent_hw[0] * 8}x{latent_hw[1] * 8} ({dtype}, batch 1; one block = "
          f"{VIDEO_FRAMES_PER_BLOCK} frames every `stride` ticks; mask {mask} for the cascades; --quant {quant}: "
          f"{_quant_note(quant)}). MFU {cal:.1%} is calibrated: at it 1.3B sequential on 1 H100 ({anchor} tokens per "
          f"device) reaches the paper's measured {PAPER_FPS[CALIBRATION]:.0f} FPS; MFU {mfu:.0%} is an assumption "
          f"for that shard. Each cell is a range, low to high, between two assumption sets: {p.name} (a shard of t "
          f"tokens per device runs at MFU x min(1, c(t) / c({anchor})), c(t) = t / (t + {p.half_tokens:.0f}); each "
          f"collective costs the machine's high latency; no overlap) and {o.name} (c(t) = t / (t + "
          f"{o.half_tokens:.0f}), the low latency, {o.overlap:.0%} of the communication hidden under compute). "
          f"MFU and the ms columns are the calibrated model's.")
    print(f"| model | hardware | stagger | mesh | T / per device | TFLOP/tick/device | MFU | compute ms | tokens ms | "
          f"model ms | tick ms | FPS at MFU {mfu:.0%} | FPS calibrated | paper |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    out: dict[str, list[tuple[FpsRow, dict, dict]]] = {}
    for preset, rows in tables.items():
        out[preset] = []
        for r in rows:
            a, c = row_range(r, mfu), row_range(r)
            paper = PAPER_FPS.get((preset, r.hardware.name, r.stagger))
            print(f"| {preset} | {r.hardware.name} | {r.stagger} | {r.mesh} | {r.layout.tokens} / "
                  f"{r.layout.device_tokens} | {r.flops['device'] / 1e12:.2f} | {_ends(c, 'mfu', 100, 1, '%')} | "
                  f"{_ends(c, 'compute_ms')} | {_ends(c, 'tokens_ms')} | {_ends(c, 'model_ms')} | "
                  f"{_ends(c, 'tick_ms')} | {_ends(a, 'fps')} | {_ends(c, 'fps')} | {paper if paper else '-'} |")
            out[preset].append((r, a, c))
    print("\nHardware: " + "; ".join(
        f"{h.name}: {h.chip} {h.tflops:.0f} TFLOP/s bf16, int8 {h.int8_tflops or 'none'}, "
        f"fp8 {h.fp8_tflops or 'none'}, {h.hbm_gib:.0f} GiB, {h.note}, {_span(*h.latency_us, 0)} us per collective"
        for h in HARDWARE.values()))
    # the paper's other measured figures against the calibrated model
    for preset, results in out.items():
        for r, _, c in results:
            paper = PAPER_FPS.get((preset, r.hardware.name, r.stagger))
            if paper is None or (preset, r.hardware.name, r.stagger) == CALIBRATION:
                continue
            need = 1e3 * VIDEO_FRAMES_PER_BLOCK / (paper * r.layout.stride)
            slow = c[p.name]["tick_ms"]  # the end nearer a slower measurement
            gap = need - slow
            print(f"{preset} {r.stagger} on {r.hardware.name}: calibrated model {_ends(c, 'fps')} FPS vs the paper's "
                  f"{paper} FPS; the paper's tick is {need:.0f} ms, the model's {_ends(c, 'tick_ms', digits=0)} ms: "
                  f"{'an overhead of' if gap > 0 else 'a saving of'} {abs(gap):.0f} ms per tick "
                  f"({abs(gap) / slow:.0%}) beyond the {p.name} end closes the gap.")
            blocks, ticks = PAPER_VIDEO_BLOCKS, (PAPER_VIDEO_BLOCKS - 1) * r.layout.stride + r.layout.num_stages
            if r.layout.in_flight > 1:
                print(f"  if that FPS averages whole {blocks}-block videos (Self-Forcing's 81 frames), "
                      f"fill and drain count: {ticks} ticks for {blocks} blocks instead of {blocks * r.layout.stride}, "
                      f"{_ends(c, 'fps', blocks * r.layout.stride / ticks)} FPS calibrated.")
    for preset, results in out.items():
        print(five_devices(preset, results))
    return out


def _quant_note(quant: str) -> str:
    if quant in ("int8", "fp8"):
        return (f"the projections at the chip's {quant} peak, where it has one (else bf16), attention in bf16; "
                "TFLOP/tick/device is then bf16-equivalent")
    return "every matmul at the bf16 peak"


def five_devices(preset: str, rows, hardware: str = "5 H100") -> str:
    """The model's answer to "5 GPUs: cascade, context parallel, or both?" for one preset, from
    `print_fps`'s (row, range at --mfu, calibrated range) list: each stagger's calibrated FPS range
    and a block's latency (noise to x0, n ticks) on `hardware`, then which of context-parallel
    sequential (short shards, many collectives) and P4 (long shards) each assumption set favours,
    and the time per pass context parallelism may lose to its short shards and communication
    before P4 catches up."""
    here = {r.stagger: (r, c) for r, _, c in rows if r.hardware.name == hardware}
    parts = [f"{stagger} {_ends(c, 'fps')} FPS ({_ends(c, 'tick_ms', r.layout.emit_passes, 0)} ms from noise to a "
             f"block's x0)" for stagger, (r, c) in here.items()]
    text = f"{preset} on {hardware}, calibrated: " + ", ".join(parts)
    if "sequential" in here and "P4" in here:
        (seq, cs), cp = here["sequential"], here["P4"][1]
        cal, _ = calibration()
        ideal = 1e3 * seq.flops["device"] / (seq.hardware.tflops * 1e12 * cal)  # a pass at the 1-device MFU, no comm
        verdicts = []
        for a in RANGE:
            s_fps, p_fps = cs[a.name]["fps"], cp[a.name]["fps"]
            budget = 1e3 * VIDEO_FRAMES_PER_BLOCK / (p_fps * seq.layout.stride) - ideal
            lost = cs[a.name]["tick_ms"] - ideal
            winner = "context parallel" if s_fps > p_fps else "P4"
            verdicts.append(f"{a.name}: {winner} by {max(s_fps, p_fps) / min(s_fps, p_fps) - 1:.0%} (a "
                            f"{seq.layout.device_tokens}-token pass may lose {budget:.0f} ms to its short shard and "
                            f"communication before P4 catches up; the model charges {lost:.0f} ms)")
        text += "; " + "; ".join(verdicts)
    return text


def print_memory(target_name: str, presets, latent_hw, mask: Mask, dtype: str, layers: int | None) -> None:
    """Per-device memory of each FPS row that fits `target_name`'s devices: the Cascade of its
    stagger compiled for the target (bench compile's `compile_row`; nothing runs): the tick,
    context parallel for the sequential stagger."""
    from bcjax import compile_cache, targets
    from bcjax.bench.compile import HEADER, build_mesh, compile_row, print_row
    from bcjax.model import attention
    from bcjax.runners import make_runner

    compile_cache.disable()
    target = targets.get(target_name)
    devices = target.devices()
    print(f"\nPer-device memory on {target.name} ({target.what}), the cascade of each row compiled on this "
          f"branch's tick:")
    print(HEADER + "\n|" + "---|" * (HEADER.count("|") - 1), flush=True)
    seen = set()
    for preset in presets:
        for r in fps_rows(preset, latent_hw, mask, dtype):
            tokens, model = r.mesh
            if (r.hardware.target != target.name and target.name != "cpu") or tokens * model > len(devices):
                continue
            if (preset, r.stagger, r.mesh) in seen:
                continue
            seen.add((preset, r.stagger, r.mesh))
            cfg = dataclasses.replace(r_cfg(preset, dtype, layers),
                                      attention=attention.backends_for(target.platform)[0])
            import ports

            pcfg = ports.get(r.port).pipeline
            mesh, label = build_mesh(tokens, model, devices, cfg)
            cas = make_runner(cfg, pcfg, latent_hw, r.stagger, r.mask, mesh, program="tick")
            row = compile_row(preset, f"{r.stagger} {r.mask}", label, cfg.attention,
                              lambda cas=cas: cas.lower(*cas.abstract_inputs()), mesh)
            print_row(row, target, 0.1)


def r_cfg(preset: str, dtype: str, layers: int | None):
    from bcjax.model.config import WanConfig

    cfg = WanConfig.preset(preset, dtype=dtype, param_dtype=dtype)
    return dataclasses.replace(cfg, num_layers=layers) if layers else cfg


def main(argv=None) -> int:
    import ports
    from bcjax.model.config import WanConfig

    force_host_devices(64)  # --hlo compiles on fake CPU devices: 64 covers (16, 4)
    ap = argparse.ArgumentParser(prog="bcjax bench comm", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="wan2.1-1.3b", choices=WanConfig.preset_names(),
                    help="model of the bytes table")
    ap.add_argument("--port", help="sampler (window, steps) of the bytes table (default: the preset's, see PORT_OF)")
    ap.add_argument("--latent-hw", nargs=2, type=int, default=(60, 104), metavar=("H", "W"))
    ap.add_argument("--staggers", "--schedules", dest="staggers", nargs="+", default=list(STAGGERS), action=OldName,
                    new="--staggers", help="the staggers of the bytes table (--schedules: its deprecated name)")
    ap.add_argument("--tokens", "--stages", dest="tokens", nargs="+", type=int, default=list(TOKENS_SIZES),
                    action=OldName, new="--tokens",
                    help="sizes of the 'tokens' axis in the bytes table (--stages: its deprecated name)")
    ap.add_argument("--models", nargs="+", type=int, default=[1], help="model devices of the bytes table")
    ap.add_argument("--group", type=int, help="tokens per group (default: the divisor of tokens_per_frame with the "
                                              "least padding, see bcjax.cascade.tokens)")
    ap.add_argument("--mask", "--window", dest="mask", default=DEFAULT_MASK, choices=MASKS, action=OldName,
                    new="--mask", help="the cascades' mask (FLOPs of the FPS model; the mask of --hlo's programs); "
                    "--window: its deprecated name")
    ap.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"))
    ap.add_argument("--mfu", type=float, default=0.4,
                    help="assumed fraction of peak FLOP/s reached on the calibration's shard (4680 tokens per "
                         "device); shorter shards fall on each assumption set's curve (FPS model)")
    ap.add_argument("--quant", default="none", choices=QUANTS,
                    help="the FPS model's precision: int8/fp8 contract the projections at the chip's 8-bit peak "
                         "(bcjax.model.quant); weight-only modes compute in bf16")
    ap.add_argument("--fps-presets", nargs="*", default=["wan2.1-1.3b", "wan2.1-14b"],
                    help="models of the FPS table (none: no FPS table)")
    ap.add_argument("--hlo", action="store_true", help="also count the collectives of each compiled tick")
    ap.add_argument("--memory", metavar="TARGET", help="also compile each FPS row's cascade for this `bench compile` "
                                                       "target (v5e-32, v5p-16, v6e-16, h100, cpu) and print its "
                                                       "per-device memory (slow for the real presets)")
    ap.add_argument("--layers", type=int, help="DiT layers of --memory's programs (default: the preset's)")
    args = ap.parse_args(argv)
    if not 0 < args.mfu <= 1:
        raise SystemExit(f"--mfu {args.mfu}: expected a fraction in (0, 1]")
    cfg = WanConfig.preset(args.preset, dtype=args.dtype, param_dtype=args.dtype, attention="dense")
    port = args.port or PORT_OF.get(args.preset, "self_forcing")
    pcfg, hw = ports.get(port).pipeline, tuple(args.latent_hw)
    print(f"{args.preset} | sampler {port} ({pcfg.num_steps} steps, cache {pcfg.cache_frames} frames) | latent "
          f"{hw[0]}x{hw[1]} ({cfg.tokens_per_frame(*hw)} tokens per frame) | {args.dtype} | batch 1 | bytes per "
          f"tick per device, token-sharded tick")
    print_bytes(cfg, pcfg, hw, args.staggers, args.tokens, args.models, args.group, args.hlo, args.mask)
    if args.hlo:
        import jax

        if jax.default_backend() == "cpu" and args.dtype == "bfloat16":
            print("XLA:CPU computes bf16 as f32, so its collectives carry twice the bytes of a bf16 accelerator's "
                  "(compare with --dtype float32).")
    if args.fps_presets:
        print_fps(args.fps_presets, hw, args.mask, args.mfu, args.dtype, args.group, args.quant)
        print("\nPer-device memory of these rows: `bcjax bench comm --memory TARGET` (TARGET: h100, v5e-32, v5p-16, "
              "v6e-16) compiles each row's cascade for that target with `bench compile`'s machinery, e.g.\n"
              "  JAX_PLATFORMS=cpu bcjax bench comm --tokens 1 --memory v5e-32")
    if args.memory:
        print_memory(args.memory, args.fps_presets or [args.preset], hw, args.mask, args.dtype, args.layers)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
