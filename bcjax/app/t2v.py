"""Text to video, entirely in JAX: umT5 encode -> DiT (sequential or cascade) -> streamed VAE decode -> mp4.

Each block's latents are decoded as soon as the denoiser emits them (the VAE carries its causal
conv caches between blocks), so frames reach the mp4 while later blocks are still denoising. The
decoder is the Wan VAE or TAEHV (`decoder`), on a device outside the denoising mesh by default
(`bcjax.vae.decoders`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator

import jax
import numpy as np
from jax.sharding import Mesh

from bcjax import checkpoint
from bcjax.app.streaming import drain, overlapped
from bcjax.app.video import Mp4Writer, NullWriter, block_to_uint8, frames_per_block, read_mp4
from bcjax.flags import renamed_keyword
from bcjax.model.wan import KV
from bcjax.names import DEFAULT_MASK, SEQUENTIAL, as_mask
from bcjax.runners import make_runner
from bcjax.schedule.config import PipelineConfig
from bcjax.text.tokenizer import load_tokenizer, tokenize
from bcjax.text.umt5 import prompt_embeddings
from bcjax.vae import wan_vae
from bcjax.vae.decoders import DECODERS, PixelDecoder, decode_device
from bcjax.vae.wan_vae import VAEConfig, encode, init_decode_state

VIDEO_FPS = 16  # Wan2.1's frame rate


class VAERoundTrip:
    """Krea's R (rule 4 of `bcjax.pipeline.krea`): called with every block's x0 in order, it
    decodes the stream with its own causal caches and encodes the last pixel frame of the block's
    first latent frame alone, as an image: [B, 1, h, w, C] normalised latents. Krea encodes in
    fp16; this runs in the VAE's own dtype (float32 here). `video` keeps the last block's decoded
    frames [B, 4F, H, W, 3] (the first block's 3 leading frames padding), for the writer: each block
    is decoded once."""

    def __init__(self, cfg: VAEConfig, params, batch: int, latent_hw: tuple[int, int]):
        self.cfg, self.params = cfg, params
        self.state = init_decode_state(cfg, batch, latent_hw)
        self.video = None

    def __call__(self, x0):
        self.state, video = wan_vae.decode_step(self.cfg, self.params, self.state, x0)
        self.video = video
        # latent frame 0 of a chunk decodes to pixel frames 0..3 (the clip's first chunk: 3 zero
        # padding frames, then latent frame 0's single frame), so its last pixel frame is index 3
        last = self.cfg.temporal_scale - 1
        return encode(self.cfg, self.params, video[:, last:last + 1])


def _timed(blocks: Iterator[jax.Array], seconds: list) -> Iterator[jax.Array]:
    """Pass blocks through, appending the wall time each took to be computed."""
    while True:
        t1 = time.perf_counter()
        x0 = next(blocks, None)
        if x0 is None:
            return
        jax.block_until_ready(x0)
        seconds.append(time.perf_counter() - t1)
        yield x0


@dataclasses.dataclass
class TextToVideo:
    """A bcjax checkpoint (dit + text + vae + tokenizer, from `bcjax convert`) ready to generate.

    >>> t2v = TextToVideo("ckpt/", PipelineConfig(), video_hw=(480, 832), stagger="P4")
    >>> timings = t2v.write_mp4("a fox in the snow", num_blocks=7, seed=0, path="fox.mp4")
    """

    path: str
    # the sampler; None: the checkpoint's own (`ports.for_checkpoint`: Krea's loop for a Krea
    # checkpoint run sequentially, its clean-pass variant under a cascade, else Self-Forcing's), set
    # before anything reads it
    pcfg: PipelineConfig = None  # type: ignore[assignment]
    video_hw: tuple[int, int] = (480, 832)
    stagger: str = SEQUENTIAL  # `bcjax.names.STAGGERS`
    mask: str = DEFAULT_MASK  # `bcjax.names.MASKS`: what a cascade's in-flight blocks see of each other
    mesh: Mesh | None = None
    decoder: str = "wan"  # a name in bcjax.vae.decoders.DECODERS
    decode_device: str | None = None  # see bcjax.vae.decoders.decode_device; None = auto
    # the DiT's run-time numerics (not in the checkpoint): compute dtype (None: its weights' dtype),
    # attention backend (None: "auto") and quantization (`bcjax.names.Quant`; None: as stored), see
    # bcjax.checkpoint.restore
    dtype: str | None = None
    attention: str | None = None
    quant: str | None = None
    token_group: int | None = None  # tokens per group of the `tokens` split (`bcjax tune`'s); None: least padding
    verify: bool = True  # check the weights against the checkpoint's manifest (bcjax.checkpoint.restore)
    adapter: str | None = None  # a `bcjax adapt` folder: the cascade's tick runs it (bcjax.adapt)
    # the old names of stagger and mask (deprecated; keyword only)
    schedule: dataclasses.InitVar[str | None] = None
    window: dataclasses.InitVar[str | None] = None

    def __post_init__(self, schedule, window):
        self.stagger = renamed_keyword("schedule", "stagger", schedule, SEQUENTIAL, self.stagger)
        self.mask = renamed_keyword("window", "mask", window, DEFAULT_MASK, self.mask)
        self.path = checkpoint.resolve(self.path)
        meta = checkpoint.read_config(self.path)
        missing = [p for p in ("dit", "text", "vae") if p not in meta["configs"]]
        if missing:
            raise ValueError(f"checkpoint {self.path} lacks part(s) {missing}; text-to-video needs dit, text and vae "
                             "(bcjax convert --text-encoder ... --vae ... --tokenizer ...)")
        self.dit_cfg, self.dit = checkpoint.restore(self.path, "dit", mesh=self.mesh, dtype=self.dtype,
                                                    attention=self.attention, quant=self.quant,
                                                    verify=self.verify)
        self.text_cfg, self.text = checkpoint.restore(self.path, "text", verify=self.verify)
        self.vae_cfg, self.vae = checkpoint.restore(self.path, "vae", verify=self.verify)
        if self.text_cfg.d_model != self.dit_cfg.text_dim or self.text_cfg.text_len != self.dit_cfg.text_len:
            raise ValueError(f"text encoder gives [{self.text_cfg.text_len}, {self.text_cfg.d_model}] embeddings; "
                             f"the DiT expects [{self.dit_cfg.text_len}, {self.dit_cfg.text_dim}]")
        if self.vae_cfg.z_dim != self.dit_cfg.in_channels:
            raise ValueError(f"VAE has {self.vae_cfg.z_dim} latent channels; the DiT has {self.dit_cfg.in_channels}")
        self._parts = set(meta["configs"])
        if self.pcfg is None:
            import ports

            self.pcfg = ports.for_checkpoint(meta.get("provenance", {}), self.stagger).pipeline
        self.decode_on = decode_device(self.decode_device, self.mesh)
        self.pixels = self.pixel_decoder(self.decoder)
        self.tokenizer = load_tokenizer(os.path.join(self.path, "tokenizer"))
        h, w = self.video_hw
        scale = self.vae_cfg.spatial_scale * self.dit_cfg.patch_size[1]
        if h % scale or w % scale:
            raise ValueError(f"video size {h}x{w} must be a multiple of {scale} (VAE stride x DiT patch)")
        self.latent_hw = (h // self.vae_cfg.spatial_scale, w // self.vae_cfg.spatial_scale)
        if self.pcfg.context == "rebuild" and self.stagger != SEQUENTIAL:
            raise ValueError(f"stagger {self.stagger!r}: a cascade of Krea's rebuilt context (port krea_14b) "
                             "takes R = the latent, not Krea's VAE round trip, so it would not make Krea's video; "
                             "use --stagger sequential, or make_runner(..., program='tick'), or the port "
                             "krea_14b_clean_pass")
        # Krea's loop runs as its own program here: its context's first frame goes through the real VAE
        adapter = None
        if self.adapter is not None:  # a `bcjax adapt` folder for this model (the runner checks the rest)
            from bcjax.adapt import load

            adapter = load(self.adapter, self.dit_cfg, self.dit)
        self.denoiser = make_runner(self.dit_cfg, self.pcfg, self.latent_hw, self.stagger, as_mask(self.mask),
                                    self.mesh, token_group=self.token_group, adapter=adapter)
        self._embed = jax.jit(lambda p, ids, mask: prompt_embeddings(self.text_cfg, p, ids, mask))

    def decoders(self) -> list[str]:
        """The names in DECODERS this checkpoint and pipeline can decode with."""
        return [d for d in DECODERS if self.decoder_refusal(d) is None]

    def decoder_refusal(self, name: str) -> str | None:
        """Why decoder `name` cannot decode this run's blocks, or None when it can."""
        if name not in DECODERS:
            return f"expected one of {', '.join(DECODERS)}"
        if name == "taehv" and "taehv" not in self._parts:
            return f"checkpoint {self.path} has no taehv part (bcjax convert ... --taehv taew2_1.safetensors)"
        if name == "taehv" and self.pcfg.context == "rebuild":
            return ("with Krea's loop, its VAE round trip decodes every block with the Wan VAE already, and those "
                    "frames go to the video; use the wan decoder")
        return None

    def pixel_decoder(self, name: str) -> PixelDecoder:
        """Decoder `name` (in `decoders()`) with its weights on this run's decode device: the one
        placement rule for every stream of the checkpoint (the mp4 writer, the live page)."""
        refusal = self.decoder_refusal(name)
        if refusal:
            raise ValueError(f"--decoder {name}: {refusal}")
        cfg, params = (self.vae_cfg, self.vae) if name == "wan" else checkpoint.restore(self.path, "taehv",
                                                                                          verify=self.verify)
        return PixelDecoder(name, cfg, params, self.decode_on)

    def encode_video(self, path: str) -> jax.Array:
        """Video-to-video input: an mp4 of exactly video_hw -> normalised latents [1, F, h, w, C]
        (its first 1 + 4k frames through the VAE encoder, whole clip)."""
        frames = read_mp4(path)
        h, w = frames.shape[1:3]
        if (h, w) != tuple(self.video_hw):
            raise ValueError(f"--video {path} is {h}x{w}; this run makes {self.video_hw[0]}x{self.video_hw[1]} "
                             "(resize it or pass --size)")
        t = self.vae_cfg.temporal_scale
        usable = 1 + t * ((len(frames) - 1) // t)
        need = 1 + t * (self.pcfg.block_frames - 1)  # one block's latent frames
        if len(frames) < need:
            raise ValueError(f"--video {path} has {len(frames)} frames; one block needs {need}")
        video = frames[:usable].astype(np.float32)[None] / 127.5 - 1.0
        return encode(self.vae_cfg, self.vae, video)

    def prompt_kv(self, prompt: str) -> KV:
        """A prompt string -> its per-layer cross-attention K/V (umT5, then the DiT's text K/V)."""
        ids, mask = tokenize(self.tokenizer, prompt, self.text_cfg.text_len)
        # on the runner's layout: split by heads when the DiT is split over a `model` axis
        return self.denoiser.text_kv(self.dit, self._embed(self.text, ids, mask))

    def _latent_blocks(self, text: KV, num_blocks: int, key, source=None, timings=None):
        """(x0, its decoded video or None) per block: Krea's round trip decodes every block already."""
        if source is not None and not self.denoiser.takes_source:
            raise ValueError(f"video-to-video runs sequentially for now; stagger {self.stagger!r} is a cascade")
        if self.denoiser.takes_round_trip:
            # a fresh round trip per video (its decoder state starts with the clip); its decoded
            # frames go to the writer, so each block is decoded once
            trip = VAERoundTrip(self.vae_cfg, self.vae, text.k.shape[1], self.latent_hw)
            for _, x0 in self.denoiser.blocks(self.dit, text, key, num_blocks=num_blocks, reencode=trip, source=source):
                if timings is not None:
                    timings["decodes"] += 1
                yield x0, trip.video
        else:
            for _, x0 in self.denoiser.blocks(self.dit, text, key, num_blocks=num_blocks, source=source):
                yield x0, None

    def _timed_blocks(self, prompt: str, num_blocks: int, seed: int, timings: dict, source=None):
        """The denoiser's (x0, decoded video or None) blocks, timing the prompt encode and each block's denoise."""
        timings.update(t0=time.perf_counter(), denoise_s=[], decode_s=[], blocks=0, decodes=0)
        text = jax.block_until_ready(self.prompt_kv(prompt))
        timings["encode_s"] = time.perf_counter() - timings["t0"]
        blocks = self._latent_blocks(text, num_blocks, jax.random.key(seed), source, timings)
        yield from _timed(blocks, timings["denoise_s"])

    def _decoder(self, timings: dict):
        """decode(x0 [1, F, h, w, C], video=None) -> uint8 frames [T, H, W, 3], carrying the decoder's
        state; a block's video already decoded (Krea's round trip, the Wan VAE) is used as is."""
        pixels = self.pixels
        state = pixels.init_state(1, self.latent_hw)

        def decode(x0, video=None) -> np.ndarray:
            nonlocal state
            t2 = time.perf_counter()
            pad = self.vae_cfg.first_chunk_padding
            if video is None:
                state, video = pixels.step(state, x0)
                timings["decodes"] += 1
                pad = pixels.first_chunk_padding
            out = block_to_uint8(video, timings["blocks"] == 0, pad)
            t3 = time.perf_counter()
            timings["decode_s"].append(t3 - t2)
            timings["blocks"] += 1
            timings.setdefault("first_frame_s", t3 - timings["t0"])
            return out

        return decode

    def frames(self, prompt: str, num_blocks: int, seed: int = 0, timings: dict | None = None) -> Iterator[np.ndarray]:
        """Yield uint8 video frames [T, H, W, 3] block by block (the first block: 1 + 4*(F-1) frames)."""
        timings = {} if timings is None else timings
        decode = None
        for x0, video in self._timed_blocks(prompt, num_blocks, seed, timings):
            decode = decode or self._decoder(timings)  # after the timings exist
            yield decode(x0, video)

    def write_mp4(self, prompt: str, num_blocks: int, path: str | None, seed: int = 0, progress: bool = True,
                  source=None) -> dict:
        """Generate and write an mp4; returns timings (seconds; per-block lists for denoise/decode) and FPS
        (denoise: video frames per block / median steady-state seconds per block; end to end: frames / wall time).

        Decode and writing run on a background thread (`overlapped`), off the denoising critical path.
        path None writes nothing (the processes of a multi-host job other than 0). source:
        video-to-video input latents (`encode_video`; the sampler from `prompts.with_strength`),
        at most its whole blocks are generated.
        """
        if source is not None:
            num_blocks = min(num_blocks, source.shape[1] // self.pcfg.block_frames)
        from tqdm import tqdm

        timings: dict = {}
        t0 = time.perf_counter()
        with (Mp4Writer(path, fps=VIDEO_FPS) if path is not None else NullWriter()) as writer:
            blocks = tqdm(self._timed_blocks(prompt, num_blocks, seed, timings, source), total=num_blocks, unit="block",
                          disable=not progress, desc=f"{self.stagger}")
            decoders: list[Callable] = []

            def sink(block):  # on the worker thread, while the next block denoises
                if not decoders:
                    decoders.append(self._decoder(timings))
                writer.write(decoders[0](*block))

            drain(overlapped(blocks, sink))
        timings.pop("t0", None)
        timings["total_s"] = time.perf_counter() - t0
        timings["frames"] = writer.frames
        # steady state: the first block pays compilation (and, for a cascade, the pipeline fill)
        steady = sorted(timings["denoise_s"][1:] or timings["denoise_s"])
        per_block = frames_per_block(self.pcfg.block_frames, self.vae_cfg.temporal_scale)
        timings["denoise_fps"] = per_block / steady[len(steady) // 2]
        timings["end_to_end_fps"] = writer.frames / timings["total_s"]
        return timings
