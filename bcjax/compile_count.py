"""Count XLA compilations, to prove a stream never recompiles."""

from __future__ import annotations

import contextlib

import jax

_BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class CompileCounter:
    """Number of backend compilations seen while the context is open.

    >>> with CompileCounter() as cc:
    ...     run_stream()
    >>> assert cc.count == 1
    """

    def __init__(self):
        self.count = 0

    def _listener(self, event: str, duration_secs: float, **_: str | int) -> None:
        if event == _BACKEND_COMPILE_EVENT:
            self.count += 1

    def __enter__(self) -> CompileCounter:
        jax.monitoring.register_event_duration_secs_listener(self._listener)
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(Exception):
            jax.monitoring.unregister_event_duration_listener(self._listener)
        return False
