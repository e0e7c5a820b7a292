"""`bcjax serve` against a hostile or careless client, through the real server: foreign origins
and rebinding hosts refused, deep JSON and floods answered with an error frame, one thread per
tab whatever it sends, paces checked, a never-reading tab costs nothing, text K/V bounded."""

import json
import logging
import os
import threading
import time

import pytest

pytest.importorskip("starlette")
pytest.importorskip("websockets")

from serve_helpers import connect, read, served, start, start_server, until


def _tab_threads():
    return [t for t in threading.enumerate() if t.name.startswith("bcjax-tab-")]


def _wait(pred, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _session(s):
    # the tests open one tab at a time; an earlier test's tab may be a moment from ending
    assert _wait(lambda: len(s.app.state.sessions) == 1, 10), len(s.app.state.sessions)
    (session,) = s.app.state.sessions
    return session


def _as(name: str, port: str, origin: str):
    """A handshake to the loopback server whose Host header says `name` (what a browser sends
    when `name` resolves to 127.0.0.1)."""
    import socket

    from websockets.sync.client import connect as ws_connect

    return ws_connect(f"ws://{name}:{port}/ws", sock=socket.create_connection(("127.0.0.1", int(port))), origin=origin,
                      open_timeout=10)


def test_foreign_origins_and_rebinding_hosts_are_refused(caplog):
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect as ws_connect

    s = served()
    port = s.url.rsplit(":", 1)[1]
    with connect(s, origin=s.url):  # the page's own origin
        pass
    with _as("localhost", port, f"http://localhost:{port}"):  # the same server by name, from the page it served so
        pass
    with caplog.at_level(logging.WARNING, logger="bcjax.serve"):
        for origin in ["http://evil.example", "null", "https://attacker.com", f"http://127.0.0.1:{int(port) + 1}"]:
            with pytest.raises(InvalidStatus) as refused:
                ws_connect(s.ws_url, origin=origin, open_timeout=10)
            assert refused.value.response.status_code == 403, origin
        # DNS rebinding: evil.example resolved to 127.0.0.1, its page's origin matches its Host
        with pytest.raises(InvalidStatus) as refused:
            _as("evil.example", port, f"http://evil.example:{port}")
        assert refused.value.response.status_code == 403
    reasons = [r.getMessage() for r in caplog.records if r.name == "bcjax.serve"]
    assert any("Origin 'http://evil.example'" in r and "--allow-origin" in r for r in reasons), reasons
    assert any("Host 'evil.example:" in r for r in reasons), reasons
    # --allow-origin adds one (a second app over the same model: nothing compiles without a start)
    other = start_server(s.backend, allow_origins=("http://localhost:3000",))
    with connect(other, origin="http://localhost:3000"):
        pass
    with pytest.raises(InvalidStatus):
        ws_connect(other.ws_url, origin="http://localhost:3001", open_timeout=10)


def test_deep_json_floods_and_bad_paces_get_one_error_frame_each():
    s = served()
    with connect(s) as ws:
        ws.send("[" * 2000)
        e = until(ws, lambda j: j["type"] == "error")
        assert e["what"] == "message" and "nests 2000 levels deep" in e["message"]
        for fps in (1e-300, 0.001, 0.5, 1000, "fast"):
            ws.send(json.dumps({"type": "pace", "fps": fps}))
            e = until(ws, lambda j: j["type"] == "error")
            assert "'fps'" in e["message"], (fps, e)
        ws.send(json.dumps({"type": "start", "prompt": "red east fast", "fps": 1e-300}))
        assert "'fps'" in until(ws, lambda j: j["type"] == "error")["message"]
        # a flood: dropped past the cap, with one error frame for the whole run of them
        for _ in range(300):
            ws.send(json.dumps({"type": "stop"}))
        time.sleep(1.0)
        start(ws)  # the cap refills: the tab works again
        got, other = read(ws, 2)
        rate = [o for o in other if o["type"] == "error" and o["what"] == "rate"]
        assert len(rate) == 1, other
        assert len(got) == 2


def test_1000_starts_cost_one_thread_and_nothing_after_reset():
    s = served()
    others = set(_tab_threads())  # other tests' tabs (of other servers too) may still be ending theirs
    with connect(s) as ws:
        start(ws)
        read(ws, 1, timeout=120)  # compiled
        session = _session(s)
        for i in range(1000):
            start(ws, prompt=["red east fast", "red west slow"][i % 2], seed=i % 7)
        time.sleep(1.0)
        assert [t for t in _tab_threads() if t not in others] == [session.thread]
        # the server may still be working through the flood (a loaded machine), its rate cap spent:
        # a reset dropped with the flood's tail is sent again once the cap refilled
        for _ in range(10):
            ws.send(json.dumps({"type": "reset"}))
            try:
                until(ws, lambda j: j["type"] == "state" and j["state"] == "idle", timeout=5)
                break
            except TimeoutError:
                continue
        else:
            raise AssertionError("no reset was taken in 50 s")
        # a step already under way ends; then the tab's thread waits, computing nothing
        assert _wait(lambda: session.gen is None and session.idle_since() is not None, 10)
        cpu = time.process_time()
        time.sleep(1.5)
        assert time.process_time() - cpu < 0.5, "the tab kept computing after reset"
        start(ws, prompt="red north fast")  # the same thread runs the next stream
        got, _ = read(ws, 2)
        assert all(h["stream"] == got[0][0]["stream"] for h, _ in got)
        assert [t for t in _tab_threads() if t not in others] == [session.thread]


def test_pace_change_wakes_the_stream_and_a_new_prompt_starts_a_new_stream():
    s = served()
    with connect(s) as ws:
        start(ws, fps=1)  # 1 frame/s: 12 s between blocks
        read(ws, 1, timeout=120)
        t = time.monotonic()
        ws.send(json.dumps({"type": "pace", "fps": 0}))
        read(ws, 2, timeout=10)
        assert time.monotonic() - t < 5, "the pace change did not wake the stream"
        ws.send(json.dumps({"type": "stop"}))
        stopped = until(ws, lambda j: j["type"] == "state" and j["state"] == "stopped")
        start(ws, prompt="red west slow")  # stop, another prompt, start: that prompt, in a new stream
        state = until(ws, lambda j: j["type"] == "state" and j["state"] == "compiling")
        assert state["prompt"] == "red west slow" and state["stream"] == stopped["stream"] + 1
        got, _ = read(ws, 2)
        assert {h["stream"] for h, _ in got} == {state["stream"]}
        ws.send(json.dumps({"type": "stop"}))
        until(ws, lambda j: j["type"] == "state" and j["state"] == "stopped")
        start(ws, prompt="red west slow")  # the same prompt and settings: resumed
        resumed = until(ws, lambda j: j["type"] == "state" and j["state"] == "running")
        assert resumed["resumed"] and resumed["stream"] == state["stream"]


def test_a_tab_that_never_reads_pauses_its_generation():
    s = served()
    with connect(s) as ws:
        start(ws)  # never read or acknowledged from here
        window = _session(s).ack_window
        deadline = time.monotonic() + 120
        while (_session(s).gen is None or _session(s).gen.sent < window) and time.monotonic() < deadline:
            time.sleep(0.1)
        gen = _session(s).gen
        assert gen.sent == window
        cpu = time.process_time()
        time.sleep(1.5)
        assert gen.sent == window and time.process_time() - cpu < 0.5, "a tab that does not read kept computing"


def test_100_prompts_leave_threads_rss_and_text_kv_bounded():
    from bcjax.app.interactive import kv_bytes
    from bcjax.toyworld.world import COLOURS, DIRECTIONS, SPEEDS

    s = served()
    cache = s.backend.text_cache
    one = kv_bytes(s.backend.prompt_kv("red east fast"))
    saved = cache.max_bytes
    cache.max_bytes = 8 * one
    threads, rss = len(threading.enumerate()), _rss_mb()
    try:
        with connect(s) as ws:
            _session(s).text_bytes = 3 * one  # per stream: the newest prompt and those of blocks in flight
            prompts = 0
            for colour in COLOURS:  # a switch keeps the sprites: one stream per colour
                start(ws, prompt=f"{colour} east fast")
                read(ws, 1, timeout=120)
                for direction in DIRECTIONS:
                    for speed in SPEEDS:
                        time.sleep(1 / 15)  # under the tab's cap of 20 messages/s
                        ws.send(json.dumps({"type": "prompt", "prompt": f"{colour} {direction} {speed}"}))
                        reply = until(ws, lambda j: j["type"] in ("prompt", "error"))
                        assert reply["type"] == "prompt", reply
                        prompts += 1
                        live = _session(s).gen.live
                        assert live.held_bytes() <= 3 * one and len(live) <= 3
                read(ws, 2)
            assert prompts == 96 and len(cache.kv) <= 8 and cache.held_bytes() <= 8 * one
            # the tab's one thread; the event loop's executor (to_thread) holds at most cpus + 4
            assert len(_tab_threads()) == 1 and len(threading.enumerate()) <= threads + 1 + min(32, os.cpu_count() + 4)
    finally:
        cache.max_bytes = saved
    assert _rss_mb() - rss < 100, f"RSS grew {_rss_mb() - rss:.0f} MB over 96 prompts"


def test_a_tab_past_the_cap_gets_the_hello_then_why():
    """The 9th tab still fills its controls from the hello, says why it waits, and retries."""
    import contextlib

    from websockets.exceptions import ConnectionClosed
    from websockets.sync.client import connect as ws_connect

    s = served()
    with contextlib.ExitStack() as tabs:
        for _ in range(8):
            tabs.enter_context(connect(s))
        with ws_connect(s.ws_url, open_timeout=10) as ninth:
            hello = json.loads(ninth.recv(timeout=10))
            assert hello["type"] == "hello" and hello["staggers"] and hello["model"]["stages"]
            error = json.loads(ninth.recv(timeout=10))
            assert error["full"] and "8 tabs" in error["message"]
            with pytest.raises(ConnectionClosed) as closed:
                ninth.recv(timeout=10)
            assert closed.value.rcvd.code == 1013


def test_a_flood_through_a_slow_server_is_one_run_of_drops(monkeypatch):
    """The server may accept one message every 1/rate s while a flood lasts: still one warning."""
    from bcjax.serve import app as app_mod
    clock = [100.0]
    monkeypatch.setattr(app_mod.time, "monotonic", lambda: clock[0])
    bucket = app_mod._Bucket(rate=20.0, burst=2)
    warnings = 0
    for _ in range(200):  # 10 s of a flood at 400 messages/s: some accepted, most dropped
        clock[0] += 1 / 400
        if not bucket.take():
            warnings += bucket.warn()
    assert warnings == 1
    clock[0] += 1.5  # the tab went quiet, then floods again: a new run, a new warning
    while bucket.take():
        pass
    assert bucket.warn()
