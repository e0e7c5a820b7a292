"""The ASGI app (Starlette): the page, its static files, and one WebSocket per tab."""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import json
import logging
import socket
import time
import urllib.parse
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from bcjax.pipeline.recache import POLICIES
from bcjax.serve import protocol
from bcjax.serve.session import Outbox, Runners, Session, listen_for_compiles

log = logging.getLogger("bcjax.serve")

STATIC = Path(__file__).parent / "static"
ACK_RATE = 200  # acks/s a tab may send: one per block at any pace the page can draw, with room
# bigger frames are refused by the protocol layer (close 1009); smaller bad ones get an error frame
WS_MAX_SIZE = 64 * 1024


def make_app(backend, *, queue: int = 8, max_sessions: int = 8, allow_origins: tuple[str, ...] = (),
             ack_window: int = 4, rate: float = 20.0, burst: int = 40, text_bytes: int = 256 * 2 ** 20) -> Starlette:
    """The server for one model: `backend` (ToyBackend, CheckpointBackend); `queue` messages may
    wait per tab; at most `max_sessions` tabs at once. `/ws` takes handshakes from the page's own
    origin and `allow_origins` (e.g. "http://localhost:3000") only, and only with a Host naming
    the address the connection came in on. A tab's generation waits while `ack_window` blocks are
    unacknowledged; a tab may send `rate` messages/s (bursts of `burst`); each stream keeps
    `text_bytes` of text K/V."""
    if queue < 1 or max_sessions < 1 or ack_window < 1 or rate <= 0 or burst < 1:
        raise ValueError(f"queue={queue}, max_sessions={max_sessions}, ack_window={ack_window}, burst={burst} must be "
                         f">= 1 and rate={rate} > 0")
    for origin in allow_origins:
        _check_origin_flag(origin)
    listen_for_compiles()
    runners = Runners(backend)
    sessions: set[Session] = set()
    allowed = {o.rstrip("/").lower() for o in allow_origins}

    async def index(request):
        return FileResponse(STATIC / "index.html")

    async def favicon(request):
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

    async def ws(websocket: WebSocket):
        refused = _refusal(websocket, allowed)
        if refused:
            client = websocket.client
            log.warning("refused a WebSocket handshake from %s: %s", f"{client[0]}:{client[1]}" if client else "?",
                        refused)
            await websocket.close(code=1008)  # before accept: uvicorn answers the handshake with 403
            return
        await websocket.accept()
        outbox = Outbox(asyncio.get_running_loop(), queue)
        session = Session(backend, runners, outbox, ack_window=ack_window, text_bytes=text_bytes)
        if len(sessions) >= max_sessions:
            # the hello first: a tab turned away still shows the model and its controls, and retries
            await websocket.send_text(json.dumps(session.hello()))
            await websocket.send_text(json.dumps({"type": "error", "what": "server", "full": True,
                                                  "message": f"the server holds {max_sessions} tabs already; "
                                                             "this page retries on its own"}))
            await websocket.close(code=1013)
            return
        sessions.add(session)
        sender = asyncio.create_task(_send(websocket, outbox))
        bucket, acks = _Bucket(rate, burst), _Bucket(ACK_RATE, ACK_RATE)
        try:
            await outbox.queue.put(session.hello())
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                raw = message.get("text") if message.get("text") is not None else message.get("bytes")
                try:
                    cmd = protocol.parse(raw, POLICIES)  # bounded: MAX_MESSAGE bytes, no recursion
                except protocol.BadMessage as e:
                    cmd = {"type": "error", "what": "message", "message": str(e)}
                # acknowledgements come with every block and cost a lock: a budget of their own
                limit = acks if cmd["type"] == "ack" else bucket
                if not limit.take():
                    if limit.warn():
                        await outbox.queue.put({"type": "error", "what": "rate", "message":
                                                f"more than {limit.rate:g} "
                                                f"{'acks' if limit is acks else 'messages'}/s: "
                                                "dropped until the tab sends slower"})
                    continue
                if cmd["type"] == "error":
                    await outbox.queue.put(cmd)
                elif cmd["type"] == "ack":
                    session.act(cmd)
                else:  # off the event loop: a prompt is encoded, a start may build a runner
                    await asyncio.to_thread(session.act, cmd)
        except WebSocketDisconnect:
            pass
        finally:
            session.close()  # ends its generation: a closed tab stops generating
            sessions.discard(session)
            sender.cancel()

    app = Starlette(routes=[Route("/", index), Route("/favicon.ico", favicon), WebSocketRoute("/ws", ws),
                            Mount("/static", StaticFiles(directory=STATIC))])
    app.state.runners, app.state.sessions = runners, sessions
    return app


