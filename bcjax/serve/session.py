"""One browser tab's generation: one thread per tab, its streams, a bounded outbox; shared compiled runners.

A `Session` belongs to one WebSocket connection and owns at most one thread, made on the first
start and ended with the connection. Start, stop, pace and reset are state changes the thread
reads between steps, never new threads, so a page (or a script) sending 1000 starts costs one
thread and only the newest stream computes. The thread drives `bcjax.app.interactive.steps` over the
runner for the chosen (stagger, mask), with a `LivePrompts` the page pushes into. Every step
becomes one message (a binary block message when a block finished, a JSON tick otherwise) on
the session's `Outbox`; the replies to the page's commands go there too, without ever waiting
(the commands run on shared workers: a tab that does not read must not hold one).

The thread computes only while the page keeps up: the page acknowledges the blocks it has
received (`ack`), and the thread waits, costing nothing, while `ack_window` blocks are
unacknowledged, and an ack counts only blocks already handed to the socket's transport. The
kernel's socket buffers would otherwise absorb minutes of a never-reading client's video before
any queue on this side filled. Sessions share nothing mutable but the
`Runners`, whose jitted programs are keyed by the runner's config: the second tab with a config
does not compile again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import functools
import itertools
import threading
import time
from typing import Any

import jax

from bcjax.app.interactive import LivePrompts, steps
from bcjax.names import SEQUENTIAL, as_mask
from bcjax.pipeline.recache import POLICIES
from bcjax.runners import Runner
from bcjax.serve import protocol

# the compile events jax reports (tracing, lowering, XLA); their durations add up to a compile
_COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration", "/jax/core/compile/jaxpr_to_mlir_module_duration",
                   "/jax/core/compile/backend_compile_duration")
_compiling = threading.local()
_listening = threading.Lock()
_listening_registered = False
_tab_ids = itertools.count(1)


def _on_jax_event(event: str, duration_secs: float, **_: str | int) -> None:
    if event in _COMPILE_EVENTS:
        _compiling.seconds = getattr(_compiling, "seconds", 0.0) + duration_secs


def listen_for_compiles() -> None:
    """Count compile time per thread (jax reports it on the thread that compiles), once per
    process: how a stream tells its one-time compiles apart from its switch latency."""
    global _listening_registered
    with _listening:
        if not _listening_registered:
            jax.monitoring.register_event_duration_secs_listener(_on_jax_event)
            _listening_registered = True


def compile_seconds() -> float:
    """Seconds this thread has spent compiling so far (see `listen_for_compiles`)."""
    return getattr(_compiling, "seconds", 0.0)


class Runners:
    """One runner per (stagger, mask), built on first use and shared by every session."""

    def __init__(self, backend):
        self.backend = backend
        self._made: dict[tuple[str, str | None], Runner] = {}
        self._lock = threading.Lock()

    def get(self, stagger: str, mask: str) -> Runner:
        from bcjax.runners import make_runner

        b = self.backend
        key = (stagger, None if stagger == SEQUENTIAL else mask)
        with self._lock:
            if key not in self._made:
                # the token group `bcjax tune` measured best for this stagger on these devices, if any
                group = getattr(b, "token_groups", {}).get(stagger)
                # the server's adapter (`bcjax serve --adapter`) where a tab picks the stagger and mask it
                # was made for; every other setting runs the base weights
                adapter = getattr(b, "adapter", None)
                if adapter is not None and (adapter.stagger, adapter.mask) != (stagger, mask):
                    adapter = None
                self._made[key] = make_runner(b.cfg, b.pcfg, b.latent_hw, stagger, as_mask(mask), b.mesh,
                                              token_group=group, adapter=adapter)
            return self._made[key]


class Outbox:
    """A tab's bounded queue from any thread to its connection's sender coroutine.

    Two kinds of writer, two rules, so that no shared worker ever waits on a tab that does not
    read: the tab's own generation thread `put`s its ticks and blocks and waits while `maxsize`
    messages wait (only that tab's thread waits); replies to the page's messages (`reply`, from
    the event loop or a shared worker) never wait: they may use `room` places past a full queue,
    and a reply that finds those taken too ends the tab (the close policy: its page has stopped
    reading while it goes on sending)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int, room: int | None = None):
        self.loop, self.maxsize = loop, maxsize
        self.room = maxsize if room is None else room
        self.closed = threading.Event()
        self.ended: Ended | None = None  # why the tab is closed from this side, once it is
        self._items: collections.deque = collections.deque()  # (msg, on_sent)
        self._cond = threading.Condition()
        self._ready = asyncio.Event()  # set (on the loop) when an item or the end is there

    def put(self, msg, cancelled=None, on_sent=None) -> bool:
        """Queue msg (dict: a JSON text message; bytes: a binary one), waiting while `maxsize`
        messages wait; `on_sent()` is called (on the loop) once it is handed to the socket's
        transport. False once the outbox is closed or `cancelled()` holds; the tab's own thread only."""
        with self._cond:
            while len(self._items) >= self.maxsize:
                if self.closed.is_set() or (cancelled is not None and cancelled()):
                    return False
                self._cond.wait(0.1)
            if self.closed.is_set() or (cancelled is not None and cancelled()):
                return False
            self._items.append((msg, on_sent))
        self._wake()
        return True

    def reply(self, msg) -> bool:
        """Queue a reply to the page without waiting (any thread); False when the outbox is
        closed, or when `maxsize + room` messages already wait: then the tab is ended."""
        with self._cond:
            if self.closed.is_set():
                return False
            if len(self._items) >= self.maxsize + self.room:
                overflow = True
            else:
                self._items.append((msg, None))
                overflow = False
        if overflow:
            self.end(NOT_READING, f"{len(self._items)} messages wait unread; the page does not read")
            return False
        self._wake()
        return True

    def end(self, code: int, reason: str, *, drop: bool = True) -> None:
        """Close the tab from this side: `get` returns Ended(code, reason) (after what waits,
        unless `drop`); the generation thread's `put`s return False from now on."""
        with self._cond:
            if self.ended is None:
                self.ended = Ended(code, reason)
                if drop:
                    self._items.clear()
            self.closed.set()
            self._cond.notify_all()
        self._wake()

    async def get(self):
        """The next (msg, on_sent), or an `Ended` once the outbox ended and nothing is left to send."""
        while True:
            with self._cond:
                if self._items:
                    item = self._items.popleft()
                    self._cond.notify_all()
                    return item
                if self.ended is not None:
                    return self.ended
                self._ready.clear()
            await self._ready.wait()

    def close(self) -> None:
        with self._cond:
            self.closed.set()
            self._cond.notify_all()

    def _wake(self) -> None:
        try:
            on_loop = asyncio.get_running_loop() is self.loop
        except RuntimeError:
            on_loop = False
        if on_loop:
            self._ready.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is gone
                self.loop.call_soon_threadsafe(self._ready.set)


