"""`bcjax serve` against tabs that do not read, do not speak, or lie (issue 32): a tab's work
never waits on a shared worker, an idle tab is closed with why, an ack counts only what the
socket's transport took; and the one-line hints of a refused file origin and an interrupted
`bcjax generate`."""

import contextlib
import functools
import json
import logging
import struct
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("websockets")

from serve_helpers import connect, deaf_tab, read, send_text, served, start, start_server, until

STALL = 2.0  # the strict server's stall limit, s


@functools.lru_cache(maxsize=1)
def _strict():
    """A second app over the test server's model: idle tabs closed after 1.5 s, a socket that
    takes nothing for STALL s closed (the defaults are 120 s and 30 s), and small kernel send
    buffers (4 KB, doubled: a tab that does not read backs up into the transport sooner)."""
    s = served()
    return start_server(s.backend, idle=1.5, stall=STALL, runners=s.app.state.runners, send_buffer=4096, shared=True)


def _deaf_server():
    """The test server's model behind a stall limit of 12 s instead of 30: the six deaf tabs below
    are closed by the outbox rule (finding 6) within about 9 s, before any stall, but their sockets,
    which never take the close frame, are let go only at the stall limit (12 s: 10 s less waiting)."""
    s = served()
    return start_server(s.backend, stall=12.0, runners=s.app.state.runners)


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _frames(data: bytes) -> list[tuple[int, bytes]]:
    """(opcode, payload) of the unmasked frames a server sent, in order."""
    out, at = [], 0
    while at + 2 <= len(data):
        op, n, at = data[at] & 0x0F, data[at + 1] & 0x7F, at + 2
        if n == 126:
            (n,), at = struct.unpack(">H", data[at:at + 2]), at + 2
        elif n == 127:
            (n,), at = struct.unpack(">Q", data[at:at + 8]), at + 8
        out.append((op, data[at:at + n]))
        at += n
    return out


