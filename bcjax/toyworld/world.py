"""A procedural video world with known ground truth, whose frames are a block-causal DiT's latents.

A scene is a few coloured square sprites on a small canvas, each moving at constant velocity and
bouncing off the walls, drawn in prompt order (a later sprite covers an earlier one). The prompt
names everything, one four-word phrase per sprite:

    "red top-left south-east fast, blue centre west slow"

colour, starting position on a 3x3 grid, direction (8 compass points), speed (pixels per frame).
So the whole video, first frame included, is a deterministic function of the prompt: a model
generating from noise can be scored frame by frame against `render(scene)`.

Frames are channels-last `[F, H, W, 3]` float32 and go into the DiT as latents directly: background
0, a sprite's pixels `amplitude * (+-1, +-1, +-1)` (its colour's sign pattern), so a typical frame
has roughly unit variance. Positions are integers (top-left corner, (row, col)), so renders are
exact and the position readout can recover them exactly.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np

# Colour words -> channel sign pattern (r, g, b); all distinct and none equal to the 0 background.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1),
    "yellow": (1, 1, -1), "cyan": (-1, 1, 1), "magenta": (1, -1, 1),
}
# Starting-position words -> (row, col) on a 3x3 grid of top-left corners, in units of half the free range.
STARTS: dict[str, tuple[int, int]] = {
    "top-left": (0, 0), "top": (0, 1), "top-right": (0, 2),
    "left": (1, 0), "centre": (1, 1), "right": (1, 2),
    "bottom-left": (2, 0), "bottom": (2, 1), "bottom-right": (2, 2),
}
# Direction words -> unit step (d_row, d_col); rows grow downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "north": (-1, 0), "north-east": (-1, 1), "east": (0, 1), "south-east": (1, 1),
    "south": (1, 0), "south-west": (1, -1), "west": (0, -1), "north-west": (-1, -1),
}
# Speed words -> pixels per frame along each moving axis.
SPEEDS: dict[str, int] = {"slow": 1, "fast": 2}

FIELDS = (COLOURS, STARTS, DIRECTIONS, SPEEDS)  # the order of the words in a sprite's phrase
WORDS_PER_SPRITE = len(FIELDS)
PAD = "<pad>"
VOCAB: tuple[str, ...] = (PAD, *COLOURS, *STARTS, *DIRECTIONS, *SPEEDS)
WORD_ID = {w: i for i, w in enumerate(VOCAB)}


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Canvas, sprites and prompt encoding of the toy world.

    size: canvas height = width in pixels (= latent positions); sprite: sprite side in pixels;
    amplitude: channel magnitude of a sprite pixel; text_len x text_dim: the prompt embedding
    the DiT's cross-attention reads (zero-padded like Wan's umT5 embeddings); embed_seed: the
    fixed rotation that turns word codes into dense embeddings.
    """

    size: int = 16
    sprite: int = 4
    min_sprites: int = 1
    max_sprites: int = 3
    amplitude: float = 2.0
    text_len: int = 16
    text_dim: int = 32
    block_frames: int = 3
    embed_seed: int = 0

    def __post_init__(self):
        if not 1 <= self.sprite < self.size:
            raise ValueError(f"sprite side {self.sprite} must be in [1, canvas size {self.size})")
        if (self.size - self.sprite) % 2:
            raise ValueError(f"canvas {self.size} minus sprite {self.sprite} must be even so the 3x3 start grid is on pixels")
        if not 1 <= self.min_sprites <= self.max_sprites <= len(COLOURS):
            raise ValueError(f"sprites per scene [{self.min_sprites}, {self.max_sprites}] must lie in [1, {len(COLOURS)}]")
        if self.max_sprites > len(STARTS):
            raise ValueError(f"max_sprites {self.max_sprites} > {len(STARTS)} distinct starting positions")
        if self.text_len < WORDS_PER_SPRITE * self.max_sprites:
            raise ValueError(f"text_len {self.text_len} cannot hold {self.max_sprites} phrases of {WORDS_PER_SPRITE} words")
        if self.text_dim < len(VOCAB) - 1 + self.max_sprites:
            raise ValueError(f"text_dim {self.text_dim} < {len(VOCAB) - 1} word codes + {self.max_sprites} sprite-slot codes")

    @property
    def channels(self) -> int:
        return 3

    @property
    def free(self) -> int:
        """Largest top-left coordinate: a sprite's corner moves in [0, free]."""
        return self.size - self.sprite


class Sprite(NamedTuple):
    colour: str
    start: str
    direction: str
    speed: str


Scene = tuple[Sprite, ...]  # in drawing order: later sprites cover earlier ones


# -- prompts ------------------------------------------------------------------------------------

def prompt_text(scene: Scene) -> str:
    """'red top-left south-east fast, blue centre west slow'."""
    return ", ".join(" ".join(s) for s in scene)


