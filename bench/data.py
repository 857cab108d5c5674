"""Data for gan-bench: shard writing and the WebDataset read pipeline.

Two halves, one file:

* **Writing.** `make_shards` turns either the built-in procedural dataset ("shapes": one coloured
  shape per image, one class per shape/colour pair) or an ImageFolder tree into WebDataset tar
  shards `shard-000000.tar ...` plus a `manifest.json`. A shard set is written into a temporary
  directory beside its destination and renamed into place, so a killed job never leaves a shard
  set that looks complete. `default_shards` keeps the built-in dataset in a cache directory.

* **Reading.** `ShardLoader` is an iterable of `(x, y)` batches: x float32 (B, 3, R, R) in [-1, 1],
  y int64 (B,). Shards are split explicitly by rank, then by DataLoader worker, so ranks never
  read the same shard; decoding and batching run in the workers. Corrupt samples are skipped and
  counted in `ShardLoader.skipped`, never raised and never silently dropped.

Shard format (one sample = two tar members sharing a key):
    <key>.png   PNG bytes, RGB, R x R
    <key>.cls   the integer label as ASCII text
"""

from __future__ import annotations

import colorsys
import datetime as _dt
import glob as _glob
import io
import json
import math
import os
import random
import shutil
import socket
import sys
import tarfile
import time
import uuid
import warnings
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps

__all__ = [
    "DataError",
    "SHAPES_CLASSES",
    "shapes_sample",
    "make_shards",
    "load_manifest",
    "resolve_shards",
    "configured_shards",
    "default_shards",
    "ShardLoader",
]

MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:06d}.tar"
MIN_RESOLUTION, MAX_RESOLUTION = 16, 256
DEFAULT_NUM_SAMPLES = 10000
IMAGE_KEYS = ("png", "jpg", "jpeg", "webp")  # accepted image members when reading
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")
MAKE_SHARDS_HINT = "create them with `bench data make-shards source=shapes out=DIR`"


class DataError(ValueError):
    """Bad data input. The message is one line: which input is wrong and how to fix it."""


# ---------------------------------------------------------------------------------------------
# Built-in procedural dataset: "shapes"
# ---------------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------------
# Shard specs and manifests
# ---------------------------------------------------------------------------------------------

def _is_remote(spec: str) -> bool:
    return "://" in spec or spec.startswith("pipe:")


def _spec_dir(spec: str) -> Path:
    """The directory part of a directory / file / pattern spec (before any brace or glob char)."""
    cut = min([i for i in (spec.find(ch) for ch in "{*?[") if i >= 0], default=len(spec))
    head = spec[:cut]
    if cut == len(spec) and os.path.isdir(spec):
        return Path(spec)
    return Path(os.path.dirname(head) or ".")


def load_manifest(shards_spec: str | os.PathLike) -> dict | None:
    """manifest.json of a shard directory (or of the directory a pattern/file points into), else None."""
    spec = os.path.expanduser(str(shards_spec))
    if not spec or _is_remote(spec):
        return None
    path = Path(spec)
    if path.name == MANIFEST and path.is_file():
        mpath = path
    else:
        mpath = _spec_dir(spec) / MANIFEST
    if not mpath.is_file():
        return None
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise DataError(f"data.shards={str(shards_spec)!r}: cannot read {mpath} ({exc}); delete the "
                        f"shard directory and write it again with `bench data make-shards`") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
        raise DataError(f"data.shards={str(shards_spec)!r}: {mpath} has no 'shards' list; "
                        f"delete the shard directory and write it again with `bench data make-shards`")
    return manifest


def _no_shards(spec: str, why: str) -> DataError:
    return DataError(
        f"data.shards={spec!r}: {why} (expected a directory with {MANIFEST} or *.tar files, a brace pattern "
        f"like /d/shard-{{000000..000009}}.tar, or a glob like /d/*.tar); {MAKE_SHARDS_HINT}")


