"""Untrusted data and destructive defaults: make-shards never deletes what it did not write, manifests
and images from shards are validated before use, a cut shard is counted in full, decode workers leave
signals to the training process, and a user's small image folder works with the folder defaults."""
from __future__ import annotations

import io
import json
import os
import signal
import struct
import tarfile
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from bench.data import loader as loader_mod
from bench.data.loader import LOADER_TIMEOUT_S, MAX_DECODE_PIXELS, LoaderSettings, ShardLoader
from bench.data.shapes import shapes_sample
from bench.data.shards import (DataError, ShardSetSpec, load_manifest, make_shards, manifest_resolution,
                               resolve_shards)

pytestmark = pytest.mark.faults

RES = 16


def _shapes(out: Path, n: int = 40, per: int = 10) -> dict:
    return make_shards(out, ShardSetSpec(source="shapes", resolution=RES, num_samples=n, samples_per_shard=per),
                       progress=False)


def _image_tree(root: Path, n: int, classes=("a", "b", "c")) -> Path:
    rng = np.random.default_rng(0)
    for i in range(n):
        d = root / classes[i % len(classes)]
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(d / f"{i:04d}.png")
    return root


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ make-shards never destroys user files


def test_a_folder_of_user_images_is_never_replaced(tmp_path):
    photos = _image_tree(tmp_path / "photos", 6)
    before = _snapshot(photos)
    for overwrite in (False, True):
        with pytest.raises(DataError, match="not a shard set gan-bench wrote") as ei:
            _shapes(photos) if not overwrite else make_shards(
                photos, ShardSetSpec(resolution=RES, num_samples=10), progress=False, overwrite=True)
        assert "overwrite" not in str(ei.value) and "\n" not in str(ei.value)
    assert _snapshot(photos) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]  # no temp or trash dirs left


@pytest.mark.parametrize("where", ["same", "inside", "contains"])
def test_out_must_not_overlap_the_source_folder(tmp_path, where):
    tree = _image_tree(tmp_path / "data" / "tree", 6)
    out = {"same": tree, "inside": tree / "shards", "contains": tmp_path / "data"}[where]
    before = _snapshot(tmp_path)
    word = {"same": "is the source folder", "inside": "is inside the source folder",
            "contains": "contains the source folder"}[where]
    for overwrite in (False, True):
        with pytest.raises(DataError, match=word):
            make_shards(out, ShardSetSpec(source="folder", folder=str(tree), resolution=RES), progress=False,
                        overwrite=overwrite)
    assert _snapshot(tmp_path) == before
    # a symlinked spelling of the same folder is caught too (paths are resolved)
    (tmp_path / "link").symlink_to(tree)
    with pytest.raises(DataError, match="source folder"):
        make_shards(tmp_path / "link", ShardSetSpec(source="folder", folder=str(tree), resolution=RES),
                    progress=False, overwrite=True)


def test_a_previous_shard_set_is_replaced_with_overwrite(tmp_path):
    out = tmp_path / "set"
    _shapes(out, n=40, per=10)
    (out / "classifier-r16.pt").write_bytes(b"ours: the domain classifier lives beside the shards")
    with pytest.raises(DataError, match="overwrite=true"):  # ours: the hint is right here
        _shapes(out, n=30, per=10)
    m = make_shards(out, ShardSetSpec(resolution=RES, num_samples=30, samples_per_shard=10), progress=False,
                    overwrite=True)
    assert m["num_samples"] == 30 and len(resolve_shards(str(out))[0]) == 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


@pytest.mark.parametrize("intruder", ["file", "dir", "foreign_manifest"])
def test_a_shard_set_with_something_else_in_it_is_refused(tmp_path, intruder):
    out = tmp_path / "set"
    _shapes(out)
    if intruder == "file":
        (out / "thesis.tex").write_text("years of work")
    elif intruder == "dir":
        (out / "photos").mkdir()
        (out / "photos" / "x.jpg").write_bytes(b"jpeg")
    else:  # a manifest we did not write (no format key) over tar files the user keeps
        (out / "manifest.json").write_text(json.dumps({"shards": ["shard-000000.tar"]}))
    before = _snapshot(out)
    with pytest.raises(DataError, match="not a shard set gan-bench wrote") as ei:
        _shapes(out, n=20) if intruder == "file" else make_shards(
            out, ShardSetSpec(resolution=RES, num_samples=20), progress=False, overwrite=True)
    assert "overwrite" not in str(ei.value)
    with pytest.raises(DataError, match="not a shard set gan-bench wrote"):
        make_shards(out, ShardSetSpec(resolution=RES, num_samples=20), progress=False, overwrite=True)
    assert _snapshot(out) == before