class _Bucket:
    """A token bucket: `rate` messages/s on average, `burst` at once."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst, self.tokens, self.t = rate, burst, float(burst), time.monotonic()
        self.last_drop = -float("inf")

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.t) * self.rate)
        self.t = now
        if self.tokens >= 1:
            self.tokens -= 1
            return True
        return False

    def warn(self, quiet: float = 1.0) -> bool:
        """True once per run of dropped messages: one error frame, not one per message.

        A run ends after `quiet` seconds without a drop. It does not end at the next accepted
        message: a flood refills one token per 1/rate s, and a slow server would otherwise split
        one flood into many runs, each with its own error frame."""
        now = time.monotonic()
        first, self.last_drop = now - self.last_drop > quiet, now
        return first


def _check_origin_flag(origin: str) -> None:
    parts = urllib.parse.urlsplit(origin)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.path.strip("/") or parts.query:
        raise ValueError(f"--allow-origin {origin!r}: expected scheme://host[:port], e.g. http://localhost:3000")


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _host_names(server: tuple[str, int] | None) -> set[str]:
    """What a Host header may say for a connection that came in on `server` = (address, port):
    the address itself, and localhost when it is a loopback address. A name pointing here that the
    server did not bind (DNS rebinding: evil.example resolved to 127.0.0.1) is not among them."""
    if server is None:
        return set()
    address, port = server[0], server[1]
    names = {f"[{address}]" if ":" in address else address}
    if _loopback(address):
        names |= {"localhost", "127.0.0.1", "[::1]"}
    else:  # a LAN address: the machine's own names too
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return {f"{n}:{port}" for n in names} | (set(names) if port == 80 else set())


def _refusal(websocket: WebSocket, allowed: set[str]) -> str | None:
    """Why a handshake is refused, or None. A browser always sends Origin on a WebSocket; a
    script that sends none is not a page acting for the user, and could forge any Origin anyway."""
    host = (websocket.headers.get("host") or "").lower()
    if host not in _host_names(websocket.scope.get("server")):
        return f"Host {host!r} is not this server's address (a DNS-rebinding page?)"
    origin = websocket.headers.get("origin")
    if origin is None:
        return None
    origin = origin.rstrip("/").lower()
    if origin in (f"http://{host}", f"https://{host}") or origin in allowed:
        return None
    return f"Origin {origin!r} is not this page's own ({'http://' + host}); allow it with --allow-origin {origin}"


async def _send(websocket: WebSocket, outbox: Outbox) -> None:
    try:
        while True:
            msg = await outbox.get()
            if isinstance(msg, bytes):
                await websocket.send_bytes(msg)
            else:
                await websocket.send_text(json.dumps(msg))
    except (WebSocketDisconnect, RuntimeError, OSError):  # the tab went away mid-send
        outbox.close()


def bind(host: str = "127.0.0.1", port: int = 8000) -> socket.socket:
    """A socket bound to (host, port), before any model loads: a port out of range, a host that is
    no address and a port in use are ValueErrors naming them. Port 0 picks a free port."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 0 .. 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r}: not an address this machine can listen on ({e})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: {host}:{port} is in use (another bcjax serve?); pick another --port, "
                             "or --port 0 for any free one") from None
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


def server(app, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None):
    """(uvicorn.Server, bound socket): on `sock`, or on one `bind(host, port)` makes."""
    import uvicorn

    sock = sock if sock is not None else bind(host, port)
    # websockets' sans-I/O protocol where uvicorn has it (its legacy one is deprecated)
    ws = "websockets-sansio" if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS else "auto"
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", ws=ws, ws_max_size=WS_MAX_SIZE)), sock
