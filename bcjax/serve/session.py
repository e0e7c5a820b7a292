"""One browser tab's generation: its own stream, thread and bounded outbox; shared compiled runners.

A `Session` belongs to one WebSocket connection. `start` builds a `Generation`: a thread that
drives `bcjax.interactive.steps` over the runner for the chosen (schedule, window), with a
`LivePrompts` the page pushes into. Every step becomes one message (a binary block message when a
block finished, a JSON tick otherwise) put on the session's `Outbox`, a bounded queue: when the
page reads slower than the model generates, the generation waits (back-pressure; memory stays
flat). Sessions share nothing mutable but the `Runners`, whose jitted programs are keyed by the
runner's config: the second tab with a config does not compile again.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import time

from bcjax.interactive import LivePrompts, steps
from bcjax.pipeline.recache import POLICIES
from bcjax.serve import protocol


class Runners:
    """One runner per (schedule, window), built on first use and shared by every session."""

    def __init__(self, backend):
        self.backend = backend
        self._made: dict[tuple[str, str | None], object] = {}
        self._lock = threading.Lock()

    def get(self, schedule: str, window: str):
        from bcjax.runners import make_runner

        b = self.backend
        key = (schedule, None if schedule == "sequential" else window)
        with self._lock:
            if key not in self._made:
                self._made[key] = make_runner(b.cfg, b.pcfg, b.latent_hw, schedule, window, b.mesh)
            return self._made[key]


class Outbox:
    """A bounded queue from any thread to the connection's sender coroutine."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int):
        self.loop, self.queue = loop, asyncio.Queue(maxsize)
        self.closed = threading.Event()

    def put(self, msg, cancelled: threading.Event | None = None) -> bool:
        """Queue msg (dict: a JSON text message; bytes: a binary one), waiting while the queue is
        full. False once the outbox (or `cancelled`) is closed; never call from the loop's thread."""
        if self.closed.is_set() or (cancelled is not None and cancelled.is_set()):
            return False
        try:
            fut = asyncio.run_coroutine_threadsafe(self.queue.put(msg), self.loop)
        except RuntimeError:  # the loop is gone
            return False
        while True:
            try:
                fut.result(timeout=0.1)
                return True
            except concurrent.futures.TimeoutError:
                if self.closed.is_set() or (cancelled is not None and cancelled.is_set()):
                    fut.cancel()
                    return False

    async def get(self):
        return await self.queue.get()

    def close(self) -> None:
        self.closed.set()


class Generation:
    """One stream: a thread stepping a runner, paused and resumed, ended by `end`."""

    def __init__(self, stream_id: int, backend, runner, settings: dict, prompt: str, outbox: Outbox):
        self.id, self.backend, self.runner, self.settings, self.outbox = stream_id, backend, runner, settings, outbox
        self.first_prompt = prompt
        self.fps = settings["fps"]
        self.live = LivePrompts(backend.encode(prompt))
        self.pushed = {0: time.perf_counter()}
        self.running, self.ended = threading.Event(), threading.Event()
        self.running.set()
        self.thread = threading.Thread(target=self._run, name=f"bcjax-stream-{stream_id}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def push(self, prompt: str) -> int:
        """Switch to a checked prompt from the next block that enters; its index."""
        kv = self.backend.encode(prompt)
        t = time.perf_counter()
        index = self.live.push(kv)
        self.pushed[index] = t  # read by the stream's thread once a block under it is done (steps later)
        return index

    def pause(self) -> None:
        self.running.clear()

    def resume(self, fps) -> None:
        self.fps = fps
        self.running.set()

    def end(self) -> None:
        self.ended.set()
        self.running.set()  # a paused thread wakes up to leave

    def _send(self, msg) -> bool:
        return self.outbox.put(msg, self.ended)

    def _run(self) -> None:
        import jax
        import jax.numpy as jnp

        s = self.settings
        ticks = None
        try:
            context = self.backend.context(self.first_prompt, s["seed"])
            encode = self.backend.frame_encoder()
            ticks = steps(self.runner, self.backend.params, self.live, jax.random.key(s["seed"]), None,
                          policy=s["policy"], context=None if context is None else jnp.asarray(context))
            shown, last_block, compute = {0}, None, 0.0
            recached: dict[int, float] = {}  # prompt -> seconds its switch spent recaching
            for tick in ticks:
                if self.ended.is_set():
                    break
                stages = [list(x) for x in tick.stages]
                base = {"stream": self.id, "tick": tick.step, "prompt": tick.prompt, "stages": stages,
                        "step_ms": 1e3 * tick.seconds, "recache_ms": 1e3 * tick.recache_s}
                e = tick.event
                compute += tick.seconds
                if tick.recache_s:
                    recached[tick.prompt] = recached.get(tick.prompt, 0.0) + tick.recache_s
                if e is None:
                    sent = self._send({"type": "tick", **base})
                else:
                    images = encode(e.x0)
                    if self.fps > 0 and last_block is not None:  # pace: bf frames per block at fps
                        self.ended.wait(max(0.0, last_block + len(images) / self.fps - time.perf_counter()))
                    last_block = time.perf_counter()
                    header = {"type": "block", **base, "block": e.block, "block_prompt": e.prompt,
                              "block_ms": 1e3 * e.seconds, "block_recache_ms": 1e3 * e.recache_s,
                              "compute_ms": 1e3 * compute, "mime": self.backend.mime}
                    compute = 0.0
                    if e.prompt not in shown and e.prompt in self.pushed:  # the first block under a new prompt
                        shown.add(e.prompt)
                        header["switch_ms"] = 1e3 * (last_block - self.pushed[e.prompt])
                        header["switch_recache_ms"] = 1e3 * recached.pop(e.prompt, 0.0)
                    sent = self._send(protocol.pack_block(header, images))
                if not sent:
                    break
                while not self.running.is_set():
                    self.running.wait(0.1)
        except Exception as exc:  # a stream's failure is reported to its page, never raised into the server
            self._send({"type": "error", "what": "stream", "stream": self.id, "message": f"{type(exc).__name__}: {exc}"})
        finally:
            if ticks is not None:
                ticks.close()
            self._send({"type": "state", "state": "ended", "stream": self.id})  # unless the page ended it


class Session:
    """One connection: at most one Generation at a time; commands from the page in order."""

    def __init__(self, backend, runners: Runners, outbox: Outbox):
        self.backend, self.runners, self.outbox = backend, runners, outbox
        self.gen: Generation | None = None
        self._streams = 0

    def hello(self) -> dict:
        return {"type": "hello", "model": self.backend.describe(), "schedules": list(protocol.SCHEDULES),
                "windows": list(protocol.WINDOWS), "policies": list(POLICIES),
                "limits": {"max_message": protocol.MAX_MESSAGE, "queue": self.outbox.queue.maxsize}}

    def handle(self, raw) -> None:
        """Act on one page message (call from a worker thread, in arrival order); replies go to the outbox."""
        try:
            cmd = protocol.parse(raw, POLICIES)
        except protocol.BadMessage as e:
            self.outbox.put({"type": "error", "what": "message", "message": str(e)})
            return
        try:
            getattr(self, f"_on_{cmd['type']}")(cmd)
        except Exception as e:  # a bug or a backend failure: this page hears of it, the server goes on
            self.outbox.put({"type": "error", "what": "server", "message": f"{cmd['type']}: {type(e).__name__}: {e}"})

    def close(self) -> None:
        if self.gen is not None:
            self.gen.end()
        self.outbox.close()

    def _state(self, state: str, **extra) -> None:
        self.outbox.put({"type": "state", "state": state, "stream": self.gen.id if self.gen else None, **extra})

    def _bad_prompt(self, cmd: dict, e: ValueError) -> None:
        """A refused prompt (of a start or a switch): the page shows why; a running stream goes on."""
        self.outbox.put({"type": "error", "what": "prompt", "for": cmd["type"], "prompt": cmd["prompt"],
                         "message": str(e), "stream": self.gen.id if self.gen else None})

    def _on_start(self, cmd: dict) -> None:
        settings = {k: cmd[k] for k in ("schedule", "window", "policy", "seed", "fps")}
        same = self.gen is not None and {**self.gen.settings, "fps": cmd["fps"]} == settings
        if same and not self.gen.running.is_set():
            self.gen.resume(cmd["fps"])
            self._state("running", settings=settings)
            return
        try:
            prompt = self.backend.check(cmd["prompt"])
        except ValueError as e:
            self._bad_prompt(cmd, e)
            return
        if self.gen is not None:
            self.gen.end()
        self._streams += 1
        runner = self.runners.get(settings["schedule"], settings["window"])
        self.gen = Generation(self._streams, self.backend, runner, settings, prompt, self.outbox)
        self._state("running", settings=settings, prompt=prompt)  # before the stream's first tick
        self.gen.start()

    def _on_prompt(self, cmd: dict) -> None:
        if self.gen is None:
            self._bad_prompt(cmd, ValueError("no stream is running: press start"))
            return
        try:
            prompt = self.backend.check(cmd["prompt"], first=self.gen.first_prompt)
        except ValueError as e:
            self._bad_prompt(cmd, e)
            return
        index = self.gen.push(prompt)
        self.outbox.put({"type": "prompt", "stream": self.gen.id, "index": index, "prompt": prompt})

    def _on_stop(self, cmd: dict) -> None:
        if self.gen is not None:
            self.gen.pause()
        self._state("stopped" if self.gen else "idle")

    def _on_reset(self, cmd: dict) -> None:
        if self.gen is not None:
            self.gen.end()
        self.gen = None
        self._state("idle")

    def _on_pace(self, cmd: dict) -> None:
        if self.gen is not None:
            self.gen.fps = cmd["fps"]