def parse_prompt(text: str, cfg: WorldConfig | None = None) -> Scene:
    """The inverse of `prompt_text`; errors name the unknown word and the words its slot accepts."""
    phrases = [p.split() for p in re.split(r"[,;]", text) if p.strip()]
    scene = []
    for i, words in enumerate(phrases):
        if len(words) != WORDS_PER_SPRITE:
            raise ValueError(f"sprite phrase {i} {' '.join(words)!r} has {len(words)} words; expected "
                             "'<colour> <start> <direction> <speed>'")
        for word, field in zip(words, FIELDS):
            if word not in field:
                raise ValueError(f"sprite phrase {i}: unknown word {word!r}; expected one of {sorted(field)}")
        scene.append(Sprite(*words))
    _check_scene(tuple(scene), cfg or WorldConfig())
    return tuple(scene)


def _check_scene(scene: Scene, cfg: WorldConfig) -> None:
    if not cfg.min_sprites <= len(scene) <= cfg.max_sprites:
        raise ValueError(f"scene has {len(scene)} sprites; this world holds {cfg.min_sprites}..{cfg.max_sprites}")
    colours = [s.colour for s in scene]
    if len(set(colours)) != len(colours):
        raise ValueError(f"sprite colours {colours} repeat; each sprite needs its own colour (the readout tells them apart by it)")


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """A random scene: distinct colours, distinct starting positions, any direction and speed."""
    n = int(rng.integers(cfg.min_sprites, cfg.max_sprites + 1))
    colours = rng.choice(len(COLOURS), n, replace=False)
    starts = rng.choice(len(STARTS), n, replace=False)
    dirs = rng.integers(0, len(DIRECTIONS), n)
    speeds = rng.integers(0, len(SPEEDS), n)
    names = [list(f) for f in FIELDS]
    return tuple(Sprite(names[0][c], names[1][s], names[2][d], names[3][v])
                 for c, s, d, v in zip(colours, starts, dirs, speeds))


