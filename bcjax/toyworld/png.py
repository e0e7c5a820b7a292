"""PNG figures without a plotting library: a zlib PNG encoder, a line plot and an image grid in numpy.

Enough for a loss curve, frame strips and labelled video panels; labels use a built-in 3x5 pixel
font (digits, A-Z, '.', '-', '+', '%', ':', '/', and 'e' for exponents).
"""

from __future__ import annotations

import struct
import zlib

import numpy as np

_FONT = {  # 3x5 glyphs, rows top to bottom, 3 bits each (MSB = left column)
    "0": (7, 5, 5, 5, 7), "1": (2, 6, 2, 2, 7), "2": (7, 1, 7, 4, 7), "3": (7, 1, 7, 1, 7),
    "4": (5, 5, 7, 1, 1), "5": (7, 4, 7, 1, 7), "6": (7, 4, 7, 5, 7), "7": (7, 1, 1, 1, 1),
    "8": (7, 5, 7, 5, 7), "9": (7, 5, 7, 1, 7), ".": (0, 0, 0, 0, 2), "-": (0, 0, 7, 0, 0),
    "e": (0, 7, 7, 4, 7), " ": (0, 0, 0, 0, 0), "%": (5, 1, 2, 4, 5), "+": (0, 2, 7, 2, 0), ":": (0, 2, 0, 2, 0),
    "/": (1, 1, 2, 4, 4), "A": (2, 5, 7, 5, 5), "B": (6, 5, 6, 5, 6), "C": (3, 4, 4, 4, 3), "D": (6, 5, 5, 5, 6),
    "E": (7, 4, 6, 4, 7), "F": (7, 4, 6, 4, 4), "G": (3, 4, 5, 5, 3), "H": (5, 5, 7, 5, 5), "I": (7, 2, 2, 2, 7),
    "J": (1, 1, 1, 5, 2), "K": (5, 5, 6, 5, 5), "L": (4, 4, 4, 4, 7), "M": (5, 7, 7, 5, 5), "N": (6, 5, 5, 5, 5),
    "O": (2, 5, 5, 5, 2), "P": (6, 5, 6, 4, 4), "Q": (2, 5, 5, 6, 3), "R": (6, 5, 6, 5, 5), "S": (3, 4, 2, 1, 6),
    "T": (7, 2, 2, 2, 2), "U": (5, 5, 5, 5, 7), "V": (5, 5, 5, 5, 2), "W": (5, 5, 7, 7, 5), "X": (5, 5, 2, 5, 5),
    "Y": (5, 5, 2, 2, 2), "Z": (7, 1, 2, 4, 7),
}


def write_png(path: str, image) -> None:
    """Write uint8 [H, W, 3] (or [H, W]) as an 8-bit RGB (grey) PNG."""
    img = np.ascontiguousarray(np.asarray(image, np.uint8))
    if img.ndim == 2:
        img = img[..., None]
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"image must be [H, W] or [H, W, 3] uint8; got shape {img.shape}")
    h, w, c = img.shape
    raw = np.concatenate([np.zeros((h, 1), np.uint8), img.reshape(h, w * c)], axis=1)  # filter 0 per row

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", w, h, 8, 2 if c == 3 else 0, 0, 0, 0)
    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw.tobytes(), 9))
                + chunk(b"IEND", b""))


def read_png(path: str) -> np.ndarray:
    """Read back a PNG written by `write_png` (8-bit, filter 0 rows only): uint8 [H, W, C]."""
    with open(path, "rb") as f:
        data = f.read()
    pos, idat = 8, b""
    shape: tuple[int, int, int] | None = None
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos:pos + 4])
        tag, body = data[pos + 4:pos + 8], data[pos + 8:pos + 8 + n]
        if tag == b"IHDR":
            w, h, _, colour = struct.unpack(">IIBB", body[:10])
            shape = (h, w, 3 if colour == 2 else 1)
        elif tag == b"IDAT":
            idat += body
        pos += 12 + n
    if shape is None:
        raise ValueError(f"{path}: no IHDR chunk (not a PNG written by write_png)")
    h, w, c = shape
    rows = np.frombuffer(zlib.decompress(idat), np.uint8).reshape(h, 1 + w * c)
    return rows[:, 1:].reshape(h, w, c)


def draw_text(img: np.ndarray, text: str, row: int, col: int, colour=(0, 0, 0), scale: int = 1) -> None:
    """Stamp `text` (see _FONT) with its top-left at (row, col), in place; clipped at the edges."""
    for i, ch in enumerate(text):
        glyph = _FONT.get(ch, _FONT[" "])
        for r, bits in enumerate(glyph):
            for cc in range(3):
                if bits >> (2 - cc) & 1:
                    r0, c0 = row + r * scale, col + (4 * i + cc) * scale
                    img[max(r0, 0):max(r0 + scale, 0), max(c0, 0):max(c0 + scale, 0)] = colour


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    return f"{v:.0e}".replace("e-0", "e-").replace("e+0", "e") if (v < 1e-2 or v >= 1e4) else f"{v:.3g}"


