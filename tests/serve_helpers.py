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

    return start_server(ToyBackend("causal-1f"), shared=True)  # 1-frame blocks: the quickest model


_started: list = []  # (uvicorn.Server, its thread) of the servers a test started for itself


def stop_started(timeout: float = 15.0) -> None:
    """Shut down every server a test started (tests/conftest.py, after each test): a server left
    running keeps serving tabs, and their generation threads, into the tests after it."""
    while _started:
        srv, thread = _started.pop()
        srv.should_exit = True
        thread.join(timeout)


SENTENCES = ["a red fox runs through the snow", "the cat sits on a warm mat", "waves crash on a rocky shore"]


def tiny_checkpoint(folder) -> str:
    """A bcjax checkpoint folder under `folder` (a pathlib.Path) with random tiny dit + umT5 + VAE,
    a random taew2_1 TAEHV and a trained tokenizer: `bcjax serve --checkpoint` in seconds."""
    import jax
    import numpy as np
    import sentencepiece as spm

    from bcjax import checkpoint
    from bcjax.model import WanConfig, param_shapes
    from bcjax.text import umt5
    from bcjax.vae import taehv, wan_vae

    spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 4), model_prefix=str(folder / "spiece"),
                                   vocab_size=40, pad_id=0, eos_id=1, unk_id=2, bos_id=-1, hard_vocab_limit=False,
                                   minloglevel=2)
    cfg = WanConfig.preset("tiny")
    tcfg, vcfg = umt5.UMT5Config.preset("tiny"), wan_vae.VAEConfig.preset("tiny")
    tae = taehv.TAEHVConfig.preset("taew2_1")
    rng = np.random.default_rng(0)

    def random(shapes):  # small random weights without compiling the initialisers
        return jax.tree_util.tree_map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)

    parts = {"dit": (cfg, random(param_shapes(cfg))), "text": (tcfg, random(umt5.param_shapes(tcfg))),
             "vae": (vcfg, random(wan_vae.param_shapes(vcfg))), "taehv": (tae, random(taehv.param_shapes(tae)))}
    dst = folder / "ckpt"
    checkpoint.save(str(dst), parts, {"source": "tests"},
                    files={"tokenizer/spiece.model": str(folder / "spiece.model")})
    return str(dst)


def start_server(backend, send_buffer: int | None = None, shared: bool = False, **options) -> Served:
    """`make_app(backend, **options)` served by uvicorn on a free loopback port, in a daemon thread
    (`send_buffer`: its connections' kernel send buffer, bytes; the server's default when None).
    Stopped after the test that started it, unless `shared` (a server kept for the whole process:
    `served()`, a module's cached one)."""
    from bcjax.serve import make_app, server
    from bcjax.serve.app import SEND_BUFFER

    app = make_app(backend, **{"queue": 4, **options})
    srv, sock = server(app, "127.0.0.1", 0, send_buffer=SEND_BUFFER if send_buffer is None else send_buffer)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="bcjax-test-server", daemon=True)
    thread.start()
    if not shared:
        _started.append((srv, thread))
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
    ws.send(json.dumps({"type": "start", "prompt": prompt, "stagger": "P4", "mask": "bidirectional",
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


def deaf_tab(s: Served, rcvbuf: int = 4096, timeout: float = 10.0):
    """A raw-socket WebSocket that reads its handshake's response and nothing after (a small
    receive buffer: the server's sends back up at once); `send_text(sock, text)` writes to it."""
    import base64
    import os
    import socket

    host, port = s.url.rsplit("/", 1)[-1].rsplit(":", 1)
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(timeout)
    sock.connect((host, int(port)))
    key = base64.b64encode(os.urandom(16)).decode()
    sock.sendall(f"GET /ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    head = b""
    while not head.endswith(b"\r\n\r\n"):  # a byte at a time: nothing past the response head is read
        byte = sock.recv(1)
        assert byte, head
        head += byte
    assert head.split(b"\r\n")[0].split()[1] == b"101", head
    return sock


def send_text(sock, text: str) -> None:
    """One masked WebSocket text frame (as a client must send it)."""
    import os
    import struct

    data = text.encode()
    n = len(data)
    head = bytes([0x81]) + (bytes([0x80 | n]) if n < 126 else bytes([0x80 | 126]) + struct.pack(">H", n)
                            if n < 2 ** 16 else bytes([0x80 | 127]) + struct.pack(">Q", n))
    mask = os.urandom(4)
    sock.sendall(head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(data)))