def resolve_shards(shards_spec: str | os.PathLike | Iterable[str]) -> tuple[list[str], dict | None]:
    """Expand a shard spec into a list of shard paths (and its manifest, when there is one).

    spec: a directory (with manifest.json: its shards; without: every *.tar in it, sorted), a brace
    pattern (`/d/shard-{000000..000009}.tar`), a glob (`/d/*.tar`), one .tar file, or a list of these.
    Remote specs (`pipe:...`, `s3://...`) are brace-expanded but not checked.
    """
    if not isinstance(shards_spec, (str, os.PathLike)):
        specs = [str(s) for s in shards_spec]
        if not specs:
            raise _no_shards("[]", "empty shard list")
        out: list[str] = []
        manifest = None
        for s in specs:
            paths, m = resolve_shards(s)
            out.extend(paths)
            manifest = manifest or m
        return out, manifest

    raw = str(shards_spec)
    spec = os.path.expanduser(raw.strip())
    if not spec:
        raise DataError("data.shards is empty; leave it unset to use the built-in dataset "
                        f"(bench.data.default_shards) or point it at a shard directory; {MAKE_SHARDS_HINT}")
    if _is_remote(spec):
        import braceexpand  # a webdataset dependency

        return list(braceexpand.braceexpand(spec)), None

    path = Path(spec)
    if path.is_dir() or (path.name == MANIFEST and path.is_file()):
        root = path if path.is_dir() else path.parent
        manifest = load_manifest(str(root))
        if manifest is not None:
            shards = [str(root / name) for name in manifest["shards"]]
            if not shards:
                raise _no_shards(raw, f"{root / MANIFEST} lists no shards")
        else:
            shards = sorted(str(p) for p in root.glob("*.tar"))
            if not shards:
                raise _no_shards(raw, "directory has no *.tar files and no manifest.json")
    elif "{" in spec:
        import braceexpand

        shards = list(braceexpand.braceexpand(spec))
        manifest = load_manifest(spec)
    elif any(ch in spec for ch in "*?["):
        shards = sorted(_glob.glob(spec))
        if not shards:
            raise _no_shards(raw, "the glob matches no files")
        manifest = load_manifest(spec)
    elif path.is_file():
        shards, manifest = [str(path)], load_manifest(spec)
    else:
        raise _no_shards(raw, "no such file or directory")

    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DataError(f"data.shards={raw!r}: {len(missing)} of {len(shards)} shard files are missing, "
                        f"first {missing[0]!r}; rewrite the shard set with `bench data make-shards` "
                        f"or fix the pattern")
    return shards, manifest


# ---------------------------------------------------------------------------------------------
# Writing shards
# ---------------------------------------------------------------------------------------------

def _png_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)  # ~2x faster than 6, ~10% larger
    return buf.getvalue()


def _shapes_item(args: tuple[int, int, int]) -> tuple[bytes, int, str | None]:
    index, seed, res = args
    arr, label = shapes_sample(index, seed, res)
    return _png_bytes(arr), label, None


def _square_resize(img: Image.Image, res: int) -> Image.Image:
    """Centre crop to a square, then resize to res x res with antialiasing."""
    w, h = img.size
    side = min(w, h)
    if w != h:
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if side != res:
        img = img.resize((res, res), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return img


def _folder_item(args: tuple[str, int, int]) -> tuple[bytes | None, int, str | None]:
    path, label, res = args
    try:
        with Image.open(path) as im:
            im.draft("RGB", (2 * res, 2 * res))  # cheap JPEG downscale-on-decode; no-op otherwise
            im = ImageOps.exif_transpose(im)
            if im.mode != "RGB":
                im = im.convert("RGB")
            upscaled = min(im.size) < res
            out = _square_resize(im, res)
            return _png_bytes(np.asarray(out)), label, ("upscaled" if upscaled else None)
    except Exception as exc:  # unreadable image: counted by the caller
        return None, label, f"{type(exc).__name__}: {exc}"


def _list_folder(folder: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]]]:
    root = Path(os.path.expanduser(str(folder)))
    if not root.is_dir():
        raise DataError(f"make-shards folder={str(folder)!r}: not a directory; pass an ImageFolder tree "
                        f"(one subfolder per class, images inside)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"make-shards folder={str(folder)!r}: no class subfolders; an ImageFolder tree has "
                        f"one subfolder per class (e.g. {root}/cat/001.jpg, {root}/dog/002.png)")
    items: list[tuple[str, int]] = []
    empty = []
    for label, name in enumerate(classes):
        files = sorted(
            str(p) for p in (root / name).rglob("*")
            if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts))
        if not files:
            empty.append(name)
        items.extend((f, label) for f in files)
    if empty:
        raise DataError(f"make-shards folder={str(folder)!r}: class folder(s) {empty[:5]} hold no images "
                        f"(extensions {', '.join(FOLDER_EXTENSIONS)}); remove them or add images")
    return classes, items