def _closed_by_server(sock, timeout: float = 40.0) -> None:
    """Read what the server sent a deaf tab until it closes the connection (within `timeout`);
    a close frame, when it got through, says 4001 and why."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(1 << 16):  # a timeout raises: the server did not close
            data += chunk
    except ConnectionResetError:  # closed with what it could not send still unread
        return
    op, payload = _frames(data)[-1]
    if op == 8:  # written only if the transport took it within `stall` s: the tab read nothing meanwhile
        assert struct.unpack(">H", payload[:2])[0] == 4001 and b"does not read" in payload, payload


def test_six_tabs_that_never_read_cannot_starve_a_seventh():
    """Finding 6: six tabs that never read, each sending 4 KB prompts that come back as ~12 KB
    error frames (every 'é' is escaped to 6 bytes), used to block every shared worker on their
    full outboxes: a 7th tab got no block in 150 s. Replies never wait now, and a tab whose
    replies pile up past its queue is closed (code 4001)."""
    s = _deaf_server()
    with connect(s) as ws:  # compiled before the attack: the timing below is the attack's alone
        start(ws)
        read(ws, 1, timeout=600)
    assert _wait(lambda: not s.app.state.sessions, 10)
    bad = json.dumps({"type": "start", "prompt": "é" * 1900}, ensure_ascii=False)
    stop = threading.Event()
    deaf = [deaf_tab(s) for _ in range(6)]

    def attack(sock):
        with contextlib.suppress(OSError):
            for _ in range(20 * 60):  # at most a minute, under the tab's cap of 20 messages/s
                if stop.is_set():
                    return
                send_text(sock, bad)
                time.sleep(1 / 19)

    threads = [threading.Thread(target=attack, args=(sock,), daemon=True) for sock in deaf]
    for t in threads:
        t.start()
    try:
        time.sleep(3.0)  # their outboxes and socket buffers are full by now (~230 KB/s each)
        t0 = time.monotonic()
        with connect(s) as ws:
            start(ws)
            read(ws, 1, timeout=30)
            first = time.monotonic() - t0
            assert first < 10, f"the normal tab's first block took {first:.1f} s beside six deaf tabs"
            # the deaf tabs are closed on their own; the normal one goes on
            assert _wait(lambda: len(s.app.state.sessions) == 1, 20), len(s.app.state.sessions)
            read(ws, 2, timeout=30)
    finally:
        stop.set()
        for t in threads:
            t.join(5)
    for sock in deaf:
        _closed_by_server(sock)
        sock.close()


def test_idle_tabs_are_closed_and_free_their_places():
    """Finding 7: eight tabs that connect and never start held every place for good (a new tab got
    1013). A tab with no message and nothing to generate is closed after `idle` s with why; a
    stream that is still generating (here: paced to 1 frame/s, 12 s a block, no acks meanwhile)
    is not idle."""
    from websockets.exceptions import ConnectionClosed

    s = _strict()
    with contextlib.ExitStack() as tabs:
        paced = tabs.enter_context(connect(s))
        start(paced, fps=1)
        read(paced, 1, timeout=600)  # compiled; the next block is 12 s away
        idle = [tabs.enter_context(connect(s)) for _ in range(7)]  # the server's 8 places taken
        t0 = time.monotonic()
        for ws in idle:
            e = until(ws, lambda j: j["type"] == "error", timeout=15)
            assert e["what"] == "idle" and "1.5 s" in e["message"] and "press start" in e["message"], e
            with pytest.raises(ConnectionClosed) as closed:
                ws.recv(timeout=10)
            assert closed.value.rcvd.code == 4000
        assert time.monotonic() - t0 < 10
        assert len(s.app.state.sessions) == 1  # the paced stream's tab stays
        with connect(s) as ninth:  # a place is free: no 'full', and it streams
            start(ninth)
            got, other = read(ninth, 1, timeout=30)
            assert not [o for o in other if o.get("full")], other
        ws = paced  # still open: its next block comes
        got, _ = read(ws, 1, timeout=30)
        assert got


def test_blind_acks_count_only_what_the_transport_took():
    """Finding 8: a tab that never read but acknowledged every block kept the server computing,
    hundreds of blocks buffered (the kernel's send buffer grows to 4 MB: ~6000 toy blocks of ~600
    bytes), until uvicorn's ping timed out at 40 s. Acks count only blocks handed to the transport,
    whose kernel buffer is fixed (SEND_BUFFER; small here): the stream stops once the buffers are
    full, and the server's own stall rule closes the tab (4001) `stall` s after its last send."""
    from bcjax.serve.session import NOT_READING

    s = _strict()
    before = set(s.app.state.sessions)
    t0 = time.monotonic()
    sock = deaf_tab(s)
    send_text(sock, json.dumps({"type": "start", "prompt": "red east fast", "stagger": "P4", "fps": 0,
                                "mask": "bidirectional", "policy": "no-recache", "seed": 0}))
    assert _wait(lambda: len(s.app.state.sessions) > len(before), 10)
    (session,) = set(s.app.state.sessions) - before
    gen, delivered, progress = None, 0, time.monotonic()  # progress: when the transport last took a block
    ended_at = None  # when the server decided to close the tab
    with contextlib.suppress(OSError):
        for n in range(1, 100 * 60):  # acks far ahead of what came, 100/s, for at most a minute
            if session not in s.app.state.sessions:
                break
            send_text(sock, json.dumps({"type": "ack", "stream": 1, "blocks": 10 * n}))
            gen = session.gen or gen
            if gen is not None and gen.delivered > delivered:
                delivered, progress = gen.delivered, time.monotonic()
            if ended_at is None and session.outbox.ended is not None:
                ended_at = time.monotonic()
            time.sleep(0.01)
    closed = time.monotonic()
    assert session not in s.app.state.sessions, "the blind tab is still served after a minute"
    # closed by the server's stall rule, not by uvicorn's keepalive (a ping unanswered: 40 s after connecting)
    ended = session.outbox.ended
    assert ended is not None and ended.code == NOT_READING, ended
    assert ended.reason.startswith(f"nothing could be sent for {STALL:g} s"), ended
    # STALL s after the transport last took a block (the rest: scheduling on a loaded machine); its
    # place freed at most STALL s later (the close frame waits that long for room in the transport)
    assert ended_at is not None and ended_at - progress < STALL + 6, (ended_at, progress)
    assert closed - progress < 2 * STALL + 8, f"closed {closed - progress:.1f} s after the last block was sent"
    assert closed - t0 < 30, f"closed {closed - t0:.1f} s after connecting: the keepalive's 40 s are near"
    assert gen is not None and gen.acked <= gen.delivered <= gen.sent
    assert gen.sent < 400, f"{gen.sent} blocks of ~600 bytes computed for a tab that read none"
    cpu = time.process_time()
    time.sleep(1.0)
    assert time.process_time() - cpu < 0.3, "the closed blind tab kept computing"
    # the TCP connection goes too: after the close frame (which waits up to STALL s for room) the
    # websocket layer waits its close timeout (10 s) for the deaf tab's reply, then drops it; a
    # 10 s wait here raced that timer
    _closed_by_server(sock, timeout=STALL + 10 + 8)
    sock.close()


