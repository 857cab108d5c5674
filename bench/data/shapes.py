"""The built-in procedural dataset "shapes": one shape per image, and the class is the shape alone; colour,
size, position, rotation, shading, background and noise are drawn independently of it. Deterministic in (seed,
index): `shapes_sample`. SHAPES_VERSION names the generator in the built-in cache directory, so a changed
generator never reuses shards or classifiers cached by an older one (docs/architecture.md, "The rooms")."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from bench.data.format import MAX_RESOLUTION, MIN_RESOLUTION, DataError, png_bytes

# 1: one colour per class (red_circle, green_square, ...); 2: the class is the shape only, anywhere in the image at
# any rotation; 3: the class is the shape only, near the centre and near upright (v2 was too hard for the main job to
# learn in minutes on a CPU: class accuracy 0.10 at step 300).
SHAPES_VERSION = 3

# The classes, in label order: outlines that stay distinct under rotation at 16-32 px.
SHAPES_CLASSES: list[str] = ["circle", "square", "triangle", "star", "cross",
                             "ring", "crescent", "heart", "arrow", "bowtie"]

# Heart outline (classic parametric curve), centred and scaled to unit circumradius.
_t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
_hx = 16.0 * np.sin(_t) ** 3
_hy = -(13.0 * np.cos(_t) - 5.0 * np.cos(2 * _t) - 2.0 * np.cos(3 * _t) - np.cos(4 * _t))
_hx, _hy = _hx - (_hx.max() + _hx.min()) / 2, _hy - (_hy.max() + _hy.min()) / 2
_HEART = np.stack([_hx, _hy], 1) / np.sqrt(_hx**2 + _hy**2).max()
_w = 0.3  # half-width of the cross's arms, relative to its reach
_CROSS = np.array([(_w, 1), (_w, _w), (1, _w), (1, -_w), (_w, -_w), (_w, -1), (-_w, -1),
                   (-_w, -_w), (-1, -_w), (-1, _w), (-_w, _w), (-_w, 1)], dtype=np.float64)
_ARROW = np.array([(-0.95, -0.3), (0.05, -0.3), (0.05, -0.75), (1.0, 0.0), (0.05, 0.75), (0.05, 0.3), (-0.95, 0.3)])
_BOWTIE = np.array([(-0.8, -0.8), (0.0, -0.15), (0.8, -0.8), (0.8, 0.8), (0.0, 0.15), (-0.8, 0.8)])
del _t, _hx, _hy, _w


def _regular(n: int, radius: float, inner: float | None = None) -> np.ndarray:
    """Vertices of a regular n-gon (or an n-pointed star with inner radius ratio `inner`)."""
    if inner is None:
        ang = np.arange(n) * 2 * np.pi / n - np.pi / 2
        return radius * np.stack([np.cos(ang), np.sin(ang)], 1)
    ang = np.arange(2 * n) * np.pi / n - np.pi / 2
    rad = np.where(np.arange(2 * n) % 2 == 0, radius, radius * inner)
    return np.stack([rad * np.cos(ang), rad * np.sin(ang)], 1)


def _draw_mask(kind: str, size: int, cx: float, cy: float, r: float, theta: float) -> Image.Image:
    """Mask ('L', size x size, 0 or 255) of one shape of scale r (reach about r) centred at (cx, cy),
    rotated by theta."""
    mask = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    c, s = math.cos(theta), math.sin(theta)

    def poly(points: np.ndarray) -> None:
        x = cx + points[:, 0] * c - points[:, 1] * s
        y = cy + points[:, 0] * s + points[:, 1] * c
        draw.polygon(list(zip(x.tolist(), y.tolist())), fill=255)

    def disc(x: float, y: float, radius: float, fill: int) -> None:
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=fill)

    if kind == "circle":
        disc(cx, cy, 0.85 * r, 255)
    elif kind == "square":
        poly(_regular(4, r))
    elif kind == "triangle":
        poly(_regular(3, 1.05 * r))
    elif kind == "star":
        poly(_regular(5, 1.05 * r, inner=0.45))
    elif kind == "cross":
        poly(_CROSS * r)
    elif kind == "ring":
        disc(cx, cy, 0.95 * r, 255)
        disc(cx, cy, 0.55 * r, 0)
    elif kind == "crescent":
        disc(cx, cy, 0.95 * r, 255)
        disc(cx + 0.5 * r * c, cy + 0.5 * r * s, 0.78 * r, 0)
    elif kind == "heart":
        poly(_HEART * r)
    elif kind == "arrow":
        poly(_ARROW * r)
    elif kind == "bowtie":
        poly(_BOWTIE * r)
    else:  # pragma: no cover - SHAPES_CLASSES is fixed
        raise AssertionError(kind)
    return mask


def _unit_geometry(kind: str, size: int = 400) -> tuple[float, float]:
    """(area, reach) of a shape drawn at r = 1: its area in units of r^2 and the largest distance of
    its pixels from the centre in units of r (the largest over rotations, measured on a fine raster)."""
    r = 0.45 * size / 1.1
    centre = size / 2
    m = np.asarray(_draw_mask(kind, size, centre, centre, r, 0.0)) > 127
    yy, xx = np.nonzero(m)
    reach = float(np.sqrt((xx + 0.5 - centre) ** 2 + (yy + 0.5 - centre) ** 2).max()) / r
    return float(m.sum()) / r**2, reach


# Per class: (area at r = 1, reach at r = 1); shapes_sample scales each class to the same drawn area.
_GEOMETRY: dict[str, tuple[float, float]] = {k: _unit_geometry(k) for k in SHAPES_CLASSES}
_MAX_REACH = max(reach / math.sqrt(area) for area, reach in _GEOMETRY.values())  # reach at area 1
AREA_RANGE = (0.10, 0.20)  # drawn area as a fraction of the image, uniform (the same for every class)
_BORDER = 0.02            # the shape keeps at least this fraction of the side from the image edge
SHIFT = 0.08              # the centre is within this fraction of the side from the image's centre (uniform square)
TILT = math.radians(20)   # rotation, uniform in [-TILT, TILT] (the same for every class)


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _colour(rng: np.random.Generator) -> np.ndarray:
    """One colour in [0,1]^3: uniform hue, saturation in [0, 1] (more often saturated), value in [0.05, 1]."""
    h, s, v = rng.random(), math.sqrt(rng.random()), rng.uniform(0.05, 1.0)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


_MIN_GAP = 0.3  # luminance gap between the two colours of an image (keeps the outline visible)


def _colour_pair(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(shape colour, background colour): two draws of `_colour` at least _MIN_GAP apart in luminance,
    in random order, so the shape's colour and the background's have the same distribution."""
    a = _colour(rng)
    for _ in range(64):
        b = _colour(rng)
        if abs(_luma(a) - _luma(b)) >= _MIN_GAP:
            break
    else:  # rare: a's luminance is mid-range and no draw was far enough; take black or white
        b = np.full(3, 0.0 if _luma(a) >= 0.5 else 1.0, dtype=np.float32)
    return (a, b) if rng.random() < 0.5 else (b, a)