# close codes of a tab the server ends (4000-4999: an application's own): the page shows why
IDLE, NOT_READING = 4000, 4001


@dataclasses.dataclass(frozen=True)
class Ended:
    """Why the server closes a tab: its close code and reason (at most 123 bytes in the frame)."""

    code: int
    reason: str


@dataclasses.dataclass(eq=False)
class Stream:
    """One stream's state. The page's commands change `running`, `fps` and `acked` (under the
    session's lock); only the session's thread steps it."""

    id: int
    settings: dict
    first_prompt: str
    prompt: str  # the newest prompt pushed (what a start compares against to resume)
    live: LivePrompts
    running: bool = True
    fps: float = 16
    sent: int = 0  # blocks put on the outbox
    delivered: int = 0  # blocks handed to the socket's transport (what an ack may count)
    acked: int = 0  # blocks the page says it received, at most those delivered
    pushed: dict = dataclasses.field(default_factory=dict)  # prompt index -> time of the switch
    runner: Any = None  # what `Runners.get` gave for its settings' (stagger, mask)


class Session:
    """One connection: at most one stream and one thread; commands from the page in order."""

    def __init__(self, backend, runners: Runners, outbox: Outbox, *, ack_window: int = 4,
                 text_bytes: int = 256 * 2 ** 20):
        self.backend, self.runners, self.outbox = backend, runners, outbox
        self.ack_window, self.text_bytes = ack_window, text_bytes
        self.gen: Stream | None = None
        self._streams = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._waiting_since: float | None = time.monotonic()  # since when the thread (or no thread) waits
        self.tab = next(_tab_ids)

    def hello(self) -> dict:
        return {"type": "hello", "model": self.backend.describe(), "staggers": list(protocol.STAGGERS),
                "stagger": getattr(self.backend, "default_stagger", "P4"),
                "masks": list(protocol.MASKS), "mask": protocol.DEFAULT_MASK, "policies": list(POLICIES),
                "limits": {"max_message": protocol.MAX_MESSAGE, "queue": self.outbox.maxsize,
                           "ack_window": self.ack_window, "min_fps": protocol.MIN_FPS, "max_fps": protocol.MAX_FPS}}

    def act(self, cmd: dict) -> None:
        """Act on one parsed page message (an `ack` only takes a lock: fine on the event loop)."""
        try:
            getattr(self, f"_on_{cmd['type']}")(cmd)
        except Exception as e:  # noqa: BLE001 - a bug or a backend failure: this page hears of it, the server goes on
            self.outbox.reply({"type": "error", "what": "server", "message": f"{cmd['type']}: {type(e).__name__}: {e}"})

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self.outbox.close()

    @property
    def thread(self) -> threading.Thread | None:
        return self._thread

    def idle_since(self) -> float | None:
        """Since when (time.monotonic) this tab's generation has nothing to do: no stream, a
        stopped one, or one waiting for the page's acks; None while it steps, compiles or paces."""
        with self._cond:
            return self._waiting_since

    def _state(self, state: str, **extra) -> None:
        self.outbox.reply({"type": "state", "state": state, "stream": self.gen.id if self.gen else None, **extra})

    def _bad_prompt(self, cmd: dict, e: ValueError) -> None:
        """A refused prompt (of a start or a switch): the page shows why; a running stream goes on."""
        self.outbox.reply({"type": "error", "what": "prompt", "for": cmd["type"], "prompt": cmd["prompt"],
                         "message": str(e), "stream": self.gen.id if self.gen else None})

    def _on_start(self, cmd: dict) -> None:
        try:
            decoder = self.backend.decoder(cmd["decoder"])
        except ValueError as e:  # a decoder this model lacks: the page says why; a running stream goes on
            self.outbox.reply({"type": "error", "what": "decoder", "decoder": cmd["decoder"], "message": str(e),
                             "stream": self.gen.id if self.gen else None})
            return
        settings = {**{k: cmd[k] for k in ("stagger", "mask", "policy", "seed")}, "decoder": decoder}
        try:
            prompt = self.backend.check(cmd["prompt"])
        except ValueError as e:
            self._bad_prompt(cmd, e)
            return
        with self._cond:
            gen = self.gen
            if gen is not None and not gen.running and gen.settings == settings and gen.prompt == prompt:
                gen.running, gen.fps = True, cmd["fps"]  # the stopped stream, under the prompt the page shows
                self._cond.notify_all()
                resumed = True
            else:
                resumed = False
        if resumed:
            self._state("running", settings={**settings, "fps": cmd["fps"]}, prompt=prompt, resumed=True)
            return
        kv = self.backend.prompt_kv(prompt)  # before the stream exists: a failure leaves the old one alone
        runner = self.runners.get(settings["stagger"], settings["mask"])
        with self._cond:
            self._streams += 1
            self.gen = Stream(self._streams, settings, prompt, prompt, LivePrompts(kv, self.text_bytes), fps=cmd["fps"],
                              runner=runner)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"bcjax-tab-{self.tab}", daemon=True)
                self._thread.start()
            self._cond.notify_all()
        # before the stream's first tick: the page shows "compiling" until the thread says "running"
        self._state("compiling", settings={**settings, "fps": cmd["fps"]}, prompt=prompt)

    def _on_prompt(self, cmd: dict) -> None:
        gen = self.gen
        if gen is None:
            self._bad_prompt(cmd, ValueError("no stream is running: press start"))
            return
        try:
            prompt = self.backend.check(cmd["prompt"], first=gen.first_prompt)
        except ValueError as e:
            self._bad_prompt(cmd, e)
            return
        kv = self.backend.prompt_kv(prompt)
        with self._cond:
            t = time.perf_counter()
            index = gen.live.push(kv)
            gen.pushed[index], gen.prompt = t, prompt
        self.outbox.reply({"type": "prompt", "stream": gen.id, "index": index, "prompt": prompt})

    def _on_stop(self, cmd: dict) -> None:
        with self._cond:
            if self.gen is not None:
                self.gen.running = False
        self._state("stopped" if self.gen else "idle", prompt=self.gen.prompt if self.gen else None)

    def _on_reset(self, cmd: dict) -> None:
        with self._cond:
            self.gen = None
            self._cond.notify_all()
        self._state("idle")

    def _on_pace(self, cmd: dict) -> None:
        with self._cond:
            if self.gen is not None:
                self.gen.fps = cmd["fps"]
                self._cond.notify_all()  # a thread waiting out the old pace recomputes its deadline

    def _on_ack(self, cmd: dict) -> None:
        with self._cond:
            gen = self.gen
            if gen is not None and cmd["stream"] == gen.id and cmd["blocks"] > gen.acked:
                # an ack counts only blocks handed to the transport: a page that acknowledges
                # blindly gets no further than one that reads
                gen.acked = min(cmd["blocks"], gen.delivered)
                self._cond.notify_all()

    def _delivered(self, gen: Stream) -> None:
        with self._cond:
            gen.delivered += 1

    # the session's thread

    def _current(self, gen: Stream) -> bool:
        return not self._closed and self.gen is gen

    def _next(self, gen: Stream | None, holding: bool) -> tuple[bool, Stream | None, str]:
        """(closed, stream, what to do): wait until the session closes, its stream is replaced or
        reset (another than `gen`), or `gen` runs and the page has read enough to step it: "step".
        holding: `gen` has a block decoding, not yet sent (it counts against the ack window); when
        `gen` cannot step now (stopped, the page behind), that block is sent first: "flush"."""
        with self._cond:
            while True:
                if self._closed:
                    return True, None, "step"
                if self.gen is not gen or (gen is not None and gen.running
                                           and gen.sent + holding - gen.acked < self.ack_window):
                    self._waiting_since = None
                    return False, self.gen, "step"
                if holding:
                    self._waiting_since = None
                    return False, gen, "flush"
                if self._waiting_since is None:
                    self._waiting_since = time.monotonic()
                self._cond.wait()

    def _wait_until(self, gen: Stream, last_block: float, frames: int) -> bool:
        """Pace: wait until `frames` frames after last_block at the stream's fps (re-read when the
        page changes it); False when the stream ended meanwhile."""
        with self._cond:
            while self._current(gen):
                left = last_block + frames / gen.fps - time.perf_counter() if gen.fps > 0 else 0.0
                if left <= 0:
                    return True
                self._cond.wait(left)
            return False

    def _send(self, gen: Stream, msg) -> bool:
        on_sent = functools.partial(self._delivered, gen) if isinstance(msg, bytes) else None
        return self.outbox.put(msg, lambda: not self._current(gen), on_sent)

    def _run(self) -> None:
        ticks, gen, holding = None, None, False
        try:
            while True:
                closed, nxt, todo = self._next(gen, holding)
                if closed:
                    return
                if nxt is not gen:  # replaced or reset: the old stream's state is freed now, not at the next start
                    if ticks is not None:
                        assert gen is not None  # ticks are gen's
                        ticks.close()  # a block it was decoding is dropped with it, as its unsent messages are
                        self.outbox.put({"type": "state", "state": "ended", "stream": gen.id})
                    gen, ticks, holding = nxt, None, False
                    if gen is None:
                        continue
                assert gen is not None  # _next hands back the same stream only while it has one
                try:
                    if ticks is None:
                        ticks = self._ticks(gen)
                        holding = next(ticks)
                    else:
                        holding = ticks.send(todo)
                except StopIteration:  # it saw its stream replaced, or the tab gone
                    ticks, holding = None, False
                    if self.outbox.closed.is_set():
                        return
                except Exception as exc:  # noqa: BLE001 - a stream's failure is reported to its page, never raised into the server
                    self._failed(gen, exc)
                    gen, ticks, holding = None, None, False
        finally:
            if ticks is not None:
                ticks.close()

    def _failed(self, gen: Stream, exc: Exception) -> None:
        """The stream cannot go on: the page hears why, and a later start builds a new one."""
        with self._cond:
            if self.gen is gen:
                self.gen = None
        self.outbox.put({"type": "error", "what": "stream", "stream": gen.id,
                         "message": f"{type(exc).__name__}: {exc}"})
        self.outbox.put({"type": "state", "state": "ended", "stream": gen.id})

    def _ticks(self, gen: Stream):
        """A generator stepping `gen` once per resume (see `_messages`)."""
        import jax.numpy as jnp

        s = gen.settings
        context = self.backend.context(gen.first_prompt, s["seed"])
        # Krea's loop: the stream's R comes from the VAE round trip, whose pixels are the ones sent
        encode = self.backend.frame_encoder(s["decoder"], round_trip=gen.runner.takes_round_trip)

        def records(on_dispatch):
            return steps(gen.runner, self.backend.params, gen.live, jax.random.key(s["seed"]), None,
                         policy=s["policy"], context=None if context is None else jnp.asarray(context),
                         on_dispatch=on_dispatch, reencode=getattr(encode, "reencode", None))

        return self._messages(gen, records, encode)

    def _messages(self, gen: Stream, make_records, encode):
        """A generator sending `gen`'s messages: one runner step per resume with "step" (the first
        resume is next()), or, resumed with "flush", only the block it holds. Yields whether it
        holds a block (see `_next`).

        Decoding never waits for the denoiser, nor the denoiser for decoding: a finished block's
        decode is dispatched (to the decode device) and held; the next step is dispatched, and
        only then are the held block's pixels fetched, encoded, paced and sent, while the devices
        compute that step (`steps(on_dispatch=)`). So the page gets the same blocks with the same
        pixels in the same order as decoding each block before the next step, one step later.
        """
        t_start, c_start = time.perf_counter(), compile_seconds()
        last_block, started, touched, in_force, first = None, 0, 0, 0, True
        compile_since: dict[int, float] = {}  # prompt -> compile seconds when its switch came in force
        recached: dict[int, float] = {}  # prompt -> seconds its switch spent recaching
        compute = 0.0
        held: list = []  # at most one (record, fetch): a block decoding, sent after the next step is dispatched

        def send_held() -> None:
            """Send the held block (if any): wait for its pixels, pace, send; _Ended when the stream ended."""
            nonlocal last_block, started, touched, compute, recached
            if not held:
                return
            record, fetch = held.pop()
            e = record.event
            images, decode_s = fetch()
            if last_block is not None and not self._wait_until(gen, last_block, len(images)):
                raise _Ended
            last_block = time.perf_counter()
            header = {"type": "block", **_base(gen, record), "block": e.block, "block_prompt": e.prompt,
                      "block_ms": 1e3 * e.seconds, "block_recache_ms": 1e3 * e.recache_s,
                      "compute_ms": 1e3 * compute, "mime": self.backend.mime, "decoder": gen.settings["decoder"],
                      "decode_ms": None if decode_s is None else 1e3 * decode_s}
            compute = 0.0
            with self._cond:
                pushed = dict(gen.pushed)
            # two moments a switch becomes visible under a cascade: the first block with
            # any pass under the new text (every block in flight runs under the prompt in
            # force), and the first block that started under it
            if record.prompt > touched and record.prompt in pushed:
                touched = record.prompt
                header.update(touched_prompt=touched, touched_ms=1e3 * (last_block - pushed[touched]),
                              touched_compile_ms=1e3 * (compile_seconds() - compile_since.get(touched, 0.0)))
            if e.prompt > started and e.prompt in pushed:
                started = e.prompt
                header.update(switch_ms=1e3 * (last_block - pushed[started]),
                              switch_recache_ms=1e3 * recached.pop(started, 0.0),
                              switch_compile_ms=1e3 * (compile_seconds() - compile_since.pop(started, 0.0)))
                with self._cond:  # switches up to this one are shown: their times are not needed again
                    for p in [p for p in gen.pushed if p <= started]:
                        del gen.pushed[p]
                recached = {p: r for p, r in recached.items() if p > started}
            if not self._send(gen, protocol.pack_block(header, images)):
                raise _Ended
            with self._cond:
                gen.sent += 1

        records = make_records(send_held)
        try:
            todo = "step"
            while True:
                if todo == "flush":
                    send_held()
                else:
                    record = next(records)  # dispatches the step, sends the held block beside it, waits for the step
                    if not self._current(gen):
                        return
                    if first:
                        first = False
                        self._send(gen, {"type": "state", "state": "running", "stream": gen.id,
                                         "first_tick_ms": 1e3 * (time.perf_counter() - t_start),
                                         "compile_ms": 1e3 * (compile_seconds() - c_start)})
                    if record.prompt > in_force:  # a switch takes effect: from here every step runs under its text
                        in_force = record.prompt
                        compile_since.setdefault(record.prompt, compile_seconds())
                    compute += record.seconds
                    if record.recache_s:
                        recached[record.prompt] = recached.get(record.prompt, 0.0) + record.recache_s
                    if record.event is None:
                        if not self._send(gen, {"type": "tick", **_base(gen, record)}):
                            return
                    else:
                        held.append((record, encode(record.event.x0)))  # the decode dispatched, not waited for
                todo = yield bool(held)
        except _Ended:
            return
        finally:
            records.close()


class _Ended(Exception):
    """A stream ended (replaced, reset, its tab closed) while its thread was sending a block."""


def _base(gen: Stream, record) -> dict:
    """What every tick and block message says of the step (`record`: its `StepRecord`)."""
    return {"stream": gen.id, "tick": record.step, "prompt": record.prompt, "stages": [list(x) for x in record.stages],
            "step_ms": 1e3 * record.seconds, "recache_ms": 1e3 * record.recache_s}
