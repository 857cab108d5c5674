"""Writing a shard set: render the built-in dataset, read an ImageFolder tree or another project's dataset
(bench/data/importers.py), pack the PNGs into tar shards plus manifest.json inside a temporary directory, then
publish it by one rename, so a killed job never leaves a shard set that looks complete (docs/architecture.md)."""

from __future__ import annotations

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
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps

from bench import rundir
from bench.workers import ordered_map, usable_cpus
from bench.data import importers, shapes
from bench.data.format import (DEFAULT_NUM_SAMPLES, MANIFEST, SHARD_NAME, DataError, check_resolution, png_bytes,
                               square_resize)

# A small image folder (or imported set) still gets this many shards (fewer images per shard), so that the
# folder data group's decode workers (configs/data/folder.yaml) and several ranks each have a shard to read.
MIN_FOLDER_SHARDS = 8
DEFAULT_RESOLUTION = 32  # shapes and folder when no resolution is given; an importer keeps its images' side
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class ShardSetSpec:
    """What `make_shards` writes.

    source             "shapes" (built-in procedural dataset), "folder" (ImageFolder tree at `folder`:
                       class names = sorted subfolder names; a folder of images without subfolders is
                       unlabelled), or an importer (bench/data/importers.py): "npz" / "hdf5" (`file`),
                       "cifar" / "lmdb" (`folder`), "torchvision" (`dataset`, `root`). Every image is centre
                       cropped to square and resized to `resolution`; unreadable images are skipped and counted
                       in the manifest
    resolution         image side in pixels (None: 32 for shapes and folder, an importer's own square side)
    num_samples        shapes: images to render (None = 10000); other sources: cap on images (None = all of
                       them; the images are shuffled with `seed` before capping and sharding, so classes mix;
                       lmdb: the first ones in key order)
    samples_per_shard  images per tar shard; more shards allow more readers (ranks x workers); not shapes:
                       fewer per shard when that gives under MIN_FOLDER_SHARDS shards
    seed               shapes: the dataset's seed; other sources: the shuffle's seed
    folder, file, split, dataset, root   the input of each source (importers.SOURCE_KEYS)
    workers            processes for rendering/encoding (None = automatic; 1 = in this process)
    """
    source: str = "shapes"
    resolution: int | None = None
    num_samples: int | None = None
    samples_per_shard: int = 1000
    seed: int = 0
    folder: str | os.PathLike | None = None
    workers: int | None = None
    file: str | os.PathLike | None = None
    split: str | None = None
    dataset: str | None = None
    root: str | os.PathLike | None = None


# ---------------------------------------------------------------------------------------------
# One image in, PNG bytes out (every source but shapes)
# ---------------------------------------------------------------------------------------------

def _image_png(im: Image.Image, res: int) -> tuple[bytes, str | None]:
    """RGB, centre crop to square, resize to res (the one path of every imported image); note "upscaled"
    when the image was smaller than res."""
    im = ImageOps.exif_transpose(im)
    if im.mode != "RGB":
        im = im.convert("RGB")
    upscaled = min(im.size) < res
    return png_bytes(np.asarray(square_resize(im, res))), ("upscaled" if upscaled else None)


def _open_encoded(data: bytes, res: int) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.draft("RGB", (2 * res, 2 * res))  # cheap JPEG downscale-on-decode; no-op otherwise
    return im


def _folder_item(args: tuple[str, int, int]) -> tuple[bytes | None, int, str | None]:
    path, label, res = args
    try:
        with Image.open(path) as im:
            im.draft("RGB", (2 * res, 2 * res))
            png, note = _image_png(im, res)
            return png, label, note
    except Exception as exc:  # unreadable image: counted by the caller
        return None, label, f"{path}: {type(exc).__name__}: {exc}"


def _record_item(args: tuple) -> tuple[bytes | None, int, str | None]:
    """An importer's record (importers.Record's image: an array, encoded bytes or None) -> PNG bytes."""
    image, label, res, where = args[1:]
    if image is None:
        return None, label, where  # the importer could not read it; `where` says why
    try:
        if isinstance(image, (bytes, bytearray, memoryview)):
            with _open_encoded(bytes(image), res) as im:
                png, note = _image_png(im, res)
        else:
            arr = image[..., 0] if image.ndim == 3 and image.shape[2] == 1 else image
            png, note = _image_png(Image.fromarray(arr), res)  # (H, W): grey, made RGB by _image_png
        return png, label, note
    except Exception as exc:
        return None, label, f"{where}: {type(exc).__name__}: {exc}"


