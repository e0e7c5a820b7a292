"""`bcjax tune`: time every candidate setting on the devices present and keep the fastest.

    bcjax tune [--preset P | --checkpoint DIR] [--devices N] [--model M] [--latent-hw H W]
               [--dtype D] [--quant Q] [--sampler S] [--mask M] [--staggers ...] [--attention ...]
               [--groups ...] [--ticks K] [--budget SECONDS] [--cache DIR]

A candidate is (stagger, token group, attention backend) on the (tokens = N, model = M) mesh:
the sequential stagger (on N > 1 devices: context parallelism), P2 and P4 under `--mask`; the
token group sizes of the `tokens` split (`bcjax.cascade.tokens`: the least-padding default, a whole
latent frame, the smallest group), only where N > 1; every attention backend of the platform
(`bcjax.model.attention.backends_for`). Each is compiled once, ahead of time (`Runner.lower` on
`Runner.step_inputs`: the executable a step runs), its per-device memory read from the compiled
program, then stepped from a full cache (every slot holding a frame, the steady state of a long
stream): the stagger's fill ticks as warm-up, then the median of `--ticks` steps, each waited for
(`block_until_ready`; wall time: no platform gives device time without a profiler). Weights are
random of the model's shape: speed does not depend on their values.

Candidates run in the order of their predicted speed (`bcjax.bench.comm.predict` on hardware it
knows; elsewhere FLOPs per block on the busiest device), so a `--budget` that runs out has measured
the likeliest winners. The winner (least ms per block) is stored by `bcjax.tune.store`, keyed by
device kind and count, model shape, sampler, mask, latent size, dtype, quant and bcjax version;
`generate`, `stream` and `serve` use it under `--stagger auto` / `--attention auto`.
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time
from collections.abc import Callable, Iterable
from typing import Any

from bcjax.names import Mask, as_mask
from bcjax.tune.store import TuneKey, cache_dir, lookup, new_record, read_record, write_record

STAGGERS = ("sequential", "P2", "P4")


@dataclasses.dataclass(frozen=True)
class Candidate:
    stagger: str
    attention: str
    group: int | None = None  # tokens per group of the `tokens` split; None: the least padding

    def label(self) -> str:
        return f"{self.stagger} | {self.group or '-'} | {self.attention}"


@dataclasses.dataclass
class Row:
    """One candidate measured (or why not)."""

    stagger: str
    attention: str
    group: int | None
    tokens_group: int | None = None  # the group the tick's split used (the least-padding one when group is None)
    tick_ms: float | None = None  # median ms of one tick (a one-block program's step / its n + 1 passes)
    steps_per_block: int = 1
    memory_bytes: float | None = None  # per device, from the compiled program
    compile_s: float | None = None
    predicted_fps: tuple[float, float] | None = None
    error: str | None = None

    @property
    def block_ms(self) -> float | None:
        return None if self.tick_ms is None else self.tick_ms * self.steps_per_block

    def candidate(self) -> Candidate:
        return Candidate(self.stagger, self.attention, self.group)


@dataclasses.dataclass(frozen=True)
class Setup:
    """What every candidate shares: the model, sampler, latent size, mesh and weights."""

    cfg: Any
    pcfg: Any
    latent_hw: tuple[int, int]
    mask: str
    mesh: Any  # a ('tokens', 'model') Mesh, or None for one device
    params: Any
    text: Any  # text K/V
    video_frames_per_block: int
    pcfg_for: Callable[[str], Any] | None = None  # a sampler per stagger (Krea's checkpoints), else pcfg

    @property
    def tokens(self) -> int:
        return 1 if self.mesh is None else int(self.mesh.shape["tokens"])

    def sampler(self, stagger: str):
        return self.pcfg_for(stagger) if self.pcfg_for else self.pcfg


def candidates(setup: Setup, staggers: Iterable[str], backends: Iterable[str],
               groups: Iterable[int] | None = None) -> list[Candidate]:
    """Every (stagger, group, backend); groups only where the tokens axis has several devices."""
    from bcjax.cascade.tokens import MIN_GROUP, token_split

    p = setup.cfg.tokens_per_frame(*setup.latent_hw)
    out = []
    for stagger in staggers:
        sizes: list[int | None] = [None]
        if setup.tokens > 1:
            if groups is not None:
                sizes = list(dict.fromkeys(groups))
            else:
                from bcjax.schedule.stagger import make_stagger

                frames = make_stagger(stagger, setup.pcfg.num_steps).in_flight * setup.pcfg.block_frames
                default = token_split(frames, p, setup.tokens).group
                smallest = min(g for g in range(1, p + 1) if p % g == 0 and g >= min(MIN_GROUP, p))
                sizes = [None, *(g for g in dict.fromkeys((p, smallest)) if g != default)]
        out += [Candidate(stagger, b, g) for g in sizes for b in backends]
    return out


def predicted_fps(setup: Setup, c: Candidate, hardware) -> tuple[float, float] | None:
    """(low, high) FPS of `c` by `bcjax.bench.comm.predict` on `hardware` (a `comm.Hardware`);
    None where the model knows no such hardware (a CPU)."""
    from bcjax.bench import comm
    from bcjax.model.tensor_parallel import model_size

    if hardware is None:
        return None
    mask = "causal" if c.stagger == "sequential" else setup.mask
    fps = comm.predict(setup.cfg, setup.sampler(c.stagger), setup.latent_hw, c.stagger, mask, setup.tokens,
                       model_size(setup.mesh), hardware, group=c.group, quant=setup.cfg.quant)["fps"]
    return float(fps[0]), float(fps[1])


def flops_per_block(setup: Setup, c: Candidate) -> float:
    """Matmul FLOPs of one block on the busiest device (`bcjax.bench.comm.tick_flops` x stride):
    the order of candidates, and of staggers where no hardware model applies."""
    from bcjax.bench import comm
    from bcjax.model.tensor_parallel import model_size

    mask: Mask = "causal" if c.stagger == "sequential" else as_mask(setup.mask)
    pcfg = setup.sampler(c.stagger)
    lay = comm.tick_layout(setup.cfg, pcfg, setup.latent_hw, c.stagger, setup.tokens, c.group)
    flops = comm.tick_flops(setup.cfg, pcfg, setup.latent_hw, c.stagger, mask, setup.tokens, model_size(setup.mesh),
                            c.group)
    return float(flops["device"] * lay.stride)


def likeliest_first(setup: Setup, cands: list[Candidate], hardware) -> list[Candidate]:
    """`cands` by predicted speed: the low end of the predicted FPS where the hardware is known,
    else the fewest FLOPs per block; the backends in the order given (the platform default first)."""
    def score(c: Candidate) -> float:
        fps = predicted_fps(setup, c, hardware)
        return -fps[0] if fps is not None else flops_per_block(setup, c)

    return sorted(cands, key=score)  # stable: equal scores keep the given order


def _full(cache):
    """`cache` with every slot marked as holding a frame (0 .. capacity - 1): attention then costs
    what a long stream's does (it skips empty slots). The K/V values do not matter for speed."""
    import jax
    import jax.numpy as jnp

    ids = jnp.arange(cache.frame_ids.shape[0], dtype=jnp.int32)
    return cache._replace(frame_ids=jax.device_put(ids, cache.frame_ids.sharding))


