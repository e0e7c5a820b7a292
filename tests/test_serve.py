"""`bcjax serve` at the WebSocket level: bad input never stops a stream or the server, tabs are
isolated and share compiled programs, a closed tab stops its generation; the live prompt queue."""

import json
import threading
import time

import jax
import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("websockets")

from serve_helpers import ack, connect, read, served, start, until

from bcjax.app.interactive import LivePrompts, steps, stream
from bcjax.compile_count import CompileCounter
from bcjax.serve import protocol

POLICIES = ("no-recache", "recache")


def test_messages_are_checked_and_the_problem_named():
    ok = protocol.parse(json.dumps({"type": "start", "prompt": "red east fast", "seed": 7}), POLICIES)
    assert ok == {"type": "start", "prompt": "red east fast", "stagger": "P4", "mask": "causal",
                  "policy": "no-recache", "seed": 7, "fps": 16, "decoder": None}
    bad = {
        "not json": "not JSON",
        "[1, 2]": "JSON list",
        '{"type": "jump"}': "type 'jump'",
        '{"type": "prompt"}': "lacks field 'prompt'",
        '{"type": "prompt", "prompt": 3}': "field 'prompt' is a int",
        '{"type": "start", "prompt": "a", "seed": -1}': "field 'seed' = -1",
        '{"type": "start", "prompt": "a", "seed": "x"}': "expected an integer",
        '{"type": "start", "prompt": "a", "stagger": "P9"}': "field 'stagger' = 'P9'",
        '{"type": "start", "prompt": "a", "schedule": "P4", "stagger": "P4"}': "'stagger' and its old name 'schedule'",
        '{"type": "start", "prompt": "a", "policy": "sometimes"}': "field 'policy'",
        '{"type": "pace", "fps": 1000}': "field 'fps' = 1000",
        '{"type": "start", "prompt": "a", "decoder": "vqgan"}':
            "field 'decoder' = 'vqgan': expected one of ['wan', 'taehv']",
        json.dumps({"type": "prompt", "prompt": "x" * protocol.MAX_MESSAGE}): "over the 4096-byte limit",
    }
    for raw, words in bad.items():
        with pytest.raises(protocol.BadMessage, match=words.replace("(", r"\(").replace("[", r"\[")):
            protocol.parse(raw, POLICIES)
    with pytest.raises(protocol.BadMessage, match="binary message of 3 bytes"):
        protocol.parse(b"abc", POLICIES)
    header, images = protocol.unpack_block(protocol.pack_block({"block": 4}, [b"one", b"", b"three"]))
    assert header == {"block": 4, "sizes": [3, 0, 5]} and images == [b"one", b"", b"three"]


def test_a_start_message_with_the_old_keys_is_read():
    """A page or client of the last release sends "schedule" and "window" (now "stagger" and "mask"):
    read for one release, as the new keys."""
    old = protocol.parse(json.dumps({"type": "start", "prompt": "red east fast", "schedule": "P2",
                                     "window": "bidirectional"}), POLICIES)
    new = protocol.parse(json.dumps({"type": "start", "prompt": "red east fast", "stagger": "P2",
                                     "mask": "bidirectional"}), POLICIES)
    assert old == new and old["stagger"] == "P2" and old["mask"] == "bidirectional"
    assert "schedule" not in old and "window" not in old


def test_toy_prompts_are_checked():
    b = served().backend
    assert b.check("  red   east\tfast ") == "red east fast"
    for prompt, words in [("", "empty"), ("   ", "empty"), ("purple east fast", "unknown word 'purple'"),
                          ("red east", "has 2 words"), ("red east fast, blue west slow", "holds 1..1"),
                          ("red east fast " * 100, "at most 1000")]:
        with pytest.raises(ValueError, match=words):
            b.check(prompt)
    # a switch may change the sprite's colour, direction and speed (not how many sprites the image holds)
    assert b.check("blue west slow", first="red east fast") == "blue west slow"
    assert b.check("red west slow", first="red east fast") == "red west slow"


