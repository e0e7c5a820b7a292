"""What `bcjax serve` serves: the embedded toy-world model or a converted real checkpoint.

Both backends have one shape, which the sessions use without asking which they hold:
    cfg, pcfg, latent_hw, params, mesh     the DiT and its sampler (runners are built from these)
    describe() -> dict                     what the page shows (prompt kind, vocabulary, stage labels,
                                           the decoders it offers)
    check(prompt, first=None) -> str       the prompt normalised, or ValueError naming what is wrong
                                           (first: the stream's first prompt, for a switch)
    prompt_kv(prompt) -> KV                the checked prompt's text K/V (cross-attention, per layer)
    context(prompt, seed) -> array | None  given clean first frames [1, G * bf, H, W, C], or None
    decoder(name | None) -> name | None    the pixel decoder a stream asked for (None: the default),
                                           or ValueError naming why it cannot have it
    frame_encoder(decoder, round_trip=False) -> fn
                                           per stream: fn(x0 [1, bf, H, W, C]) dispatches the block's
                                           pixel decode without waiting for it and returns fetch();
                                           fetch() waits for the pixels and gives (encoded images,
                                           seconds from dispatch to pixels, or None without a decode).
                                           Blocks are dispatched in order, each fetched before the next
                                           is dispatched (the decoder's state runs through them).
                                           round_trip (a runner with Krea's loop): fn.reencode is the
                                           VAE round trip giving R, and fn sends the pixels the round
                                           trip decoded (each block is decoded once).
    mime                                   their type
"""

from __future__ import annotations

import collections
import dataclasses
import io
import threading
import time
from typing import Any

import numpy as np

# why the toy world offers no decoder choice (the page shows it beside the disabled control)
NO_VAE = "the toy world has no VAE: its 3 latent channels are the pixels"
MAX_PROMPT_CHARS = 1000  # a prompt longer than this is refused before it reaches a tokenizer
TEXT_CACHE_BYTES = 1024 * 2 ** 20  # per server: ~10 prompts of a 1.3B model, every toy prompt many times over


def _images(frames: np.ndarray, fmt: str, **opts) -> list[bytes]:
    """uint8 [F, H, W, 3] -> one encoded image per frame."""
    from PIL import Image

    out = []
    for f in frames:
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(f)).save(buf, fmt, **opts)
        out.append(buf.getvalue())
    return out


def _stage_labels(pcfg) -> list[str]:
    return [f"t={round(float(t))}" for t in pcfg.timesteps] + ["clean"]


class TextCache:
    """Text K/V of the last prompts, so a prompt typed again is not encoded again; least recently
    used dropped first once they hold over `max_bytes` (the newest is kept whatever its size)."""

    def __init__(self, prompt_kv, max_bytes: int):
        self.prompt_kv, self.max_bytes = prompt_kv, max_bytes
        self.kv: collections.OrderedDict = collections.OrderedDict()
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()  # tabs encode from their own threads

    def __call__(self, text: str):
        from bcjax.app.interactive import kv_bytes

        with self._lock:
            if text in self.kv:
                self.kv.move_to_end(text)
                return self.kv[text]
        kv = self.prompt_kv(text)
        with self._lock:
            self.kv[text], self._bytes[text] = kv, kv_bytes(kv)
            while len(self.kv) > 1 and sum(self._bytes.values()) > self.max_bytes:
                old, _ = self.kv.popitem(last=False)
                del self._bytes[old]
        return kv

    def held_bytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())


def _common_checks(prompt: str) -> str:
    text = " ".join(prompt.split())
    if not text:
        raise ValueError("the prompt is empty")
    if len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"the prompt is {len(prompt)} characters long; at most {MAX_PROMPT_CHARS}")
    return text


