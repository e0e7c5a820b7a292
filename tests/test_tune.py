"""`bcjax tune`: real timings on fake CPU devices pick and store a setting that `--stagger auto`
then runs; with injected timings the choice is the argmin; a stored tuning of another version or
shape is not used (one line says why); an interrupted tune keeps its rows, is not used, resumes."""

import dataclasses
import os

import jax
import numpy as np
import pytest

from bcjax import cli
from bcjax.tune import measure, resolve, store
from bcjax.tune.command import build_setup
from bcjax.tune.measure import Candidate, Row


@pytest.fixture
def folder(tmp_path, monkeypatch):
    path = str(tmp_path / "tune")
    monkeypatch.setenv(store.ENV, path)
    return path


def _setup(devices=1):
    return build_setup(preset="tiny", checkpoint=None, devices=devices, model=1, latent_hw=(8, 8), dtype=None,
                       quant=None, sampler=None, mask="causal")


def _key(setup, name="tiny", **over):
    devs = list(setup.mesh.devices.flat) if setup.mesh is not None else jax.devices()[:1]
    kw = dict(device_kind=devs[0].device_kind, devices=len(devs), model_devices=1, model=name, mask=setup.mask,
              latent_hw=setup.latent_hw, dtype=str(setup.cfg.dtype), quant=setup.cfg.quant)
    return store.TuneKey.make(setup.cfg, setup.pcfg, **{**kw, **over})