def _list_folder(folder: str | os.PathLike) -> tuple[list[str], list[tuple[str, int]], bool]:
    """(class names, (image path, label) pairs, labelled). A folder without class subfolders whose images lie
    directly in it is one unlabelled class."""
    root = Path(os.path.expanduser(str(folder)))
    if not root.is_dir():
        raise DataError(f"make-shards folder={str(folder)!r}: not a directory; pass an ImageFolder tree "
                        f"(one subfolder per class, images inside)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        flat = sorted(str(p) for p in root.iterdir() if p.suffix.lower() in FOLDER_EXTENSIONS and p.is_file()
                      and not p.name.startswith("."))
        if flat:
            return list(importers.UNLABELLED), [(f, 0) for f in flat], False
        raise DataError(f"make-shards folder={str(folder)!r}: no class subfolders and no images; an ImageFolder "
                        f"tree has one subfolder per class (e.g. {root}/cat/001.jpg, {root}/dog/002.png), an "
                        f"unlabelled set its images directly in the folder")
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
    return classes, items, True


# ---------------------------------------------------------------------------------------------
# The jobs of one shard set, and packing their results into tar shards
# ---------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    fn: Callable                 # job -> (png bytes or None, label, note: "upscaled", None, or why it failed)
    chunks: Iterable[list]       # the jobs, one per image, in lists that each run through one ordered_map
    total: int                   # jobs in all
    keyed: bool                  # job[0] is the sample key (else samples are numbered as written)
    class_names: list[str]
    labelled: bool
    resolution: int
    work: float                  # ~ output pixels; decides whether a process pool pays off
    extra: dict = field(default_factory=dict)  # source-specific manifest entries


@dataclass
class _Written:
    shards: list[str] = field(default_factory=list)
    written: int = 0
    skipped: int = 0
    upscaled: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def _plan(spec: ShardSetSpec, stack: ExitStack) -> _Plan:
    seed, folder = spec.seed, spec.folder
    if spec.num_samples is not None and int(spec.num_samples) < 1:
        raise DataError(f"make-shards num_samples={spec.num_samples}: must be >= 1")
    if spec.source == "shapes":
        resolution = spec.resolution or DEFAULT_RESOLUTION
        n = DEFAULT_NUM_SAMPLES if spec.num_samples is None else int(spec.num_samples)
        return _Plan(shapes.shapes_item, [[(i, seed, resolution) for i in range(n)]], n, True,
                     list(shapes.SHAPES_CLASSES), True, resolution, n * resolution * resolution)
    if spec.source == "folder":
        if folder is None:
            raise DataError("make-shards source=folder needs folder=/path/to/imagefolder "
                            "(one subfolder per class)")
        resolution = spec.resolution or DEFAULT_RESOLUTION
        class_names, items, labelled = _list_folder(folder)
        random.Random(f"gan-bench/folder/{seed}").shuffle(items)  # mix classes across shards
        if spec.num_samples is not None:
            items = items[: int(spec.num_samples)]
        extra = {"folder": str(Path(os.path.expanduser(str(folder))).resolve()), "num_files": len(items)}
        return _Plan(_folder_item, [[(p, lab, resolution) for p, lab in items]], len(items), False, class_names,
                     labelled, resolution, 1e9 if len(items) > 500 else 0, extra)
    if spec.source not in importers.SOURCES:
        raise DataError(f"make-shards source={spec.source!r}: unknown; use source=shapes (built-in), "
                        f"source=folder folder=/path/to/imagefolder, or one of: {', '.join(importers.SOURCES)}")
    src = importers.open_source(spec)
    stack.callback(src.close)
    resolution = spec.resolution or src.native
    if resolution is None:
        raise DataError(f"make-shards source={spec.source}: its images are not all one square size; give "
                        f"data.resolution=N (each image is centre cropped and resized to N x N)")
    resolution = check_resolution(resolution, f"make-shards source={spec.source}", 8, 1024)
    total = src.total if spec.num_samples is None else min(src.total, int(spec.num_samples))
    jobs = ((r.key, r.image, r.label, resolution, r.where) for r in src.records(seed, total))
    return _Plan(_record_item, _chunked(jobs), total, True, src.class_names, src.labelled, resolution,
                 total * resolution * resolution, dict(src.extra, num_records=src.total))


IMPORT_CHUNK = 512  # records read ahead of the encoding workers (bounded memory for a large input)


def _chunked(jobs: Iterator) -> Iterator[list]:
    chunk: list = []
    for job in jobs:
        chunk.append(job)
        if len(chunk) == IMPORT_CHUNK:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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
    return min(usable_cpus(), 8) if work > 5e6 else 1  # work ~ output pixels; workers only pay off when big


