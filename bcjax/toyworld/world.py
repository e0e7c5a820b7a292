"""A procedural video world with known ground truth, whose frames are a block-causal DiT's latents.

A scene is a walled canvas (a one-pixel white rim) holding a few coloured square sprites, drawn in
prompt order (a later sprite covers an earlier one). The video is image-to-video: the first block
is the still image (every sprite at its start), and from the second block on each sprite moves
at the velocity its prompt phrase names, one step per block (by default), bouncing elastically
off the walls:

    "red south-east fast, blue west slow"      (colour, direction of 8, speed in pixels/frame)

So the video is a deterministic function of the prompt and the first block: a model continuing
the given first block can be scored frame by frame against `render(scene)`. The first block says
where, the prompt says how: the second block cannot be predicted without the prompt, and later
blocks (after bounces) not without the earlier frames.

Frames are channels-last `[F, H, W, 3]` float32 and go into the DiT as latents directly: background
0, a sprite's pixels `amplitude * (+-1, +-1, +-1)` (its colour's sign pattern), walls
`amplitude * (1, 1, 1)`. Positions are integers (top-left corner, (row, col)), so renders are
exact and the position readout recovers them exactly.

Why walls are drawn and positions come from an image, not from words: Wan's DiT has no absolute
positions (3D RoPE is relative, the patch embedding a convolution), so a tiny one cannot place a
sprite at "top-left" from noise; everything asked of it here is translation-equivariant (carry a
sprite along the prompt's velocity, bounce at a visible wall).
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Mapping, Sequence
from typing import NamedTuple

import numpy as np

# Colour words -> channel sign pattern (r, g, b); distinct, none the 0 background or the white wall.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (1, -1, -1), "green": (-1, 1, -1), "blue": (-1, -1, 1),
    "yellow": (1, 1, -1), "cyan": (-1, 1, 1), "magenta": (1, -1, 1),
}
WALL = (1, 1, 1)
# Direction words -> unit step (d_row, d_col); rows grow downwards.
DIRECTIONS: dict[str, tuple[int, int]] = {
    "north": (-1, 0), "north-east": (-1, 1), "east": (0, 1), "south-east": (1, 1),
    "south": (1, 0), "south-west": (1, -1), "west": (0, -1), "north-west": (-1, -1),
}
# Speed words -> pixels per world step along each moving axis. Even, so a sprite moves by whole
# (1, 2, 2) patches, bounces included (a reflection off a wall moves it by 2 hi - 2 p - v): every
# token of the next block is a copy of a token of the last one, which attention does exactly;
# odd pixel shifts would ask a tiny DiT to resample pixels inside patches.
SPEEDS: dict[str, int] = {"slow": 2, "fast": 4}

FIELDS: tuple[Mapping[str, object], ...] = (COLOURS, DIRECTIONS, SPEEDS)  # the order of the words in a sprite's phrase
WORDS_PER_SPRITE = len(FIELDS)


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    """Canvas, sprites and prompt encoding of the toy world.

    size: canvas height = width in pixels (= latent positions), walls included; sprite: sprite
    side; amplitude: channel magnitude of a drawn pixel; still_frames: frames the sprites rest
    before moving (the given first block); frames_per_step: frames that show one world step
    (3 = one step per block, the default: a tiny DiT cannot learn within a 20-minute CPU budget to
    place frame k of a block k steps ahead, since RoPE scores add over t/h/w and cannot couple a
    time offset with a proportional space offset in one attention hop; 1 = a step every frame);
    text_len x text_dim: the prompt embedding the DiT's cross-attention reads (one token per
    sprite phrase, zero-padded like Wan's umT5 embeddings); embed_seed: the fixed rotation that makes
    the word codes dense.
    """

    size: int = 12
    sprite: int = 3
    min_sprites: int = 1
    max_sprites: int = 2
    amplitude: float = 2.0
    still_frames: int = 3
    frames_per_step: int = 3
    text_len: int = 4
    text_dim: int = 32
    block_frames: int = 3
    embed_seed: int = 0

    def __post_init__(self):
        if not 1 <= self.sprite <= self.size - 3:
            raise ValueError(f"sprite side {self.sprite} must be in [1, canvas size {self.size} - 3] "
                             "(walls + room to move)")
        if self.frames_per_step < 1 or self.still_frames < 0:
            raise ValueError(f"frames_per_step {self.frames_per_step} must be >= 1 "
                             f"and still_frames {self.still_frames} >= 0")
        if not 1 <= self.min_sprites <= self.max_sprites <= len(COLOURS):
            raise ValueError(f"sprites per scene [{self.min_sprites}, {self.max_sprites}] "
                             f"must lie in [1, {len(COLOURS)}]")
        if self.text_len < self.max_sprites:
            raise ValueError(f"text_len {self.text_len} cannot hold {self.max_sprites} sprite phrases (one token each)")
        if self.text_dim < _code_dim(self):
            raise ValueError(f"text_dim {self.text_dim} < {_code_dim(self)} word and sprite-slot codes")

    @property
    def channels(self) -> int:
        return 3

    @property
    def lo(self) -> int:
        """Smallest top-left coordinate of a sprite (inside the wall)."""
        return 1

    @property
    def hi(self) -> int:
        """Largest top-left coordinate of a sprite."""
        return self.size - 1 - self.sprite


def _code_dim(cfg: WorldConfig) -> int:
    return sum(len(f) for f in FIELDS) + cfg.max_sprites


class Sprite(NamedTuple):
    colour: str
    direction: str
    speed: str
    row: int = 0  # start corner, from the first block (the image), not from the prompt
    col: int = 0


Scene = tuple[Sprite, ...]  # in drawing order: later sprites cover earlier ones


# -- prompts ------------------------------------------------------------------------------------

def prompt_text(scene: Scene) -> str:
    """'red south-east fast, blue west slow' (the start positions are the image's, not the prompt's)."""
    return ", ".join(f"{s.colour} {s.direction} {s.speed}" for s in scene)


def parse_prompt(text: str, cfg: WorldConfig | None = None, starts: Sequence[tuple[int, int]] | None = None) -> Scene:
    """The inverse of `prompt_text` (start corners from `starts`, default all at (lo, lo)); errors
    name the unknown word and the words its slot accepts."""
    cfg = cfg or WorldConfig()
    phrases = [p.split() for p in re.split(r"[,;]", text) if p.strip()]
    starts = list(starts) if starts is not None else [(cfg.lo, cfg.lo)] * len(phrases)
    if len(starts) != len(phrases):
        raise ValueError(f"{len(phrases)} sprite phrases but {len(starts)} start positions")
    scene = []
    for i, words in enumerate(phrases):
        if len(words) != WORDS_PER_SPRITE:
            raise ValueError(f"sprite phrase {i} {' '.join(words)!r} has {len(words)} words; expected "
                             "'<colour> <direction> <speed>'")
        for word, field in zip(words, FIELDS, strict=True):
            if word not in field:
                raise ValueError(f"sprite phrase {i}: unknown word {word!r}; expected one of {sorted(field)}")
        scene.append(Sprite(*words, *(int(v) for v in starts[i])))
    _check_scene(tuple(scene), cfg)
    return tuple(scene)


def check_switch(first: Scene, scene: Scene) -> None:
    """A switch keeps the stream's sprites (the image holds them, one phrase per sprite, in drawing
    order); each may take a new colour, direction and speed. ValueError naming the counts unless
    `scene` has as many sprite phrases as `first`. `bcjax stream` and `bcjax serve` share the rule."""
    if len(scene) != len(first):
        raise ValueError(f"this stream has {len(first)} sprite(s) (the image holds them); a switch to "
                         f"{len(scene)} sprite phrase(s) cannot be rendered: give one phrase per sprite "
                         "(a colour, direction and speed each), or start a new stream for other sprites")


def _check_scene(scene: Scene, cfg: WorldConfig) -> None:
    if not cfg.min_sprites <= len(scene) <= cfg.max_sprites:
        raise ValueError(f"scene has {len(scene)} sprites; this world holds {cfg.min_sprites}..{cfg.max_sprites}")
    colours = [s.colour for s in scene]
    if len(set(colours)) != len(colours):
        raise ValueError(f"sprite colours {colours} repeat; "
                         "each sprite needs its own colour (the readout tells them apart by it)")
    for s in scene:
        if not (cfg.lo <= s.row <= cfg.hi and cfg.lo <= s.col <= cfg.hi):
            raise ValueError(f"sprite {s.colour} starts at ({s.row}, {s.col}); "
                             f"corners must lie in [{cfg.lo}, {cfg.hi}]")


def sample_scene(rng: np.random.Generator, cfg: WorldConfig) -> Scene:
    """A random scene: distinct colours, any direction, speed and start inside the walls."""
    n = int(rng.integers(cfg.min_sprites, cfg.max_sprites + 1))
    colours = rng.choice(len(COLOURS), n, replace=False)
    dirs = rng.integers(0, len(DIRECTIONS), n)
    speeds = rng.integers(0, len(SPEEDS), n)
    corners = rng.integers(cfg.lo, cfg.hi + 1, (n, 2))
    names = [list(f) for f in FIELDS]
    return tuple(Sprite(names[0][c], names[1][d], names[2][v], int(r), int(q))
                 for c, d, v, (r, q) in zip(colours, dirs, speeds, corners, strict=True))


@functools.lru_cache(maxsize=8)
def _rotation(text_dim: int, seed: int) -> np.ndarray:
    q, r = np.linalg.qr(np.random.default_rng(seed).standard_normal((text_dim, text_dim)))
    return (q * np.sign(np.diag(r))).astype(np.float32)  # a fixed orthogonal [text_dim, text_dim]


def prompt_embedding(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """The prompt as the DiT's text input: float32 [text_len, text_dim].

    One token per sprite phrase (what a text encoder's contextual output gives a cross-attention
    to read in one hop): sqrt(text_dim / 4) * R (onehot(colour) + onehot(direction) + onehot(speed)
    + onehot(drawing slot)), R a fixed orthogonal rotation. Wan's cross-attention has no positions
    on text tokens, so the slot code carries the drawing order. Padding tokens are exactly zero,
    as in Wan's padded umT5 embeddings.
    """
    _check_scene(scene, cfg)
    code = np.zeros((cfg.text_len, cfg.text_dim), np.float32)
    for i, s in enumerate(scene):
        offset = 0
        for word, field in zip((s.colour, s.direction, s.speed), FIELDS, strict=True):
            code[i, offset + list(field).index(word)] = 1.0
            offset += len(field)
        code[i, offset + i] = 1.0
    return np.sqrt(cfg.text_dim / 4.0).astype(np.float32) * code @ _rotation(cfg.text_dim, cfg.embed_seed).T


# -- dynamics and rendering -----------------------------------------------------------------------

def _reflect(p, lo: int, hi: int):
    """Fold an unbounded coordinate into [lo, hi] (elastic bounces off both walls)."""
    free = hi - lo
    if free == 0:
        return np.full_like(p, lo)
    m = np.mod(p - lo, 2 * free)
    return lo + np.where(m <= free, m, 2 * free - m)


def positions(scene: Scene, num_frames: int, cfg: WorldConfig, start_frame: int = 0) -> np.ndarray:
    """int32 [F, S, 2] top-left (row, col) of every sprite at frames start_frame .. start_frame + F - 1."""
    p0 = np.asarray([(s.row, s.col) for s in scene], np.int64)  # [S, 2]
    v = np.asarray([DIRECTIONS[s.direction] for s in scene], np.int64) * np.asarray(
        [SPEEDS[s.speed] for s in scene], np.int64)[:, None]  # [S, 2]
    frames = np.arange(start_frame, start_frame + num_frames, dtype=np.int64)
    t = np.where(frames >= cfg.still_frames, (frames - cfg.still_frames) // cfg.frames_per_step + 1, 0)  # world steps
    return _reflect(p0[None] + v[None] * t[:, None, None], cfg.lo, cfg.hi).astype(np.int32)


def colour_values(scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """float32 [S, 3] the latent value of each sprite's pixels."""
    return cfg.amplitude * np.asarray([COLOURS[s.colour] for s in scene], np.float32)