class ToyBackend:
    """The toy-world DiT (default: the checkpoint shipped in the package). Prompts are sprite
    phrases ('red south-east fast'); the stream continues a still image whose sprites start at
    seeded positions. A switch may change colours, directions and speeds, not the number of sprites
    (the image holds them). Frames are the latents themselves (3 channels), sent as lossless PNGs."""

    mime = "image/png"
    adapter: Any = None  # `bcjax serve --adapter` (a `bcjax.adapt.Adapter`): runners of its stagger and mask run it

    def __init__(self, checkpoint: str | None = None, mesh=None, text_cache_bytes: int = TEXT_CACHE_BYTES, *,
                 dtype: str | None = None, attention: str | None = None, quant: str | None = None):
        from bcjax.toyworld.evaluate import load_model

        model = load_model(checkpoint, dtype=dtype, attention=attention, quant=quant)
        self.world, self.cfg, self.params, self.mesh = model.world, model.cfg, model.params, mesh
        # rolling positions: a page's stream has no planned end
        self.pcfg = dataclasses.replace(model.pcfg, positions="rolling")
        self.latent_hw = (self.world.size, self.world.size)
        self.text_cache = TextCache(self._embed, text_cache_bytes)

    def describe(self) -> dict:
        from bcjax.toyworld.world import COLOURS, DIRECTIONS, SPEEDS

        w = self.world
        return {"kind": "toy", "title": f"toy world ({self.cfg.num_layers} layers, dim {self.cfg.dim})",
                "vocabulary": [list(COLOURS), list(DIRECTIONS), list(SPEEDS)], "max_sprites": w.max_sprites,
                "example": "red south-east fast" if w.max_sprites == 1 else "red south-east fast, blue west slow",
                "block_frames": w.block_frames, "stages": _stage_labels(self.pcfg), "width": w.size, "height": w.size,
                "max_prompt": MAX_PROMPT_CHARS, "decoders": [], "decoder": None, "decoder_note": NO_VAE,
                "decode_device": None}

    def decoder(self, name: str | None) -> None:
        if name is not None:
            raise ValueError(f"decoder {name!r}: {NO_VAE}; there is nothing to decode")
        return None

    def check(self, prompt: str, first: str | None = None) -> str:
        from bcjax.toyworld.world import check_switch, parse_prompt, prompt_text

        scene = parse_prompt(_common_checks(prompt), self.world)
        if first is not None:
            check_switch(parse_prompt(first, self.world), scene)
        return prompt_text(scene)

    def prompt_kv(self, prompt: str):
        return self.text_cache(self.check(prompt))

    def _embed(self, text: str):
        import jax.numpy as jnp

        from bcjax.model.wan import text_kv
        from bcjax.toyworld.world import parse_prompt, prompt_embedding

        emb = prompt_embedding(parse_prompt(text, self.world), self.world)
        return text_kv(self.cfg, self.params, jnp.asarray(emb[None]))

    def context(self, prompt: str, seed: int):
        """The still first block: the prompt's sprites at seeded start corners, [1, bf, H, W, 3]."""
        from bcjax.toyworld.world import parse_prompt, render

        w = self.world
        n = len(parse_prompt(prompt, w))
        rng = np.random.default_rng(seed)
        starts = [(int(y), int(x)) for y, x in (rng.integers(w.lo, w.hi + 1, 2) for _ in range(n))]
        return render(parse_prompt(prompt, w, starts), w.block_frames, w)[None]

    def frame_encoder(self, decoder: None = None, round_trip: bool = False):
        from bcjax.toyworld.world import to_rgb

        self.decoder(decoder)
        if round_trip:
            raise ValueError(f"Krea's VAE round trip: {NO_VAE}")
        # nothing to decode: the PNGs are made in fetch(), beside the next step like a decode
        return lambda x0: lambda: (_images(to_rgb(np.asarray(x0)[0], self.world), "PNG"), None)