@pytest.mark.slow
def test_live_prompts_switch_at_the_next_entering_block_like_a_prompt_schedule():
    """A prompt pushed while the stream runs gives the same video as a prompt schedule naming the
    block it took effect at, for both runners (one loop, one stepping interface)."""
    import jax.numpy as jnp

    b = served().backend
    a, c = b.prompt_kv("red east fast"), b.prompt_kv("red west slow")
    context = jnp.asarray(b.context("red east fast", 0))
    for stagger in ("sequential", "P4"):
        runner = served().app.state.runners.get(stagger, "bidirectional")
        live, seen = LivePrompts(a), []
        for tick in steps(runner, b.params, live, jax.random.key(1), 6, context=context):
            seen.append(tick)
            if len(seen) == 2:
                assert live.push(c) == 1  # in force from the next block that enters
        events = [t.event for t in seen if t.event is not None]
        switch_block = min(blk for t in seen for blk, _, p in t.stages if p == 1)
        assert switch_block == 3, stagger  # blocks 1, 2 entered before the push
        ref = list(stream(runner, b.params, [(0, a), (switch_block, c)], jax.random.key(1), 6, context=context))
        assert [e.block for e in events] == [e.block for e in ref] == list(range(1, 7))
        assert [e.prompt for e in events] == [e.prompt for e in ref] == [0, 0, 1, 1, 1, 1]
        np.testing.assert_array_equal(np.concatenate([e.x0 for e in events], 1), np.concatenate([e.x0 for e in ref], 1))


def test_both_runners_step_the_same_way():
    """start / entering / step / done: the blocks the runners' own streams give, in order, with
    the noise level of every block each step worked on (the page's strip)."""
    import jax.numpy as jnp

    from bcjax.schedule.stagger import stagger_table

    b = served().backend
    text, context = b.prompt_kv("red east fast"), jnp.asarray(b.context("red east fast", 2))
    key, n = jax.random.key(2), 5
    for stagger in ("sequential", "P4"):
        runner = served().app.state.runners.get(stagger, "bidirectional")
        state = runner.start(b.params, text, key, num_blocks=n, context=context)
        assert runner.cache(runner.with_cache(state, runner.cache(state))) is runner.cache(state)
        got, stages = [], []
        while not runner.done(state):
            entering = runner.entering(state)
            state, out = runner.step(b.params, text, state)
            assert entering == max(blk for blk, _ in out.stages)  # the newest block in flight
            stages.append(out.stages)
            if out.block >= 0:
                got.append((out.block, np.asarray(out.x0)))
        assert [blk for blk, _ in got] == list(range(1, n + 1))
        ref = (x for _, x in runner.blocks(b.params, text, key, num_blocks=n, context=context))
        if stagger == "sequential":
            assert stages == [tuple((blk, st) for st in range(5)) for blk in range(1, n + 1)]
        else:
            table = stagger_table(runner.plan, n)
            assert stages == [tuple(sorted((1 + int(blk), int(st)) for blk, st, u in zip(*row, strict=True) if u))
                              for row in zip(table["block"], table["stage"], table["busy"], strict=True)][:len(stages)]
            assert len(stages) == runner.plan.emit_tick(n - 1) + 1  # the last clean pass has no reader
        for (_, x), r in zip(got, ref, strict=True):
            np.testing.assert_array_equal(x, np.asarray(r))