def prompt_tokens(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """int32 [text_len] word ids, one phrase per sprite in drawing order, then PAD (0)."""
    _check_scene(scene, cfg)
    ids = [WORD_ID[w] for s in scene for w in s]
    return np.asarray(ids + [WORD_ID[PAD]] * (cfg.text_len - len(ids)), np.int32)


@functools.lru_cache(maxsize=8)
def _rotation(text_dim: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((text_dim, text_dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)  # a fixed orthogonal [text_dim, text_dim]


def prompt_embedding(prompt: Scene | np.ndarray, cfg: WorldConfig) -> np.ndarray:
    """The prompt as the DiT's text input: float32 [text_len, text_dim] (or [B, text_len, text_dim]
    for token ids [B, text_len]).

    Wan's cross-attention has no positions on text tokens, so each word's code carries its
    sprite slot: token i = sqrt(text_dim / 2) * R (onehot(word) + onehot(sprite i // 4)), R a fixed
    orthogonal rotation (dense like a real text encoder's output, information-equivalent to the
    one-hots). PAD tokens are exactly zero, as in Wan's padded umT5 embeddings.
    """
    tokens = prompt_tokens(prompt, cfg) if isinstance(prompt, tuple) else np.asarray(prompt)
    if tokens.shape[-1] != cfg.text_len:
        raise ValueError(f"prompt tokens have length {tokens.shape[-1]}; this world's text_len is {cfg.text_len}")
    words = len(VOCAB) - 1
    # [..., text_len, text_dim] one-hot word code (PAD -> none) + sprite-slot code
    code = np.zeros((*tokens.shape, cfg.text_dim), np.float32)
    np.put_along_axis(code, np.maximum(tokens - 1, 0)[..., None], 1.0, axis=-1)
    slot = np.minimum(np.arange(cfg.text_len) // WORDS_PER_SPRITE, cfg.max_sprites - 1)
    code[..., np.arange(cfg.text_len), words + slot] += 1.0
    code *= (tokens != WORD_ID[PAD])[..., None]
    return np.sqrt(cfg.text_dim / 2.0).astype(np.float32) * code @ _rotation(cfg.text_dim, cfg.embed_seed).T


# -- dynamics and rendering -----------------------------------------------------------------------

def _reflect(p, free: int):
    """Fold an unbounded coordinate into [0, free] (elastic bounces off both walls)."""
    if free == 0:
        return np.zeros_like(p)
    m = np.mod(p, 2 * free)
    return np.where(m <= free, m, 2 * free - m)


def positions(scene: Scene, num_frames: int, cfg: WorldConfig, start_frame: int = 0) -> np.ndarray:
    """int32 [F, S, 2] top-left (row, col) of every sprite at frames start_frame .. start_frame + F - 1."""
    half = cfg.free // 2
    p0 = np.asarray([STARTS[s.start] for s in scene], np.int64) * half  # [S, 2]
    v = np.asarray([DIRECTIONS[s.direction] for s in scene], np.int64) * np.asarray(
        [SPEEDS[s.speed] for s in scene], np.int64)[:, None]  # [S, 2]
    t = np.arange(start_frame, start_frame + num_frames, dtype=np.int64)[:, None, None]
    return _reflect(p0[None] + v[None] * t, cfg.free).astype(np.int32)


def colour_values(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """float32 [S, 3] the latent value of each sprite's pixels."""
    return cfg.amplitude * np.asarray([COLOURS[s.colour] for s in scene], np.float32)


def render(scene: Scene, num_frames: int, cfg: WorldConfig, start_frame: int = 0) -> np.ndarray:
    """Ground-truth latents float32 [F, size, size, 3]: sprites drawn in order over a 0 background."""
    pos = positions(scene, num_frames, cfg, start_frame)
    col = colour_values(scene, cfg)
    frames = np.zeros((num_frames, cfg.size, cfg.size, 3), np.float32)
    k = cfg.sprite
    for f in range(num_frames):
        for s in range(len(scene)):
            r, c = pos[f, s]
            frames[f, r:r + k, c:c + k] = col[s]
    return frames


def sample_batch(rng: np.random.Generator, cfg: WorldConfig, batch: int, num_frames: int):
    """A training batch: (latents float32 [B, F, size, size, 3], prompt embeddings [B, text_len, text_dim])."""
    scenes = [sample_scene(rng, cfg) for _ in range(batch)]
    frames = np.stack([render(s, num_frames, cfg) for s in scenes])
    text = np.stack([prompt_embedding(s, cfg) for s in scenes])
    return frames, text


# -- readout ------------------------------------------------------------------------------------

def read_positions(frames, scene: Scene, cfg: WorldConfig, min_visible: int | None = None) -> np.ndarray:
    """Each sprite's top-left (row, col) read back from (generated) latents: float [F, S, 2], NaN
    where fewer than min_visible pixels (default a quarter of the sprite) show its colour.

    Every pixel is assigned to the nearest of {background, the 6 palette colours}; the estimate is
    the sprite-sized window with the most pixels of the sprite's colour minus background pixels
    (another sprite's pixels are neutral: they may be covering it). Exact on renders unless the
    sprite is covered on two opposite sides.
    """
    frames = np.asarray(frames, np.float32)
    if frames.ndim != 4 or frames.shape[1:] != (cfg.size, cfg.size, cfg.channels):
        raise ValueError(f"frames must be [F, {cfg.size}, {cfg.size}, {cfg.channels}]; got {frames.shape}")
    k, n = cfg.sprite, cfg.free + 1
    min_visible = k * k // 4 if min_visible is None else min_visible
    palette = np.concatenate([np.zeros((1, 3), np.float32), cfg.amplitude * np.asarray(list(COLOURS.values()), np.float32)])
    # [F, H, W] index into palette of each pixel's nearest colour
    nearest = np.argmin(((frames[..., None, :] - palette) ** 2).sum(-1), axis=-1)
    names = list(COLOURS)
    out = np.full((frames.shape[0], len(scene), 2), np.nan)
    def windows(mask):
        # [F, H+1, W+1] summed-area table -> [F, n*n] pixel count of every k x k window
        sat = np.pad(mask.astype(np.int32).cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
        counts = sat[:, k:k + n, k:k + n] - sat[:, :n, k:k + n] - sat[:, k:k + n, :n] + sat[:, :n, :n]
        return counts.reshape(len(frames), -1)

    background = windows(nearest == 0)
    for s, sprite in enumerate(scene):
        hits = windows(nearest == 1 + names.index(sprite.colour))
        best = (hits - background).argmax(1)
        seen = hits.max(1) >= min_visible
        out[seen, s] = np.stack(np.unravel_index(best, (n, n)), -1)[seen]
    return out


def position_error(frames, scene: Scene, cfg: WorldConfig, start_frame: int = 0):
    """(error [F, S], valid [F, S]): Euclidean pixel distance between read-back and true corners.

    valid marks the sprites whose true position the readout recovers from the ground-truth render
    itself (so heavy occlusion does not count against a model); a sprite the readout cannot find
    in `frames` counts as an error of canvas size.
    """
    truth = positions(scene, len(frames), cfg, start_frame).astype(np.float64)
    valid = np.all(read_positions(render(scene, len(frames), cfg, start_frame), scene, cfg) == truth, axis=-1)
    err = np.linalg.norm(read_positions(frames, scene, cfg) - truth, axis=-1)
    return np.where(np.isnan(err), float(cfg.size), err), valid


def to_rgb(frames, cfg: WorldConfig) -> np.ndarray:
    """Latents [..., 3] -> uint8 RGB for viewing: background mid-grey, colours at full saturation."""
    x = np.clip(np.asarray(frames, np.float32) / (2 * cfg.amplitude) + 0.5, 0.0, 1.0)
    return (x * 255 + 0.5).astype(np.uint8)


def scenes_of(prompts: Sequence[str], cfg: WorldConfig) -> list[Scene]:
    return [parse_prompt(p, cfg) for p in prompts]
