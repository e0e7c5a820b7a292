"""Where `bcjax tune` keeps what it measured, and how a run finds it.

One small JSON file per tuning key, in `$BCJAX_TUNE_CACHE` (default ~/.cache/bcjax/tune): the key
(device kind and count, mesh, model architecture, sampler, mask, latent size, dtype, quant, bcjax
version), every measured row, and the winner. A file is replaced atomically after every measured
candidate, so an interrupted tune keeps what it measured and never leaves half a file; a record
without a winner (`complete` false) is never used by `--stagger auto`, and the next tune with the
same key resumes it. Speed depends on the architecture, not on the weights, so a random-weight
preset and a checkpoint of the same shape share a key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from importlib import metadata
from typing import Any

ENV = "BCJAX_TUNE_CACHE"
FORMAT = 1  # the record layout; a record of another format is ignored like one of another version


def default_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "bcjax", "tune")


def cache_dir(path: str | None = None) -> str:
    return os.path.abspath(os.path.expanduser(path or os.environ.get(ENV) or default_dir()))


def bcjax_version() -> str:
    try:
        return metadata.version("bcjax")
    except metadata.PackageNotFoundError:  # a source tree on PYTHONPATH, not installed
        return "unknown"


def architecture(cfg) -> dict[str, Any]:
    """The WanConfig fields that set a pass's cost (shapes), without the run-time numerics."""
    from bcjax.checkpoint import RUNTIME_FIELDS

    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in RUNTIME_FIELDS}


def sampler_shape(pcfg) -> dict[str, Any]:
    """The sampler fields that set the cost of a block (steps, block, cache, context)."""
    return {k: getattr(pcfg, k) for k in ("num_steps", "block_frames", "cache_frames", "sink_frames", "context",
                                          "positions")}


@dataclasses.dataclass(frozen=True)
class TuneKey:
    """What a measurement is valid for. `devices` is every device the mesh uses (tokens x model)."""

    device_kind: str
    devices: int
    model_devices: int  # the `model` axis (tensor parallel); tokens = devices / model_devices
    model: str  # a readable name (preset or checkpoint folder); not part of the identity
    architecture: str  # sha256 of `architecture(cfg)` + `sampler_shape(pcfg)`
    mask: str
    latent_hw: tuple[int, int]
    dtype: str
    quant: str
    version: str

    @classmethod
    def make(cls, cfg, pcfg, *, device_kind: str, devices: int, model_devices: int, model: str, mask: str,
             latent_hw, dtype: str, quant: str = "none", version: str | None = None) -> TuneKey:
        shape = json.dumps({"dit": architecture(cfg), "sampler": sampler_shape(pcfg)}, sort_keys=True, default=str)
        return cls(device_kind, int(devices), int(model_devices), model, hashlib.sha256(shape.encode()).hexdigest(),
                   mask, (int(latent_hw[0]), int(latent_hw[1])), dtype, quant, version or bcjax_version())

    def identity(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("model")
        d["latent_hw"] = list(self.latent_hw)
        return d

    def filename(self) -> str:
        digest = hashlib.sha256(json.dumps(self.identity(), sort_keys=True).encode()).hexdigest()[:16]
        kind = "".join(c if c.isalnum() else "-" for c in self.device_kind.lower()).strip("-") or "device"
        return f"{kind}-x{self.devices}-{digest}.json"

    def describe(self) -> str:
        return f"{self.devices} x {self.device_kind}"


def write_record(path: str, record: dict) -> None:
    """Replace `path` with `record` atomically (a temporary file in the same folder, then rename)."""
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tune-", suffix=".json", dir=folder)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_record(path: str) -> dict | None:
    """The record at `path`, or None when it is missing or unreadable (a damaged file is not a tuning)."""
    try:
        with open(path) as f:
            rec = json.load(f)
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) and rec.get("format") == FORMAT and isinstance(rec.get("key"), dict) else None


def new_record(key: TuneKey) -> dict:
    return {"format": FORMAT, "key": key.identity(), "model": key.model, "complete": False, "winner": None,
            "rows": []}


def lookup(key: TuneKey, folder: str | None = None) -> tuple[dict | None, str]:
    """(the finished record for `key`, "") or (None, why not: the nearest record's differences,
    an unfinished tune, or none at all)."""
    folder = cache_dir(folder)
    rec = read_record(os.path.join(folder, key.filename()))
    if rec is not None and rec["key"] == key.identity():
        if rec.get("complete") and rec.get("winner"):
            return rec, ""
        return None, (f"the tune for {key.describe()} was interrupted after {len(rec.get('rows', []))} candidate(s); "
                      "`bcjax tune` with the same flags resumes it")
    want = key.identity()
    nearest: tuple[int, list[str]] | None = None
    for name in sorted(os.listdir(folder)) if os.path.isdir(folder) else ():
        other = read_record(os.path.join(folder, name)) if name.endswith(".json") else None
        if other is None:
            continue
        diff = [f"{k} {other['key'].get(k)!r} (here {want[k]!r})" for k in want if other["key"].get(k) != want[k]]
        if nearest is None or len(diff) < nearest[0]:
            nearest = (len(diff), diff)
    if nearest is None:
        return None, f"no `bcjax tune` result in {folder}"
    return None, "the stored tuning nearest to this run differs in " + ", ".join(nearest[1]).replace(
        "architecture", "model shape")