def test_bad_input_gets_an_error_frame_and_the_stream_goes_on():
    s = served()
    with connect(s) as ws:
        start(ws)
        blocks, _ = read(ws, 2)
        sent = ["not json", json.dumps({"type": "warp"}), json.dumps({"type": "prompt", "prompt": "x" * 5000}),
                b"\x00\x01"]
        for m in sent:
            ws.send(m)
        errors = [until(ws, lambda j: j["type"] == "error") for _ in sent]
        assert [e["what"] for e in errors] == ["message"] * 4
        assert "not JSON" in errors[0]["message"] and "'warp'" in errors[1]["message"]
        assert "over the 4096-byte limit" in errors[2]["message"] and "binary" in errors[3]["message"]
        for bad, words in [("purple east fast", "unknown word 'purple'"), ("", "empty"),
                           ("red east fast " * 100, "at most"), ("red east fast, blue west slow", "holds 1..1")]:
            ws.send(json.dumps({"type": "prompt", "prompt": bad}))
            e = until(ws, lambda j: j["type"] in ("error", "prompt"))
            assert e["type"] == "error" and e["what"] == "prompt" and words in e["message"], e
        more, other = read(ws, 3)
        assert [h["block_prompt"] for h, _ in more] == [0, 0, 0] and not [o for o in other if o["type"] == "error"]
        assert more[0][0]["block"] > blocks[-1][0]["block"]  # the same stream went on
        ws.send(json.dumps({"type": "prompt", "prompt": "red west slow"}))
        ack = until(ws, lambda j: j["type"] in ("prompt", "error"))
        assert ack == {"type": "prompt", "stream": 1, "index": 1, "prompt": "red west slow"}
        after, _ = read(ws, 12)
        first_new = next(h for h, _ in after if h["block_prompt"] == 1)
        assert first_new["switch_ms"] > 0
    # a message over the transport limit closes that connection (1009), not the server
    from websockets.exceptions import ConnectionClosed

    with connect(s) as ws:
        ws.send(json.dumps({"type": "prompt", "prompt": "x" * 100_000}))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1009
    with connect(s) as ws:
        start(ws, stagger="sequential")
        assert len(read(ws, 1)[0]) == 1


def test_tabs_are_isolated_and_share_compiled_programs():
    s = served()
    with connect(s) as ws:  # alone: compiles the P4 tick if no earlier test did
        start(ws, seed=3)
        alone, _ = read(ws, 8)
    with CompileCounter() as cc, connect(s) as tab_b, connect(s) as tab_c:
        start(tab_b, seed=3)
        start(tab_c, prompt="red south fast", seed=5)
        got_c, _ = read(tab_c, 2)
        tab_c.send(json.dumps({"type": "prompt", "prompt": "red north slow"}))
        tab_c.send(json.dumps({"type": "stop"}))
        tab_c.send(json.dumps({"type": "pace", "fps": 30}))
        got_b, other_b = read(tab_b, 8)
        # resume: the same settings and the prompt the stream was switched to
        tab_c.send(json.dumps({"type": "start", "prompt": "red north slow", "seed": 5, "fps": 0,
                               "mask": "bidirectional"}))
        rest_c, _ = read(tab_c, 10)
    assert cc.count == 0, f"a second and third tab compiled {cc.count} programs"
    # tab B saw exactly what it sees alone: C's switch, pause and pace never reached it
    assert [h["block"] for h, _ in got_b] == [h["block"] for h, _ in alone]
    assert [imgs for _, imgs in got_b] == [imgs for _, imgs in alone]
    assert all(h["block_prompt"] == 0 for h, _ in got_b) and not any(o["type"] == "prompt" for o in other_b)
    assert got_c[0][1] != alone[0][1]  # C is its own stream (its own seed, so its own image)
    assert any(h["block_prompt"] == 1 for h, _ in rest_c)


def test_a_closed_tab_stops_its_generation():
    s = served()

    def streams():
        return [t for t in threading.enumerate() if t.name.startswith("bcjax-tab-")]

    with connect(s) as ws:
        start(ws, stagger="sequential", fps=0)
        read(ws, 2)
        assert streams() and s.app.state.sessions
    deadline = time.monotonic() + 10
    while (streams() or s.app.state.sessions) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not streams() and not s.app.state.sessions, f"still alive: {streams()}"


