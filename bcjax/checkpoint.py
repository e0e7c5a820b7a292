"""bcjax checkpoints: one orbax tree per model part, plus `config.json` (configs and provenance).

    DST/
      config.json        {"format": "bcjax", "parts": {"dit": {...WanConfig}, ...}, "provenance": {...},
                          "manifest": {"dit": {array: {shape, dtype, sha256}}, ...}}  (bcjax.manifest)
                         (architecture only: no dtype, param_dtype or attention, see RUNTIME_FIELDS)
      dit/  text/  vae/  taehv/  orbax PyTree checkpoints (dtype preserved, bf16 stays bf16)
      tokenizer/         the sentencepiece model, when a text encoder is bundled

A checkpoint is written into a temporary folder beside DST (`.bcjax-<name>.<pid>.<random>`) and
swapped into place by renames, so at every instant DST is the complete old checkpoint or the
complete new one (`replace`); temporary folders of a killed run are removed by the next save.
Every path is made absolute (`~` expanded) before orbax sees it: orbax reads absolute paths only.
`restore` reads a part straight onto a mesh (the DiT split over its `model` axis, everything else
replicated): every device reads only the shard it holds, so no
device or host holds a whole copy of a tensor-parallel model.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
from collections.abc import Iterable, Mapping
from importlib import metadata

import jax
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from bcjax import manifest
from bcjax.errors import BadFileError
from bcjax.paths import FORMAT, check_destination, clean_stale, replace, resolve, temp_beside

__all__ = ["FORMAT", "RUNTIME_FIELDS", "check_destination", "clean_stale", "config_from_dict", "config_to_dict",
           "read_config", "replace", "resolve", "restore", "save", "stored_dtype"]

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
RUNTIME_FIELDS = ("dtype", "param_dtype", "attention", "quant")


def config_to_dict(cfg) -> dict:
    return {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RUNTIME_FIELDS}


def _type_error(name: str, value, default) -> str | None:
    """Why a JSON `value` cannot be the field whose default is `default` (None: it can)."""
    def fits(v, d) -> bool:
        if d is None:
            return v is None or isinstance(v, (int, float, str))
        if isinstance(d, bool):
            return isinstance(v, bool)
        if isinstance(d, (int, float)):
            return isinstance(v, (float, int) if isinstance(d, float) else int) and not isinstance(v, bool)
        if isinstance(d, str):
            return isinstance(v, str)
        if isinstance(d, tuple):
            return isinstance(v, (list, tuple)) and (not d or all(fits(x, d[0]) for x in v))
        return True  # a field of another kind is the class's own to check

    if fits(value, default):
        return None
    kind = "a list" if isinstance(default, tuple) else type(default).__name__
    return f"field {name} is {json.dumps(value)[:40]}; expected {kind}"


def config_from_dict(cls, data: Mapping, **runtime):
    """`cls` from a config.json object; run-time fields come from `runtime` (None: the class default).
    A value of the wrong type or one the class refuses raises BadFileError naming the field."""
    if not isinstance(data, Mapping):
        raise BadFileError(f"{cls.__name__} must be a JSON object, got a JSON {type(data).__name__}")
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
        if default is not dataclasses.MISSING and (why := _type_error(name, value, default)):
            raise BadFileError(f"{cls.__name__}: {why}")
        kwargs[name] = tuple(value) if isinstance(default, tuple) and isinstance(value, list) else value
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ArithmeticError) as e:  # the class's own checks (__post_init__)
        raise BadFileError(f"{cls.__name__}: {e}") from None


# the leaves of a quantized kernel stored in its 8-bit type (`bcjax.model.quant`): not the part's dtype
QUANTIZED_LEAF = "kernel/qvalue"


def stored_dtype(path: str, part: str) -> str:
    """The dtype the part's weights were written in (one for every leaf, as every bcjax part has, a
    quantized kernel's 8-bit values aside): from the manifest, or for a checkpoint written before
    manifests from orbax's metadata."""
    path = resolve(path)
    recorded = read_config(path).get("manifest", {}).get(part)
    if recorded:
        dtypes = {str(entry.get("dtype")) if isinstance(entry, dict) else "?" for name, entry in recorded.items()
                  if not name.endswith(QUANTIZED_LEAF)}
    else:
        try:
            meta = ocp.StandardCheckpointer().metadata(_part_folder(path, part))
        except BadFileError:
            raise
        except Exception as e:  # noqa: BLE001 - orbax fails on a damaged folder in many ways; all are the file's
            raise BadFileError(f"{path}/{part}: orbax cannot read its metadata ({_first_line(e)})") from None
        dtypes = {str(leaf.dtype) for name, leaf in manifest.leaves(getattr(meta, "item_metadata", meta)).items()
                  if not name.endswith(QUANTIZED_LEAF)}
    if not dtypes:
        raise BadFileError(f"{path}/{part}: no weight arrays in its metadata (_METADATA missing or damaged)")
    if len(dtypes) != 1:
        raise BadFileError(f"{path}/{part}: weights in several dtypes {sorted(dtypes)}; expected one")
    return dtypes.pop()


