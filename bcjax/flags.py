"""argparse pieces shared by `bcjax` and the harnesses it hands arguments to (`bcjax eval toyworld`):
value types whose errors say what was expected, and a flag's deprecated spelling (and a Python
keyword's: `renamed_keyword`)."""

from __future__ import annotations

import argparse
import sys
import warnings


def positive(text: str) -> int:
    """argparse type: an integer > 0 (argparse names the flag in front of the message)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def positive_seconds(text: str) -> float:
    """argparse type: a finite number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected a positive number of seconds, got {text!r}")
    return value


class OldName(argparse.Action):
    """A flag's deprecated spelling: it works, and one line on stderr says the new one (and why,
    when `why` is given)."""

    def __init__(self, *args, new: str, why: str = "", **kwargs):
        self.new, self.why = new, why
        super().__init__(*args, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string != self.new:
            print(f"{parser.prog}: {option_string} is deprecated here; it is spelled {self.new}"
                  + (f" ({self.why})" if self.why else ""), file=sys.stderr)
        setattr(namespace, self.dest, values)


def renamed_keyword(old: str, new: str, value, default, given):
    """`given` (the new keyword's value), or a deprecated keyword's `value` with a DeprecationWarning
    naming the new one; both given is a TypeError. For the keywords renamed in 0.x (one release)."""
    if value is None:
        return given
    warnings.warn(f"{old}= is deprecated: it is spelled {new}= (docs/concepts/glossary.md)", DeprecationWarning,
                  stacklevel=3)
    if given != default:
        raise TypeError(f"got both {new}= and its old name {old}=")
    return value
