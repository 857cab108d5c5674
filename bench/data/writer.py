"""Writing a shard set: render the built-in dataset or read an ImageFolder tree, pack the PNGs into
tar shards plus manifest.json inside a temporary directory, then publish it by one rename, so a killed
job never leaves a shard set that looks complete (docs/architecture.md)."""

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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from bench import rundir
from bench.workers import ordered_map, usable_cpus
from bench.data import shapes
from bench.data.format import DEFAULT_NUM_SAMPLES, MANIFEST, SHARD_NAME, DataError, png_bytes, square_resize

# A small image folder still gets this many shards (fewer images per shard), so that the folder data
# group's decode workers (configs/data/folder.yaml) and several ranks each have a shard to read.
MIN_FOLDER_SHARDS = 8
FOLDER_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm")


@dataclass(frozen=True)
class ShardSetSpec:
    """What `make_shards` writes.

    source             "shapes" (built-in procedural dataset) or "folder" (ImageFolder tree at `folder`:
                       class names = sorted subfolder names; centre crop to square, resize to
                       `resolution`; unreadable images are skipped and counted in the manifest)
    resolution         image side in pixels
    num_samples        shapes: images to render (None = 10000); folder: cap on images (None = all of
                       them; the images are shuffled with `seed` before capping and sharding, so classes mix)
    samples_per_shard  images per tar shard; more shards allow more readers (ranks x workers); folder:
                       fewer per shard when that gives under MIN_FOLDER_SHARDS shards
    seed               shapes: the dataset's seed; folder: the shuffle's seed
    folder             the ImageFolder tree (source=folder only)
    workers            processes for rendering/encoding (None = automatic; 1 = in this process)
    """
    source: str = "shapes"
    resolution: int = 32
    num_samples: int | None = None
    samples_per_shard: int = 1000
    seed: int = 0
    folder: str | os.PathLike | None = None
    workers: int | None = None


# ---------------------------------------------------------------------------------------------
# ImageFolder input
# ---------------------------------------------------------------------------------------------

def _folder_item(args: tuple[str, int, int]) -> tuple[bytes | None, int, str | None]:
    path, label, res = args
    try:
        with Image.open(path) as im:
            im.draft("RGB", (2 * res, 2 * res))  # cheap JPEG downscale-on-decode; no-op otherwise
            im = ImageOps.exif_transpose(im)
            if im.mode != "RGB":
                im = im.convert("RGB")
            upscaled = min(im.size) < res
            out = square_resize(im, res)
            return png_bytes(np.asarray(out)), label, ("upscaled" if upscaled else None)
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


# ---------------------------------------------------------------------------------------------
# The jobs of one shard set, and packing their results into tar shards
# ---------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    fn: Callable                 # job -> (png bytes or None, label, note)
    jobs: list                   # one per image; jobs[j][0] names the image in error messages
    keys: list[int] | None       # the sample keys (None: numbered as written)
    class_names: list[str]
    work: float                  # ~ output pixels; decides whether a process pool pays off
    extra: dict = field(default_factory=dict)  # source-specific manifest entries


@dataclass
class _Written:
    shards: list[str] = field(default_factory=list)
    written: int = 0
    skipped: int = 0
    upscaled: int = 0
    skipped_examples: list[str] = field(default_factory=list)


