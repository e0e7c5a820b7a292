"""The one exception a malformed user file raises: `bcjax` prints it as one line, exit 2."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


class BadFileError(ValueError):
    """A file or folder a user handed bcjax (safetensors, .pt/.pth, TAEHV, config.json, an orbax
    folder, a tokenizer) is malformed, incomplete or corrupt. The message names the file and what is
    wrong, on one line: several problems are joined with '; ' (a multi-line message would hide
    all but its first line behind a log prefix)."""

    def __init__(self, message: str):
        super().__init__(one_line(message))


def one_line(message: str) -> str:
    """`message` with its line breaks (and the indents after them) folded into '; '."""
    lines = [line.strip() for line in str(message).splitlines()]
    return "; ".join(line.rstrip(":;") if i < len(lines) - 1 else line
                     for i, line in enumerate(lines) if line)


@contextlib.contextmanager
def naming(path) -> Iterator[None]:
    """Turn a reader's or converter's complaint about the content of the file at `path` into a
    BadFileError that names the file, on one line."""
    try:
        yield
    except BadFileError:
        raise
    except (ValueError, KeyError, ArithmeticError, IndexError, TypeError) as e:
        # beyond ValueError and KeyError: a shape no check foresaw, met in the converter's arithmetic
        message = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
        if not isinstance(e, (ValueError, KeyError)):
            message = f"unexpected content ({type(e).__name__}: {message})"
        raise BadFileError(message if str(path) in message else f"{path}: {message}") from None
