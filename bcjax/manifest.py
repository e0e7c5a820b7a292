"""A checkpoint's integrity manifest: every weight array's shape, dtype and checksum.

`bcjax.checkpoint.save` records it in config.json ("manifest": {part: {array path: {"shape",
"dtype", "sha256"}}}) from the arrays it writes; `restore` recomputes it from the arrays orbax
read back, so flipped or truncated bytes in a data file, a missing array or one of another
shape or dtype are refused with the part and the array named, instead of loading silently.
The checksum is over each array's bytes in C order (bf16 as its 16-bit patterns), the same on
any host and any sharding. NaN and Inf are refused too: no trained weight holds them, and a
cast of them is what a silent corruption looked like (an all-black video).
"""

from __future__ import annotations

import hashlib
from typing import Any

import jax
import ml_dtypes
import numpy as np

from bcjax.errors import BadFileError

ALGORITHM = "sha256"

# exponent bits of the float types whose NaN/Inf numpy's isfinite does not test natively
_EXPONENT = {np.dtype(ml_dtypes.bfloat16): (np.uint16, 0x7F80)}


def leaves(tree) -> dict[str, Any]:
    """{"blocks/ffn_0/kernel": leaf} in the tree's flattening order."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {"/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path): leaf for path, leaf in flat}


def _bytes(a: np.ndarray) -> bytes | memoryview:
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).data


def checksum(a) -> str:
    """sha256 of the array's bytes in C order (gathered to this host)."""
    return hashlib.sha256(_bytes(np.asarray(a))).hexdigest()


def finite(a) -> bool:
    """No NaN or Inf in `a` (integer arrays: always)."""
    a = np.asarray(a)
    if a.dtype in _EXPONENT:
        bits, mask = _EXPONENT[a.dtype]
        return not np.any((a.view(bits) & mask) == mask)
    if np.issubdtype(a.dtype, np.inexact):
        return bool(np.isfinite(a).all())
    if a.dtype.kind == "V" or "float" in a.dtype.name:  # the fp8 types of ml_dtypes
        return bool(np.isfinite(a.astype(np.float32)).all())
    return True


def of(tree) -> dict[str, dict]:
    """The manifest of one part: {array path: {"shape", "dtype", "sha256"}}."""
    return {name: {"shape": list(np.shape(a)), "dtype": str(a.dtype), ALGORITHM: checksum(a)}
            for name, a in leaves(tree).items()}


def check_finite(tree, where: str) -> None:
    """BadFileError naming `where` and the first array holding NaN or Inf."""
    for name, a in leaves(tree).items():
        if not finite(_local(a)):
            raise BadFileError(f"{where}: array {name} holds NaN or Inf; the weights are corrupt (convert them again)")


def verify(tree, expected: dict, where: str) -> None:
    """Compare restored arrays with the manifest; BadFileError naming `where` and the array.

    Arrays this process cannot see whole (a multi-host mesh) are checked for shape and dtype here;
    their bytes are checked by NaN/Inf on the local shards only."""
    got = leaves(tree)
    missing, extra = sorted(set(expected) - set(got)), sorted(set(got) - set(expected))
    if missing or extra:
        raise BadFileError(f"{where}: arrays {missing or extra} are {'missing' if missing else 'not in the manifest'}")
    for name, a in got.items():
        want = expected[name]
        if not isinstance(want, dict) or not {"shape", "dtype", ALGORITHM} <= set(want):
            raise BadFileError(f"{where}: the manifest entry of array {name} is malformed")
        if list(np.shape(a)) != want["shape"] or str(a.dtype) != want["dtype"]:
            raise BadFileError(f"{where}: array {name} is {str(a.dtype)}{list(np.shape(a))}; "
                               f"the manifest says {want['dtype']}{want['shape']}")
        host = _local(a)  # one copy to the host per array, at most
        if getattr(a, "is_fully_addressable", True) and checksum(host) != want[ALGORITHM]:
            raise BadFileError(f"{where}: array {name} does not match its checksum; the checkpoint is corrupt "
                               "(convert it again)")
        if not finite(host):
            raise BadFileError(f"{where}: array {name} holds NaN or Inf; the weights are corrupt (convert them again)")


def _local(a):
    """The array on the host, or the shards this process holds when it cannot see it whole."""
    if getattr(a, "is_fully_addressable", True):
        return np.asarray(a)
    return np.concatenate([np.asarray(s.data).reshape(-1) for s in a.addressable_shards])