def _per_device_bytes(compiled) -> float | None:
    m = compiled.memory_analysis()
    if m is None:
        return None
    return float(m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes)


def measure(setup: Setup, c: Candidate, ticks: int = 5) -> Row:
    """Compile and time one candidate (module docstring); an error is the row's content."""
    import jax

    from bcjax.runners import make_runner

    row = Row(c.stagger, c.attention, c.group)
    try:
        cfg = dataclasses.replace(setup.cfg, attention=c.attention)
        runner = make_runner(cfg, setup.sampler(c.stagger), setup.latent_hw, c.stagger, as_mask(setup.mask), setup.mesh,
                             token_group=c.group)
        params, text = runner.place_params(setup.params), runner.place_text(setup.text)
        state = runner.start(params, text, jax.random.key(0), num_blocks=None)
        state = runner.with_cache(state, _full(runner.cache(state)))
        tick = runner.kind == "tick"
        if tick and setup.tokens > 1:
            row.tokens_group = runner.tick_program.spec.split.group
        # a one-block program's step is a whole block: reported per pass (its n + 1 passes, one tick each)
        passes = 1 if tick else runner.plan.num_stages
        row.steps_per_block = runner.plan.stride if tick else passes
        warm = runner.plan.num_stages if tick else 1
        steps = max(ticks, 3) if tick else max(2, -(-ticks // 2))
        if runner.kind == "krea":  # host work between its calls: timed through `step`, compile included in step 1
            t0 = time.perf_counter()
            state, _ = runner.step(params, text, state)
            first = time.perf_counter() - t0
            times = _timed(lambda s: runner.step(params, text, s)[0], state, warm - 1 + steps)[warm - 1:]
            row.tick_ms = 1e3 * statistics.median(times) / passes
            row.compile_s = first - statistics.median(times)
            return row
        t0 = time.perf_counter()
        compiled = runner.lower(*runner.step_inputs(params, text, state)).compile()
        row.compile_s = time.perf_counter() - t0
        row.memory_bytes = _per_device_bytes(compiled)

        def one(s):
            out = compiled(*runner.step_inputs(params, text, s))
            return s._replace(carry=out[0], step=s.step + 1)

        times = _timed(one, state, warm + steps)[warm:]
        row.tick_ms = 1e3 * statistics.median(times) / passes
    except Exception as e:  # noqa: BLE001 - a refused or failing candidate is a row saying why
        row.error = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0][:200]}"
    return row


