"""One preset per upstream block-causal pipeline: which Wan model, and how it is sampled.

>>> import ports
>>> port = ports.get("longlive")
>>> port.model, port.pipeline.window_frames, port.pipeline.sink_frames
('wan2.1-1.3b', 12, 3)
"""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Mapping

from bcjax.names import PORTS, SEQUENTIAL
from bcjax.schedule.config import PipelineConfig

NAMES = PORTS  # the module names, `bcjax.names.PortName`


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


def for_checkpoint(provenance: Mapping, stagger: str | None = SEQUENTIAL) -> Port:
    """The port a converted checkpoint samples with unless told otherwise, from its config's
    provenance (`bcjax.checkpoint.read_config(path)["provenance"]`): a Krea checkpoint runs Krea's
    own loop when sequential (`krea_14b`) and its clean-pass variant under a cascade, or where the
    stagger is picked later (stagger None: the server, whose tabs pick one per stream); any other
    checkpoint, Self-Forcing's sampler."""
    if provenance.get("layout") == "krea":
        return get("krea_14b" if stagger == SEQUENTIAL else "krea_14b_clean_pass")
    return get("self_forcing")
