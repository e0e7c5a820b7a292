"""Reading upstream checkpoint files into {name: numpy array}, bf16 kept as bf16 (ml_dtypes).

- `.safetensors`: the header is parsed here (8-byte little-endian length, JSON header, raw
  buffer) and every tensor is a read-only view of one memory map of the file, because
  safetensors' own numpy backend has no bf16 (`data type 'bfloat16' not understood`).
- `.pt` / `.pth` / `.bin`: `torch.load(map_location="cpu", weights_only=True)`, torch imported
  only here; nested dicts (`{"generator": {...}, "step": 600}`) keep their nesting, tensors
  become numpy (bf16 reinterpreted bit for bit, never through float32).
- a folder: every `*.safetensors` shard named by its `*.safetensors.index.json` (HF / diffusers
  sharding), or the folder's `.safetensors` files when it has no index.

`nested(state, "generator")` walks into such a tree and names the keys it found when one is
missing.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from pathlib import Path

import ml_dtypes
import numpy as np

from bcjax.errors import BadFileError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")

# safetensors dtype tag -> numpy dtype (https://github.com/huggingface/safetensors, format spec)
_SAFETENSORS_DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(bool),
}


def load(path: str | Path):
    """A checkpoint file or sharded folder as a (possibly nested) dict whose tensors are numpy."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_dir():
        return _read_safetensors_folder(path)
    if path.name.endswith(".safetensors"):
        return _read_safetensors(path)
    if path.suffix in TORCH_SUFFIXES:
        return _read_torch(path)
    raise ValueError(
        f"checkpoint {path}: unknown extension {path.suffix or '(none)'!r}; "
        f"expected .safetensors, {', '.join(TORCH_SUFFIXES)} or a folder of .safetensors shards"
    )


def read_state_dict(path: str | Path, *keys: str) -> dict[str, np.ndarray]:
    """A flat state dict {name: numpy} from a file or sharded folder; `keys` walk into a nested
    checkpoint first (`read_state_dict("model.pt", "generator")`)."""
    state = nested(load(path), *keys, source=path)
    if not isinstance(state, Mapping):
        where = f"{path}" + "".join(f"[{k!r}]" for k in keys)
        raise BadFileError(f"{where} is a {type(state).__name__}, not a state dict of tensors")
    bad = [k for k, v in state.items() if not isinstance(v, np.ndarray)]
    if bad:
        where = f"{path}" + "".join(f"[{k!r}]" for k in keys)
        raise BadFileError(
            f"{where} is not a flat state dict: entries {bad[:10]} are {type(state[bad[0]]).__name__}, not tensors; "
            f"pick one with read_state_dict(path, key)"
        )
    return dict(state)


def nested(state, *keys: str, source=None):
    """state[keys[0]][keys[1]]...; a missing key raises a KeyError listing the keys that exist."""
    node = state
    for depth, key in enumerate(keys):
        if not isinstance(node, Mapping) or key not in node:
            have = sorted(map(str, node)) if isinstance(node, Mapping) else type(node).__name__
            where = f"{source}" if source is not None else "checkpoint"
            where += "".join(f"[{k!r}]" for k in keys[:depth])
            raise KeyError(f"{where} has no key {key!r}; its keys: {shorten(have)}")
        node = node[key]
    return node


def top_keys(state) -> list[str]:
    """The sorted top-level keys of a checkpoint, for error messages."""
    return sorted(map(str, state)) if isinstance(state, Mapping) else []


def is_flat(state) -> bool:
    """True when every value of the mapping is an array (a state dict, not a checkpoint of them)."""
    return isinstance(state, Mapping) and len(state) > 0 and all(_is_array(v) for v in state.values())


def checkpoint_and_source(path_or_state):
    """(checkpoint tree with numpy tensors, its name for messages) from a path or a loaded dict."""
    if isinstance(path_or_state, (str, Path)):
        return load(path_or_state), Path(path_or_state)
    if isinstance(path_or_state, Mapping):
        return as_numpy(path_or_state), "(in-memory dict)"
    raise TypeError(f"expected a checkpoint path or a dict, got {type(path_or_state).__name__}")


def as_numpy(tree):
    """Turn torch tensors anywhere in a nested dict into numpy (bf16 stays bf16); numpy passes."""
    if isinstance(tree, Mapping):
        return {k: as_numpy(v) for k, v in tree.items()}
    if type(tree).__module__.startswith("torch") and hasattr(tree, "detach"):
        return _torch_to_numpy(tree)
    return tree


def shorten(items, n: int = 20) -> str:
    """repr of a list cut to its first n items, for error messages."""
    if isinstance(items, str):
        return items
    items = list(items)
    return repr(items[:n])[:-1] + (f", ... {len(items) - n} more]" if len(items) > n else "]")


def _is_array(v) -> bool:
    return isinstance(v, np.ndarray) or (type(v).__module__.startswith("torch") and hasattr(v, "detach"))