def draw(corners, scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """Latents float32 [F, size, size, 3] of the scene's sprites at the given top-left corners (int
    [F, S, 2]): walls, then sprites in order, over a 0 background."""
    corners = np.asarray(corners)
    col = colour_values(scene, cfg)
    frames = np.zeros((len(corners), cfg.size, cfg.size, 3), np.float32)
    wall = cfg.amplitude * np.asarray(WALL, np.float32)
    frames[:, [0, -1], :] = wall
    frames[:, :, [0, -1]] = wall
    k = cfg.sprite
    for f in range(len(corners)):
        for s in range(len(scene)):
            r, c = corners[f, s]
            frames[f, r:r + k, c:c + k] = col[s]
    return frames


def render(scene: Scene, num_frames: int, cfg: WorldConfig, start_frame: int = 0) -> np.ndarray:
    """Ground-truth latents float32 [F, size, size, 3]: the scene drawn at its true positions."""
    return draw(positions(scene, num_frames, cfg, start_frame), scene, cfg)


Segments = Sequence[tuple[int, Scene]]  # a switched stream: [(first block, scene in force)], the first at 0


def switch_positions(segments: Segments, num_frames: int, cfg: WorldConfig) -> np.ndarray:
    """int32 [F, S, 2] corners of a switched stream's sprites at frames 0..F-1.

    segments [(first block, scene)] sorted, the first at block 0 (its corners are the image's);
    a later scene's corners are ignored: from its first block on every sprite moves from where it
    was on the last frame before the switch, at the new scene's velocity, world step 1 on the
    switch block's frames (the world steps once per block: frames_per_step == block_frames)."""
    _check_segments(segments, cfg)
    out = np.zeros((num_frames, len(segments[0][1]), 2), np.int32)
    bf = cfg.block_frames
    for k, (block, scene) in enumerate(segments):
        cut = block * bf
        end = segments[k + 1][0] * bf if k + 1 < len(segments) else num_frames
        if cut >= num_frames:
            break
        n = min(end, num_frames) - cut
        if k == 0:
            out[cut:cut + n] = positions(scene, n, cfg, cut)
        else:
            here = tuple(s._replace(row=int(r), col=int(c)) for s, (r, c) in zip(scene, out[cut - 1], strict=True))
            out[cut:cut + n] = positions(here, n, cfg, cfg.still_frames)
    return out


def scene_of_frames(segments: Segments, num_frames: int, cfg: WorldConfig) -> list[tuple[int, int, Scene]]:
    """[(first frame, end frame, scene)] of a switched stream's frames 0..F-1."""
    bf, out = cfg.block_frames, []
    for k, (block, scene) in enumerate(segments):
        end = segments[k + 1][0] * bf if k + 1 < len(segments) else num_frames
        if block * bf < num_frames:
            out.append((block * bf, min(end, num_frames), scene))
    return out


def render_stream(segments: Segments, num_frames: int, cfg: WorldConfig) -> np.ndarray:
    """Ground truth float32 [F, size, size, 3] of a switched stream: each segment's sprites in its
    colours at `switch_positions` (without switches, `render` of the one scene)."""
    corners = switch_positions(segments, num_frames, cfg)
    return np.concatenate([draw(corners[a:b], scene, cfg) for a, b, scene in scene_of_frames(segments, num_frames,
                                                                                              cfg)])


def _check_segments(segments: Segments, cfg: WorldConfig) -> None:
    if not segments or segments[0][0] != 0:
        raise ValueError(f"a switched stream's first scene must start at block 0; got {[b for b, _ in segments]}")
    blocks = [b for b, _ in segments]
    if blocks != sorted(set(blocks)):
        raise ValueError(f"switch blocks {blocks} must increase")
    for _, scene in segments[1:]:
        check_switch(segments[0][1], scene)
    if segments[1:] and (cfg.frames_per_step != cfg.block_frames or cfg.still_frames != cfg.block_frames):
        raise ValueError(f"switches need the world to step once per block (frames_per_step {cfg.frames_per_step} "
                         f"and still_frames {cfg.still_frames} == block_frames {cfg.block_frames})")


def switch_scene(rng: np.random.Generator, scene: Scene, at_block: int, cfg: WorldConfig,
                 before: Segments | None = None) -> Scene:
    """A switch at `at_block` that always shows: every sprite takes another colour (distinct among
    them) and a direction whose first step from where the sprite is differs from where the old
    prompt would have taken it, at a random speed. `before`: the stream's segments so far
    (default [(0, scene)]). Corners: where the sprites are when the switch comes."""
    before = list(before or [(0, scene)])
    bf = cfg.block_frames
    here = switch_positions(before, at_block * bf + 1, cfg)  # [.., S, 2]: last frame before, and the old next
    last, old_next = here[-2], here[-1]
    colours = rng.permutation([c for c in COLOURS if c not in {s.colour for s in scene}] +
                              [s.colour for s in scene])
    out: list[Sprite] = []
    for i, s in enumerate(scene):
        new_colour = next(c for c in colours if c != s.colour and c not in {o.colour for o in out})
        dirs = list(rng.permutation(list(DIRECTIONS)))
        speed = str(rng.choice(list(SPEEDS)))
        for d in dirs:
            moved = positions((Sprite(new_colour, d, speed, int(last[i][0]), int(last[i][1])),), 1, cfg,
                              cfg.still_frames)[0, 0]
            if tuple(moved) != tuple(old_next[i]) and tuple(moved) != tuple(last[i]):
                break
        out.append(Sprite(str(new_colour), str(d), speed, int(last[i][0]), int(last[i][1])))
    return tuple(out)


def sample_batch(rng: np.random.Generator, cfg: WorldConfig, batch: int, num_frames: int, max_start_block: int = 0):
    """A training batch: (latents float32 [B, F, size, size, 3], prompt embeddings [B, text_len, text_dim]).

    Each clip starts at a random block in [0, max_start_block] of its video (0: the still first
    block), so clips cover both the image-to-video start and a stream's later, bouncing blocks.
    """
    scenes = [sample_scene(rng, cfg) for _ in range(batch)]
    starts = rng.integers(0, max_start_block + 1, batch) * cfg.block_frames
    frames = np.stack([render(s, num_frames, cfg, int(t)) for s, t in zip(scenes, starts, strict=True)])
    text = np.stack([prompt_embedding(s, cfg) for s in scenes])
    return frames, text


# -- readout ------------------------------------------------------------------------------------

def nearest_colours(frames, cfg: WorldConfig) -> np.ndarray:
    """int [F, H, W]: each pixel's nearest palette entry (0 background, 1..6 the COLOURS in order,
    7 the wall)."""
    frames = np.asarray(frames, np.float32)
    if frames.ndim != 4 or frames.shape[1:] != (cfg.size, cfg.size, cfg.channels):
        raise ValueError(f"frames must be [F, {cfg.size}, {cfg.size}, {cfg.channels}]; got {frames.shape}")
    palette = cfg.amplitude * np.asarray([(0, 0, 0), *COLOURS.values(), WALL], np.float32)
    return np.argmin(((frames[..., None, :] - palette) ** 2).sum(-1), axis=-1)


def colour_correct(frames, scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """bool [F, S]: the sprite shows in its own colour -- the readout finds it (`read_positions`)
    and at least half of the pixels of the sprite-sized box there are nearest to its colour.
    A sprite painted in another colour, smeared into blotches or lost is wrong."""
    pos = read_positions(frames, scene, cfg)
    nearest = nearest_colours(frames, cfg)
    k, names = cfg.sprite, list(COLOURS)
    out = np.zeros(pos.shape[:2], bool)
    for f, s in zip(*np.nonzero(np.isfinite(pos).all(-1)), strict=True):
        r, c = pos[f, s].astype(int)
        out[f, s] = (nearest[f, r:r + k, c:c + k] == 1 + names.index(scene[s].colour)).sum() * 2 >= k * k
    return out


def crisp_frames(frames, scene: Scene, cfg: WorldConfig) -> np.ndarray:
    """bool [F]: the frame is a clean render -- every channel of every pixel within amplitude / 2
    of the world drawn with its sprites at their read-back corners (right or wrong). A sprite
    smeared over two hypotheses (half-amplitude pixels), a blotch, a ghost, or a lost sprite fails.
    Position accuracy is `position_error`'s; this is what the eye calls sharp."""
    frames = np.asarray(frames, np.float32)
    pos = read_positions(frames, scene, cfg)
    found = np.isfinite(pos).all((1, 2))
    out = np.zeros(len(frames), bool)
    ref = draw(pos[found].astype(np.int64), scene, cfg)
    out[found] = np.abs(frames[found] - ref).max((1, 2, 3)) < cfg.amplitude / 2
    return out


def read_positions(frames, scene: Scene, cfg: WorldConfig, min_visible: int | None = None) -> np.ndarray:
    """Each sprite's top-left (row, col) read back from (generated) latents: float [F, S, 2], NaN
    where fewer than min_visible pixels (default a quarter of the sprite) show its colour.

    Every pixel is assigned to the nearest of {background, the 6 colours, wall}; the estimate is
    the sprite-sized box with the most pixels of the sprite's colour minus background pixels
    (another sprite's pixels are neutral: they may be covering it). Exact on renders unless the
    sprite is covered on two opposite sides.
    """
    k, n = cfg.sprite, cfg.size - cfg.sprite + 1  # n x n candidate corners, walls included
    min_visible = k * k // 4 if min_visible is None else min_visible
    nearest = nearest_colours(frames, cfg)
    names = list(COLOURS)
    out = np.full((nearest.shape[0], len(scene), 2), np.nan)
    def boxes(pixels):
        # [F, H+1, W+1] summed-area table -> [F, n*n] pixel count of every k x k box
        sat = np.pad(pixels.astype(np.int32).cumsum(1).cumsum(2), ((0, 0), (1, 0), (1, 0)))
        counts = sat[:, k:k + n, k:k + n] - sat[:, :n, k:k + n] - sat[:, k:k + n, :n] + sat[:, :n, :n]
        return counts.reshape(len(nearest), -1)

    background = boxes(nearest == 0)
    for s, sprite in enumerate(scene):
        hits = boxes(nearest == 1 + names.index(sprite.colour))
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
