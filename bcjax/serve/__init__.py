"""`bcjax serve`: a local web page where the video streams as it is generated and the prompt
changes mid-stream (Starlette + uvicorn, one WebSocket per browser tab).

Transport: each generated block goes to the page as one binary WebSocket message holding a small
JSON header (block id, prompt, the tick's noise-level strip, timings) and the block's frames as
still images: PNG for the toy world (12x12 latents drawn scaled up: lossless keeps the sprites'
exact colours; a frame is ~100 bytes), JPEG for a real model (832x480: ~40 KB, decoded by the
browser natively). Why not fragmented MP4 through Media Source Extensions: an H.264 encoder
groups frames into fragments and the player buffers them, which adds latency of its own to the
very figure the page exists to show (prompt change -> first frame under the new prompt); Debian's
Chromium may lack the proprietary codec; and a block's frames could no longer be tied to the
block's header (its prompt, its tick). Frames as images on the same socket as the control
messages arrive in order with their metadata, need no codec, and cost at most a JPEG encode per
frame, far below the DiT's time per block.

    bcjax serve [--checkpoint DIR] [--host 127.0.0.1] [--port 8000] [--allow-origin ORIGIN ...]
"""

from bcjax.serve.app import bind, make_app, server
from bcjax.serve.models import CheckpointBackend, ToyBackend

__all__ = ["CheckpointBackend", "ToyBackend", "bind", "make_app", "server"]