class CheckpointBackend:
    """A converted real checkpoint (`bcjax convert`: dit + text + vae + tokenizer): free-text
    prompts through umT5, text to video from noise, each block decoded by the stream's choice of
    the checkpoint's pixel decoders (the Wan VAE, TAEHV; their causal caches carried per stream)
    on the decode device `TextToVideo` picks, and sent as JPEGs."""

    mime = "image/jpeg"
    adapter: Any = None  # `bcjax serve --adapter` (a `bcjax.adapt.Adapter`): runners of its stagger and mask run it

    def __init__(self, path: str, port: str | None = None, video_hw: tuple[int, int] = (480, 832), mesh=None,
                 quality: int = 85, text_cache_bytes: int = TEXT_CACHE_BYTES, decoder: str | None = None,
                 decode_device: str | None = None, dtype: str | None = None, attention: str | None = None,
                 quant: str | None = None,
                 verify: bool = True):
        import ports
        from bcjax.app.t2v import TextToVideo
        from bcjax.checkpoint import read_config

        # None: the checkpoint's own sampler; a Krea checkpoint's clean-pass variant, which every tab's
        # stagger can run (`ports.for_checkpoint`)
        chosen = ports.get(port) if port else ports.for_checkpoint(read_config(path).get("provenance", {}), None)
        pcfg = dataclasses.replace(chosen.pipeline, positions="rolling")
        height, width = video_hw
        if decoder is None:  # the tiny decoder keeps a live stream's pace, when the checkpoint has it
            decoder = "taehv" if "taehv" in read_config(path)["configs"] and pcfg.context != "rebuild" else "wan"
        self.t2v = TextToVideo(path, pcfg, (height, width), mesh=mesh, decoder=decoder, decode_device=decode_device,
                               dtype=dtype, attention=attention, quant=quant, verify=verify)
        self.cfg, self.params, self.pcfg, self.mesh = self.t2v.dit_cfg, self.t2v.dit, pcfg, mesh
        self.latent_hw, self.video_hw, self.quality = self.t2v.latent_hw, (height, width), quality
        self.port = chosen.name
        # every decoder the checkpoint has, on the one decode device: a tab picks one per stream
        self.pixels = {d: self.t2v.pixels if d == self.t2v.decoder else self.t2v.pixel_decoder(d)
                       for d in self.t2v.decoders()}
        self.text_cache = TextCache(self.t2v.prompt_kv, text_cache_bytes)

    def describe(self) -> dict:
        return {"kind": "text", "title": f"{self.port} checkpoint ({self.cfg.num_layers} layers, dim {self.cfg.dim}, "
                                         f"decoded on {self.t2v.decode_on})",
                "vocabulary": None, "max_sprites": None, "example": "a red fox running through fresh snow",
                "block_frames": 4 * self.pcfg.block_frames, "stages": _stage_labels(self.pcfg),
                "width": self.video_hw[1], "height": self.video_hw[0], "max_prompt": MAX_PROMPT_CHARS,
                "decoders": list(self.pixels), "decoder": self.t2v.decoder, "decoder_note": None,
                "decode_device": str(self.t2v.decode_on)}

    def decoder(self, name: str | None) -> str:
        if name is None:
            return self.t2v.decoder
        if name not in self.pixels:  # the reason TextToVideo gives: no taehv part, or Krea's loop
            raise ValueError(f"decoder {name!r}: {self.t2v.decoder_refusal(name)}")
        return name

    def check(self, prompt: str, first: str | None = None) -> str:
        from bcjax.text.tokenizer import clean_prompt

        text = _common_checks(prompt)
        tokens = len(self.t2v.tokenizer.encode(clean_prompt(text))) + 1  # + EOS
        if tokens > self.t2v.text_cfg.text_len:
            raise ValueError(f"the prompt is {tokens} tokens long; "
                             f"the text encoder reads at most {self.t2v.text_cfg.text_len}")
        return text

    def prompt_kv(self, prompt: str):
        return self.text_cache(self.check(prompt))

    def context(self, prompt: str, seed: int):
        return None  # text to video: the first block is generated too

    def frame_encoder(self, decoder: str | None = None, round_trip: bool = False):
        import jax

        from bcjax.app.video import block_to_uint8

        if round_trip:
            return self._round_trip_encoder(decoder)
        pixels = self.pixels[self.decoder(decoder)]  # on the decode device
        state = [pixels.init_state(1, self.latent_hw)]
        blocks = [0]  # a host count: asking the state's frame count would wait for the last decode

        def encode(x0):
            first = blocks[0] == 0
            blocks[0] += 1
            t0 = time.perf_counter()
            state[0], video = pixels.step(state[0], x0)  # dispatched: the decode device works from here

            def fetch() -> tuple[list[bytes], float]:
                ready = jax.block_until_ready(video)  # the decode alone, not the JPEGs after it
                seconds = time.perf_counter() - t0
                return _images(block_to_uint8(ready, first, pixels.first_chunk_padding), "JPEG",
                               quality=self.quality), seconds

            return fetch

        return encode

    def _round_trip_encoder(self, decoder: str | None):
        """Krea's loop: R of every block is its first latent frame through the Wan VAE (decoded with
        the stream's causal caches, the last pixel frame encoded alone, `VAERoundTrip`), so the
        denoiser decodes every block already; those pixels are the ones sent (one decode per block,
        as `bcjax generate` writes them). The decode is on the denoiser's path: the next block
        needs R."""
        import jax

        from bcjax.app.t2v import VAERoundTrip
        from bcjax.app.video import block_to_uint8

        if self.decoder(decoder) != "wan":
            raise ValueError(f"decoder {decoder!r}: Krea's loop decodes every block with the Wan VAE for its R; "
                             "those frames are the ones sent")
        trip = VAERoundTrip(self.t2v.vae_cfg, self.t2v.vae, 1, self.latent_hw)
        decoded: collections.deque = collections.deque()  # (video, when its decode was dispatched), per block

        def reencode(x0):
            t0 = time.perf_counter()
            r = trip(x0)
            decoded.append((trip.video, t0))
            return r

        blocks = [0]

        def encode(x0):
            first = blocks[0] == 0
            blocks[0] += 1
            video, t0 = decoded.popleft()

            def fetch() -> tuple[list[bytes], float]:
                ready = jax.block_until_ready(video)
                seconds = time.perf_counter() - t0
                return _images(block_to_uint8(ready, first, self.t2v.vae_cfg.first_chunk_padding), "JPEG",
                               quality=self.quality), seconds

            return fetch

        encode.reencode = reencode  # type: ignore[attr-defined]
        return encode
