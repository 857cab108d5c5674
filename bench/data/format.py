"""The shard format, shared by the writer, the reader and the built-in dataset (a leaf module). One sample = two
tar members sharing a key: <key>.png (PNG bytes, RGB, R x R) and <key>.cls (the integer label as ASCII text).
A shard set is a directory of `shard-000000.tar ...` plus `manifest.json` (docs/architecture.md, "The rooms")."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
MIN_RESOLUTION, MAX_RESOLUTION = 16, 512  # 512: BigGAN / BigGAN-deep 512 (models/biggan.py G_ARCH)
DEFAULT_NUM_SAMPLES = 10000
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")  # accepted image members when reading
MAKE_SHARDS_HINT = "create them with `bench data make-shards source=shapes out=DIR`"


class DataError(ValueError):
    """Bad data input. The message is one line: which input is wrong and how to fix it."""


def check_resolution(resolution: int, what: str, lo: int = MIN_RESOLUTION, hi: int = MAX_RESOLUTION) -> int:
    if not isinstance(resolution, (int, np.integer)) or not lo <= resolution <= hi:
        raise DataError(f"{what} resolution={resolution!r}: use an integer from {lo} to {hi}")
    return int(resolution)


def png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # ~2x faster than 6, ~10% larger
    return buf.getvalue()


def square_resize(img: Image.Image, res: int) -> Image.Image:
    """Centre crop to a square, then resize to res x res with antialiasing."""
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != res:
        img = img.resize((res, res), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img