def _part_folder(path: str, part: str) -> str:
    folder = os.path.join(path, part)
    if not os.path.isdir(folder):
        raise BadFileError(f"{path}: part {part!r} is in config.json but its folder {part}/ is missing")
    return folder


def _first_line(e: BaseException) -> str:
    text = str(e).strip().split(" See full TensorStore details")[0]  # then a pybind repr of many lines
    return f"{type(e).__name__}: {text.splitlines()[0][:200]}" if text else type(e).__name__


def save(dst: str, parts: Mapping[str, tuple], provenance: Mapping, *, files: Mapping[str, str] | None = None,
         overwrite: bool = False, sources: Iterable[str] = ()) -> None:
    """Write a checkpoint atomically, with its manifest (every array's shape, dtype and checksum).

    parts: {"dit": (WanConfig, params), "text": (UMT5Config, params), "vae": (VAEConfig, params)};
    files: {relative name in DST: source path} copied alongside (e.g. the tokenizer model);
    sources: the files the weights came from (an output holding one is refused), see
    `check_destination` for what `overwrite` may replace.
    """
    known = _parts()
    for name, (cfg, params) in parts.items():
        if name not in known:
            raise ValueError(f"unknown checkpoint part {name!r}; known: {sorted(known)}")
        expected = jax.tree_util.tree_map(lambda s: (tuple(s.shape), s.dtype), known[name][1](cfg))
        got = jax.tree_util.tree_map(lambda a: (tuple(a.shape), a.dtype), params)
        if expected != got:
            raise ValueError(f"part {name!r}: parameters do not match its config {cfg}")
    dst = resolve(dst)
    check_destination(dst, [*sources, *(files or {}).values()], overwrite=overwrite)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    clean_stale(dst)
    tmp = temp_beside(dst)
    try:
        sums = {}
        for name, (_, params) in parts.items():
            manifest.check_finite(params, f"part {name!r}")
            sums[name] = manifest.of(params)
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
            "manifest": sums,
        }
        from bcjax.model.quant import stored_name

        quantized = {name: q for name, (_, params) in parts.items() if name == "dit" and (q := stored_name(params))}
        if quantized:
            meta["stored_quant"] = quantized
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(meta, f, indent=2)
        replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def read_config(path: str) -> dict:
    """config.json of a bcjax checkpoint, with each part's config as its dataclass (its architecture;
    the run-time fields are the class defaults: `restore` sets them for a run). A malformed file
    raises BadFileError naming it and what is wrong."""
    path = resolve(path)
    if os.path.isfile(path):
        raise ValueError(f"{path} is a file; a bcjax checkpoint is a folder (convert one with `bcjax convert`)")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} is not a bcjax checkpoint: no config.json (convert one with `bcjax convert`)")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise BadFileError(f"{cfg_path}: not a bcjax config.json (not JSON text: {_first_line(e)})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        got = meta.get("format") if isinstance(meta, dict) else f"a JSON {type(meta).__name__}"
        raise BadFileError(f"{cfg_path}: format {got!r}, expected {FORMAT!r}")
    if not isinstance(meta.get("parts"), dict):
        raise BadFileError(f"{cfg_path}: not a bcjax config.json (no 'parts' object)")
    for key in ("provenance", "manifest"):
        if not isinstance(meta.get(key, {}), dict):
            raise BadFileError(f"{cfg_path}: {key!r} is a JSON {type(meta[key]).__name__}; expected an object")
    known = _parts()
    unknown = sorted(set(meta["parts"]) - set(known))
    if unknown:
        raise BadFileError(f"{cfg_path}: unknown part(s) {unknown}; known: {sorted(known)}")
    configs = {}
    for name, data in meta["parts"].items():
        try:
            configs[name] = config_from_dict(known[name][0], data)
        except ValueError as e:
            raise BadFileError(f"{cfg_path}: part {name!r}: {e}") from None
    meta["configs"] = configs
    return meta