# ------------------------------------------------------------------ manifests are validated when read


@pytest.mark.parametrize("patch, problem", [
    ({"shards": ["../escape.tar"]}, "not a plain file name"),
    ({"shards": ["/etc/passwd"]}, "not a plain file name"),
    ({"shards": ["sub/shard.tar"]}, "not a plain file name"),
    ({"shards": [".."]}, "not a plain file name"),
    ({"shards": [7]}, "not a plain file name"),
    ({"shards": "shard-000000.tar"}, "no 'shards' list"),
    ({"class_names": "cat,dog"}, "'class_names' is not a list of strings"),
    ({"class_names": ["cat", 2]}, "'class_names' is not a list of strings"),
    ({"num_samples": -1}, "'num_samples'=-1 is not a non-negative integer"),
    ({"num_samples": "40"}, "'num_samples'='40' is not a non-negative integer"),
    ({"num_samples": True}, "'num_samples'=True is not a non-negative integer"),
    ({"num_samples": 400}, "does not fit 4 shards"),
    ({"shard_counts": [10, 10, 10]}, "'shard_counts' has 3 entries for 4 shards"),
    ({"shard_counts": [10, 10, 10, 11]}, "sum to 41, not num_samples=40"),
    ({"shard_counts": [10, 10, 10, -10]}, "not a list of non-negative integers"),
])
def test_bad_manifests_are_one_clear_error(tmp_path, patch, problem):
    out = tmp_path / "set"
    _shapes(out)
    m = json.loads((out / "manifest.json").read_text())
    m.update(patch)
    (out / "manifest.json").write_text(json.dumps(m))
    for read in (load_manifest, resolve_shards,
                 lambda s: ShardLoader(s, 4, RES, LoaderSettings(num_workers=0))):
        with pytest.raises(DataError) as ei:
            read(str(out))
        msg = str(ei.value)
        assert str(out / "manifest.json") in msg and problem in msg and "\n" not in msg


def test_recorded_per_shard_counts_are_accepted_and_resolution_is_readable(tmp_path):
    out = tmp_path / "set"
    _shapes(out)
    m = json.loads((out / "manifest.json").read_text())
    m["shard_counts"] = [10, 10, 10, 10]
    (out / "manifest.json").write_text(json.dumps(m))
    assert load_manifest(str(out))["shard_counts"] == [10] * 4
    assert manifest_resolution(str(out)) == RES
    assert manifest_resolution(str(out / "shard-000000.tar")) == RES
    assert manifest_resolution(str(tmp_path / "nothing-here")) is None


# ------------------------------------------------------------------ images and shards are untrusted


def _png_with_header(width: int, height: int) -> bytes:
    """A small PNG whose IHDR claims width x height (the data is a few bytes: a decompression bomb's header)."""
    real = io.BytesIO()
    Image.new("RGB", (4, 4)).save(real, format="PNG")
    data = bytearray(real.getvalue())
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr) & 0xFFFFFFFF)
    return bytes(data)


def _tar(path: Path, samples: list[tuple[str, bytes, int]]) -> None:
    with tarfile.open(path, "w") as tar:
        for key, png, label in samples:
            for ext, payload in (("png", png), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


@pytest.mark.parametrize("side", [20000, 5000])  # 400 MP (PIL refuses too), 25 MP (only our limit)
def test_a_decompression_bomb_is_skipped_not_decoded(tmp_path, monkeypatch, side):
    assert side * side > MAX_DECODE_PIXELS
    good = [(f"{i:04d}", _png_from(i), i % 10) for i in range(6)]
    _tar(tmp_path / "a.tar", good[:3] + [("bomb", _png_with_header(side, side), 1)] + good[3:])
    loaded = []
    real_load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: (loaded.append(self.size), real_load(self))[1])
    with pytest.warns(UserWarning, match="corrupt"):
        ld = ShardLoader([str(tmp_path / "a.tar")], 2, RES, LoaderSettings(num_workers=0, resampled=False))
        n = sum(len(y) for _, y in ld)
    assert n == 6 and ld.skipped == 1
    assert loaded and max(w * h for w, h in loaded) <= RES * RES  # the bomb's pixels were never decoded


