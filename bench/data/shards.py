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
import re
import shutil
import sys
from pathlib import Path
from typing import Iterable

from bench import rundir
from bench.data.format import (DEFAULT_NUM_SAMPLES, MAKE_SHARDS_HINT, MANIFEST, MAX_RESOLUTION, MIN_RESOLUTION,
                               SHARD_NAME, DataError, check_resolution)
from bench.data import importers
from bench.data.shapes import SHAPES_VERSION
from bench.data.writer import DEFAULT_RESOLUTION, ShardSetSpec, publish, temp_dir_for, write_shard_set

__all__ = [  # the shard format's names and DataError live in format.py; they are part of this API
    "MANIFEST", "SHARD_NAME", "DEFAULT_NUM_SAMPLES", "MAKE_SHARDS_HINT", "DataError", "ShardSetSpec",
    "load_manifest", "resolve_shards", "is_remote", "make_shards", "configured_shards", "default_shards",
    "manifest_hash", "dataset_info", "shard_dir", "manifest_problem", "shard_counts", "manifest_resolution",
    "owned_shard_set", "effective_size", "data_facts", "describe_size",
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
    problem = manifest_problem(manifest)
    if problem:
        raise DataError(f"data.shards={str(shards_spec)!r}: {mpath}: {problem}; delete the shard directory "
                        f"and write it again with `bench data make-shards`")
    return manifest


def _is_count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _plain_name(name) -> bool:
    """A file name inside the shard directory: no path separators, no '..', not absolute."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name and not os.path.isabs(name))


def manifest_problem(m: dict) -> str | None:
    """What is wrong with a manifest read from disk (it is untrusted input), or None."""
    shards = m.get("shards")
    if not isinstance(shards, list):
        return "has no 'shards' list"
    bad = next((s for s in shards if not _plain_name(s)), None)
    if bad is not None or any(s is None for s in shards):
        return f"shard name {bad!r} is not a plain file name inside the directory"
    names = m.get("class_names")
    if names is not None and not (isinstance(names, list) and all(isinstance(c, str) for c in names)):
        return "'class_names' is not a list of strings"
    labelled = m.get("labelled", True)  # manifests from before the key are labelled
    if not isinstance(labelled, bool):
        return f"'labelled'={labelled!r} is not true or false"
    if not labelled and names is not None and len(names) != 1:
        return f"'labelled' is false but it names {len(names)} classes (an unlabelled set has one)"
    for key in ("num_samples", "samples_per_shard", "resolution"):
        if key in m and not _is_count(m[key]):
            return f"{key!r}={m[key]!r} is not a non-negative integer"
    counts = m.get("shard_counts")
    if counts is not None:
        if not (isinstance(counts, list) and all(_is_count(c) for c in counts)):
            return "'shard_counts' is not a list of non-negative integers"
        if len(counts) != len(shards):
            return f"'shard_counts' has {len(counts)} entries for {len(shards)} shards"
        if "num_samples" in m and sum(counts) != m["num_samples"]:
            return f"'shard_counts' sum to {sum(counts)}, not num_samples={m['num_samples']}"
    elif shards and m.get("num_samples") is not None and m.get("samples_per_shard"):
        n, per = m["num_samples"], m["samples_per_shard"]
        if not per * (len(shards) - 1) < n <= per * len(shards):
            return (f"num_samples={n} does not fit {len(shards)} shards of samples_per_shard={per} "
                    f"(the per-shard counts do not add up)")
    return None


def shard_counts(manifest: dict | None) -> list[int] | None:
    """Samples in each shard, in manifest order: 'shard_counts' when recorded, else derived from
    num_samples and samples_per_shard (the writer fills every shard but the last); None if unknown."""
    if not manifest or manifest_problem(manifest):
        return None
    if manifest.get("shard_counts") is not None:
        return list(manifest["shard_counts"])
    n, per, k = manifest.get("num_samples"), manifest.get("samples_per_shard"), len(manifest["shards"])
    if n is None or not per or not k:
        return None
    return [per] * (k - 1) + [n - per * (k - 1)]


def manifest_resolution(shards_spec) -> int | None:
    """The image side recorded in the shard set's manifest.json, or None (no manifest, or not recorded).
    For the config (docs/architecture.md): data.resolution, unless set explicitly, may come from here."""
    manifest = load_manifest(shards_spec)
    res = manifest.get("resolution") if manifest else None
    return int(res) if _is_count(res) and res > 0 else None


def resolution_from_manifest(shards_spec) -> int:
    """`data.resolution: null` (the folder data group's default): the image side the shards were written
    at, so a user's 32-pixel shards are not trained or classified at 128."""
    if not shards_spec or shards_spec == "???":
        raise DataError(f"data.shards is empty: this data group reads your shards; give data.shards=DIR "
                        f"({MAKE_SHARDS_HINT})")
    res = manifest_resolution(shards_spec)
    if res is None:
        raise DataError(f"data.resolution=null takes the resolution from the shards' {MANIFEST}, but "
                        f"data.shards={shards_spec!r} has none that records it; set data.resolution=N ({MIN_RESOLUTION}..{MAX_RESOLUTION})")
    return res


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

    spec       what to write: source, resolution, num_samples, samples_per_shard, seed, workers, and the
               source's input: folder, file, split, dataset, root (see ShardSetSpec, importers.SOURCE_KEYS)
    progress   progress and a summary line on stderr
    overwrite  replace an existing shard set at `out` (default: refuse with DataError)

    The set is written to a temporary directory beside `out` and renamed into place when complete.
    """
    importers.check_spec(spec.source, {k: getattr(spec, k) for k in ("folder", "file", "split", "dataset", "root")})
    if spec.source == "shapes":
        resolution = check_resolution(spec.resolution or DEFAULT_RESOLUTION, "make-shards")
    elif spec.resolution is None and spec.source != "folder":
        resolution = None  # an importer's own square side (writer._plan)
    else:
        resolution = check_resolution(spec.resolution or DEFAULT_RESOLUTION, f"make-shards source={spec.source}",
                                      8, 1024)
    if int(spec.samples_per_shard) < 1:
        raise DataError(f"make-shards samples_per_shard={spec.samples_per_shard}: must be >= 1")
    spec = dataclasses.replace(spec, resolution=resolution, samples_per_shard=int(spec.samples_per_shard),
                               seed=int(spec.seed))
    out = Path(os.path.expanduser(str(out))).absolute()
    _check_out(out, spec, overwrite)
    tmp = temp_dir_for(out)
    try:
        manifest = write_shard_set(tmp, spec, progress=progress, summary=progress)
        _check_out(out, spec, overwrite)  # again: the user may have put files there while we wrote
        if not publish(tmp, out, overwrite):
            raise DataError(f"make-shards out={str(out)!r}: another process wrote a shard set there "
                            f"at the same time; use it, or pass overwrite=true")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return manifest


# What make_shards and the domain classifier write into a shard directory (and atomic_write's temp files).
_OUR_EXTRA = re.compile(r"^\.?classifier-r\d+\.pt(\.tmp-\d+-[0-9a-f]+)?$")


def owned_shard_set(out: Path) -> str | None:
    """None when directory `out` holds a shard set we wrote and nothing else (so replacing it destroys
    nothing of the user's); otherwise why not, for the error message."""
    manifest = rundir.read_json(out / MANIFEST) if (out / MANIFEST).is_file() else None
    if manifest is None:
        return f"it has no readable {MANIFEST}"
    if manifest.get("format") != "png+cls" or manifest_problem(manifest) or not all(
            k in manifest for k in ("num_samples", "class_names", "resolution", "source")):
        return f"its {MANIFEST} is not one `bench data make-shards` wrote"
    allowed = set(manifest["shards"]) | {MANIFEST}
    for p in out.iterdir():
        if p.name in allowed and p.is_file() and not p.is_symlink():
            continue
        if _OUR_EXTRA.match(p.name) and p.is_file():
            continue
        return f"it holds {p.name!r}, which is not part of the shard set"
    return None


def _check_out(out: Path, spec: ShardSetSpec, overwrite: bool) -> None:
    """DataError unless writing to `out` can destroy nothing but a shard set we wrote earlier."""
    where = f"make-shards out={str(out)!r}"
    src = importers.source_path(spec)
    if src is not None:
        dst = out.resolve()
        if dst == src or src in dst.parents or dst in src.parents:
            rel = "is" if dst == src else "is inside" if src in dst.parents else "contains"
            key = "root" if spec.source == "torchvision" else "file" if spec.source in ("npz", "hdf5") else "folder"
            raise DataError(f"{where} {rel} the source {key}={str(src)!r}; write the shards to a "
                            f"directory outside the input")
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir() or out.is_symlink():
        raise DataError(f"{where}: exists and is not a directory; choose another out (a new or empty directory)")
    if not any(out.iterdir()):
        return
    why = owned_shard_set(out)
    if why is not None:
        raise DataError(f"{where}: not empty and not a shard set gan-bench wrote ({why}); nothing was "
                        f"changed: choose a new or empty directory")
    if not overwrite:
        raise DataError(f"{where}: already holds a complete shard set ({MANIFEST}); pass overwrite=true to "
                        f"replace it, or choose another out")


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
    subdirectory `shapes-v{SHAPES_VERSION}-r{resolution}-n{num_samples}-s{seed}` (the generator's version:
    shards an older generator cached are never reused). The set has about 64 shards (fewer when
    tiny), so up to 64 readers (ranks x workers) can share it. Concurrent first uses are safe: each
    writes its own temporary copy, the first rename wins and the others use the winner's shards.
    """
    resolution = check_resolution(resolution, "data (built-in shapes)")
    root = Path(os.path.expanduser(str(cache_dir))).absolute() if cache_dir else rundir.cache_root()
    out = root / f"shapes-v{SHAPES_VERSION}-r{resolution}-n{int(num_samples)}-s{int(seed)}"
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


def effective_size(num_samples: int | None, mirror: bool) -> int | None:
    """The data set's size as training sees it: num_samples, doubled by data.mirror (every image and its mirror
    image, as StyleGAN2-ADA's --mirror counts its dataset); None when the count is unknown."""
    return None if num_samples is None else int(num_samples) * (2 if mirror else 1)


def data_facts(shards_spec, mirror: bool) -> dict:
    """What a run records about its training data (run.json) and the start line prints: the image count, the
    effective size with data.mirror, and whether the set is labelled (a manifest without the key is)."""
    _, manifest = resolve_shards(str(shards_spec))
    n = manifest.get("num_samples") if manifest else None
    return {"data_num_samples": n, "data_mirror": bool(mirror), "data_effective_size": effective_size(n, mirror),
            "data_labelled": bool(manifest.get("labelled", True)) if manifest else None}


def describe_size(facts: dict) -> str:
    """'10000 images' or '10000 images (20000 with data.mirror)' for the training start line."""
    n = facts.get("data_num_samples")
    if n is None:
        return "an unknown number of images" + (" (doubled by data.mirror)" if facts.get("data_mirror") else "")
    more = f" ({facts['data_effective_size']} with data.mirror)" if facts.get("data_mirror") else ""
    return f"{n} images{more}"