def shapes_sample(index: int, seed: int, resolution: int) -> tuple[np.ndarray, int]:
    """One image of the built-in dataset: (uint8 array (R, R, 3), label = index % n_classes).

    Deterministic in (seed, index). The label only decides the outline. Everything else is random and
    drawn the same way for every class: the drawn area (AREA_RANGE of the image, each class scaled to
    it), position (within SHIFT of the centre), rotation (within TILT of upright), the two colours (see
    `_colour_pair`), a gentle shading of the shape, a second background colour near the first for a
    gradient (half the images), and pixel noise. The shape is drawn at 2x-4x and box-downsampled
    (antialiased).
    """
    if not isinstance(resolution, (int, np.integer)) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise DataError(f"shapes: resolution={resolution!r} is unsupported; "
                        f"use an integer from {MIN_RESOLUTION} to {MAX_RESOLUTION} (e.g. 32, 64, 128)")
    if index < 0 or seed < 0:
        raise DataError(f"shapes: index={index} and seed={seed} must both be >= 0")
    res = int(resolution)
    label = int(index) % len(SHAPES_CLASSES)
    kind = SHAPES_CLASSES[label]
    rng = np.random.default_rng([int(seed), int(index), 0x5EED, SHAPES_VERSION])

    # Geometry: the area fixes the scale of this class; the position range is the same for all classes.
    ss = max(2, min(4, 512 // res))
    size = res * ss
    area = rng.uniform(*AREA_RANGE) * size * size
    unit_area, _ = _GEOMETRY[kind]
    r = math.sqrt(area / unit_area)
    margin = _MAX_REACH * math.sqrt(area) + _BORDER * size
    shift = max(0.0, min(SHIFT * size, size / 2 - margin))  # the largest shape at the largest area still fits
    cx, cy = size / 2 + rng.uniform(-shift, shift, size=2)
    theta = rng.uniform(-TILT, TILT)
    mask = np.asarray(_draw_mask(kind, size, cx, cy, r, theta).reduce(ss), dtype=np.float32)
    mask = (mask * (1.0 / 255.0))[:, :, None]

    # Colours: shape and background from one distribution; shading and gradient are zero-mean.
    fg_colour, bg_colour = _colour_pair(rng)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / max(res - 1, 1) - 0.5
    phi = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (xx * np.float32(math.cos(phi)) + yy * np.float32(math.sin(phi)))[:, :, None]  # [-0.71, 0.71]
    fg = fg_colour[None, None, :] * (1.0 + np.float32(rng.uniform(0.0, 0.2)) * ramp)
    if rng.random() < 0.5:
        delta = rng.normal(0.0, 0.06, 3).astype(np.float32)
        psi = rng.uniform(0.0, 2.0 * np.pi)
        t = (xx * np.float32(math.cos(psi) / 1.42) + yy * np.float32(math.sin(psi) / 1.42))[:, :, None]
        bg = bg_colour + delta * t  # t in [-0.5, 0.5]
    else:
        bg = np.broadcast_to(bg_colour, (res, res, 3))

    img = bg * (1.0 - mask) + fg * mask  # float32 (res, res, 3), about [0, 1]
    noise = rng.standard_normal(size=(res, res, 3), dtype=np.float32)
    img += noise * np.float32(rng.uniform(0.005, 0.03))
    img *= 255.0
    img += 0.5
    return np.clip(img, 0, 255, out=img).astype(np.uint8), label


def shapes_item(args: tuple[int, int, int]) -> tuple[bytes, int, str | None]:
    """(index, seed, resolution) -> (PNG bytes, label, note): one job of the shard writer."""
    index, seed, res = args
    arr, label = shapes_sample(index, seed, res)
    return png_bytes(arr), label, None