def _timed(step: Callable, state, n: int) -> list[float]:
    import jax

    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        state = step(state)
        jax.block_until_ready(state.carry)
        times.append(time.perf_counter() - t0)
    return times


def winner(rows: Iterable[Row]) -> Row | None:
    """The measured row with the least ms per block."""
    ok = [r for r in rows if r.error is None and r.block_ms is not None]
    return min(ok, key=lambda r: r.block_ms) if ok else None  # type: ignore[arg-type, return-value]


def as_dict(row: Row) -> dict:
    d = dataclasses.asdict(row)
    d["block_ms"] = row.block_ms
    return d


def from_dict(d: dict) -> Row:
    names = {f.name for f in dataclasses.fields(Row)}
    row = Row(**{k: v for k, v in d.items() if k in names})
    if row.predicted_fps is not None:
        row.predicted_fps = (row.predicted_fps[0], row.predicted_fps[1])
    return row


def tune(setup: Setup, key: TuneKey, cands: list[Candidate], *, budget_s: float = 600.0, ticks: int = 5,
         folder: str | None = None, hardware=None, measure_fn: Callable[[Setup, Candidate], Row] | None = None,
         progress: bool = True, decoder: tuple[str, Any] | None = None) -> dict:
    """Measure `cands` (likeliest first) within `budget_s`, storing the record after each one;
    returns the record. A record of the same key left by an interrupted tune is resumed: its rows
    are kept, its candidates not measured again. measure_fn: the timing (tests inject one).
    decoder: (name, `bcjax.tune.decode.decoder_for`'s triple): also time its placements
    (`bcjax.tune.decode`) against the winner, within what is left of the budget."""
    from tqdm.auto import tqdm

    path = os.path.join(cache_dir(folder), key.filename())
    old = read_record(path)
    record = old if old is not None and old["key"] == key.identity() else new_record(key)
    record["model"], record["complete"], record["winner"] = key.model, False, None
    done = {from_dict(r).candidate(): from_dict(r) for r in record["rows"]}
    preds = {c: predicted_fps(setup, c, hardware) for c in cands}
    order = likeliest_first(setup, cands, hardware)
    todo = [c for c in order if c not in done]
    measure_fn = measure_fn or (lambda s, c: measure(s, c, ticks))
    t0, skipped = time.perf_counter(), []
    bar = tqdm(total=len(todo), unit="candidate", desc="bcjax tune", **({} if progress else {"disable": True}))
    for i, c in enumerate(todo):
        if i and time.perf_counter() - t0 > budget_s:  # the likeliest candidate is measured whatever the budget
            skipped.append(c)
            continue
        bar.set_postfix_str(c.label())
        row = measure_fn(setup, c)
        row.predicted_fps = preds[c]
        done[c] = row
        record["rows"] = [as_dict(r) for r in done.values()]
        write_record(path, record)  # after every candidate: an interrupted tune keeps what it measured
        bar.update(1)
        if row.error is None and row.block_ms:
            bar.set_postfix_str(f"{c.label()}: {row.block_ms:.1f} ms/block")
    bar.close()
    best = winner(done[c] for c in order if c in done)
    record["rows"] = [as_dict(done[c]) for c in order if c in done]
    record["skipped"] = [dataclasses.asdict(c) for c in skipped]
    record["winner"] = as_dict(best) if best else None
    record["complete"] = best is not None
    if decoder is not None and best is not None and best.block_ms is not None:
        record["decode"] = _placements(setup, decoder, best.block_ms, budget_s - (time.perf_counter() - t0))
    record["measured_s"] = time.perf_counter() - t0
    record["video_frames_per_block"] = setup.video_frames_per_block
    write_record(path, record)
    record["path"] = path
    return record