class _Progress:
    """Progress lines on stderr at most every `every` seconds (only once work has run that long)."""

    def __init__(self, total: int, label: str, enabled: bool, every: float = 5.0):
        self.total, self.label, self.enabled, self.every = total, label, enabled, every
        self.t0 = self.last = time.time()

    def update(self, done: int, shards: int) -> None:
        now = time.time()
        if self.enabled and now - self.last >= self.every:
            self.last = now
            rate = done / max(now - self.t0, 1e-9)
            print(f"{self.label}: {done}/{self.total} images, {shards} shards, {rate:.0f} img/s",
                  file=sys.stderr, flush=True)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0  # fixed: the same inputs give byte-identical shards
    info.mode = 0o444
    tar.addfile(info, io.BytesIO(data))


def _auto_workers(workers: int | None, work: float) -> int:
    if workers is not None:
        return max(1, int(workers))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return min(cpus, 8) if work > 5e6 else 1  # work ~ output pixels; a pool only pays off when big


def _write_shard_set(tmp: Path, *, source: str, resolution: int, num_samples: int | None,
                     samples_per_shard: int, seed: int, folder: str | os.PathLike | None,
                     progress: bool, summary: bool, workers: int | None) -> dict:
    """Write shards and manifest.json into the (new, empty) directory `tmp`. Returns the manifest."""
    extra: dict = {}
    if source == "shapes":
        n = DEFAULT_NUM_SAMPLES if num_samples is None else int(num_samples)
        if n < 1:
            raise DataError(f"make-shards num_samples={num_samples}: must be >= 1")
        class_names = list(SHAPES_CLASSES)
        fn, jobs = _shapes_item, [(i, seed, resolution) for i in range(n)]
        keys = list(range(n))
        work = n * resolution * resolution
    elif source == "folder":
        if folder is None:
            raise DataError("make-shards source=folder needs folder=/path/to/imagefolder "
                            "(one subfolder per class)")
        class_names, items = _list_folder(folder)
        random.Random(f"gan-bench/folder/{seed}").shuffle(items)  # mix classes across shards
        if num_samples is not None:
            items = items[: int(num_samples)]
        fn, jobs = _folder_item, [(p, lab, resolution) for p, lab in items]
        keys = None
        work = 1e9 if len(items) > 500 else 0
        extra["folder"] = str(Path(os.path.expanduser(str(folder))).resolve())
        extra["num_files"] = len(items)
    else:
        raise DataError(f"make-shards source={source!r}: unknown; use source=shapes (built-in) "
                        f"or source=folder folder=/path/to/imagefolder")

    nproc = _auto_workers(workers, work)
    prog = _Progress(len(jobs), f"make-shards {source}", progress)
    shards: list[str] = []
    written = skipped = upscaled = 0
    skipped_examples: list[str] = []
    tar: tarfile.TarFile | None = None
    pool = None
    try:
        if nproc > 1:
            import multiprocessing as mp

            pool = mp.get_context("fork" if sys.platform == "linux" else "spawn").Pool(nproc)
            results = pool.imap(fn, jobs, chunksize=64)
        else:
            results = map(fn, jobs)
        for j, (png, label, note) in enumerate(results):
            if png is None:
                skipped += 1
                if len(skipped_examples) < 10:
                    skipped_examples.append(f"{jobs[j][0]}: {note}")
                continue
            upscaled += note == "upscaled"
            if tar is None or written % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                shards.append(SHARD_NAME.format(len(shards)))
                tar = tarfile.open(tmp / shards[-1], "w", format=tarfile.USTAR_FORMAT)
            key = f"{keys[j] if keys is not None else written:08d}"
            _add_member(tar, f"{key}.png", png)
            _add_member(tar, f"{key}.cls", str(label).encode())
            written += 1
            if j % 256 == 0:
                prog.update(j, len(shards))
    finally:
        if tar is not None:
            tar.close()
        if pool is not None:
            pool.terminate()
    if written == 0:
        raise DataError(f"make-shards folder={str(folder)!r}: none of {len(jobs)} images could be read "
                        f"(first error: {skipped_examples[0] if skipped_examples else 'none'})")

    manifest = {
        "shards": shards,
        "num_samples": written,
        "class_names": class_names,
        "resolution": resolution,
        "source": source,
        "seed": seed,
        "samples_per_shard": samples_per_shard,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "format": "png+cls",
    }
    if source == "folder":
        manifest.update(extra, skipped=skipped, skipped_examples=skipped_examples, upscaled=upscaled)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if summary:
        dt = time.time() - prog.t0
        more = f", skipped {skipped} unreadable images" if skipped else ""
        print(f"make-shards {source}: wrote {written} images ({resolution}x{resolution}) in {len(shards)} "
              f"shards in {dt:.1f} s{more}", file=sys.stderr, flush=True)
    return manifest


