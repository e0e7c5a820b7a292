"""Reading an optimised HLO module's text: the collectives each computation runs, how often its
loops run them, and the bytes of a shape list. `bcjax bench comm --hlo` counts a compiled tick's
collectives per mesh axis with it, and `bcjax bench compile` its GEMM and collective sizes."""

from __future__ import annotations

import re
from collections import defaultdict
from typing import Any

import numpy as np

_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
             "f64": 8, "s64": 8, "u64": 8}
SHAPE = re.compile(r"\b(pred|[suf]\d+|bf16)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) ")
_COLLECTIVE = re.compile(r"= (.+?) (all-gather|all-reduce|reduce-scatter|all-to-all|collective-permute)(?:-start)?\(")
_CALLS = re.compile(r"(?:calls|to_apply|body|condition|true_computation|false_computation)=%([\w.\-]+)")
_BRANCHES = re.compile(r"branch_computations=\{([^}]*)\}")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"\}')
_GROUPS_LIST = re.compile(r"replica_groups=\{\{([\d,]+)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]")


def shape_bytes(shapes: str) -> int:
    """Bytes of every array shape (e.g. "bf16[4,8]") in `shapes`."""
    return sum(_ITEMSIZE[dt] * int(np.prod([int(d) for d in dims.split(",") if d]))
               for dt, dims in SHAPE.findall(shapes))


_VALUE = re.compile(r"^\s*%([\w.\-]+) = s32\[\]\S* (constant|copy)\((-?\d+|%[\w.\-]+)\)")
_TUPLE_FIRST = re.compile(r"^\s*%([\w.\-]+) = \(.*\) tuple\(%([\w.\-]+)")
_WHILE = re.compile(r"while\(%([\w.\-]+)\), condition=%([\w.\-]+), body=%([\w.\-]+)")
_BOUND = re.compile(r"compare\(%[\w.\-]+, %([\w.\-]+)\), direction=LT")


