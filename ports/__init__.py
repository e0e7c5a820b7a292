"""One preset per upstream block-causal pipeline: which Wan model, and how it is sampled.

>>> import ports
>>> port = ports.get("longlive")
>>> port.model, port.pipeline.window_frames, port.pipeline.sink_frames
('wan2.1-1.3b', 12, 3)
"""

from __future__ import annotations

import dataclasses
import importlib

from bcjax.schedule.config import PipelineConfig

NAMES = ("self_forcing", "causvid", "longlive", "krea_14b", "krea_14b_clean_pass")


@dataclasses.dataclass(frozen=True)
class Port:
    name: str
    model: str  # WanConfig preset
    pipeline: PipelineConfig
    source: str  # where the numbers were read
    notes: str = ""


def get(name: str) -> Port:
    key = name.replace("-", "_").lower()
    if key not in NAMES:
        raise ValueError(f"unknown port {name!r}; known: {', '.join(NAMES)}")
    return importlib.import_module(f"ports.{key}").PORT
