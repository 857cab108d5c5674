"""Shard sets: resolving a shard spec, manifest.json, writing a set (`make_shards`), the built-in
shard cache (`default_shards`) and a set's identity (`manifest_hash`, `dataset_info`, `shard_dir`).

A shard set is a directory of WebDataset tar shards `shard-000000.tar ...` plus `manifest.json`; see
bench/data/format.py for the sample format and docs/architecture.md for where this sits.
"""

from __future__ import annotations

import dataclasses
import glob as _glob
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path
from typing import Iterable

from bench import rundir
from bench.data.format import (DEFAULT_NUM_SAMPLES, MAKE_SHARDS_HINT, MANIFEST, SHARD_NAME, DataError,
                               check_resolution)
from bench.data.writer import ShardSetSpec, publish, temp_dir_for, write_shard_set

__all__ = [  # the shard format's names and DataError live in format.py; they are part of this API
    "MANIFEST", "SHARD_NAME", "DEFAULT_NUM_SAMPLES", "MAKE_SHARDS_HINT", "DataError", "ShardSetSpec",
    "load_manifest", "resolve_shards", "is_remote", "make_shards", "configured_shards", "default_shards",
    "manifest_hash", "dataset_info", "shard_dir",
]


# ---------------------------------------------------------------------------------------------
# Shard specs and manifests
# ---------------------------------------------------------------------------------------------

def is_remote(spec: str) -> bool:
    """A `pipe:` or URL spec: brace-expanded but never checked on disk."""
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
    if not spec or is_remote(spec):
        return None
    path = Path(spec)
    if path.name == MANIFEST and path.is_file():
        mpath = path
    else:
        mpath = _spec_dir(spec) / MANIFEST
    if not mpath.is_file():
        return None
    manifest = rundir.read_json(mpath)
    if manifest is None:
        raise DataError(f"data.shards={str(shards_spec)!r}: cannot read {mpath} (not a JSON object); delete "
                        f"the shard directory and write it again with `bench data make-shards`")
    if not isinstance(manifest.get("shards"), list):
        raise DataError(f"data.shards={str(shards_spec)!r}: {mpath} has no 'shards' list; "
                        f"delete the shard directory and write it again with `bench data make-shards`")
    return manifest


def no_shards(spec: str, why: str) -> DataError:
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
            raise no_shards("[]", "empty shard list")
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
                        f"(bench.data.shards.default_shards) or point it at a shard directory; {MAKE_SHARDS_HINT}")
    if is_remote(spec):
        import braceexpand  # a webdataset dependency

        return list(braceexpand.braceexpand(spec)), None

    path = Path(spec)
    if path.is_dir() or (path.name == MANIFEST and path.is_file()):
        root = path if path.is_dir() else path.parent
        manifest = load_manifest(str(root))
        if manifest is not None:
            shards = [str(root / name) for name in manifest["shards"]]
            if not shards:
                raise no_shards(raw, f"{root / MANIFEST} lists no shards")
        else:
            shards = sorted(str(p) for p in root.glob("*.tar"))
            if not shards:
                raise no_shards(raw, "directory has no *.tar files and no manifest.json")
    elif "{" in spec:
        import braceexpand

        shards = list(braceexpand.braceexpand(spec))
        manifest = load_manifest(spec)
    elif any(ch in spec for ch in "*?["):
        shards = sorted(_glob.glob(spec))
        if not shards:
            raise no_shards(raw, "the glob matches no files")
        manifest = load_manifest(spec)
    elif path.is_file():
        shards, manifest = [str(path)], load_manifest(spec)
    else:
        raise no_shards(raw, "no such file or directory")

    missing = [s for s in shards if not os.path.isfile(s)]
    if missing:
        raise DataError(f"data.shards={raw!r}: {len(missing)} of {len(shards)} shard files are missing, "
                        f"first {missing[0]!r}; rewrite the shard set with `bench data make-shards` "
                        f"or fix the pattern")
    return shards, manifest


# ---------------------------------------------------------------------------------------------
# Writing a shard set, and the built-in one
# ---------------------------------------------------------------------------------------------