def line_plot(series: dict[str, np.ndarray], *, height: int = 300, width: int = 600, log_y: bool = True,
              colours=((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)), text_scale: int = 2,
              legend: bool = False) -> np.ndarray:
    """uint8 [height, width, 3]: each series (y over its index) as a polyline on shared axes,
    y ticks labelled at the decades (log) or quartiles, x ticks at the ends; legend: the series
    names, upper-cased, in their colours, stacked in a column right of the plot."""
    if legend:
        names = [n.upper() for n in series]
        key_w = 4 * text_scale * max(len(n) for n in names) + 12
        plot = line_plot(series, height=height, width=width, log_y=log_y, colours=colours, text_scale=text_scale)
        img = np.full((height, width + key_w, 3), 255, np.uint8)
        img[:, :width] = plot
        for i, (name, colour) in enumerate(zip(names, colours, strict=False)):  # the palette may outnumber the series
            draw_text(img, name, 10 + i * 8 * text_scale, width + 6, colour=colour, scale=text_scale)
        return img
    img = np.full((height, width, 3), 255, np.uint8)
    left, right, top, bottom = 4 + 16 * text_scale, 10, 10, 8 + 6 * text_scale
    ph, pw = height - top - bottom, width - left - right
    ys = [np.asarray(v, np.float64) for v in series.values()]
    ys = [y[np.isfinite(y) & ((y > 0) if log_y else True)] for y in ys]
    allv = np.concatenate([y for y in ys if y.size] or [np.ones(1)])
    tf = np.log10 if log_y else (lambda a: a)
    lo, hi = tf(allv.min()), tf(allv.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    n = max(max((len(y) for y in ys), default=1), 2)

    def to_px(i, v):
        return top + (ph - 1) * (1 - (tf(v) - lo) / (hi - lo)), left + (pw - 1) * i / (n - 1)

    ticks = (10.0 ** np.arange(np.ceil(lo), np.floor(hi) + 1)) if log_y else np.linspace(lo, hi, 5)
    if log_y and len(ticks) < 2:
        ticks = 10.0 ** np.linspace(lo, hi, 3)
    for v in ticks:
        r = round(float(to_px(0, v)[0]))
        img[r, left:left + pw] = (225, 225, 225)
        draw_text(img, _fmt(float(v)), r - 2 * text_scale, 2, scale=text_scale)
    img[top:top + ph, left] = 0
    img[top + ph - 1, left:left + pw] = 0
    draw_text(img, "0", top + ph + 4, left - text_scale, scale=text_scale)
    label = str(n - 1)
    draw_text(img, label, top + ph + 4, left + pw - 4 * text_scale * len(label), scale=text_scale)
    for y, colour in zip(ys, colours, strict=False):  # the palette may outnumber the series
        if not y.size:
            continue
        r, c = to_px(np.arange(len(y)), y)
        # each segment sampled once per pixel it spans: a gap-free polyline
        pts = [(r[:1], c[:1])]
        for i in range(len(y) - 1):
            k = int(max(abs(r[i + 1] - r[i]), abs(c[i + 1] - c[i]))) + 2
            t = np.linspace(0.0, 1.0, k)[1:]
            pts.append((r[i] + t * (r[i + 1] - r[i]), c[i] + t * (c[i + 1] - c[i])))
        rr = np.rint(np.concatenate([p[0] for p in pts])).astype(int)
        cc = np.rint(np.concatenate([p[1] for p in pts])).astype(int)
        img[np.clip(rr, 0, height - 1), np.clip(cc, 0, width - 1)] = colour
    return img


def image_grid(rows, *, scale: int = 4, gap: int = 2, background=(255, 255, 255)) -> np.ndarray:
    """Tile rows of uint8 [H, W, 3] images (each row a list or [N, H, W, 3]) into one image,
    each pixel enlarged to scale x scale."""
    rows = [np.asarray(r) for r in rows]
    h, w = rows[0].shape[1:3]
    ncol = max(len(r) for r in rows)
    out = np.empty((len(rows) * (h * scale + gap) + gap, ncol * (w * scale + gap) + gap, 3), np.uint8)
    out[:] = background
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            big = np.repeat(np.repeat(im, scale, 0), scale, 1)
            y, x = gap + i * (h * scale + gap), gap + j * (w * scale + gap)
            out[y:y + h * scale, x:x + w * scale] = big
    return out
