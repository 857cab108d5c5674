"""Reading shard sets: `ShardLoader`, an iterable of (x, y) batches, x float32 (B, 3, R, R) in [-1, 1],
y int64 (B,). Shards are split explicitly by rank, then by DataLoader worker, so ranks never read the
same shard; decoding, the optional horizontal flip (data.mirror) and batching run in the workers. Corrupt
samples are skipped and counted in `ShardLoader.skipped`, never raised and never silently dropped
(docs/architecture.md).
"""

from __future__ import annotations

import atexit
import dataclasses
import io
import os
import random
import signal
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from PIL import Image

from bench.data.format import IMAGE_KEYS, DataError, square_resize
from bench.data.shards import effective_size, is_remote, load_manifest, no_shards, resolve_shards, shard_counts
from bench.workers import quiet_child_signals

# Shards are untrusted input: an image whose header claims more pixels than this is skipped (and
# counted) before any pixel is decoded, so a decompression bomb cannot exhaust a worker's memory.
MAX_DECODE_PIXELS = 4096 * 4096
# Seconds the training process waits for one batch from its decode workers before it fails with a
# DataError. Without a limit a hung decode (a stuck network filesystem, a pathological image) blocks
# the main process inside DataLoader and with it the handling of SIGTERM / preemption. A batch never
# takes this long unless a worker is stuck: the slowest legitimate wait, the first batch that fills a
# shuffle buffer of thousands of images, takes seconds.
LOADER_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class LoaderSettings:
    """How a ShardLoader reads, beyond its shards, batch size and resolution.

    rank, world_size  this process's place among the data-parallel processes; passed explicitly so
                      that splitting does not depend on torch.distributed being initialised
    num_workers       DataLoader worker processes (0 = decode in this process). Readers per process =
                      max(1, num_workers); the shard count must be >= world_size x readers
    shuffle_buffer    samples in each reader's shuffle buffer (<= 1 = no sample shuffling)
    seed              base seed; each reader's stream is seeded by (seed, rank, worker, epoch)
    resampled         True: infinite; each reader draws shards with replacement from its own split.
                      False: one pass over this rank's shards (no sample read twice across ranks)
    epoch_passes      with resampled=False: repeat the passes forever (reshuffled each pass)
    drop_last         drop a final partial batch (None: True when resampled, else False)
    num_classes       labels >= this count as corrupt (None: from the shards' manifest.json)
    timeout_s         with workers: seconds to wait for one batch before failing (see LOADER_TIMEOUT_S)
    mirror            data.mirror, training's real images only: each sample drawn is flipped left-right
                      with probability 1/2 (StudioGAN's RandomHorizontalFlip), from a stream seeded like the
                      reader's, so a resumed run flips the same samples; the effective size is then 2 x N
    """
    rank: int = 0
    world_size: int = 1
    num_workers: int = 1
    shuffle_buffer: int = 1000
    seed: int = 0
    resampled: bool = True
    epoch_passes: bool = False
    drop_last: bool | None = None
    num_classes: int | None = None
    timeout_s: float = LOADER_TIMEOUT_S
    mirror: bool = False


def _worker_init(_worker_id: int) -> None:
    """Decode workers ignore SIGTERM, SIGINT and SIGUSR1 (bench.workers.quiet_child_signals): the training
    process handles them (a stop request, then a checkpoint) and closes the loader. A Ctrl-C or a scheduler's
    SIGTERM reaches the whole process group; a worker killed by it would fail the run before it could save. A
    worker still leaves when its parent shuts the loader down or dies (torch's worker loop watches the parent)."""
    quiet_child_signals()


class _SkipCounter:
    """webdataset exception handler that counts what it skips (and warns for the first few)."""

    def __init__(self, where: str, max_consecutive: int = 1000):
        self.where, self.max_consecutive = where, max_consecutive
        self.pending = 0  # skipped since the last batch left this reader
        self.total = 0
        self.consecutive = 0
        self.notes = 0  # failures seen (the first few are warned about)
        self.warned: set[str] = set()  # shards already warned about as cut short

    def __call__(self, exc: BaseException) -> bool:
        self.add(1)
        return self.note(exc)

    def add(self, n: int) -> None:
        self.pending += n
        self.total += n

    def note(self, exc: BaseException) -> bool:
        """A failure (warn for the first few; too many in a row is a DataError) without counting a sample."""
        self.consecutive += 1
        self.notes += 1
        if self.notes <= 3:
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
    with Image.open(io.BytesIO(data)) as im:  # reads the header only
        if im.size[0] * im.size[1] > MAX_DECODE_PIXELS:
            raise _Corrupt(f"sample {sample.get('__key__')!r}: image header says {im.size[0]}x{im.size[1]}, "
                           f"over the {MAX_DECODE_PIXELS} pixel limit (not decoded)")
        if im.mode != "RGB":
            im = im.convert("RGB")
        if im.size != (resolution, resolution):
            im = square_resize(im, resolution)
        arr = np.asarray(im, dtype=np.uint8)
    if arr.shape != (resolution, resolution, 3):
        raise _Corrupt(f"sample {sample.get('__key__')!r}: decoded shape {arr.shape}")
    return arr, label