def _temp_dir_for(out: Path) -> Path:
    """A fresh temporary directory beside `out`; also removes temporaries of dead writers on this host."""
    out.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{out.name}.tmp-{socket.gethostname()}-"
    for stale in out.parent.glob(_glob.escape(prefix) + "*"):
        pid = stale.name[len(prefix):].split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
    tmp = out.parent / f"{prefix}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def _publish(tmp: Path, out: Path, overwrite: bool) -> bool:
    """Move the finished shard set `tmp` to `out` by rename. False if another writer got there first."""
    if overwrite and out.exists():
        trash = out.parent / f".{out.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        os.rename(out, trash)
        os.rename(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
        return True
    try:
        os.rename(tmp, out)  # atomic; also replaces an empty directory, fails on a non-empty one
        return True
    except OSError as exc:
        if (out / MANIFEST).is_file():
            shutil.rmtree(tmp, ignore_errors=True)
            return False
        raise DataError(f"shards: cannot move the finished set into {str(out)!r} ({exc.strerror}); it exists "
                        f"without {MANIFEST}: delete it or choose another directory") from None


def _check_resolution(resolution: int, what: str, lo: int = MIN_RESOLUTION, hi: int = MAX_RESOLUTION) -> int:
    if not isinstance(resolution, (int, np.integer)) or not lo <= resolution <= hi:
        raise DataError(f"{what} resolution={resolution!r}: use an integer from {lo} to {hi}")
    return int(resolution)


def make_shards(out: str | os.PathLike, source: str = "shapes", resolution: int = 32,
                num_samples: int | None = None, samples_per_shard: int = 1000, seed: int = 0,
                folder: str | os.PathLike | None = None, progress: bool = True, *,
                overwrite: bool = False, workers: int | None = None) -> dict:
    """Write a WebDataset shard set to directory `out` and return its manifest.

    source       "shapes" (built-in procedural dataset) or "folder" (ImageFolder tree at `folder`:
                 class names = sorted subfolder names; centre crop to square, resize to `resolution`;
                 unreadable images are skipped and counted in the manifest)
    num_samples  shapes: images to render (None = 10000); folder: cap on images (None = all of them;
                 the images are shuffled with `seed` before capping and sharding, so classes mix)
    samples_per_shard  images per tar shard; more shards allow more readers (ranks x workers)
    overwrite    replace an existing shard set at `out` (default: refuse with DataError)
    workers      processes for rendering/encoding (None = automatic; 1 = in this process)

    The set is written to a temporary directory beside `out` and renamed into place when complete.
    """
    if source == "folder":
        resolution = _check_resolution(resolution, "make-shards source=folder", 8, 1024)
    else:
        resolution = _check_resolution(resolution, "make-shards")
    if int(samples_per_shard) < 1:
        raise DataError(f"make-shards samples_per_shard={samples_per_shard}: must be >= 1")
    out = Path(os.path.expanduser(str(out))).absolute()
    if out.exists() and not overwrite:
        if (out / MANIFEST).is_file():
            raise DataError(f"make-shards out={str(out)!r}: already holds a complete shard set ({MANIFEST}); "
                            f"pass overwrite=true to replace it, or choose another out")
        if not out.is_dir() or any(out.iterdir()):
            raise DataError(f"make-shards out={str(out)!r}: exists and is not an empty directory; "
                            f"choose another out, or pass overwrite=true to replace it")
    tmp = _temp_dir_for(out)
    try:
        manifest = _write_shard_set(tmp, source=source, resolution=resolution, num_samples=num_samples,
                                    samples_per_shard=int(samples_per_shard), seed=int(seed), folder=folder,
                                    progress=progress, summary=progress, workers=workers)
        if not _publish(tmp, out, overwrite):
            raise DataError(f"make-shards out={str(out)!r}: another process wrote a shard set there "
                            f"at the same time; use it, or pass overwrite=true")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


def configured_shards(data_cfg) -> str:
    """`data.shards`, or with it empty and data=shapes, the built-in dataset's directory (written on first
    use, see default_shards). Any other dataset needs its shards."""
    if data_cfg.shards:
        return str(data_cfg.shards)
    if data_cfg.name != "shapes":
        raise DataError(f"data.shards is empty; data={data_cfg.name} needs a shard directory")
    return str(default_shards(data_cfg.resolution, num_samples=data_cfg.num_samples))


def default_shards(resolution: int, cache_dir: str | os.PathLike | None = None,
                   num_samples: int = DEFAULT_NUM_SAMPLES, seed: int = 0) -> Path:
    """Directory of the built-in shapes shards, written on first use and reused afterwards.

    Location: `cache_dir`, else $GAN_BENCH_CACHE, else ~/.cache/gan-bench; subdirectory
    `shapes-r{resolution}-n{num_samples}-s{seed}`. The set has about 64 shards (fewer when tiny), so up
    to 64 readers (ranks x workers) can share it. Concurrent first uses are safe: each writes its
    own temporary copy, the first rename wins and the others use the winner's shards.
    """
    resolution = _check_resolution(resolution, "data (built-in shapes)")
    root = Path(os.path.expanduser(str(cache_dir or os.environ.get("GAN_BENCH_CACHE")
                                       or "~/.cache/gan-bench"))).absolute()
    out = root / f"shapes-r{resolution}-n{int(num_samples)}-s{int(seed)}"
    if (out / MANIFEST).is_file():
        resolve_shards(str(out))  # raises DataError naming the first missing shard
        return out
    print(f"gan-bench: writing the built-in shapes dataset ({num_samples} images, {resolution}x{resolution}) "
          f"to {out} (first use; later runs reuse it)", file=sys.stderr, flush=True)
    tmp = _temp_dir_for(out)
    try:
        _write_shard_set(tmp, source="shapes", resolution=resolution, num_samples=int(num_samples),
                         samples_per_shard=max(1, math.ceil(int(num_samples) / 64)), seed=int(seed),
                         folder=None, progress=True, summary=False, workers=None)
        _publish(tmp, out, overwrite=False)  # False: a concurrent writer won; its set is identical
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------------

class _SkipCounter:
    """webdataset exception handler that counts what it skips (and warns for the first few)."""

    def __init__(self, where: str, max_consecutive: int = 1000):
        self.where, self.max_consecutive = where, max_consecutive
        self.pending = 0  # skipped since the last batch left this reader
        self.total = 0
        self.consecutive = 0

    def __call__(self, exc: BaseException) -> bool:
        self.pending += 1
        self.total += 1
        self.consecutive += 1
        if self.total <= 3:
            msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            warnings.warn(f"gan-bench data: skipping a corrupt sample ({self.where}): {msg[:300]}",
                          stacklevel=2)
        if self.consecutive >= self.max_consecutive:
            raise DataError(f"data.shards: {self.consecutive} corrupt samples or shards in a row "
                            f"({self.where}), last: {exc}; check or rewrite the shards")
        return True

    def ok(self) -> None:
        self.consecutive = 0


class _Corrupt(Exception):
    pass


def _decode(sample: dict, resolution: int, num_classes: int | None) -> tuple[np.ndarray, int]:
    data = next((sample[k] for k in IMAGE_KEYS if k in sample), None)
    if data is None:
        raise _Corrupt(f"sample {sample.get('__key__')!r} has no image (png/jpg) member")
    if "cls" not in sample:
        raise _Corrupt(f"sample {sample.get('__key__')!r} has no cls member")
    try:
        label = int(bytes(sample["cls"]).decode("ascii").strip())
    except (ValueError, UnicodeDecodeError):
        raise _Corrupt(f"sample {sample.get('__key__')!r}: cls {bytes(sample['cls'])[:20]!r} "
                       f"is not an integer") from None
    if label < 0 or (num_classes is not None and label >= num_classes):
        raise _Corrupt(f"sample {sample.get('__key__')!r}: label {label} outside [0, {num_classes})")
    with Image.open(io.BytesIO(data)) as im:
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (resolution, resolution):
            im = _square_resize(im, resolution)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (resolution, resolution, 3):
        raise _Corrupt(f"sample {sample.get('__key__')!r}: decoded shape {arr.shape}")
    return arr, label


class _BatchStream(torch.utils.data.IterableDataset):
    """One reader's stream of (x, y, skipped) batches; runs inside each DataLoader worker."""

    def __init__(self, shards: list[str], batch_size: int, resolution: int, rank: int, world_size: int,
                 shuffle_buffer: int, seed: int, resampled: bool, epoch_passes: bool, drop_last: bool,
                 num_classes: int | None):
        super().__init__()
        self.shards, self.batch_size, self.resolution = shards, batch_size, resolution
        self.rank, self.world_size = rank, world_size
        self.shuffle_buffer, self.seed = shuffle_buffer, seed
        self.resampled, self.epoch_passes, self.drop_last = resampled, epoch_passes, drop_last
        self.num_classes = num_classes
        self.epoch = -1  # lives in the worker (persistent workers keep it), bumped per iteration

    def reader_shards(self, worker: int, num_workers: int) -> list[str]:
        # Node split, then worker split: disjoint, and complete when taken over all readers.
        return self.shards[self.rank::self.world_size][worker::num_workers]

    def _urls(self, mine: list[str], rng: random.Random) -> Iterator[dict]:
        if self.resampled:
            while True:
                yield {"url": rng.choice(mine)}
        while True:
            order = list(mine)
            rng.shuffle(order)
            for url in order:
                yield {"url": url}
            if not self.epoch_passes:
                return

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, int]]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        self.epoch += 1
        tag = f"{self.seed}/{self.rank}/{worker}/{self.epoch}"
        mine = self.reader_shards(worker, num_workers)
        if not mine:  # ShardLoader checks shards >= readers; this is the last line of defence
            raise DataError(f"data.shards: reader rank={self.rank} worker={worker} got no shards")
        counter = _SkipCounter(f"rank {self.rank} worker {worker}")

        samples = wds.tarfile_samples(self._urls(mine, random.Random(f"gan-bench/shards/{tag}")),
                                      handler=counter)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                  rng=random.Random(f"gan-bench/samples/{tag}"))(samples)

        bs, res = self.batch_size, self.resolution
        xbuf = np.empty((bs, res, res, 3), dtype=np.uint8)
        ybuf = np.empty((bs,), dtype=np.int64)
        n = 0
        for sample in samples:
            try:
                xbuf[n], ybuf[n] = _decode(sample, res, self.num_classes)
            except Exception as exc:
                counter(_Corrupt(f"{exc} @ {sample.get('__url__')}"))
                continue
            counter.ok()
            n += 1
            if n == bs:
                yield self._collate(xbuf, ybuf, n, counter)
                n = 0
        if n and not self.drop_last:
            yield self._collate(xbuf, ybuf, n, counter)
        elif counter.pending:  # report skips after the last batch in an empty batch
            yield self._collate(xbuf, ybuf, 0, counter)

    @staticmethod
    def _collate(xbuf: np.ndarray, ybuf: np.ndarray, n: int, counter: _SkipCounter):
        x = torch.from_numpy(xbuf[:n]).permute(0, 3, 1, 2)  # NHWC uint8 -> NCHW view
        x = x.to(torch.float32, memory_format=torch.contiguous_format)
        x.mul_(1.0 / 127.5).sub_(1.0)  # uint8 [0, 255] -> [-1, 1]
        y = torch.from_numpy(ybuf[:n].copy())
        skipped, counter.pending = counter.pending, 0
        return x, y, skipped


