"""What every model config shares: named presets and dtype checks (a helper, not a base class)."""

from __future__ import annotations

DTYPES = ("float32", "bfloat16", "float16")


def check_dtypes(cfg, names=("param_dtype", "dtype")) -> None:
    for name in names:
        if getattr(cfg, name) not in DTYPES:
            raise ValueError(f"{name}={getattr(cfg, name)!r}: expected one of {', '.join(DTYPES)}")


def from_preset(cls, presets: dict, name: str, overrides: dict):
    if name not in presets:
        raise ValueError(f"unknown {cls.__name__} preset {name!r}; known: {sorted(presets)}")
    return cls(**{**presets[name], **overrides})
