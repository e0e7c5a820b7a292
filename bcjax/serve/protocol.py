"""The page <-> server messages: parsing what a page sends, packing what the server sends.

Page -> server: one JSON object per text message, at most MAX_MESSAGE bytes:
    {"type": "start", "prompt": str, "stagger": "P4", "mask": "causal",
     "policy": "no-recache", "seed": 0, "fps": 16,
     "decoder": "taehv"}                                a new stream (or resume a stopped one); decoder:
                                                        one the hello offers, absent or null: the default;
                                                        "schedule" / "window": the old names of "stagger" /
                                                        "mask", still read (one release; OLD_KEYS)
    {"type": "prompt", "prompt": str}                   switch at the next block
    {"type": "stop"} | {"type": "reset"}               pause | end the stream
    {"type": "pace", "fps": 16}                         frames/s the stream is paced to (0: as fast as it computes)
    {"type": "ack", "stream": 1, "blocks": 7}          the page has received 7 blocks of stream 1

Server -> page: JSON text messages {"type": "hello" | "state" | "prompt" | "tick" | "error", ...}
and one binary message per generated block: a 4-byte big-endian header length, the header
(UTF-8 JSON: {"type": "block", "block", "prompt", "tick", "stages", "mime", "sizes", "decoder",
"decode_ms" (the pixel decode of this block on the decode device; null without a decoder), ...}),
then the block's frames as images, back to back (header["sizes"] their byte lengths).
The server closes a tab with code 4000 after an {"type": "error", "what": "idle"} message (idle
too long), and with 4001 when it does not read (see `bcjax.serve.session.Outbox`).
"""

from __future__ import annotations

import json
import struct

from bcjax.names import DEFAULT_MASK, MASKS, STAGGERS
from bcjax.vae.decoders import DECODERS

MAX_MESSAGE = 4096  # bytes of one page message (a prompt and a few fields fit many times over)
# no page message nests deeper than 1; a small limit, checked before json.loads, keeps a
# message of 2000 '[' from reaching the decoder's recursion limit
MAX_DEPTH = 4
MAX_SEED = 2 ** 31 - 1
# fps 0 is "unpaced"; otherwise a block of 12-48 frames waits at most a few seconds
MIN_FPS, MAX_FPS = 1, 120
MAX_STREAM = 2 ** 31 - 1
TYPES = ("start", "prompt", "stop", "reset", "pace", "ack")
# a start message's fields under their old names (pages of bcjax <= 0.x; read for one release)
OLD_KEYS = {"schedule": "stagger", "window": "mask"}


class BadMessage(ValueError):
    """A page message the server will not act on; its text goes back in an error frame."""


def parse(raw: str | bytes | None, policies: tuple[str, ...]) -> dict:
    """A page message -> a checked command dict (see the module docstring); BadMessage naming
    what is wrong otherwise. raw: the text of a text message, bytes of a binary one."""
    if isinstance(raw, bytes):
        raise BadMessage(f"binary message of {len(raw)} bytes: the server reads JSON text messages only")
    if raw is None:
        raise BadMessage("empty message")
    size = len(raw.encode("utf-8", "surrogatepass"))
    if size > MAX_MESSAGE:
        raise BadMessage(f"message of {size} bytes is over the {MAX_MESSAGE}-byte limit")
    depth = _depth(raw)
    if depth > MAX_DEPTH:
        raise BadMessage(f"message nests {depth} levels deep; at most {MAX_DEPTH}")
    try:
        msg = json.loads(raw)
    except json.JSONDecodeError as e:
        raise BadMessage(f"message is not JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(msg, dict):
        raise BadMessage(f"message is a JSON {type(msg).__name__}; expected an object with a 'type'")
    kind = msg.get("type")
    if kind not in TYPES:
        raise BadMessage(f"message type {kind!r}: expected one of {list(TYPES)}")
    out = {"type": kind}
    if kind in ("start", "prompt"):
        out["prompt"] = _field(msg, "prompt", str)
    if kind == "start":
        for old, new in OLD_KEYS.items():
            if old in msg:
                if new in msg:
                    raise BadMessage(f"fields {new!r} and its old name {old!r} both given; send {new!r}")
                msg[new] = msg.pop(old)
        out["stagger"] = _choice(msg, "stagger", STAGGERS, "P4")
        out["mask"] = _choice(msg, "mask", MASKS, DEFAULT_MASK)
        out["policy"] = _choice(msg, "policy", policies, "no-recache")
        out["seed"] = _number(msg, "seed", 0, MAX_SEED, 0, integer=True)
        # which decoders a model has is the backend's to say; the names are checked here
        out["decoder"] = None if msg.get("decoder") is None else _choice(msg, "decoder", DECODERS, None)
    if kind in ("start", "pace"):
        out["fps"] = _number(msg, "fps", 0, MAX_FPS, 16)
        if 0 < out["fps"] < MIN_FPS:
            raise BadMessage(f"field 'fps' = {out['fps']!r}: expected 0 (unpaced) or {MIN_FPS} .. {MAX_FPS}")
    if kind == "ack":
        out["stream"] = _number(msg, "stream", 0, MAX_STREAM, None, integer=True)
        out["blocks"] = _number(msg, "blocks", 0, MAX_STREAM, None, integer=True)
    return out


def _depth(text: str) -> int:
    """How deep [ and { nest in a JSON text (outside strings), without recursion."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _field(msg: dict, name: str, kind: type):
    if name not in msg:
        raise BadMessage(f"{msg['type']!r} message lacks field {name!r}")
    value = msg[name]
    if not isinstance(value, kind):
        raise BadMessage(f"field {name!r} is a {type(value).__name__}; expected a {kind.__name__}")
    return value


def _choice(msg: dict, name: str, choices, default):
    value = msg.get(name, default)
    if value not in choices:
        raise BadMessage(f"field {name!r} = {value!r}: expected one of {list(choices)}")
    return value


def _number(msg: dict, name: str, lo, hi, default, integer: bool = False):
    if default is None and name not in msg:
        raise BadMessage(f"{msg['type']!r} message lacks field {name!r}")
    value = msg.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise BadMessage(f"field {name!r} = {value!r}: expected {'an integer' if integer else 'a number'}")
    if not lo <= value <= hi:
        raise BadMessage(f"field {name!r} = {value!r}: expected {lo} .. {hi}")
    return value


def pack_block(header: dict, images: list[bytes]) -> bytes:
    """One binary block message: header length, header JSON (with "sizes" added), the images."""
    head = json.dumps({**header, "sizes": [len(b) for b in images]}, separators=(",", ":")).encode()
    return struct.pack(">I", len(head)) + head + b"".join(images)


def unpack_block(data: bytes) -> tuple[dict, list[bytes]]:
    """The inverse of `pack_block` (the page does the same in JavaScript)."""
    (n,) = struct.unpack(">I", data[:4])
    header = json.loads(data[4:4 + n])
    images, at = [], 4 + n
    for size in header["sizes"]:
        images.append(data[at:at + size])
        at += size
    return header, images
