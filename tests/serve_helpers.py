"""One `bcjax serve` app on a free loopback port, shared by the serve tests (its runners compile once)."""

from __future__ import annotations

import contextlib
import functools
import json
import threading
import time
from typing import NamedTuple

import pytest


class Served(NamedTuple):
    url: str  # http://127.0.0.1:PORT
    ws_url: str
    app: object
    backend: object


@functools.lru_cache(maxsize=1)
def served() -> Served:
    """The toy-world server (one per test process)."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    from bcjax.serve import ToyBackend

    return start_server(ToyBackend())


def start_server(backend, **options) -> Served:
    """`make_app(backend, **options)` served by uvicorn on a free loopback port, in a daemon thread."""
    from bcjax.serve import make_app, server

    app = make_app(backend, **{"queue": 4, **options})
    srv, sock = server(app, "127.0.0.1", 0)
    threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="bcjax-test-server", daemon=True).start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not start within 20 s")
        time.sleep(0.02)
    host, port = sock.getsockname()[:2]
    return Served(f"http://{host}:{port}", f"ws://{host}:{port}/ws", app, backend)


@contextlib.contextmanager
def connect(s: Served, **options):
    """A WebSocket to the server, its hello already read (options: websockets' connect's, e.g. origin)."""
    from websockets.sync.client import connect as ws_connect

    with ws_connect(s.ws_url, max_size=None, open_timeout=10, **options) as ws:
        hello = json.loads(ws.recv(timeout=10))
        assert hello["type"] == "hello", hello
        try:
            yield ws
        finally:
            _received.pop(id(ws), None)


def start(ws, prompt="red east fast", **settings):
    ws.send(json.dumps({"type": "start", "prompt": prompt, "schedule": "P4", "window": "bidirectional",
                        "policy": "no-recache", "seed": 0, "fps": 0, **settings}))


_received: dict = {}  # websocket -> {stream: blocks received}, for the acknowledgements the page sends too


def ack(ws, data: bytes):
    """Acknowledge a block message as the page does (the server waits for acks); its (header, images)."""
    from bcjax.serve.protocol import unpack_block

    header, images = unpack_block(data)
    seen = _received.setdefault(id(ws), {})
    seen[header["stream"]] = seen.get(header["stream"], 0) + 1
    ws.send(json.dumps({"type": "ack", "stream": header["stream"], "blocks": seen[header["stream"]]}))
    return header, images


def read(ws, blocks: int, timeout: float = 60.0):
    """(block messages [(header, images)], JSON messages other than ticks) until `blocks` blocks came."""
    out, other = [], []
    deadline = time.monotonic() + timeout
    while len(out) < blocks:
        m = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(m, bytes):
            out.append(ack(ws, m))
        elif (j := json.loads(m))["type"] != "tick":
            other.append(j)
    return out, other


def until(ws, pred, timeout: float = 30.0):
    """Read messages until pred(JSON message) holds (blocks, acknowledged, and ticks skipped); that message."""
    deadline = time.monotonic() + timeout
    while True:
        m = ws.recv(timeout=max(0.1, deadline - time.monotonic()))
        if isinstance(m, bytes):
            ack(ws, m)
        elif pred(j := json.loads(m)):
            return j
