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
from bcjax.serve.session import IDLE, NOT_READING, Ended, Outbox, Runners, Session, listen_for_compiles

log = logging.getLogger("bcjax.serve")

STATIC = Path(__file__).parent / "static"
ACK_RATE = 200  # acks/s a tab may send: one per block at any pace the page can draw, with room
# bigger frames are refused by the protocol layer (close 1009); smaller bad ones get an error frame
WS_MAX_SIZE = 64 * 1024
IDLE_S = 120.0  # a tab with no message and nothing to generate for this long is closed (its slot freed)
STALL_S = 30.0  # a tab whose socket takes nothing for this long is closed (it does not read)
SEND_BUFFER = 128 * 1024  # bytes (the kernel doubles it): 5 MB/s at a 50 ms round trip


def make_app(backend, *, queue: int = 8, max_sessions: int = 8, allow_origins: tuple[str, ...] = (),
             ack_window: int = 4, rate: float = 20.0, burst: int = 40, text_bytes: int = 256 * 2 ** 20,
             idle: float = IDLE_S, stall: float = STALL_S, runners: Runners | None = None) -> Starlette:
    """The server for one model: `backend` (ToyBackend, CheckpointBackend); `queue` messages may
    wait per tab; at most `max_sessions` tabs at once. `/ws` takes handshakes from the page's own
    origin and `allow_origins` (e.g. "http://localhost:3000") only, and only with a Host naming
    the address the connection came in on. A tab's generation waits while `ack_window` blocks are
    unacknowledged; a tab may send `rate` messages/s (bursts of `burst`); each stream keeps
    `text_bytes` of text K/V. A tab is closed when it has been idle `idle` s (no message, and
    its generation waits: no stream, a stopped one, or one waiting for acks), and when nothing
    could be handed to its socket's transport for `stall` s (its page does not read). `runners`:
    another app's `app.state.runners` over the same backend, to share its compiled programs."""
    if queue < 1 or max_sessions < 1 or ack_window < 1 or rate <= 0 or burst < 1 or idle <= 0 or stall <= 0:
        raise ValueError(f"queue={queue}, max_sessions={max_sessions}, ack_window={ack_window}, burst={burst} must be "
                         f">= 1 and rate={rate}, idle={idle}, stall={stall} > 0")
    for origin in allow_origins:
        _check_origin_flag(origin)
    listen_for_compiles()
    runners = Runners(backend) if runners is None else runners
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
        # room for the replies to a whole burst of messages: only a tab that does not read fills it
        outbox = Outbox(asyncio.get_running_loop(), queue, room=2 * burst)
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
        outbox.reply(session.hello())
        # the tab's two coroutines: neither waits on the other, nor on any other tab
        sender = asyncio.create_task(_send(websocket, outbox, stall))
        receiver = asyncio.create_task(_receive(websocket, session, _Bucket(rate, burst), idle))
        try:
            await asyncio.wait({sender, receiver}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            session.close()  # ends its generation: a closed tab stops generating
            sessions.discard(session)  # its place is free now, not once its close frame is through
            receiver.cancel()
            if outbox.ended is not None and not sender.done():  # the page hears why, then the close
                await asyncio.wait({sender}, timeout=stall)
            sender.cancel()

    app = Starlette(routes=[Route("/", index), Route("/favicon.ico", favicon), WebSocketRoute("/ws", ws),
                            Mount("/static", StaticFiles(directory=STATIC))])
    app.state.runners, app.state.sessions = runners, sessions
    return app


async def _receive(websocket: WebSocket, session: Session, bucket: _Bucket, idle: float) -> None:
    """Act on the tab's messages in order until it disconnects or has been idle `idle` s (then
    its outbox is ended with why, for the sender to send and close)."""
    outbox = session.outbox
    acks = _Bucket(ACK_RATE, ACK_RATE)
    last = time.monotonic()
    pending: asyncio.Future | None = None
    try:
        while True:
            if pending is None:
                pending = asyncio.ensure_future(websocket.receive())
            since = session.idle_since()
            left = idle if since is None else max(last, since) + idle - time.monotonic()
            if left <= 0:
                log.info("closing tab %d: idle for %g s", session.tab, idle)
                outbox.reply({"type": "error", "what": "idle", "message":
                              f"closed after {idle:g} s without a start or a message: press start to reconnect"})
                outbox.end(IDLE, f"idle for {idle:g} s", drop=False)
                return
            done, _ = await asyncio.wait({pending}, timeout=left)
            if not done:
                continue
            message, pending = pending.result(), None
            last = time.monotonic()
            if message["type"] == "websocket.disconnect" or outbox.closed.is_set():
                return
            raw = message.get("text") if message.get("text") is not None else message.get("bytes")
            try:
                cmd = protocol.parse(raw, POLICIES)  # bounded: MAX_MESSAGE bytes, no recursion
            except protocol.BadMessage as e:
                cmd = {"type": "error", "what": "message", "message": str(e)}
            # acknowledgements come with every block and cost a lock: a budget of their own
            limit = acks if cmd["type"] == "ack" else bucket
            if not limit.take():
                if limit.warn():
                    outbox.reply({"type": "error", "what": "rate", "message":
                                  f"more than {limit.rate:g} {'acks' if limit is acks else 'messages'}/s: "
                                  "dropped until the tab sends slower"})
                continue
            if cmd["type"] == "error":
                outbox.reply(cmd)
            elif cmd["type"] == "ack":
                session.act(cmd)
            else:  # off the event loop: a prompt is encoded, a start may build a runner; replies never wait
                await asyncio.to_thread(session.act, cmd)
    except WebSocketDisconnect:
        pass
    finally:
        if pending is not None:
            pending.cancel()


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
    if not _allowable(origin):
        raise ValueError(f"--allow-origin {origin!r}: expected scheme://host[:port], e.g. http://localhost:3000")


def _allowable(origin: str) -> bool:
    """Whether --allow-origin takes `origin`: an http(s) page's, not a file's or a sandboxed frame's ('null')."""
    parts = urllib.parse.urlsplit(origin)
    return parts.scheme in ("http", "https") and bool(parts.netloc) and not parts.path.strip("/") and not parts.query


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
    if _allowable(origin):
        return f"Origin {origin!r} is not this page's own ({'http://' + host}); allow it with --allow-origin {origin}"
    # a page opened from a file, or a sandboxed frame: any such page may send it, so no flag allows it
    return (f"Origin {origin!r} is not this page's own ({'http://' + host}): a page opened from a file or a "
            f"sandboxed frame cannot be allowed; open http://{host}/, or serve your page over http and pass "
            "--allow-origin http://ITS-HOST:PORT")


async def _send(websocket: WebSocket, outbox: Outbox, stall: float) -> None:
    """Send the tab's outbox in order; a message the socket's transport has not taken after
    `stall` s (its buffer stays full: the page does not read) ends the tab, as does its outbox's end."""
    try:
        while True:
            item = await outbox.get()
            if isinstance(item, Ended):
                log.info("closing a tab (code %d): %s", item.code, item.reason)
                # the close frame waits for room in the transport too: at most `stall` s
                await asyncio.wait_for(websocket.close(item.code, item.reason[:120]), stall)
                return
            msg, on_sent = item
            try:
                await asyncio.wait_for(websocket.send_bytes(msg) if isinstance(msg, bytes)
                                       else websocket.send_text(json.dumps(msg)), stall)
            except TimeoutError:
                outbox.end(NOT_READING, f"nothing could be sent for {stall:g} s: the page does not read")
                continue
            if on_sent is not None:  # handed to the transport: an ack may count it now
                on_sent()
    except (WebSocketDisconnect, RuntimeError, OSError, TimeoutError):  # the tab went away mid-send
        outbox.close()


def bind(host: str = "127.0.0.1", port: int = 8000, send_buffer: int = SEND_BUFFER) -> socket.socket:
    """A socket bound to (host, port), before any model loads: a port out of range, a host that is
    no address and a port in use are ValueErrors naming them. Port 0 picks a free port. Every
    connection it accepts has a kernel send buffer of `send_buffer` bytes (the kernel doubles it)."""
    if not 0 <= port <= 65535:
        raise ValueError(f"--port {port}: expected 0 .. 65535")
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except (socket.gaierror, UnicodeError) as e:
        raise ValueError(f"--host {host!r}: not an address this machine can listen on ({e})") from None
    family, _, _, _, address = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # every connection's kernel send buffer (accepted sockets inherit it): fixed, not grown to 4 MB,
    # so a page that stops reading backs up into the transport, where the sender sees it, after
    # kilobytes rather than hundreds of blocks
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRINUSE:
            raise ValueError(f"--port {port}: {host}:{port} is in use (another bcjax serve?); pick another --port, "
                             "or --port 0 for any free one") from None
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror})") from None
    return sock


def server(app, host: str = "127.0.0.1", port: int = 8000, sock: socket.socket | None = None,
           send_buffer: int = SEND_BUFFER):
    """(uvicorn.Server, bound socket): on `sock`, or on one `bind(host, port, send_buffer)` makes."""
    import uvicorn

    sock = sock if sock is not None else bind(host, port, send_buffer)
    # websockets' sans-I/O protocol where uvicorn has it (its legacy one is deprecated)
    ws = "websockets-sansio" if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS else "auto"
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", ws=ws, ws_max_size=WS_MAX_SIZE)), sock