class ShardLoader:
    """Iterable of (x, y) batches from WebDataset shards; x float32 (B,3,R,R) in [-1,1], y int64 (B,).

    shards          list of shard paths (or a spec string, see `resolve_shards`)
    batch_size      images per batch (per process)
    resolution      output side R; images of another size are centre-cropped and resized
    rank, world_size  this process's place among the data-parallel processes; passed explicitly so
                    that splitting does not depend on torch.distributed being initialised
    num_workers     DataLoader worker processes (0 = decode in this process). Readers per process =
                    max(1, num_workers); the shard count must be >= world_size x readers
    shuffle_buffer  samples in each reader's shuffle buffer (<= 1 = no sample shuffling)
    seed            base seed; each reader's stream is seeded by (seed, rank, worker, epoch)
    resampled       True: infinite; each reader draws shards with replacement from its own split.
                    False: one pass over this rank's shards (no sample read twice across ranks)
    epoch_passes    with resampled=False: repeat the passes forever (reshuffled each pass)
    drop_last       drop a final partial batch (default: True when resampled, else False)
    num_classes     labels >= this count as corrupt (default: from the shards' manifest.json)

    `skipped` counts corrupt samples skipped so far (bad image bytes, missing or non-integer cls,
    label out of range, unreadable shard); worker counts reach it with the batches.
    """

    def __init__(self, shards: list[str] | str, batch_size: int, resolution: int, *, rank: int = 0,
                 world_size: int = 1, num_workers: int = 1, shuffle_buffer: int = 1000, seed: int = 0,
                 resampled: bool = True, epoch_passes: bool = False, drop_last: bool | None = None,
                 num_classes: int | None = None):
        manifest = None
        if isinstance(shards, (str, os.PathLike)):
            shards, manifest = resolve_shards(shards)
        shards = [str(s) for s in (shards or [])]
        if not shards:
            raise _no_shards("[]", "empty shard list")
        missing = [s for s in shards if not _is_remote(s) and not os.path.isfile(s)]
        if missing:
            raise DataError(f"data.shards: shard file {missing[0]!r} does not exist ({len(missing)} of "
                            f"{len(shards)} missing); rewrite the shard set or fix data.shards")
        if batch_size < 1:
            raise DataError(f"train.batch_size={batch_size}: must be >= 1")
        if not 1 <= resolution <= 4096:
            raise DataError(f"data.resolution={resolution}: must be a positive image side in pixels")
        if world_size < 1 or not 0 <= rank < world_size:
            raise DataError(f"data loader: rank={rank} world_size={world_size}: need 0 <= rank < world_size")
        if num_workers < 0:
            raise DataError(f"data.num_workers={num_workers}: must be >= 0")
        if epoch_passes and resampled:
            raise DataError("data loader: epoch_passes=True needs resampled=False "
                            "(resampled streams are already infinite)")
        readers = world_size * max(1, num_workers)
        if len(shards) < readers:
            raise DataError(
                f"data.shards: {len(shards)} shard(s) for {readers} readers (world_size={world_size} x "
                f"num_workers={max(1, num_workers)}); every reader needs its own shard or its rank hangs. "
                f"Write more, smaller shards (`bench data make-shards ... samples_per_shard=<smaller>`) "
                f"or lower data.num_workers")
        if num_classes is None:
            dirs = {os.path.dirname(s) for s in shards if not _is_remote(s)}
            if manifest is None and len(dirs) == 1:
                manifest = load_manifest(dirs.pop() or ".")
            if manifest is not None and manifest.get("class_names"):
                num_classes = len(manifest["class_names"])

        self.shards = shards
        self.batch_size, self.resolution = int(batch_size), int(resolution)
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), int(num_workers)
        self.resampled, self.num_classes = bool(resampled), num_classes
        self.manifest = manifest
        self.skipped = 0
        self._dataset = _BatchStream(
            shards, self.batch_size, self.resolution, self.rank, self.world_size, int(shuffle_buffer),
            int(seed), self.resampled, bool(epoch_passes),
            (self.resampled if drop_last is None else bool(drop_last)), num_classes)
        self._loader: torch.utils.data.DataLoader | None = None

    @property
    def readers(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def rank_shards(self) -> list[str]:
        """The shards this rank reads (its node split)."""
        return self.shards[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self._dataset, batch_size=None, num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0, pin_memory=False,
                prefetch_factor=4 if self.num_workers > 0 else None)
        try:
            for x, y, skipped in self._loader:
                self.skipped += int(skipped)
                if len(y):
                    yield x, y
        except DataError as exc:
            self.close()
            # A worker's DataError arrives wrapped with its traceback; keep the one-line message.
            raise DataError(str(exc).strip().splitlines()[-1].split("DataError: ", 1)[-1]) from None
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        """Stop the worker processes now (they also stop when the loader is garbage-collected)."""
        loader, self._loader = self._loader, None
        it = getattr(loader, "_iterator", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            # Explicit: a shutdown left to the garbage collector after a worker error can wait ~5 s.
            it._shutdown_workers()

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