def make_shards(out: str | os.PathLike, spec: ShardSetSpec = ShardSetSpec(), *, progress: bool = True,
                overwrite: bool = False) -> dict:
    """Write a WebDataset shard set to directory `out` and return its manifest.

    spec       what to write: source, resolution, num_samples, samples_per_shard, seed, folder,
               workers (see ShardSetSpec)
    progress   progress and a summary line on stderr
    overwrite  replace an existing shard set at `out` (default: refuse with DataError)

    The set is written to a temporary directory beside `out` and renamed into place when complete.
    """
    if spec.source == "folder":
        resolution = check_resolution(spec.resolution, "make-shards source=folder", 8, 1024)
    else:
        resolution = check_resolution(spec.resolution, "make-shards")
    if int(spec.samples_per_shard) < 1:
        raise DataError(f"make-shards samples_per_shard={spec.samples_per_shard}: must be >= 1")
    spec = dataclasses.replace(spec, resolution=resolution, samples_per_shard=int(spec.samples_per_shard),
                               seed=int(spec.seed))
    out = Path(os.path.expanduser(str(out))).absolute()
    if out.exists() and not overwrite:
        if (out / MANIFEST).is_file():
            raise DataError(f"make-shards out={str(out)!r}: already holds a complete shard set ({MANIFEST}); "
                            f"pass overwrite=true to replace it, or choose another out")
        if not out.is_dir() or any(out.iterdir()):
            raise DataError(f"make-shards out={str(out)!r}: exists and is not an empty directory; "
                            f"choose another out, or pass overwrite=true to replace it")
    tmp = temp_dir_for(out)
    try:
        manifest = write_shard_set(tmp, spec, progress=progress, summary=progress)
        if not publish(tmp, out, overwrite):
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

    Location: `cache_dir`, else `rundir.cache_root()` ($GAN_BENCH_CACHE, else ~/.cache/gan-bench);
    subdirectory `shapes-r{resolution}-n{num_samples}-s{seed}`. The set has about 64 shards (fewer when
    tiny), so up to 64 readers (ranks x workers) can share it. Concurrent first uses are safe: each
    writes its own temporary copy, the first rename wins and the others use the winner's shards.
    """
    resolution = check_resolution(resolution, "data (built-in shapes)")
    root = Path(os.path.expanduser(str(cache_dir))).absolute() if cache_dir else rundir.cache_root()
    out = root / f"shapes-r{resolution}-n{int(num_samples)}-s{int(seed)}"
    if (out / MANIFEST).is_file():
        resolve_shards(str(out))  # raises DataError naming the first missing shard
        return out
    print(f"gan-bench: writing the built-in shapes dataset ({num_samples} images, {resolution}x{resolution}) "
          f"to {out} (first use; later runs reuse it)", file=sys.stderr, flush=True)
    spec = ShardSetSpec(source="shapes", resolution=resolution, num_samples=int(num_samples),
                        samples_per_shard=max(1, math.ceil(int(num_samples) / 64)), seed=int(seed))
    tmp = temp_dir_for(out)
    try:
        write_shard_set(tmp, spec, progress=True, summary=False)
        publish(tmp, out, overwrite=False)  # False: a concurrent writer won; its set is identical
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---------------------------------------------------------------------------------------------
# A shard set's identity
# ---------------------------------------------------------------------------------------------

def shard_dir(shards_spec) -> Path:
    """The one directory holding the shard set (where its domain classifier and caches go)."""
    from bench.eval.errors import ClassifierError  # a leaf; only this message is the classifier's

    shards, _ = resolve_shards(str(shards_spec))
    dirs = {os.path.dirname(os.path.abspath(s)) for s in shards}
    if len(dirs) != 1:
        raise ClassifierError(f"data.shards={str(shards_spec)!r} spans {len(dirs)} directories; "
                              f"pass out=/path/classifier.pt to say where the classifier goes")
    return Path(dirs.pop())


def manifest_hash(shards_spec) -> str:
    """sha256 (hex, 16 chars) of the shard set's manifest.json (without its creation time); for
    shards without a manifest, of the shard paths, sizes and modification times."""
    shards, manifest = resolve_shards(str(shards_spec))
    if manifest is not None:
        ident = {k: v for k, v in manifest.items() if k != "created"}
    else:
        ident = {"shards": [[os.path.abspath(s), os.path.getsize(s), int(os.path.getmtime(s))]
                            for s in shards if os.path.isfile(s)] or shards}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def dataset_info(shards_spec) -> tuple[list[str] | None, int | None, int | None]:
    """(class names, image count, resolution) from the manifest; None where unknown."""
    _, manifest = resolve_shards(str(shards_spec))
    if manifest is None:
        return None, None, None
    return (list(manifest["class_names"]) if manifest.get("class_names") else None,
            manifest.get("num_samples"), manifest.get("resolution"))
