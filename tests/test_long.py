"""Long streams: rolling RoPE positions past the table, and a soak with no recompiles or growth."""

import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import shared

from bcjax.compile_count import CompileCounter
from bcjax.model import text_kv
from bcjax.model.rope import rope_base
from bcjax.pipeline import PipelineConfig

HW = (4, 6)
LONGLIVE = PipelineConfig(window_frames=12, sink_frames=3)


@pytest.fixture(scope="module")
def text(tiny_cfg, tiny_params):
    ctx = np.random.default_rng(5).standard_normal((1, tiny_cfg.text_len, tiny_cfg.text_dim)).astype(np.float32)
    return text_kv(tiny_cfg, tiny_params, jnp.asarray(ctx))


def _table(cfg, positions):
    return dataclasses.replace(cfg, rope_max_positions=positions)


def _err(a, b):
    return float(jnp.abs(jnp.asarray(a) - jnp.asarray(b)).max())


@pytest.mark.parametrize("sink", [0, 3])
@pytest.mark.parametrize("table", [1024, 40])
def test_rolling_positions_stay_in_the_table_and_keep_every_window_offset(sink, table):
    pcfg = PipelineConfig(window_frames=12, sink_frames=sink, positions="rolling")
    bf, period = pcfg.block_frames, pcfg.rope_period(table)
    span = pcfg.cache_frames - sink + (pcfg.num_steps + 1) * bf  # rolling cache + a P1 cascade's blocks
    jumps = 0
    for block in range(sink // bf, 4000):  # 12 000 latent frames
        newest = block * bf + bf - 1
        base = int(rope_base(table, period, newest, xp=np))
        frames = np.arange(max(sink, newest - span + 1), newest + 1)  # every non-sink frame a pass can see
        pos = frames - base
        assert pos.max() <= table - 1 and pos.min() >= sink  # inside the table, never on the sink's positions
        np.testing.assert_array_equal(np.diff(pos), 1)  # offsets inside the window are the absolute ones
        jumps += base != int(rope_base(table, period, newest - bf, xp=np))
    assert jumps == -(-(4000 * bf - table) // period)  # it really rolls, once per period


def test_rolling_table_too_short_for_the_window_is_refused(tiny_cfg):
    with pytest.raises(ValueError, match="RoPE table longer than"):
        shared.runner(_table(tiny_cfg, 24), dataclasses.replace(LONGLIVE, positions="rolling"), HW, program="block")
    with pytest.raises(ValueError, match="positions='rolling'"):
        shared.runner(_table(tiny_cfg, 60), LONGLIVE, HW, program="block").generate(None, None, jax.random.key(0),
                                                                                  num_blocks=21)
    with pytest.raises(ValueError, match="positions="):
        PipelineConfig(positions="relative")


@pytest.mark.parametrize("runner", ["sequential", "P4-bidirectional"])
def test_rolling_without_sink_is_the_absolute_stream(tiny_cfg, tiny_params, text, runner):
    """No sink: every offset the model sees is preserved by a jump, so a stream far past a short
    table equals the absolute stream of a long one (the re-rotation is exact up to rounding)."""
    pcfg = PipelineConfig(window_frames=9)
    key, n = jax.random.key(1), 24  # 72 latent frames through a 30-position table: 6 jumps

    def make(cfg, p):
        if runner == "sequential":
            return shared.runner(cfg, p, HW, program="block")
        return shared.runner(cfg, p, HW, "P4", "bidirectional", program="tick")

    absolute = make(tiny_cfg, pcfg).generate(tiny_params, text, key, num_blocks=n)
    rolling = make(_table(tiny_cfg, 30), dataclasses.replace(pcfg, positions="rolling")).generate(tiny_params, text,
                                                                                                  key, num_blocks=n)
    assert _err(rolling, absolute) <= 2e-4, _err(rolling, absolute)


def test_rolling_with_sink_is_absolute_until_the_table_ends_then_runs_on(tiny_cfg, tiny_params, text):
    """With a sink: identical up to the first jump (continuity), then the sink moves closer, so
    the stream changes, stays finite, and never recompiles."""
    key, n, table = jax.random.key(2), 20, 36
    absolute = shared.runner(tiny_cfg, LONGLIVE, HW, program="block").generate(tiny_params, text, key, num_blocks=n)
    pipe = shared.runner(_table(tiny_cfg, table), dataclasses.replace(LONGLIVE, positions="rolling"), HW,
                         program="block")
    with CompileCounter() as cc:
        rolling = jnp.concatenate([x for _, x in pipe.blocks(tiny_params, text, key, num_blocks=n)], axis=1)
    assert cc.count <= 3  # block fn (+ its rebase branch, + tiny host ops), never per block
    first_jump = table // LONGLIVE.block_frames  # first block whose last frame passes the table
    before = slice(0, first_jump * LONGLIVE.block_frames)
    assert _err(rolling[:, before], absolute[:, before]) <= 1e-5
    after = rolling[:, first_jump * LONGLIVE.block_frames:]
    assert bool(jnp.isfinite(after).all())
    assert _err(after, absolute[:, first_jump * LONGLIVE.block_frames:]) > 1e-4  # the sink really moved


def _rss_mib():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@pytest.mark.slow
@pytest.mark.parametrize("runner", ["sequential", "P4-bidirectional"])
def test_soak_ten_thousand_frames_no_recompile_no_growth(tiny_cfg, tiny_params, text, runner):
    """10 000+ latent frames (LongLive window and sink, rolling positions through the 1024 table
    ten times): zero compiles after warm-up, a constant set of live device buffers, flat RSS."""
    pcfg = dataclasses.replace(LONGLIVE, positions="rolling")
    if runner == "sequential":
        pipe = shared.runner(tiny_cfg, pcfg, HW, program="block")
        stream = (x for _, x in pipe.blocks(tiny_params, text, jax.random.key(3), num_blocks=3400))
    else:
        stream = (x for _, x in shared.runner(tiny_cfg, pcfg, HW, "P4", "bidirectional", program="tick").blocks(
            tiny_params, text, jax.random.key(3), num_blocks=None))
    warm = 50
    for _ in range(warm):
        assert bool(jnp.isfinite(next(stream)).all())  # also compiles the check used below
    live0 = sum(a.nbytes for a in jax.live_arrays())
    rss0, t0 = _rss_mib(), time.perf_counter()
    with CompileCounter() as cc:
        for i in range(3400 - warm):
            x0 = next(stream)
            if i % 500 == 0:
                assert bool(jnp.isfinite(x0).all())
        jax.block_until_ready(x0)
        live1 = sum(a.nbytes for a in jax.live_arrays())
    print(f"{runner}: {3400 - warm} blocks in {time.perf_counter() - t0:.1f} s, compiles {cc.count}, "
          f"live {live0} -> {live1} B, max RSS {rss0:.0f} -> {_rss_mib():.0f} MiB")
    assert cc.count == 0
    assert live1 <= live0 + x0.nbytes  # at most the last block held here
    assert _rss_mib() - rss0 < 64


def test_cli_generate_takes_the_positions_option(tmp_path):
    from bcjax.cli import main

    out = tmp_path / "latents.npy"
    assert main(["generate", "--positions", "rolling", "--port", "longlive", "--blocks", "2", "--latent-hw", "4", "6",
                 "--out", str(out)]) == 0
    assert np.load(out).shape[:4] == (1, 6, 4, 6)