def _pack(tmp: Path, plan: _Plan, samples_per_shard: int, nproc: int, prog: _Progress) -> _Written:
    """Run the plan's jobs chunk by chunk (in worker processes when nproc > 1: bench.workers, which a stop
    request cannot hang) and write their PNGs into tar shards in `tmp`."""
    out = _Written()
    tar: tarfile.TarFile | None = None
    done = 0
    try:
        for chunk in plan.chunks:
            results = ordered_map(plan.fn, chunk, nproc)
            try:
                for job, (png, label, note) in zip(chunk, results):
                    done += 1
                    if done % 256 == 0:
                        prog.update(done, len(out.shards))
                    if png is None:
                        out.skipped += 1
                        if len(out.skipped_examples) < 10:
                            out.skipped_examples.append(note)
                        continue
                    out.upscaled += note == "upscaled"
                    if tar is None or out.written % samples_per_shard == 0:
                        if tar is not None:
                            tar.close()
                        out.shards.append(SHARD_NAME.format(len(out.shards)))
                        tar = tarfile.open(tmp / out.shards[-1], "w", format=tarfile.USTAR_FORMAT)
                    key = f"{job[0] if plan.keyed else out.written:08d}"
                    _add_member(tar, f"{key}.png", png)
                    _add_member(tar, f"{key}.cls", str(label).encode())
                    out.written += 1
            finally:
                results.close()  # stops the workers now (a generator's finally), whether or not all jobs ran
    finally:
        if tar is not None:
            tar.close()
    return out


def write_shard_set(tmp: Path, spec: ShardSetSpec, *, progress: bool, summary: bool) -> dict:
    """Write shards and manifest.json into the (new, empty) directory `tmp`. Returns the manifest."""
    with ExitStack() as stack:  # an importer's open input is closed however this ends
        plan = _plan(spec, stack)
        per_shard = spec.samples_per_shard
        if spec.source != "shapes" and plan.total < MIN_FOLDER_SHARDS * per_shard:
            per_shard = max(1, math.ceil(plan.total / MIN_FOLDER_SHARDS))
            if progress and per_shard != spec.samples_per_shard:
                print(f"make-shards {spec.source}: {plan.total} images, so {per_shard} per shard instead of "
                      f"{spec.samples_per_shard}: at least {MIN_FOLDER_SHARDS} shards let several readers share "
                      f"the set", file=sys.stderr, flush=True)
        nproc = _auto_workers(spec.workers, plan.work)
        prog = _Progress(plan.total, f"make-shards {spec.source}", progress)
        w = _pack(tmp, plan, per_shard, nproc, prog)
    if w.written == 0:
        raise DataError(f"make-shards source={spec.source}: none of {plan.total} images could be read (first "
                        f"error: {w.skipped_examples[0] if w.skipped_examples else 'none'})")

    manifest = {
        "shards": w.shards,
        "num_samples": w.written,
        "class_names": plan.class_names,
        "labelled": plan.labelled,  # false: every label is 0 and class_names is ["unlabelled"]
        "resolution": plan.resolution,
        "source": spec.source,
        "seed": spec.seed,
        "samples_per_shard": per_shard,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "format": "png+cls",
    }
    if spec.source != "shapes":
        manifest.update(plan.extra, skipped=w.skipped, skipped_examples=w.skipped_examples,
                        upscaled=w.upscaled)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # inside the unpublished temp dir
    if summary:
        dt = time.time() - prog.t0
        more = f", skipped {w.skipped} unreadable images" if w.skipped else ""
        k = len(plan.class_names)
        what = f"{k} class{'es' * (k != 1)}" if plan.labelled else "unlabelled"
        print(f"make-shards {spec.source}: wrote {w.written} images ({plan.resolution}x{plan.resolution}, "
              f"{what}) in {len(w.shards)} shards in {dt:.1f} s{more}",
              file=sys.stderr, flush=True)
    return manifest


# ---------------------------------------------------------------------------------------------
# Temporary directory and publishing
# ---------------------------------------------------------------------------------------------

def temp_dir_for(out: Path) -> Path:
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


def publish(tmp: Path, out: Path, overwrite: bool) -> bool:
    """Move the finished shard set `tmp` to `out` by rename, after fsyncing every file in it (the set is
    whole on disk before its name appears; the parent is fsynced after). False if another writer got
    there first."""
    rundir.fsync_tree(tmp)
    published = _rename_into_place(tmp, out, overwrite)
    rundir.fsync_dir(out.parent)
    return published


def _rename_into_place(tmp: Path, out: Path, overwrite: bool) -> bool:
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