def parse_computations(hlo: str):
    """{computation: (collectives [(kind, result bytes, first replica group or size)], callees [(name, times)])}, entry.

    A while loop counts its body `known_trip_count` times (XLA:CPU and XLA:GPU annotate it); where
    the annotation is missing (XLA:TPU), from its condition `i < bound` and the induction
    variable's initial constant. XLA:TPU's async collectives keep copies of the collective in their
    continuation fusions and "done" computation: only the start's is counted."""
    comps: dict[str, tuple[list, list]] = {}  # per computation: (collective ops, calls)
    entry, name = None, None
    values: dict[str, dict[str, str]] = {}  # per computation: s32 scalar constants and copies
    tuples: dict[str, dict[str, str]] = {}  # per computation: a tuple's first operand
    bounds: dict[str, str] = {}  # condition computation -> the name its `i < bound` compares with
    # (computation, init tuple, condition, body) of whiles without a known trip count
    loops: list[tuple[str, str, str, str, int]] = []
    done: set[str] = set()
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)
        if m and line.rstrip().endswith("{"):
            name = m.group(1)
            comps[name] = ([], [])
            values[name], tuples[name] = {}, {}
            if line.startswith("ENTRY"):
                entry = name
            continue
        if name is None or "=" not in line:
            continue
        ops, calls = comps[name]
        if v := _VALUE.match(line):
            values[name][v.group(1)] = v.group(3)
        if t := _TUPLE_FIRST.match(line):
            tuples[name][t.group(1)] = t.group(2)
        if (bnd := _BOUND.search(line)) and "ROOT" in line:
            bounds[name] = bnd.group(1)
        if ("ROOT" in line and 'custom_call_target="AsyncCollectiveDone"' in line) \
                or name.startswith("async_collective_fusion"):  # XLA:TPU's continuation of a started one
            done.add(name)
        c = _COLLECTIVE.search(line)
        if c and "-done" not in line.split("=", 1)[1].split("(", 1)[0]:
            g = _GROUPS_LIST.search(line)
            group: list[int] | int | None = [int(d) for d in g.group(1).split(",")] if g else None
            if group is None and (io := _GROUPS_IOTA.search(line)):
                group = int(io.group(2))  # iota form [groups, size]: the devices are not listed
            shapes = SHAPE.findall(c.group(1))
            if c.group(2) in ("all-gather", "collective-permute") and f"{c.group(2)}-start(" in line:
                shapes = shapes[len(shapes) // 2:]  # XLA:GPU's start returns (operands, results)
            ops.append((c.group(2), shape_bytes(" ".join(f"{dt}[{dims}]" for dt, dims in shapes)), group))
        trip = _TRIP.search(line)
        w = _WHILE.search(line)
        if w and not trip:
            loops.append((name, w.group(1), w.group(2), w.group(3), len(calls)))
        for callee in _CALLS.findall(line):
            is_body = f"body=%{callee}" in line
            calls.append((callee, int(trip.group(1)) if is_body and trip else 1))
        if b := _BRANCHES.search(line):
            calls.extend((n.strip().lstrip("%"), 1) for n in b.group(1).split(","))

    def constant(comp: str, ref: str) -> int | None:
        for _ in range(8):  # follow copies to the constant
            ref = values.get(comp, {}).get(ref.lstrip("%"), ref)
            if not ref.startswith("%"):
                break
        try:
            return int(ref)
        except ValueError:
            return None

    for comp, init_tuple, cond, body, _ in loops:
        bound = constant(cond, "%" + bounds[cond]) if cond in bounds else None
        first = tuples[comp].get(init_tuple)
        init = constant(comp, "%" + first) if first else None
        if bound is not None and init is not None and bound > init:
            calls = comps[comp][1]
            comps[comp] = (comps[comp][0], [(c, bound - init if c == body else k) for c, k in calls])
    for name in done:
        comps[name] = ([], comps[name][1])
    return comps, entry


def hlo_collectives(hlo: str, mesh) -> dict[str, dict[str, Any]]:
    """Per mesh axis ('tokens', 'model'; 'other' for groups spanning neither): collective ops run
    per call of the program, their result bytes and the bytes one device receives (ring), and
    under "kinds" the ops of each kind (all-gather, all-reduce, ...).
    Each op counts as often as the loops around it run (while known_trip_count); a branch of a
    conditional counts once."""
    comps, entry = parse_computations(hlo)
    times: dict[str, int] = defaultdict(int)

    def visit(comp: str, k: int):
        times[comp] += k
        for callee, n in comps.get(comp, ((), ()))[1]:
            if callee in comps:
                visit(callee, k * n)

    visit(entry, 1)
    # replica groups name positions in the program's device assignment, which is the mesh's
    # order; device ids agree with them only on some platforms (not on a v5e-32 topology)
    ids = np.arange(mesh.devices.size).reshape(mesh.devices.shape)
    axes = {name: [set(np.moveaxis(ids, i, -1).reshape(-1, ids.shape[i])[j].tolist())
                   for j in range(ids.size // ids.shape[i])]
            for i, name in enumerate(mesh.axis_names)}
    out: defaultdict[str, dict[str, Any]] = defaultdict(
        lambda: {"ops": 0, "payload": 0.0, "wire": 0.0, "kinds": defaultdict(int)})
    for comp, k in times.items():
        for kind, nbytes, group in comps[comp][0]:
            size = group if isinstance(group, int) else len(group or ())
            axis = next((a for a, groups in axes.items() if isinstance(group, list) and set(group) in groups), None)
            if axis is None and isinstance(group, int):  # iota groups: by size, when it is unambiguous
                sizes = [a for a in mesh.axis_names if mesh.shape[a] == size]
                axis = sizes[0] if len(sizes) == 1 else None
            axis = axis or "other"
            if size <= 1:
                continue
            wire = nbytes * (size - 1) / size * (2 if kind == "all-reduce" else 1)
            out[axis]["ops"] += k
            out[axis]["payload"] += k * nbytes
            out[axis]["wire"] += k * wire
            out[axis]["kinds"][kind] += k
    return {axis: {**v, "kinds": dict(v["kinds"])} for axis, v in out.items()}
