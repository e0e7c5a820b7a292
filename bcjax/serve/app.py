"""The ASGI app (Starlette): the page, its static files, and one WebSocket per tab."""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

from starlette.applications import Starlette
from starlette.responses import FileResponse
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect

from bcjax.serve.session import Outbox, Runners, Session

STATIC = Path(__file__).parent / "static"
WS_MAX_SIZE = 64 * 1024  # bigger frames are refused by the protocol layer (close 1009); smaller bad ones get an error frame


def make_app(backend, *, queue: int = 8, max_sessions: int = 8) -> Starlette:
    """The server for one model: `backend` (ToyBackend, CheckpointBackend); `queue` messages may
    wait per tab before its generation waits; at most `max_sessions` tabs at once."""
    if queue < 1 or max_sessions < 1:
        raise ValueError(f"queue={queue} and max_sessions={max_sessions} must be >= 1")
    runners = Runners(backend)
    sessions: set[Session] = set()

    async def index(request):
        return FileResponse(STATIC / "index.html")

    async def ws(websocket: WebSocket):
        await websocket.accept()
        if len(sessions) >= max_sessions:
            await websocket.send_text(json.dumps({"type": "error", "what": "server",
                                                  "message": f"the server holds {max_sessions} tabs already; try later"}))
            await websocket.close(code=1013)
            return
        outbox = Outbox(asyncio.get_running_loop(), queue)
        session = Session(backend, runners, outbox)
        sessions.add(session)
        sender = asyncio.create_task(_send(websocket, outbox))
        try:
            await outbox.queue.put(session.hello())
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                # off the event loop: a prompt is encoded, a start may build a runner
                await asyncio.to_thread(session.handle, message.get("text") if message.get("text") is not None
                                        else message.get("bytes"))
        except WebSocketDisconnect:
            pass
        finally:
            session.close()  # ends its generation: a closed tab stops generating
            sessions.discard(session)
            sender.cancel()

    app = Starlette(routes=[Route("/", index), WebSocketRoute("/ws", ws), Mount("/static", StaticFiles(directory=STATIC))])
    app.state.runners, app.state.sessions = runners, sessions
    return app


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


def server(app, host: str = "127.0.0.1", port: int = 8000):
    """(uvicorn.Server, bound socket): port 0 picks a free port (read it from the socket)."""
    import uvicorn

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    # websockets' sans-I/O protocol where uvicorn has it (its legacy one is deprecated)
    ws = "websockets-sansio" if "websockets-sansio" in uvicorn.config.WS_PROTOCOLS else "auto"
    return uvicorn.Server(uvicorn.Config(app, log_level="warning", ws=ws, ws_max_size=WS_MAX_SIZE)), sock