def restore(path: str, part: str = "dit", *, mesh=None, spec: P | None = None, dtype: str | None = None,
            param_dtype: str | None = None, attention: str | None = None, quant: str | None = None,
            verify: bool = True):
    """(config, params) of one part, restored onto `mesh` or onto the default device.

    Run-time fields (not in config.json): param_dtype defaults to the dtype the weights were written
    in (a bf16 checkpoint stays bf16 in memory), dtype (compute) to param_dtype, attention to the
    config's default ("auto"); a part without an attention field ignores `attention`.

    spec: one PartitionSpec for every leaf; by default the DiT takes the tensor-parallel layout
    of `bcjax.model.tensor_parallel` (split over the mesh's `model` axis, replicated over
    `tokens`; fully replicated when model = 1) and other parts are replicated. orbax reads each
    device's slice of each tensor from the file, so a host reads only what its devices hold.

    quant: `bcjax.names.Quant` (DiT only). A checkpoint stored quantized (`bcjax convert --quant`)
    runs its "-weight" mode by default, or the weights+activations mode of the same type; asking
    it for another type is one error naming both. An unquantized one is quantized as it loads.

    verify: check every array against the manifest (shape, dtype, checksum) and for NaN/Inf
    (README, Checkpoints, gives its cost); a checkpoint written before manifests, or restored in
    another param_dtype than it was written in (the checksums are of the stored bytes), gets the
    NaN/Inf check only. A corrupt or incomplete part raises BadFileError naming the part and the array.
    """
    path = resolve(path)
    meta = read_config(path)
    if part not in meta["configs"]:
        raise ValueError(f"{path} holds parts {sorted(meta['configs'])}; no {part!r}")
    where = f"{path}/{part}"
    folder = _part_folder(path, part)
    recorded = meta.get("manifest", {}).get(part)
    if "manifest" in meta and not isinstance(recorded, dict):
        raise BadFileError(f"{where}: config.json's manifest has no entry for this part")
    stored = stored_dtype(path, part)
    param_dtype = param_dtype or stored
    from bcjax.model import quant as q
    from bcjax.names import as_quant

    stored_q = meta.get("stored_quant", {}).get(part)
    load_quant = as_quant(f"{stored_q}-weight") if stored_q else None
    if quant is not None:
        quant = as_quant(quant)
        q.check_runs(stored_q, quant, f"--quant {quant}", where=f"{path}: ")
    cfg = config_from_dict(type(meta["configs"][part]), meta["parts"][part], dtype=dtype or param_dtype,
                           param_dtype=param_dtype, attention=attention, quant=load_quant)
    try:
        shapes = _parts()[part][1](cfg)
    except Exception as e:  # noqa: BLE001 - a config.json of impossible sizes fails in the model's own code
        raise BadFileError(f"{path}/config.json: part {part!r} describes no valid model ({_first_line(e)})") from None
    if recorded is not None:
        for name, s in manifest.leaves(shapes).items():
            entry = recorded.get(name)
            if not isinstance(entry, dict) or entry.get("shape") != list(s.shape):
                raise BadFileError(f"{where}: array {name} is {list(s.shape)} by config.json but "
                                   f"{entry.get('shape') if isinstance(entry, dict) else 'absent'} by the manifest")
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
    try:
        params = ocp.StandardCheckpointer().restore(folder, target)
    except Exception as e:  # noqa: BLE001 - a damaged orbax folder fails in any of tensorstore's ways
        raise BadFileError(f"{where}: orbax cannot read it; the checkpoint is incomplete or corrupt "
                           f"({_first_line(e)})") from None
    if verify and recorded is not None and param_dtype == stored:
        manifest.verify(params, recorded, where)
    elif verify:
        manifest.check_finite(params, where)
    if quant is not None and quant != getattr(cfg, "quant", quant):
        if not stored_q:  # quantize-at-load, on the arrays where they lie (global arrays under a mesh)
            params = q.quantize(params, quant)
        cfg = dataclasses.replace(cfg, quant=quant)
    return cfg, params
