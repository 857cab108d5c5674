"""The built-in procedural dataset "shapes": one coloured shape per image, one class per shape/colour
pair. Deterministic in (seed, index); see `shapes_sample`."""

from __future__ import annotations

import colorsys
import math

import numpy as np
from PIL import Image, ImageDraw

from bench.data.format import MAX_RESOLUTION, MIN_RESOLUTION, DataError, png_bytes


# (class name, shape kind, RGB). Every class differs from every other in shape AND colour.
_SHAPES: list[tuple[str, str, tuple[int, int, int]]] = [
    ("red_circle", "circle", (220, 30, 30)),
    ("green_square", "square", (30, 170, 50)),
    ("blue_triangle", "triangle", (40, 80, 235)),
    ("yellow_star", "star", (245, 215, 30)),
    ("magenta_hexagon", "hexagon", (215, 40, 200)),
    ("cyan_cross", "cross", (30, 215, 225)),
    ("orange_ring", "ring", (250, 135, 20)),
    ("purple_pentagon", "pentagon", (125, 50, 190)),
    ("white_crescent", "crescent", (245, 245, 245)),
    ("brown_heart", "heart", (140, 80, 35)),
]
SHAPES_CLASSES: list[str] = [name for name, _, _ in _SHAPES]

# Heart outline (classic parametric curve), centred and scaled to unit circumradius.
_t = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
_hx = 16.0 * np.sin(_t) ** 3
_hy = -(13.0 * np.cos(_t) - 5.0 * np.cos(2 * _t) - 2.0 * np.cos(3 * _t) - np.cos(4 * _t))
_hx, _hy = _hx - (_hx.max() + _hx.min()) / 2, _hy - (_hy.max() + _hy.min()) / 2
_HEART = np.stack([_hx, _hy], 1) / np.sqrt(_hx**2 + _hy**2).max()
_w = 0.34  # half-width of the cross's arms, relative to its reach
_CROSS = np.array([(_w, 1), (_w, _w), (1, _w), (1, -_w), (_w, -_w), (_w, -1), (-_w, -1),
                   (-_w, -_w), (-1, -_w), (-1, _w), (-_w, _w), (-_w, 1)], dtype=np.float64)
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
    """Binary mask ('L', size x size) of one shape with circumradius ~r, rotated by theta."""
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
    elif kind == "hexagon":
        poly(_regular(6, 0.95 * r))
    elif kind == "pentagon":
        poly(_regular(5, r))
    elif kind == "cross":
        poly(_CROSS * r)
    elif kind == "ring":
        disc(cx, cy, 0.92 * r, 255)
        disc(cx, cy, 0.5 * r, 0)
    elif kind == "crescent":
        disc(cx, cy, 0.92 * r, 255)
        disc(cx + 0.45 * r * c, cy + 0.45 * r * s, 0.8 * r, 0)
    elif kind == "heart":
        poly(_HEART * r)
    else:  # pragma: no cover - _SHAPES is fixed
        raise AssertionError(kind)
    return mask


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]))


def _tint(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
    """A weakly saturated colour in [0,1]^3 with HSV value in [lo, hi]."""
    h, s, v = rng.random(), rng.uniform(0.0, 0.35), rng.uniform(lo, hi)
    return np.array(colorsys.hsv_to_rgb(h, s, v), dtype=np.float32)


def shapes_sample(index: int, seed: int, resolution: int) -> tuple[np.ndarray, int]:
    """One image of the built-in dataset: (uint8 array (R, R, 3), label = index % n_classes).

    Deterministic in (seed, index). Position, size, rotation, colour jitter, shading and background
    (dark or light tint, optionally a gradient, plus noise) are random, but the background always
    keeps a luminance gap to the shape so the class stays recognisable. The shape is drawn at 2x or
    4x and box-downsampled (antialiased).
    """
    if not isinstance(resolution, (int, np.integer)) or not MIN_RESOLUTION <= resolution <= MAX_RESOLUTION:
        raise DataError(f"shapes: resolution={resolution!r} is unsupported; "
                        f"use an integer from {MIN_RESOLUTION} to {MAX_RESOLUTION} (e.g. 32, 64, 128)")
    if index < 0 or seed < 0:
        raise DataError(f"shapes: index={index} and seed={seed} must both be >= 0")
    res = int(resolution)
    label = int(index) % len(_SHAPES)
    _, kind, rgb = _SHAPES[label]
    rng = np.random.default_rng([int(seed), int(index), 0x5EED])

    # Shape mask, supersampled then area-averaged.
    ss = max(2, min(4, 512 // res))
    size = res * ss
    r = rng.uniform(0.2, 0.38) * size
    cx, cy = rng.uniform(1.05 * r, size - 1.05 * r, size=2)
    theta = rng.uniform(0.0, 2.0 * np.pi)
    mask = np.asarray(_draw_mask(kind, size, cx, cy, r, theta).reduce(ss), dtype=np.float32)
    mask = (mask * (1.0 / 255.0))[:, :, None]

    # Shape colour: jitter plus a gentle linear shading across the image.
    colour = np.clip(np.array(rgb) / 255.0 + rng.normal(0.0, 0.04, 3), 0.0, 1.0).astype(np.float32)
    lum = _luma(colour)
    yy, xx = np.mgrid[0:res, 0:res].astype(np.float32) / max(res - 1, 1) - 0.5
    phi = rng.uniform(0.0, 2.0 * np.pi)
    ramp = (xx * np.float32(math.cos(phi)) + yy * np.float32(math.sin(phi)))[:, :, None]  # [-0.71, 0.71]
    shade = 1.0 + np.float32(rng.uniform(0.0, 0.25)) * ramp
    fg = np.minimum(colour[None, None, :] * shade, 1.0)

    # Background: dark or light, at least ~0.25 luminance away from the shape.
    modes = []
    if lum - 0.25 >= 0.08:
        modes.append((0.03, min(0.3, lum - 0.25)))
    if lum + 0.25 <= 0.92:
        modes.append((max(0.7, lum + 0.25), 0.97))
    lo, hi = modes[int(rng.integers(len(modes)))]
    c0 = _tint(rng, lo, hi)
    if rng.random() < 0.5:
        c1 = _tint(rng, lo, hi)
        psi = rng.uniform(0.0, 2.0 * np.pi)
        t = (xx * np.float32(math.cos(psi) / 1.42) + yy * np.float32(math.sin(psi) / 1.42))[:, :, None] + 0.5
        bg = c0 * (1.0 - t) + c1 * t
    else:
        bg = np.broadcast_to(c0, (res, res, 3))

    img = bg * (1.0 - mask) + fg * mask  # float32 (res, res, 3) in [0, 1]
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
