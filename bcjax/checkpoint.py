"""bcjax checkpoints: one orbax tree per model part, plus `config.json` (configs and provenance).

    DST/
      config.json        {"format": "bcjax", "parts": {"dit": {...WanConfig}, ...}, "provenance": {...}}
                         (architecture only: no dtype, param_dtype or attention, see RUNTIME_FIELDS)
      dit/  text/  vae/  taehv/  orbax PyTree checkpoints (dtype preserved, bf16 stays bf16)
      tokenizer/         the sentencepiece model, when a text encoder is bundled

A checkpoint is written into a temporary folder beside DST and renamed into place, so a crash
never leaves a half-written DST. `restore` reads a part straight onto a mesh (the DiT split over
its `model` axis, everything else replicated): every device reads only the shard it holds, so no
device or host holds a whole copy of a tensor-parallel model.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from importlib import metadata

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

FORMAT = "bcjax"


def _parts():
    """part name -> (config class, function cfg -> parameter ShapeDtypeStruct tree)."""
    from bcjax.model.config import WanConfig
    from bcjax.model.wan import param_shapes as dit_shapes
    from bcjax.text.umt5 import UMT5Config
    from bcjax.text.umt5 import param_shapes as text_shapes

    parts = {"dit": (WanConfig, dit_shapes), "text": (UMT5Config, text_shapes)}
    try:
        from bcjax.vae.wan_vae import VAEConfig
        from bcjax.vae.wan_vae import param_shapes as vae_shapes

        parts["vae"] = (VAEConfig, vae_shapes)
    except ImportError:  # the VAE port is optional for DiT-only checkpoints
        pass
    from bcjax.vae.taehv import TAEHVConfig
    from bcjax.vae.taehv import param_shapes as taehv_shapes

    parts["taehv"] = (TAEHVConfig, taehv_shapes)
    return parts


# Run-time numerics, not architecture: the compute dtype, the dtype weights are held in on device and
# the attention kernel are the caller's choice for this run and this machine (a bf16 checkpoint may run
# in fp32, an "xla" toy model on a GPU's kernel), so config.json does not hold them. Files written
# before this rule do; those keys are read and ignored, and the values come from the caller (`restore`).
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention")


def config_to_dict(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}


def config_from_dict(cls, data: Mapping, **runtime):
    """`cls` from a config.json object; run-time fields come from `runtime` (None: the class default)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    data = {k: v for k, v in data.items() if k not in RUNTIME_FIELDS}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}; "
                         "the checkpoint's config.json is from another version")
    bad = sorted(set(runtime) - set(RUNTIME_FIELDS))
    if bad:
        raise ValueError(f"{bad} are not run-time fields; expected some of {RUNTIME_FIELDS}")
    kwargs = {k: v for k, v in runtime.items() if v is not None and k in fields}
    for name, value in data.items():
        default = fields[name].default
        kwargs[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    return cls(**kwargs)


def stored_dtype(path: str, part: str) -> str:
    """The dtype the part's weights were written in (one for every leaf, as every bcjax part has)."""
    meta = ocp.StandardCheckpointer().metadata(os.path.join(path, part))
    dtypes = {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(getattr(meta, "item_metadata", meta))}
    if len(dtypes) != 1:
        raise ValueError(f"{path}/{part}: weights in several dtypes {sorted(dtypes)}; expected one")
    return dtypes.pop()


def save(dst: str, parts: Mapping[str, tuple], provenance: Mapping, *, files: Mapping[str, str] | None = None,
         overwrite: bool = False) -> None:
    """Write a checkpoint atomically.

    parts: {"dit": (WanConfig, params), "text": (UMT5Config, params), "vae": (VAEConfig, params)};
    files: {relative name in DST: source path} copied alongside (e.g. the tokenizer model).
    """
    known = _parts()
    for name, (cfg, params) in parts.items():
        if name not in known:
            raise ValueError(f"unknown checkpoint part {name!r}; known: {sorted(known)}")
        expected = jax.tree_util.tree_map(lambda s: (tuple(s.shape), s.dtype), known[name][1](cfg))
        got = jax.tree_util.tree_map(lambda a: (tuple(a.shape), a.dtype), params)
        if expected != got:
            raise ValueError(f"part {name!r}: parameters do not match its config {cfg}")
    dst = os.path.abspath(dst)
    if os.path.exists(dst) and not overwrite:
        raise FileExistsError(f"{dst} exists; pass overwrite=True (--overwrite) to replace it")
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".bcjax-", dir=parent)
    try:
        ckptr = ocp.StandardCheckpointer()
        for name, (_, params) in parts.items():
            ckptr.save(os.path.join(tmp, name), params)
        ckptr.wait_until_finished()
        for rel, src in (files or {}).items():
            os.makedirs(os.path.dirname(os.path.join(tmp, rel)) or tmp, exist_ok=True)
            shutil.copyfile(src, os.path.join(tmp, rel))
        meta = {
            "format": FORMAT,
            "parts": {name: config_to_dict(cfg) for name, (cfg, _) in parts.items()},
            "provenance": {**provenance, "bcjax": metadata.version("bcjax"),
                           "written": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")},
        }
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_config(path: str) -> dict:
    """config.json of a bcjax checkpoint, with each part's config as its dataclass (its architecture;
    the run-time fields are the class defaults: `restore` sets them for a run)."""
    if os.path.isfile(path):
        raise ValueError(f"{path} is a file; a bcjax checkpoint is a folder (convert one with `bcjax convert`)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} is not a bcjax checkpoint: no config.json (convert one with `bcjax convert`)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{cfg_path}: not a bcjax config.json (not JSON text: {e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise ValueError(f"{cfg_path}: format {got!r}, expected {FORMAT!r}")
    if not isinstance(meta.get("parts"), dict):
        raise ValueError(f"{cfg_path}: not a bcjax config.json (no 'parts' object)")
    known = _parts()
    meta["configs"] = {name: config_from_dict(known[name][0], data) for name, data in meta["parts"].items()}
    return meta


def restore(path: str, part: str = "dit", *, mesh=None, spec: P | None = None, dtype: str | None = None,
            param_dtype: str | None = None, attention: str | None = None):
    """(config, params) of one part, restored onto `mesh` or onto the default device.

    Run-time fields (not in config.json): param_dtype defaults to the dtype the weights were written
    in (a bf16 checkpoint stays bf16 in memory), dtype (compute) to param_dtype, attention to the
    config's default ("auto"); a part without an attention field ignores `attention`.

    spec: one PartitionSpec for every leaf; by default the DiT takes the tensor-parallel layout
    of `bcjax.model.tensor_parallel` (split over the mesh's `model` axis, replicated over
    `stage`; fully replicated when model = 1) and other parts are replicated. orbax reads each
    device's slice of each tensor from the file, so a host reads only what its devices hold.
    """
    meta = read_config(path)
    if part not in meta["configs"]:
        raise ValueError(f"{path} holds parts {sorted(meta['configs'])}; no {part!r}")
    param_dtype = param_dtype or stored_dtype(path, part)
    cfg = config_from_dict(type(meta["configs"][part]), meta["parts"][part], dtype=dtype or param_dtype,
                           param_dtype=param_dtype, attention=attention)
    shapes = _parts()[part][1](cfg)
    if mesh is None:
        shardings = jax.tree_util.tree_map(lambda _: jax.sharding.SingleDeviceSharding(jax.devices()[0]), shapes)
    elif spec is None and part == "dit":
        from bcjax.model.tensor_parallel import Layout
        from bcjax.model.tensor_parallel import shardings as tp_shardings

        shardings = tp_shardings(mesh, Layout(cfg, mesh).params)
    else:
        shardings = jax.tree_util.tree_map(lambda _: NamedSharding(mesh, spec or P()), shapes)
    target = jax.tree_util.tree_map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                    shapes, shardings)
    return cfg, ocp.StandardCheckpointer().restore(os.path.join(path, part), target)