def test_serve_cli_names_a_bad_checkpoint(tmp_path, capsys):
    from bcjax.cli import main

    assert main(["serve", "--checkpoint", str(tmp_path / "nope"), "--port", "0"]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["serve", "--checkpoint", str(tmp_path), "--port", "0"]) == 2
    assert "no config.json" in capsys.readouterr().err


class _Recording:
    """The toy backend (or a runner) as is, but for a log of the moments the overlap is about:
    ("decode", block) when a block's decode is dispatched, ("fetch", block) when its pixels are
    fetched, ("step", n) when runner step n has been dispatched."""

    def __init__(self, inner, log: list):
        self._inner, self._log = inner, log

    def __getattr__(self, name):
        return getattr(self._inner, name)

    def frame_encoder(self, decoder=None, round_trip=False):
        encode, blocks = self._inner.frame_encoder(decoder, round_trip), iter(range(10 ** 9))

        def dispatch(x0):
            k = next(blocks)
            self._log.append(("decode", k))
            fetch = encode(x0)

            def fetched():
                self._log.append(("fetch", k))
                return fetch()

            return fetched

        return dispatch

    def step(self, params, text, state):
        out = self._inner.step(params, text, state)
        self._log.append(("step", state.step))
        return out


def test_decode_overlaps_the_next_step_and_sends_the_same_frames():
    """A block's pixels are fetched only once the next step is dispatched (the devices compute it
    while the page's frames are fetched, encoded and sent), the frames equal those of decoding
    each block before the next step, and a stop sends the block still held."""
    import jax.numpy as jnp
    from serve_helpers import start_server

    base = served()
    log: list = []
    s = start_server(_Recording(base.backend, log), ack_window=100)
    s.app.state.runners.get = lambda stagger, mask: _Recording(base.app.state.runners.get(stagger, mask), log)
    for stagger in ("sequential", "P4"):
        log.clear()
        with connect(s) as ws:
            start(ws, stagger=stagger, seed=4)
            got, _ = read(ws, 6)
            ws.send(json.dumps({"type": "stop"}))
            until(ws, lambda j: j["type"] == "state" and j["state"] == "stopped")
            # a block decoding at the stop comes now, and nothing after it: wait (on a loaded machine
            # too) until every decoded block has arrived and the socket stays quiet for a second
            deadline = time.monotonic() + 60
            while True:
                try:
                    m = ws.recv(timeout=1.0)
                except TimeoutError:
                    if len(got) >= sum(what == "decode" for what, _ in log) or time.monotonic() > deadline:
                        break
                    continue
                if isinstance(m, bytes):
                    got.append(ack(ws, m))
            ws.send(json.dumps({"type": "reset"}))
        decoded = [k for what, k in log if what == "decode"]
        assert len(got) == len(decoded), f"{stagger}: {len(decoded)} blocks decoded, {len(got)} sent after the stop"
        at = {event: i for i, event in enumerate(log)}
        for k, (header, _) in enumerate(got[:6]):
            # the step after the block's: dispatched after the block's decode, before its pixels are fetched
            assert at[("decode", k)] < at[("step", header["tick"] + 1)] < at[("fetch", k)], (stagger, k, log)
        # the frames of decoding each block before the next step (the PNGs are lossless: same pixels)
        b = base.backend
        encode, ref = b.frame_encoder(), []
        # endless, as the server's: a cascade told its length drains differently at the end
        ticks = steps(base.app.state.runners.get(stagger, "bidirectional"), b.params,
                      LivePrompts(b.prompt_kv("red east fast")), jax.random.key(4), None,
                      context=jnp.asarray(b.context("red east fast", 4)))
        while len(ref) < len(got):
            if (e := next(ticks).event) is not None:
                ref.append((e.block, encode(e.x0)()[0]))
        ticks.close()
        assert [(h["block"], imgs) for h, imgs in got] == ref, stagger
