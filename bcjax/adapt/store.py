"""An adapter on disk, and the checks that refuse one made for another model, rank or stagger.

A folder (`bcjax adapt --out DIR`):

    DIR/adapter.json  what it was made for: the base model's architecture hash and a fingerprint of
                      its weights, rank, stagger, mask, sampler, the training settings, and
                      "complete": true only once the finished factors are in place
    DIR/lora/         the finished factors (orbax), written beside and renamed into place before
                      adapter.json says complete
    DIR/ckpt/         the training checkpoints (orbax, one folder per saved step): a killed run
                      resumes from the newest

adapter.json is replaced in one rename (written to a temporary file first), so a killed run
leaves either the run's settings with "complete": false, or the finished adapter.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np

from bcjax.errors import BadFileError
from bcjax.model import lora
from bcjax.model.config import WanConfig
from bcjax.names import SEQUENTIAL
from bcjax.schedule.config import PipelineConfig

FORMAT = "bcjax-adapter"
META = "adapter.json"
FACTORS = "lora"
# sampler fields an adapter is trained under; RoPE positions (absolute or rolling) are a run's choice
_SAMPLER_SKIP = ("positions",)


def model_hash(cfg: WanConfig) -> str:
    """sha256 (16 hex digits) of the architecture (`bcjax.checkpoint.config_to_dict`: no dtype,
    attention or quant), so one adapter serves every numerics of its model."""
    from bcjax.checkpoint import config_to_dict

    text = json.dumps(config_to_dict(cfg), sort_keys=True, default=list)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_hash(params) -> str:
    """sha256 (16 hex digits) of the patch embedding and head kernels as float32 (never quantized,
    small; the same for any upcast of the weights): tells two checkpoints of one architecture apart."""
    h = hashlib.sha256()
    for a in (params["embed"]["patch_embedding"]["kernel"], params["head"]["head"]["kernel"]):
        h.update(np.ascontiguousarray(np.asarray(a, np.float32)).tobytes())
    return h.hexdigest()[:16]


def sampler_dict(pcfg: PipelineConfig) -> dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(pcfg).items()
            if k not in _SAMPLER_SKIP}


def describe(cfg: WanConfig, pcfg: PipelineConfig, params, rank: int, stagger: str, mask: str) -> dict:
    """The fields an adapter is checked against (adapter.json's identity)."""
    return {"format": FORMAT, "model": model_hash(cfg), "weights": weights_hash(params), "rank": int(rank),
            "stagger": str(stagger), "mask": str(mask), "sampler": sampler_dict(pcfg)}


@dataclasses.dataclass(frozen=True)
class Adapter:
    """A finished adapter: its factors (`bcjax.model.lora`) and what it was made for."""

    lora: Any  # {"self_attn": {"q": {"kernel_lora_a": [L, in, r], "kernel_lora_b": [L, r, out]}, ...}, ...}
    meta: dict
    path: str = ""

    @property
    def rank(self) -> int:
        return int(self.meta["rank"])

    @property
    def stagger(self) -> str:
        return str(self.meta["stagger"])

    @property
    def mask(self) -> str:
        return str(self.meta["mask"])

    @property
    def where(self) -> str:
        return f"adapter {self.path or '(in memory)'}"

    def check_model(self, cfg: WanConfig, params=None) -> None:
        """A ValueError when the adapter was made for another architecture, or (params given)
        other weights of this one."""
        if self.meta.get("model") != model_hash(cfg):
            raise ValueError(f"{self.where} was made for another model (architecture hash {self.meta.get('model')}; "
                             f"this model's is {model_hash(cfg)})")
        if params is not None and self.meta.get("weights") != weights_hash(params):
            raise ValueError(f"{self.where} was made for other weights of this architecture (weights hash "
                             f"{self.meta.get('weights')}; these are {weights_hash(params)})")

    def check(self, cfg: WanConfig, pcfg: PipelineConfig, stagger, mask, params=None, rank: int | None = None) -> None:
        """A ValueError naming the first field this run differs in from the adapter's (model,
        weights when params are given, rank when given, stagger, mask, a sampler field)."""
        where = self.where
        self.check_model(cfg, params)
        if rank is not None and rank != self.rank:
            raise ValueError(f"{where} has rank {self.rank}; rank {rank} was asked for")
        if str(stagger) != self.stagger:
            raise ValueError(f"{where} was made for stagger {self.stagger}; this runner's is {stagger}")
        if str(mask) != self.mask:
            raise ValueError(f"{where} was made for mask {self.mask}; this runner's is {mask}")
        mine, want = self.meta.get("sampler", {}), sampler_dict(pcfg)
        for k in sorted(set(mine) | set(want)):
            if mine.get(k) != want.get(k):
                raise ValueError(f"{where} was made for a sampler with {k}={mine.get(k)}; this runner's has "
                                 f"{k}={want.get(k)}")


def check_stagger(stagger) -> None:
    """An adapter is for a cascade: the sequential stagger is its teacher, refused saying so."""
    if stagger == SEQUENTIAL:
        raise ValueError("stagger 'sequential' is the teacher an adapter learns to reproduce (the same weights run "
                         "one block at a time); adapt a cascade stagger: P1, P2, P4, P4-no-clean")


def read_meta(path: str) -> dict | None:
    """adapter.json of `path`, None when there is none; BadFileError naming it when unreadable."""
    file = os.path.join(path, META)
    if not os.path.isfile(file):
        return None
    try:
        with open(file, encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise BadFileError(f"{file}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else None
        raise BadFileError(f"{file}: not a bcjax adapter (format {got!r})")
    return meta


def write_meta(path: str, meta: dict) -> None:
    """adapter.json replaced in one rename."""
    os.makedirs(path, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path, prefix=".adapter-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(meta, f, indent=2)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # what a plain open() would have given it (mkstemp's is 0600)
        os.replace(tmp, os.path.join(path, META))
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def save(path: str, factors, meta: dict) -> None:
    """The finished adapter: factors into DIR/lora (beside, then renamed), then adapter.json with
    "complete": true. Until that last rename the folder does not load as an adapter."""
    import orbax.checkpoint as ocp

    from bcjax.paths import replace, resolve, temp_beside

    path = resolve(path)
    os.makedirs(path, exist_ok=True)
    dst = os.path.join(path, FACTORS)
    tmp = temp_beside(dst)
    try:
        ckptr = ocp.StandardCheckpointer()
        ckptr.save(os.path.join(tmp, "factors"), jax.device_get(factors))
        ckptr.wait_until_finished()
        replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    write_meta(path, {**meta, "complete": True})


def load(path: str, cfg: WanConfig | None = None, params=None) -> Adapter:
    """A finished adapter from `path`; refused (naming the folder and why) when it is not one, is
    unfinished (a killed or running `bcjax adapt`), or when `cfg`/`params` are given and it was
    made for another model or other weights. Stagger, mask and sampler are checked by the runner
    (`make_runner(adapter=...)`)."""
    import orbax.checkpoint as ocp

    from bcjax.paths import resolve

    path = resolve(path)
    if not os.path.isdir(path):
        raise ValueError(f"--adapter {path}: no such folder (make one with `bcjax adapt`)")
    meta = read_meta(path)
    if meta is None:
        raise ValueError(f"--adapter {path}: no {META}; not an adapter made by `bcjax adapt`")
    if meta.get("complete") is not True:
        raise ValueError(f"--adapter {path}: unfinished (its {META} is not complete: a `bcjax adapt` run was stopped "
                         f"at step {meta.get('step', '?')} or is still running; run it again to resume)")
    folder = os.path.join(path, FACTORS, "factors")
    if not os.path.isdir(folder):
        raise BadFileError(f"--adapter {path}: {META} says complete but {FACTORS}/ is missing")
    if cfg is not None:
        Adapter(None, meta, path).check_model(cfg, params)
    try:
        factors = ocp.StandardCheckpointer().restore(folder)
    except Exception as e:  # noqa: BLE001 - a damaged orbax folder fails in any of tensorstore's ways
        raise BadFileError(f"--adapter {path}: {FACTORS}/ unreadable ({e})") from None
    adapter = Adapter(factors, meta, path)
    if cfg is not None:
        want = jax.eval_shape(lambda: lora.init(cfg, jax.random.key(0), adapter.rank))
        got = jax.tree_util.tree_map(lambda a: tuple(a.shape), factors)
        if jax.tree_util.tree_map(lambda a: tuple(a.shape), want) != got:
            raise BadFileError(f"--adapter {path}: its factors do not have the shapes of a rank-{adapter.rank} "
                               "adapter of this model")
    return adapter