# ---- safetensors -----------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file; a malformed header raises BadFileError naming the file,
    the tensor and what is wrong (the format: 8-byte length, a JSON object of {name: {"dtype",
    "shape", "data_offsets"}} and "__metadata__", then the byte buffer)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise BadFileError(f"safetensors file {path} is truncated ({size} bytes; no header length)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise BadFileError(f"safetensors file {path} is truncated: header of {n} bytes, file of {size}")
        try:
            header = json.loads(f.read(n))
        except (ValueError, RecursionError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            raise BadFileError(f"safetensors file {path} has a header that is not JSON: {e}") from None
    if not isinstance(header, dict):
        raise BadFileError(f"safetensors file {path}: its header is a JSON {type(header).__name__}; "
                           "expected an object of tensors")
    header.pop("__metadata__", None)
    buffer = size - 8 - n
    mm = np.memmap(path, dtype=np.uint8, mode="r") if buffer > 0 else np.zeros(0, np.uint8)
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        dtype, shape, (begin, end) = _entry(path, name, info)
        count = math.prod(shape)
        if end - begin != count * dtype.itemsize or end > buffer:
            raise BadFileError(
                f"safetensors file {path}: tensor {name} ({info['dtype']} {list(shape)}) spans bytes [{begin}, {end}) "
                f"of a {buffer}-byte buffer; expected {count * dtype.itemsize} bytes"
            )
        out[name] = (np.frombuffer(mm, dtype=dtype, count=count, offset=8 + n + begin).reshape(shape) if count
                     else np.zeros(shape, dtype))
    return out


def _entry(path: Path, name: str, info) -> tuple[np.dtype, tuple[int, ...], tuple[int, int]]:
    """(dtype, shape, (begin, end)) of one header entry, each checked for its type and range."""
    where = f"safetensors file {path}: tensor {name}"
    if not isinstance(info, dict):
        raise BadFileError(f"{where} is a JSON {type(info).__name__}; expected an object with dtype, shape and "
                           "data_offsets")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise BadFileError(f"{where} has no {', '.join(missing)}")
    tag, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(tag, str) or tag not in _SAFETENSORS_DTYPES:
        raise BadFileError(f"{where} has dtype {tag!r}, not one of {sorted(_SAFETENSORS_DTYPES)}")

    def counts(v, n=None) -> bool:
        return (isinstance(v, list) and (n is None or len(v) == n)
                and all(isinstance(x, int) and not isinstance(x, bool) and 0 <= x < 2**63 for x in v))

    if not counts(shape):
        raise BadFileError(f"{where} has shape {json.dumps(shape)[:60]}; expected a list of non-negative integers")
    if not counts(offsets, 2) or offsets[0] > offsets[1]:
        raise BadFileError(f"{where} has data_offsets {json.dumps(offsets)[:60]}; expected [begin, end], "
                           "0 <= begin <= end")
    return _SAFETENSORS_DTYPES[tag], tuple(shape), (offsets[0], offsets[1])


def _read_safetensors_folder(folder: Path) -> dict[str, np.ndarray]:
    indexes = sorted(folder.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        raise ValueError(f"checkpoint folder {folder} has {len(indexes)} index files {[p.name for p in indexes]}; "
                         "expected one")
    if indexes:
        try:
            index = json.loads(indexes[0].read_bytes())
        except (ValueError, RecursionError) as e:
            raise BadFileError(f"{indexes[0]} is not JSON: {e}") from None
        weight_map = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(weight_map, Mapping):
            raise BadFileError(f"{indexes[0]} has no 'weight_map' object")
        odd = [v for v in weight_map.values() if not isinstance(v, str) or Path(v).name != v or v in ("", ".", "..")]
        if odd:
            raise BadFileError(f"{indexes[0]}: weight_map names {shorten(map(repr, odd), 3)}; expected shard file "
                               "names in its folder")
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(weight_map.values())):
            if not (folder / shard).is_file():
                raise FileNotFoundError(f"shard {folder / shard} named by {indexes[0].name} does not exist")
            tensors = _read_safetensors(folder / shard)
            wanted = [k for k, s in weight_map.items() if s == shard]
            absent = [k for k in wanted if k not in tensors]
            if absent:
                raise BadFileError(f"shard {folder / shard} lacks {shorten(absent)}, "
                                 f"which {indexes[0].name} places there")
            out.update({k: tensors[k] for k in wanted})
        return out
    shards = sorted(folder.glob("*.safetensors"))
    if not shards:
        raise FileNotFoundError(f"checkpoint folder {folder} has no .safetensors files and no *.safetensors.index.json")
    out = {}
    for shard in shards:
        tensors = _read_safetensors(shard)
        twice = sorted(set(tensors) & set(out))
        if twice:
            raise BadFileError(f"checkpoint folder {folder}: keys {shorten(twice)} appear in more than one shard "
                             "and there is no index")
        out.update(tensors)
    return out


# ---- torch -----------------------------------------------------------------------------------


def _read_torch(path: Path):
    import torch

    try:
        try:  # zip-format files map lazily; the legacy format cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - arbitrary bytes fail in any of pickle's ways (KeyError, struct.error, ...)
        # torch's own message suggests weights_only=False, i.e. running the file's code: not done here
        first = f"{type(e).__name__}: {str(e).strip().splitlines()[0]}" if str(e).strip() else type(e).__name__
        raise BadFileError(f"checkpoint {path}: not a PyTorch checkpoint that loads as plain tensors "
                         f"({first[:200]})") from None
    return as_numpy(obj)


def _torch_to_numpy(t) -> np.ndarray:
    import torch

    t = t.detach().cpu()
    # numpy has no bf16 / fp8: reinterpret the bits as the ml_dtypes type of the same width
    bits = {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
    }
    if t.dtype in bits:
        as_int, np_dtype = bits[t.dtype]
        return t.view(as_int).numpy().view(np_dtype)
    return t.numpy()


def unflatten(flat: Mapping[str, np.ndarray]) -> dict:
    """{"a/b/c": x} -> {"a": {"b": {"c": x}}}: a converter's flat output as a parameter tree."""
    tree: dict = {}
    for path, value in flat.items():
        *parents, leaf = path.split("/")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree
