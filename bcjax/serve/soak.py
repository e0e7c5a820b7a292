"""A soak of `bcjax serve` (not run in CI): N tabs stream and switch prompts for a while; every
`--every` seconds one line of the server's threads, RSS, text-cache bytes and blocks/s.

    python -m bcjax.serve.soak --minutes 10 --tabs 8 [--fps 0] [--stagger P4]

The server runs in this process (the embedded toy-world model, uvicorn on a free loopback port);
each tab is a WebSocket client thread that acknowledges blocks as the page does, switches to
another prompt of its sprite every `--switch-every` blocks, and restarts with another colour now
and then (a new stream on the same tab thread).
"""

from __future__ import annotations

import argparse
import json
import random
import threading
import time

from bcjax.flags import OldName
from bcjax.names import STAGGERS


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def _tab(url: str, index: int, args, stop: threading.Event, blocks: list[int]) -> None:
    from websockets.sync.client import connect

    from bcjax.serve.protocol import unpack_block
    from bcjax.toyworld.world import COLOURS, DIRECTIONS, SPEEDS

    rng = random.Random(index)
    colours = list(COLOURS)
    with connect(url, max_size=None, open_timeout=30) as ws:
        json.loads(ws.recv(timeout=30))  # hello
        received: dict[int, int] = {}
        since_switch, starts, colour = 0, 0, colours[index % len(colours)]

        def start():
            nonlocal since_switch, starts, colour
            colour = colours[(index + starts) % len(colours)]
            starts += 1
            since_switch = 0
            ws.send(json.dumps({"type": "start", "prompt": f"{colour} east fast", "stagger": args.stagger,
                                "mask": "causal", "policy": "no-recache", "seed": index, "fps": args.fps}))

        colour = ""
        start()
        while not stop.is_set():
            try:
                m = ws.recv(timeout=1)
            except TimeoutError:
                continue
            if not isinstance(m, bytes):
                continue
            header, _ = unpack_block(m)
            received[header["stream"]] = received.get(header["stream"], 0) + 1
            ws.send(json.dumps({"type": "ack", "stream": header["stream"], "blocks": received[header["stream"]]}))
            blocks[index] += 1
            since_switch += 1
            if since_switch >= args.switch_every:
                since_switch = 0
                if rng.random() < 0.1:
                    start()  # a new stream, another colour
                else:
                    prompt = f"{colour} {rng.choice(list(DIRECTIONS))} {rng.choice(list(SPEEDS))}"
                    ws.send(json.dumps({"type": "prompt", "prompt": prompt}))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bcjax.serve.soak", description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--tabs", type=int, default=8)
    p.add_argument("--fps", type=float, default=0, help="each tab's pace (0: as fast as it computes)")
    p.add_argument("--stagger", "--schedule", dest="stagger", default="P4", choices=STAGGERS, action=OldName,
                   new="--stagger", help="--schedule: its deprecated name")
    p.add_argument("--switch-every", type=int, default=4, help="blocks between a tab's prompt switches")
    p.add_argument("--every", type=float, default=30, help="seconds between report lines")
    args = p.parse_args(argv)

    from bcjax.serve import ToyBackend, make_app, server

    backend = ToyBackend()
    app = make_app(backend, max_sessions=args.tabs)
    srv, sock = server(app, "127.0.0.1", 0)
    serving = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    serving.start()
    while not srv.started:
        time.sleep(0.05)
    host, port = sock.getsockname()[:2]
    url = f"ws://{host}:{port}/ws"
    stop, blocks = threading.Event(), [0] * args.tabs
    tabs = [threading.Thread(target=_tab, args=(url, i, args, stop, blocks), daemon=True) for i in range(args.tabs)]
    for t in tabs:
        t.start()
    t0 = last_t = time.monotonic()
    last_blocks = 0
    print("  time  threads  tab-threads   RSS MB  text-cache KB  blocks/s (all tabs)", flush=True)
    try:
        while time.monotonic() - t0 < 60 * args.minutes:
            time.sleep(args.every)
            now, total = time.monotonic(), sum(blocks)
            tab_threads = sum(t.name.startswith("bcjax-tab-") for t in threading.enumerate())
            print(f"{now - t0:6.0f}  {threading.active_count():7d}  {tab_threads:11d}  {_rss_mb():7.0f}  "
                  f"{backend.text_cache.held_bytes() / 1024:13.1f}  {(total - last_blocks) / (now - last_t):8.1f}",
                  flush=True)
            last_t, last_blocks = now, total
    finally:
        stop.set()
        for t in tabs:
            t.join(timeout=10)
        srv.should_exit = True
        serving.join(timeout=20)
        # the tabs' generation threads leave once their sockets closed; exiting under a running
        # XLA computation aborts the interpreter
        deadline = time.monotonic() + 20
        while any(t.name.startswith("bcjax-tab-") for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