def test_a_file_origin_is_refused_with_a_hint_the_cli_takes(caplog):
    """Finding 9: a refused `null` origin was logged with the hint `--allow-origin null`, which the
    CLI refuses. Every hint names a flag value the CLI takes, and a file's origin is told why not."""
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect as ws_connect

    from bcjax.serve.app import _check_origin_flag

    s = served()
    with caplog.at_level(logging.WARNING, logger="bcjax.serve"):
        for origin in ["null", "file://", "http://evil.example"]:
            with pytest.raises(InvalidStatus):
                ws_connect(s.ws_url, origin=origin, open_timeout=10)
    reasons = [r.getMessage() for r in caplog.records if r.name == "bcjax.serve"]
    assert len(reasons) == 3, reasons
    for reason in reasons:
        hint = reason.split("--allow-origin ", 1)[1].split()[0]
        if "ITS-HOST" not in hint:
            _check_origin_flag(hint)  # the CLI takes it
    assert "cannot be allowed" in reasons[0] and "--allow-origin null" not in reasons[0]
    assert "cannot be allowed" in reasons[1]
    assert reasons[2].endswith("--allow-origin http://evil.example")


def test_an_interrupted_generate_says_the_mp4_keeps_its_blocks(tmp_path, capsys, monkeypatch):
    """Finding 9: Ctrl-C in `bcjax generate --checkpoint` printed only 'interrupted'."""
    import numpy as np

    import bcjax.app.t2v
    from bcjax.app.video import Mp4Writer
    from bcjax.cli import main

    blocks_before_ctrl_c = [2]

    class Interrupted:  # TextToVideo's interface, interrupted after some blocks
        def __init__(self, *args, **kwargs):
            pass

        def write_mp4(self, prompt, num_blocks, path, **kwargs):
            with Mp4Writer(path) as w:
                for _ in range(blocks_before_ctrl_c[0]):
                    w.write(np.zeros((12, 32, 32, 3), np.uint8))
                raise KeyboardInterrupt

    monkeypatch.setattr(bcjax.app.t2v, "TextToVideo", Interrupted)
    (tmp_path / "ckpt").mkdir()
    out = tmp_path / "v.mp4"
    argv = ["generate", "--checkpoint", str(tmp_path / "ckpt"), "--sampler", "self_forcing", "--prompt", "a fox",
            "--out", str(out)]
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"bcjax generate: interrupted; {out} holds the blocks made so far", err
    assert out.stat().st_size > 0
    blocks_before_ctrl_c[0] = 0  # before the first block: the old file stays, and is not claimed
    assert main(argv) == 130
    err = capsys.readouterr().err.strip()
    assert err == f"bcjax generate: interrupted before the first block; nothing written to {out}", err
