"""Checks of the paths a command will write, made before anything is computed."""

from __future__ import annotations

import os


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