def test_tune_on_fake_devices_stores_what_stagger_auto_then_runs(folder, capsys):
    """Real timings (tiny preset, 2 fake CPU devices): the winner is the least ms per block among
    the printed rows, stored, and `generate --stagger auto` runs it, saying it was measured."""
    rc = cli.main(["tune", "--preset", "tiny", "--devices", "2", "--staggers", "sequential", "P4",
                   "--attention", "dense", "--ticks", "2", "--cache", folder])
    out = capsys.readouterr().out
    assert rc == 0, out
    files = [f for f in os.listdir(folder) if f.endswith(".json")]
    assert len(files) == 1 and not [f for f in os.listdir(folder) if f.startswith(".tune-")]
    rec = store.read_record(os.path.join(folder, files[0]))
    assert rec is not None and rec["complete"] and len(rec["rows"]) == 2
    rows = [measure.from_dict(r) for r in rec["rows"]]
    assert all(r.error is None and r.tick_ms > 0 and r.memory_bytes > 0 and r.compile_s > 0 for r in rows)
    best = min(rows, key=lambda r: r.block_ms)
    assert (rec["winner"]["stagger"], rec["winner"]["attention"]) == (best.stagger, best.attention)
    assert "**winner**" in out and f"winner: {best.stagger}, attention dense" in out
    # sequential on the tick's 2-device split is 5 ticks per block, P4 one
    assert {r.stagger: r.steps_per_block for r in rows} == {"sequential": 5, "P4": 1}

    rc = cli.main(["generate", "--preset", "tiny", "--stagger", "auto", "--attention", "auto", "--devices", "2",
                   "--blocks", "2"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"--stagger auto / --attention auto: {best.stagger}, attention dense (measured by `bcjax tune` on " \
           f"2 x cpu" in out
    label = "P4 causal, 5 blocks in flight on 2 device(s)" if best.stagger == "P4" else "sequential"
    assert label in out


def _fake(times: dict[tuple[str, str], tuple[float, int] | str]):
    """A measure_fn: (stagger, attention) -> (ms per tick, ticks per block), or an error text."""
    calls = []

    def fn(setup, c: Candidate) -> Row:
        calls.append(c)
        t = times[(c.stagger, c.attention)]
        if isinstance(t, str):
            return Row(c.stagger, c.attention, c.group, error=t)
        return Row(c.stagger, c.attention, c.group, tick_ms=t[0], steps_per_block=t[1], memory_bytes=1.0,
                   compile_s=0.1)
    return fn, calls


TIMES = {("sequential", "dense"): (1.0, 5), ("sequential", "chunked"): (1.1, 5),  # 5.0 / 5.5 ms per block
         ("P2", "dense"): (2.1, 2), ("P2", "chunked"): "XlaRuntimeError: out of memory",  # 4.2
         ("P4", "dense"): (4.3, 1), ("P4", "chunked"): (4.1, 1)}  # 4.3 / 4.1: the argmin


def test_with_injected_timings_the_choice_is_the_argmin_of_ms_per_block(folder):
    setup, _ = _setup()
    cands = measure.candidates(setup, ("sequential", "P2", "P4"), ("dense", "chunked"))
    assert len(cands) == 6 and {c.group for c in cands} == {None}  # one device: no group to choose
    fn, calls = _fake(TIMES)
    rec = measure.tune(setup, _key(setup), cands, measure_fn=fn, progress=False)
    assert len(calls) == 6
    ok = {k: v[0] * v[1] for k, v in TIMES.items() if not isinstance(v, str)}
    assert (rec["winner"]["stagger"], rec["winner"]["attention"]) == min(ok, key=ok.get) == ("P4", "chunked")
    assert rec["winner"]["block_ms"] == pytest.approx(4.1)
    # the least ms per tick (sequential's 1.0) is not the winner: a block takes 5 of its ticks
    table = measure.table(rec)
    assert table.index("| P4 | - | chunked") < table.index("| P2 | - | dense") < table.index("| sequential | - | dense")
    assert "out of memory" in table


def test_a_stored_tuning_of_another_version_or_shape_is_not_used(folder, monkeypatch):
    setup, _ = _setup()
    fn, _ = _fake(TIMES)
    measure.tune(setup, _key(setup), measure.candidates(setup, ("sequential", "P2", "P4"), ("dense", "chunked")),
                 measure_fn=fn, progress=False)
    args = (setup.cfg, setup.pcfg, setup.latent_hw, "causal", None)
    used = resolve(*args, stagger="auto", attention="auto", model="tiny", folder=folder)
    assert (used.source, used.stagger, used.attention) == ("tuned", "P4", "chunked")
    assert "measured by `bcjax tune` on 1 x cpu" in used.line

    monkeypatch.setattr(store, "bcjax_version", lambda: "9.9.9")  # a newer bcjax than the one that tuned
    other = resolve(*args, stagger="auto", attention="auto", model="tiny", folder=folder)
    assert other.source == "predicted" and other.attention == "auto" and other.group is None
    assert "differs in version" in other.line and "9.9.9" in other.line and "\n" not in other.line
    monkeypatch.undo()

    wide = resolve(setup.cfg, setup.pcfg, (8, 16), "causal", None, stagger="auto", attention=None, folder=folder)
    assert wide.source == "predicted" and "latent_hw [8, 8] (here [8, 16])" in wide.line
    # the prediction on a CPU: the fewest FLOPs per block (sequential: one block's passes, no in-flight keys)
    assert wide.stagger == "sequential"
    deeper = dataclasses.replace(setup.cfg, num_layers=setup.cfg.num_layers + 1)
    assert "model shape" in resolve(deeper, setup.pcfg, (8, 8), "causal", None, stagger="auto", attention=None,
                                    folder=folder).line
    # a flag that is not "auto" is kept, and nothing is said
    given = resolve(*args, stagger="P2", attention=None, folder=folder)
    assert (given.stagger, given.line) == ("P2", "")


def test_an_interrupted_tune_keeps_its_rows_is_not_used_and_resumes(folder):
    setup, _ = _setup()
    key = _key(setup)
    cands = measure.candidates(setup, ("sequential", "P2", "P4"), ("dense", "chunked"))
    fn, calls = _fake(TIMES)

    def interrupted(s, c):
        if len(calls) == 3:
            raise KeyboardInterrupt
        return fn(s, c)

    with pytest.raises(KeyboardInterrupt):
        measure.tune(setup, key, cands, measure_fn=interrupted, progress=False)
    path = os.path.join(folder, key.filename())
    rec = store.read_record(path)
    assert rec is not None and not rec["complete"] and rec["winner"] is None and len(rec["rows"]) == 3
    assert os.listdir(folder) == [key.filename()]  # no temporary file left
    found, why = store.lookup(key, folder)
    assert found is None and "interrupted after 3 candidate(s)" in why
    line = resolve(setup.cfg, setup.pcfg, setup.latent_hw, "causal", None, stagger="auto", attention=None,
                   model="tiny", folder=folder).line
    assert "interrupted" in line and "model's prediction" in line

    fn2, calls2 = _fake(TIMES)
    rec = measure.tune(setup, key, cands, measure_fn=fn2, progress=False)
    assert len(calls2) == 3 and set(calls2).isdisjoint(set(calls[:3]))  # only what was left
    assert rec["complete"] and (rec["winner"]["stagger"], rec["winner"]["attention"]) == ("P4", "chunked")


def test_a_budget_that_runs_out_measures_the_likeliest_first(folder):
    """Candidates run by predicted speed; past the budget the rest are listed, not measured."""
    setup, _ = _setup()
    cands = measure.candidates(setup, ("P4", "P2", "sequential"), ("dense",))
    order = measure.likeliest_first(setup, cands, None)
    flops = [measure.flops_per_block(setup, c) for c in order]
    assert flops == sorted(flops) and order[-1].stagger == "P2"  # causal P4 ties with sequential; P2 pays more
    fn, calls = _fake(TIMES)
    rec = measure.tune(setup, _key(setup), cands, budget_s=1e-9, measure_fn=fn, progress=False)
    assert calls == order[:1] and len(rec["skipped"]) == 2
    assert rec["complete"] and rec["winner"]["stagger"] == order[0].stagger
    assert measure.table(rec).count("not measured: budget") == 2


def test_group_candidates_on_several_devices():
    """On several `tokens` devices the token group is a candidate: the least-padding split, a whole
    frame, the smallest group, each once."""
    from bcjax.cascade.tokens import token_split

    setup, _ = build_setup(preset="tiny", checkpoint=None, devices=2, model=1, latent_hw=(32, 32), dtype=None,
                           quant=None, sampler=None, mask="causal")
    p = setup.cfg.tokens_per_frame(32, 32)
    groups = [c.group for c in measure.candidates(setup, ("P4",), ("dense",))]
    assert groups[0] is None and len(groups) == len(set(groups))
    default = token_split(5 * setup.pcfg.block_frames, p, 2).group
    assert set(groups[1:]) <= {g for g in range(1, p + 1) if p % g == 0} and default not in groups[1:]


def test_the_compiled_step_of_step_inputs_is_the_step(monkeypatch):
    """`Runner.step_inputs` + `lower(...).compile()` (what tune times) computes what `step` does."""
    from bcjax.runners import make_runner

    setup, _ = _setup()
    for stagger in ("sequential", "P2"):
        runner = make_runner(setup.cfg, setup.pcfg, setup.latent_hw, stagger, "causal", None)
        params, text = runner.place_params(setup.params), runner.place_text(setup.text)
        a = runner.start(params, text, jax.random.key(3), num_blocks=3)
        b = runner.start(params, text, jax.random.key(3), num_blocks=3)
        compiled = runner.lower(*runner.step_inputs(params, text, b)).compile()
        for _ in range(2):
            a, _ = runner.step(params, text, a)
            out = compiled(*runner.step_inputs(params, text, b))
            b = b._replace(carry=out[0], step=b.step + 1)
        np.testing.assert_array_equal(np.asarray(runner.cache(a).k), np.asarray(runner.cache(b).k))


def test_serve_takes_the_tuned_stagger_as_the_pages_default(folder, capsys):
    """`bcjax serve --stagger auto --attention auto`: the page's default stagger, the backend's
    attention and the tuned token group come from the stored tuning."""
    import argparse
    import types

    setup, _ = _setup()
    fn, _ = _fake(TIMES)
    measure.tune(setup, _key(setup), measure.candidates(setup, ("sequential", "P2", "P4"), ("dense", "chunked")),
                 measure_fn=fn, progress=False)
    backend = types.SimpleNamespace(cfg=setup.cfg, pcfg=setup.pcfg, latent_hw=setup.latent_hw, mesh=None)
    cli._serve_auto(argparse.Namespace(stagger="auto", attention="auto", checkpoint=None), backend)
    assert (backend.default_stagger, backend.cfg.attention) == ("P4", "chunked")
    assert "measured by `bcjax tune`" in capsys.readouterr().out
    from bcjax.serve.session import Runners

    runner = Runners(backend).get("P4", "causal")
    assert runner.cfg.attention == "chunked"
    plain = types.SimpleNamespace(cfg=setup.cfg, pcfg=setup.pcfg, latent_hw=setup.latent_hw, mesh=None)
    cli._serve_auto(argparse.Namespace(stagger="P2", attention=None, checkpoint=None), plain)
    assert plain.default_stagger == "P2" and capsys.readouterr().out == ""


def test_the_device_script_runs_both_parts_and_kills_a_part_past_its_share(tmp_path):
    """`python -m bcjax.bench.device` (the prepared script for a lent GPU) on the tiny preset: bench
    gpu, then tune, each in its own process, logs and summary.json written; a part that outlives its
    share of the deadline is killed, even when silent, and said so."""
    import json
    import subprocess
    import sys
    import time

    from bcjax.bench import device

    out = tmp_path / "check"
    proc = subprocess.run([sys.executable, "-m", "bcjax.bench.device", "--out", str(out), "--preset", "tiny",
                           "--latent-hw", "8", "8", "--dtype", "float32", "--attention", "dense", "--deadline", "240"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["bench_gpu"]["rc"] == 0 and summary["tune"]["rc"] == 0 and "done in" in proc.stdout
    assert "sequential denoise FPS" in (out / "bench-gpu.txt").read_text()
    assert "winner:" in (out / "tune.txt").read_text()
    assert [f for f in os.listdir(out / "tune") if f.endswith(".json")]

    t0 = time.perf_counter()
    silent = device._run("silent", [sys.executable, "-c", "import time; print('started', flush=True); "
                                    "time.sleep(60)"], 3.0, str(tmp_path))
    assert silent["rc"] == "killed: past its limit" and time.perf_counter() - t0 < 15
    assert (tmp_path / "silent.txt").read_text() == "started\n"


def test_tune_measures_every_installed_backend_tokamax_included_on_accelerators():
    import importlib.util

    from bcjax.model import attention

    assert attention.installed_backends("cpu") == attention.backends_for("cpu") == ("chunked", "dense")
    has = importlib.util.find_spec("tokamax") is not None
    for platform in ("gpu", "tpu"):
        found = attention.installed_backends(platform)
        assert found[:len(attention.backends_for(platform))] == attention.backends_for(platform)
        assert ("tokamax" in found) == has


def test_decode_placement_is_timed_and_the_winner_becomes_the_decode_device(folder):
    """`--decoder taehv` on a 2-device mesh of 10 fake devices: the mesh's device and one outside it
    are timed; the stored winner minimises the stream's period (decode in series on a mesh device,
    overlapped outside it), and `--stagger auto` hands it on as --decode-device."""
    from bcjax.tune import decode

    setup, _ = _setup(devices=2)
    dec = ("taehv", decode.decoder_for("taehv", None, "tiny", "float32"))
    fn, _ = _fake({("P4", "dense"): (50.0, 1)})
    rec = measure.tune(setup, _key(setup), measure.candidates(setup, ("P4",), ("dense",)), measure_fn=fn,
                       progress=False, decoder=dec)
    found = [decode.Placement(**p) for p in rec["decode"]["placements"]]
    assert [p.where for p in found] == ["mesh", "outside"] and all(p.decode_ms > 0 for p in found)
    periods = {p.spec: p.period_ms(50.0) for p in found}
    assert periods[found[0].spec] == pytest.approx(50.0 + found[0].decode_ms)
    assert periods[found[1].spec] == pytest.approx(max(50.0, found[1].decode_ms))
    assert rec["decode"]["winner"]["spec"] == min(periods, key=periods.get)
    assert "Decode placement (taehv" in measure.decode_table(rec)
    choice = resolve(setup.cfg, setup.pcfg, setup.latent_hw, "causal", setup.mesh, stagger="auto", attention=None,
                     folder=folder)
    assert choice.source == "tuned" and choice.decode_device == rec["decode"]["winner"]["spec"]


def test_bad_tune_flags_are_named_before_anything_compiles(folder, capsys):
    assert cli.main(["tune", "--preset", "tiny", "--staggers", "P4", "Q7", "--cache", folder]) == 2
    assert "--staggers Q7" in capsys.readouterr().err
    assert cli.main(["tune", "--preset", "tiny", "--budget", "0", "--cache", folder]) == 2
    assert "--budget 0.0: expected a positive number of seconds" in capsys.readouterr().err
    assert not os.path.exists(folder)  # nothing stored
