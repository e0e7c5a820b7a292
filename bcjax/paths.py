"""Checks of the paths a command will write, made before anything is computed, and the atomic
replace of an output folder (a bcjax checkpoint) that keeps the old one whole until the new is in."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable

FORMAT = "bcjax"  # config.json's "format" in a bcjax checkpoint folder
_TMP = ".bcjax-"  # prefix of the temporary folders beside a checkpoint being written
_log = logging.getLogger("bcjax")


def resolve(path) -> str:
    """`path` absolute with `~` expanded: orbax takes a relative path for another folder."""
    return os.path.abspath(os.path.expanduser(os.fspath(path)))


def temp_beside(dst: str) -> str:
    """A new empty folder beside `dst`, named `.bcjax-<name>.<pid>.<random>` so that `clean_stale`
    can tell it was this process's (and remove it once the process is gone)."""
    return tempfile.mkdtemp(prefix=f"{_TMP}{os.path.basename(dst)}.{os.getpid()}.", dir=os.path.dirname(dst))


def check_output(path: str, flag: str = "--out") -> None:
    """Raise ValueError naming `flag` and `path` unless `path` can be written: its nearest
    existing ancestor is a folder this process may create files in, and `path` is not a folder.
    Nothing is created (a refused run leaves nothing behind)."""
    full = os.path.abspath(path)
    if os.path.isdir(full):
        raise ValueError(f"{flag} {path}: is a folder; expected a file name")
    folder = os.path.dirname(full)
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    if not os.path.isdir(folder):
        raise ValueError(f"{flag} {path}: {folder} is a file, not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: cannot write in {folder} (permission denied)")
    # /proc and /sys pass access() as root yet refuse new files: try one
    probe = os.path.join(folder, f".bcjax-probe-{os.getpid()}")
    try:
        with open(probe, "w"):
            pass
    except OSError as e:
        raise ValueError(f"{flag} {path}: cannot write in {folder} ({e.strerror})") from None
    os.remove(probe)


def _is_checkpoint(folder: str) -> bool:
    try:
        with open(os.path.join(folder, "config.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(meta, dict) and meta.get("format") == FORMAT


def _inside(path: str, folder: str) -> bool:
    """`path` is `folder` or lies under it (both resolved, symlinks followed)."""
    path, folder = os.path.realpath(path), os.path.realpath(folder)
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def check_destination(dst: str, sources: Iterable[str] = (), *, overwrite: bool = False) -> None:
    """Refuse an output folder, before anything is read or computed, unless writing it loses
    nothing but an older checkpoint: it is new, or (with overwrite) an empty folder or a bcjax
    checkpoint; never a file, the working folder or one above it, or a folder holding a source."""
    full = resolve(dst)
    if os.path.isfile(full):
        raise ValueError(f"output {dst} is a file; a checkpoint is a folder")
    if _inside(os.getcwd(), full):
        raise ValueError(f"output {dst} is the working folder or holds it; name a new folder for the checkpoint")
    for src in sources:
        if src and _inside(resolve(src), full):
            raise ValueError(f"output {dst} holds the source {src}; write the checkpoint to another folder")
    if not os.path.lexists(full):
        return
    if not overwrite:
        raise FileExistsError(f"{dst} exists; pass --overwrite (overwrite=True) to replace it")
    if not os.path.isdir(full):
        raise ValueError(f"output {dst} is not a folder")
    if os.listdir(full) and not _is_checkpoint(full):
        held = sorted(os.listdir(full))
        raise ValueError(f"output {dst} is not a bcjax checkpoint (no config.json of format 'bcjax'; it holds "
                         f"{held[:5]}{' ...' if len(held) > 5 else ''}); --overwrite replaces only a checkpoint "
                         "or an empty folder")


def clean_stale(dst: str) -> list[str]:
    """Remove the temporary folders beside `dst` that a killed write of it left (their process is
    gone); log any other `.bcjax-*` folder there (an older bcjax's, whose writer cannot be told).
    Returns the removed paths."""
    dst = resolve(dst)
    parent, name = os.path.split(dst)
    removed: list[str] = []
    try:
        entries = os.listdir(parent)
    except OSError:
        return removed
    for entry in sorted(entries):
        full = os.path.join(parent, entry)
        if not entry.startswith(_TMP) or not os.path.isdir(full) or os.path.islink(full):
            continue
        owner, _, rest = entry[len(_TMP):].rpartition(".")[0].rpartition(".")
        if owner == name and rest.isdigit() and not _alive(int(rest)):
            shutil.rmtree(full, ignore_errors=True)
            removed.append(full)
            _log.warning("bcjax: removed %s, left by an interrupted write of %s", full, dst)
        elif not rest.isdigit():
            _log.warning("bcjax: %s looks like a temporary folder an interrupted bcjax left; delete it if no "
                         "bcjax is running", full)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


_RENAME_EXCHANGE = 2  # linux/fs.h


def _exchange(a: str, b: str) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the OS or
    the file system has no such call."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    at_fdcwd = -100
    rc = renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (22, 38, 95):  # EINVAL, ENOSYS, EOPNOTSUPP: no exchange here; fall back
        return False
    raise OSError(err, os.strerror(err), b)


def replace(new: str, dst: str) -> None:
    """Put the complete folder `new` at `dst`. An existing `dst` is swapped out in one atomic
    rename exchange (Linux) and only then removed, so a kill at any moment leaves `dst` the whole
    old or the whole new checkpoint (and a temporary folder the next save removes). Elsewhere the
    old one is renamed aside first and restored if the second rename fails."""
    if not os.path.lexists(dst):
        os.rename(new, dst)
        return
    if _exchange(new, dst):
        shutil.rmtree(new)  # now the old checkpoint
        return
    aside = temp_beside(dst)
    os.rmdir(aside)
    os.rename(dst, aside)
    try:
        os.rename(new, dst)
    except BaseException:
        os.rename(aside, dst)
        raise
    shutil.rmtree(aside)