class _BatchStream(torch.utils.data.IterableDataset):
    """One reader's stream of (x, y, skipped) batches; runs inside each DataLoader worker.
    `settings` has drop_last and num_classes resolved (see ShardLoader)."""

    def __init__(self, shards: list[str], batch_size: int, resolution: int, settings: LoaderSettings):
        super().__init__()
        self.shards, self.batch_size, self.resolution = shards, batch_size, resolution
        self.rank, self.world_size = settings.rank, settings.world_size
        self.shuffle_buffer, self.seed = settings.shuffle_buffer, settings.seed
        self.resampled, self.epoch_passes = settings.resampled, settings.epoch_passes
        self.drop_last, self.num_classes = settings.drop_last, settings.num_classes
        self.mirror = settings.mirror
        self.epoch = -1  # lives in the worker (persistent workers keep it), bumped per iteration
        self.expected: dict[str, int] = {}  # abspath of a shard -> its samples (from the manifest)

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

    def _samples(self, urls: Iterator[dict], counter: _SkipCounter) -> Iterator[dict]:
        """The samples of each shard in turn. A shard that breaks off (truncated, corrupt) is counted in
        full: with its count in the manifest, every sample not read from it is a skipped sample."""
        import webdataset as wds

        for src in urls:
            url = src["url"]
            errors = 0

            def handler(exc: BaseException) -> bool:
                nonlocal errors
                errors += 1
                return counter.note(exc)

            n = 0
            for sample in wds.tarfile_samples(iter([src]), handler=handler):
                n += 1
                yield sample
            expected = self.expected.get(url if is_remote(url) else os.path.abspath(url))
            if expected is None:
                counter.add(errors)  # unknown size: one skip per read error
            elif n < expected:
                counter.add(expected - n)
                if url not in counter.warned:  # once per shard: a resampled stream meets it again
                    counter.warned.add(url)
                    warnings.warn(f"gan-bench data: shard {url} ended after {n} of its {expected} samples "
                                  f"(truncated or corrupt); counted the {expected - n} unread as skipped",
                                  stacklevel=2)

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

        samples = self._samples(self._urls(mine, random.Random(f"gan-bench/shards/{tag}")), counter)
        if self.shuffle_buffer > 1:
            samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer,
                                  rng=random.Random(f"gan-bench/samples/{tag}"))(samples)

        bs, res = self.batch_size, self.resolution
        xbuf = np.empty((bs, res, res, 3), dtype=np.uint8)
        ybuf = np.empty((bs,), dtype=np.int64)
        flips = random.Random(f"gan-bench/mirror/{tag}") if self.mirror else None
        n = 0
        for sample in samples:
            try:
                arr, ybuf[n] = _decode(sample, res, self.num_classes)
            except Exception as exc:
                counter(_Corrupt(f"{exc} @ {sample.get('__url__')}"))
                continue
            counter.ok()
            xbuf[n] = arr[:, ::-1] if flips is not None and flips.random() < 0.5 else arr
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

    shards      list of shard paths (or a spec string, see `resolve_shards`)
    batch_size  images per batch (per process)
    resolution  output side R; images of another size are centre-cropped and resized
    settings    rank / world size, workers, shuffling, seed, passes (see LoaderSettings)

    `effective_size` is the number of distinct images it can yield (2 x the manifest's count with mirror).
    `skipped` counts corrupt samples skipped so far (bad image bytes, missing or non-integer cls,
    label out of range, unreadable shard); worker counts reach it with the batches.
    """

    def __init__(self, shards: list[str] | str, batch_size: int, resolution: int,
                 settings: LoaderSettings = LoaderSettings()):
        manifest = None
        if isinstance(shards, (str, os.PathLike)):
            shards, manifest = resolve_shards(shards)
        shards = [str(s) for s in (shards or [])]
        settings = _fit_workers(shards, settings)
        _check(shards, batch_size, resolution, settings)
        dirs = {os.path.dirname(s) for s in shards if not is_remote(s)}
        if manifest is None and len(dirs) == 1:
            manifest = load_manifest(next(iter(dirs)) or ".")
        num_classes = settings.num_classes
        if num_classes is None and manifest is not None and manifest.get("class_names"):
            num_classes = len(manifest["class_names"])

        self.shards = shards
        self.batch_size, self.resolution = int(batch_size), int(resolution)
        self.rank, self.world_size = int(settings.rank), int(settings.world_size)
        self.num_workers = int(settings.num_workers)
        self.resampled, self.num_classes = bool(settings.resampled), num_classes
        self.mirror = bool(settings.mirror)
        self.manifest = manifest
        self.skipped = 0
        stream = dataclasses.replace(
            settings, rank=self.rank, world_size=self.world_size, num_workers=self.num_workers,
            shuffle_buffer=int(settings.shuffle_buffer), seed=int(settings.seed), resampled=self.resampled,
            epoch_passes=bool(settings.epoch_passes), mirror=self.mirror,
            drop_last=self.resampled if settings.drop_last is None else bool(settings.drop_last),
            num_classes=num_classes)
        self._dataset = _BatchStream(shards, self.batch_size, self.resolution, stream)
        self._dataset.expected = _expected_counts(manifest, dirs)
        self.timeout_s = float(settings.timeout_s or 0)
        self._loader: torch.utils.data.DataLoader | None = None
        _LIVE.add(self)

    @property
    def readers(self) -> int:
        return self.world_size * max(1, self.num_workers)

    @property
    def effective_size(self) -> int | None:
        """Distinct images this loader can yield: the manifest's num_samples, x 2 with mirror; None if unknown."""
        return effective_size(self.manifest.get("num_samples") if self.manifest else None, self.mirror)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None:
            self._loader = torch.utils.data.DataLoader(
                self._dataset, batch_size=None, num_workers=self.num_workers,
                persistent_workers=self.num_workers > 0, pin_memory=False,
                prefetch_factor=4 if self.num_workers > 0 else None, worker_init_fn=_worker_init,
                timeout=self.timeout_s if self.num_workers > 0 else 0)
        try:
            for x, y, skipped in self._loader:
                self.skipped += int(skipped)
                if len(y):
                    yield x, y
        except RuntimeError as exc:
            self.close()
            if "timed out" not in str(exc):
                raise
            raise DataError(f"data loader: no batch from the decode workers in {self.timeout_s:g} s; a worker "
                            f"is stuck (a hung filesystem or image?). Check the shards in data.shards") from None
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
            # A worker stuck inside one decode ignores the SIGTERM that shutdown falls back to (workers
            # ignore SIGTERM/SIGINT, see _worker_init), and the interpreter would wait for it at exit.
            for w in getattr(it, "_workers", []):
                if w.is_alive():
                    os.kill(w.pid, signal.SIGKILL)
                    w.join(timeout=5)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "ShardLoader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


_LIVE: "weakref.WeakSet[ShardLoader]" = weakref.WeakSet()


@atexit.register
def _close_live_loaders() -> None:
    """At exit, before multiprocessing joins its children (registered earlier, so it runs later), stop
    the workers of loaders nobody closed: they ignore SIGTERM, so that join could wait for a stuck one."""
    for ld in list(_LIVE):
        ld.close()


def _expected_counts(manifest: dict | None, dirs: set[str]) -> dict[str, int]:
    """abspath of each shard -> its sample count, when the manifest of their one directory says so."""
    counts = shard_counts(manifest)
    if counts is None or len(dirs) != 1:
        return {}
    root = os.path.abspath(next(iter(dirs)) or ".")
    return {os.path.join(root, name): c for name, c in zip(manifest["shards"], counts)}


def _fit_workers(shards: list[str], s: LoaderSettings) -> LoaderSettings:
    """No more decode workers than this rank has shards (one line says so): a worker without a shard
    has nothing to read, and a small set (a user's own folder) would otherwise fail outright."""
    if s.num_workers <= 1 or s.world_size < 1 or not 0 <= s.rank < s.world_size:
        return s
    mine = len(shards[s.rank::s.world_size])
    if 1 <= mine < s.num_workers:
        print(f"gan-bench data: {mine} shard(s) for this process, so {mine} decode worker(s) instead of "
              f"data.num_workers={s.num_workers}", file=sys.stderr, flush=True)
        return dataclasses.replace(s, num_workers=mine)
    return s


def _check(shards: list[str], batch_size: int, resolution: int, s: LoaderSettings) -> None:
    """DataError for a loader that cannot work: no or missing shards, bad sizes, fewer shards than readers."""
    if not shards:
        raise no_shards("[]", "empty shard list")
    missing = [p for p in shards if not is_remote(p) and not os.path.isfile(p)]
    if missing:
        raise DataError(f"data.shards: shard file {missing[0]!r} does not exist ({len(missing)} of "
                        f"{len(shards)} missing); rewrite the shard set or fix data.shards")
    if batch_size < 1:
        raise DataError(f"train.batch_size={batch_size}: must be >= 1")
    if not 1 <= resolution <= 4096:
        raise DataError(f"data.resolution={resolution}: must be a positive image side in pixels")
    if s.world_size < 1 or not 0 <= s.rank < s.world_size:
        raise DataError(f"data loader: rank={s.rank} world_size={s.world_size}: need 0 <= rank < world_size")
    if s.num_workers < 0:
        raise DataError(f"data.num_workers={s.num_workers}: must be >= 0")
    if s.epoch_passes and s.resampled:
        raise DataError("data loader: epoch_passes=True needs resampled=False "
                        "(resampled streams are already infinite)")
    readers = s.world_size * max(1, s.num_workers)
    if len(shards) < readers:
        raise DataError(
            f"data.shards: {len(shards)} shard(s) for {readers} readers (world_size={s.world_size} x "
            f"num_workers={max(1, s.num_workers)}); every reader needs its own shard or its rank hangs. "
            f"Write more, smaller shards (`bench data make-shards ... samples_per_shard=<smaller>`) "
            f"or lower data.num_workers")