def _placements(setup: Setup, decoder: tuple[str, Any], block_ms: float, left_s: float) -> dict:
    """Each decode placement timed (the first whatever the budget), and the one a stream with
    the winner's `block_ms` runs fastest with."""
    from bcjax.tune import decode

    name, dec = decoder
    found, t0 = [], time.perf_counter()
    for i, (p, device) in enumerate(decode.placements(setup.mesh, name)):
        if i and time.perf_counter() - t0 > left_s:
            p.error = "not measured: budget"
        else:
            decode.measure(p, device, dec, setup.latent_hw, setup.pcfg.block_frames)
        found.append(p)
    best = decode.best(found, block_ms)
    return {"decoder": name, "block_ms": block_ms, "placements": [dataclasses.asdict(p) for p in found],
            "winner": dataclasses.asdict(best) if best else None}


def decode_table(record: dict) -> str:
    """The decode placements of a record (empty when it has none)."""
    from bcjax.tune.decode import Placement

    d = record.get("decode")
    if not d:
        return ""
    lines = [f"Decode placement ({d['decoder']}, one block; the stream's period with the winner's "
             f"{d['block_ms']:.2f} ms per block):",
             "| where | --decode-device | decode ms | compile s | ms per block end to end | |",
             "|---|---|---|---|---|---|"]
    for raw in d["placements"]:
        p = Placement(**raw)
        period = p.period_ms(d["block_ms"])
        mark = "**winner**" if d["winner"] and d["winner"]["spec"] == p.spec else (p.error or "")
        lines.append(f"| {p.where} | {p.spec} | {'' if p.decode_ms is None else f'{p.decode_ms:.2f}'} | "
                     f"{'' if p.compile_s is None else f'{p.compile_s:.1f}'} | "
                     f"{'' if period is None else f'{period:.2f}'} | {mark} |")
    return "\n".join(lines)


def table(record: dict) -> str:
    """The record as a markdown table, fastest first."""
    frames = record.get("video_frames_per_block", 12)
    rows = [from_dict(r) for r in record["rows"]]
    rows.sort(key=lambda r: (r.block_ms is None, r.block_ms or 0.0))
    best = record.get("winner")
    lines = ["| stagger | group | attention | ms/tick | ticks/block | ms/block | FPS | predicted FPS | "
             "memory/device | compile s | |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pred = "-" if r.predicted_fps is None else _range(r.predicted_fps)
        if r.error is not None:
            lines.append(f"| {r.stagger} | {_group(r)} | {r.attention} | | | | | {pred} | | | {r.error} |")
            continue
        assert r.block_ms is not None and r.tick_ms is not None
        mem = "n/a" if r.memory_bytes is None else f"{r.memory_bytes / 2**20:,.1f} MiB"
        mark = "**winner**" if best and from_dict(best).candidate() == r.candidate() else ""
        lines.append(f"| {r.stagger} | {_group(r)} | {r.attention} | {r.tick_ms:.2f} | {r.steps_per_block} | "
                     f"{r.block_ms:.2f} | {1e3 * frames / r.block_ms:.1f} | {pred} | {mem} | "
                     f"{r.compile_s:.1f} | {mark} |")
    for c in record.get("skipped", []):
        lines.append(f"| {c['stagger']} | {c['group'] or '-'} | {c['attention']} | | | | | | | | "
                     "not measured: budget |")
    return "\n".join(lines)


def _group(r: Row) -> str:
    """The token group: as asked, or the least-padding one (marked *) the split chose."""
    if r.group is not None:
        return str(r.group)
    return f"{r.tokens_group}*" if r.tokens_group else "-"


def _range(fps) -> str:
    lo, hi = fps
    return f"{lo:.1f}" if abs(hi - lo) < 0.05 else f"{lo:.1f}-{hi:.1f}"


__all__ = ["STAGGERS", "Candidate", "Row", "Setup", "candidates", "likeliest_first", "lookup", "measure",
           "predicted_fps", "table", "tune", "winner"]