def _plan(spec: ShardSetSpec) -> _Plan:
    resolution, seed, folder = spec.resolution, spec.seed, spec.folder
    if spec.source == "shapes":
        n = DEFAULT_NUM_SAMPLES if spec.num_samples is None else int(spec.num_samples)
        if n < 1:
            raise DataError(f"make-shards num_samples={spec.num_samples}: must be >= 1")
        return _Plan(shapes.shapes_item, [(i, seed, resolution) for i in range(n)], list(range(n)),
                     list(shapes.SHAPES_CLASSES), n * resolution * resolution)
    if spec.source == "folder":
        if folder is None:
            raise DataError("make-shards source=folder needs folder=/path/to/imagefolder "
                            "(one subfolder per class)")
        class_names, items = _list_folder(folder)
        random.Random(f"gan-bench/folder/{seed}").shuffle(items)  # mix classes across shards
        if spec.num_samples is not None:
            items = items[: int(spec.num_samples)]
        extra = {"folder": str(Path(os.path.expanduser(str(folder))).resolve()), "num_files": len(items)}
        return _Plan(_folder_item, [(p, lab, resolution) for p, lab in items], None, class_names,
                     1e9 if len(items) > 500 else 0, extra)
    raise DataError(f"make-shards source={spec.source!r}: unknown; use source=shapes (built-in) "
                    f"or source=folder folder=/path/to/imagefolder")


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
    """Run the plan's jobs (in worker processes when nproc > 1: bench.workers, which a stop request cannot
    hang) and write their PNGs into tar shards in `tmp`."""
    out = _Written()
    tar: tarfile.TarFile | None = None
    results = ordered_map(plan.fn, plan.jobs, nproc)
    try:
        for j, (png, label, note) in enumerate(results):
            if png is None:
                out.skipped += 1
                if len(out.skipped_examples) < 10:
                    out.skipped_examples.append(f"{plan.jobs[j][0]}: {note}")
                continue
            out.upscaled += note == "upscaled"
            if tar is None or out.written % samples_per_shard == 0:
                if tar is not None:
                    tar.close()
                out.shards.append(SHARD_NAME.format(len(out.shards)))
                tar = tarfile.open(tmp / out.shards[-1], "w", format=tarfile.USTAR_FORMAT)
            key = f"{plan.keys[j] if plan.keys is not None else out.written:08d}"
            _add_member(tar, f"{key}.png", png)
            _add_member(tar, f"{key}.cls", str(label).encode())
            out.written += 1
            if j % 256 == 0:
                prog.update(j, len(out.shards))
    finally:
        results.close()  # stops the workers now (a generator's finally), whether or not all jobs ran
        if tar is not None:
            tar.close()
    return out


def write_shard_set(tmp: Path, spec: ShardSetSpec, *, progress: bool, summary: bool) -> dict:
    """Write shards and manifest.json into the (new, empty) directory `tmp`. Returns the manifest."""
    plan = _plan(spec)
    per_shard = spec.samples_per_shard
    if spec.source == "folder" and len(plan.jobs) < MIN_FOLDER_SHARDS * per_shard:
        per_shard = max(1, math.ceil(len(plan.jobs) / MIN_FOLDER_SHARDS))
        if progress and per_shard != spec.samples_per_shard:
            print(f"make-shards folder: {len(plan.jobs)} images, so {per_shard} per shard instead of "
                  f"{spec.samples_per_shard}: at least {MIN_FOLDER_SHARDS} shards let several readers share the set",
                  file=sys.stderr, flush=True)
    nproc = _auto_workers(spec.workers, plan.work)
    prog = _Progress(len(plan.jobs), f"make-shards {spec.source}", progress)
    w = _pack(tmp, plan, per_shard, nproc, prog)
    if w.written == 0:
        raise DataError(f"make-shards folder={str(spec.folder)!r}: none of {len(plan.jobs)} images could be "
                        f"read (first error: {w.skipped_examples[0] if w.skipped_examples else 'none'})")

    manifest = {
        "shards": w.shards,
        "num_samples": w.written,
        "class_names": plan.class_names,
        "resolution": spec.resolution,
        "source": spec.source,
        "seed": spec.seed,
        "samples_per_shard": per_shard,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "format": "png+cls",
    }
    if spec.source == "folder":
        manifest.update(plan.extra, skipped=w.skipped, skipped_examples=w.skipped_examples,
                        upscaled=w.upscaled)
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")  # inside the unpublished temp dir
    if summary:
        dt = time.time() - prog.t0
        more = f", skipped {w.skipped} unreadable images" if w.skipped else ""
        print(f"make-shards {spec.source}: wrote {w.written} images ({spec.resolution}x{spec.resolution}) in "
              f"{len(w.shards)} shards in {dt:.1f} s{more}", file=sys.stderr, flush=True)
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