def _png_from(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(shapes_sample(i, 0, RES)[0]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("num_workers", [0, 1])
def test_a_shard_cut_in_half_is_counted_in_full(tmp_path, num_workers):
    out = tmp_path / "set"
    _shapes(out, n=200, per=50)
    cut = out / "shard-000001.tar"
    os.truncate(cut, cut.stat().st_size // 2)
    ld = ShardLoader(str(out), 8, RES, LoaderSettings(num_workers=num_workers, resampled=False, shuffle_buffer=0))
    if num_workers == 0:
        with pytest.warns(UserWarning, match=r"shard .*shard-000001\.tar ended after \d+ of its 50 samples"):
            n = sum(len(y) for _, y in ld)
    else:
        n = sum(len(y) for _, y in ld)
    assert 150 <= n < 200 and n + ld.skipped == 200  # every sample read or counted as skipped


def test_the_loader_waits_for_a_hung_worker_only_so_long(tmp_path, monkeypatch):
    out = tmp_path / "set"
    _shapes(out)
    ld = ShardLoader(str(out), 4, RES, LoaderSettings(num_workers=1))
    assert ld.timeout_s == LOADER_TIMEOUT_S > 0
    next(iter(ld))
    assert ld._loader.timeout == LOADER_TIMEOUT_S
    ld.close()

    def hang(*a, **k):
        time.sleep(60)

    monkeypatch.setattr(loader_mod, "_decode", hang)  # inherited by the forked worker
    hung = ShardLoader(str(out), 4, RES, LoaderSettings(num_workers=1, timeout_s=2))
    t0 = time.time()
    with pytest.raises(DataError, match="no batch from the decode workers in 2 s"):
        next(iter(hung))
    assert time.time() - t0 < 30


def test_decode_workers_ignore_sigterm_and_sigint(tmp_path):
    out = tmp_path / "set"
    _shapes(out)
    ld = ShardLoader(str(out), 4, RES, LoaderSettings(num_workers=2, shuffle_buffer=10))
    it = iter(ld)
    for _ in range(3):
        next(it)
    workers = ld._loader._iterator._workers
    assert len(workers) == 2
    for w in workers:
        os.kill(w.pid, signal.SIGTERM)
        os.kill(w.pid, signal.SIGINT)
    time.sleep(0.5)
    for _ in range(20):
        x, y = next(it)
        assert len(y) == 4
    assert all(w.is_alive() for w in workers)
    ld.close()
    assert not any(w.is_alive() for w in workers)


# ------------------------------------------------------------------ a new user's small image folder


def test_a_small_image_folder_works_with_the_folder_defaults(tmp_path, capsys):
    tree = _image_tree(tmp_path / "tree", 300)
    m = make_shards(tmp_path / "shards", ShardSetSpec(source="folder", folder=str(tree), resolution=RES,
                                                      samples_per_shard=1000), progress=True)
    assert len(m["shards"]) >= 8 and m["num_samples"] == 300
    assert "at least 8 shards" in capsys.readouterr().err
    ld = ShardLoader(str(tmp_path / "shards"), 32, RES, LoaderSettings(num_workers=4, resampled=False))
    assert sum(len(y) for _, y in ld) == 300 and ld.skipped == 0

    # a set with fewer shards than workers: fewer workers, said in one line
    few = _shapes(tmp_path / "few", n=30, per=10)
    assert len(few["shards"]) == 3
    capsys.readouterr()
    ld = ShardLoader(str(tmp_path / "few"), 4, RES, LoaderSettings(num_workers=4, resampled=False))
    err = capsys.readouterr().err.strip().splitlines()
    assert ld.num_workers == 3 and len(err) == 1 and "3 decode worker(s)" in err[0]
    assert sum(len(y) for _, y in ld) == 30
