"""Tests for bench/data/: the shapes dataset, shard writing, and the WebDataset read pipeline."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing as mp
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.data import shapes
from bench.data.loader import LoaderSettings, ShardLoader
from bench.data.shapes import SHAPES_CLASSES, shapes_sample
from bench.data.shards import (DataError, ShardSetSpec, default_shards, load_manifest, make_shards,
                               resolve_shards)

RES = 16
N, PER_SHARD = 200, 50  # 4 shards


@pytest.fixture(scope="module")
def shards_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards") / "shapes16"
    make_shards(out, ShardSetSpec(source="shapes", resolution=RES, num_samples=N, samples_per_shard=PER_SHARD,
                                  seed=3), progress=False)
    return out


def _digest(img_uint8: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(img_uint8).tobytes()).hexdigest()


def _to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B,3,R,R) in [-1,1] -> (B,R,R,3) uint8, exactly inverting the loader's scaling."""
    return ((x + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _read_all(loader) -> list[tuple[int, str]]:
    out = []
    for x, y in loader:
        for img, label in zip(_to_uint8(x), y.tolist()):
            out.append((label, _digest(img)))
    return out


def _write_tar(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, payload in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


# -------------------------------------------------------------------------------- shapes


def test_shapes_classes_are_distinct_shapes():
    # the class is the shape alone (colour is drawn independently: tests/test_shapes_only.py)
    assert len(SHAPES_CLASSES) >= 10 and len(set(SHAPES_CLASSES)) == len(SHAPES_CLASSES)
    assert all(name.isalpha() and name.islower() for name in SHAPES_CLASSES)


def test_shapes_deterministic_and_varied():
    a, la = shapes_sample(7, 0, 32)
    b, lb = shapes_sample(7, 0, 32)
    assert np.array_equal(a, b) and la == lb == 7 % len(SHAPES_CLASSES)
    c, _ = shapes_sample(7 + len(SHAPES_CLASSES), 0, 32)  # same class, other index
    d, _ = shapes_sample(7, 1, 32)  # same index, other seed
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    # labels cycle through all classes; images carry real contrast (shape vs background)
    assert [shapes_sample(i, 0, 16)[1] for i in range(12)] == [i % len(SHAPES_CLASSES) for i in range(12)]
    assert a.astype(float).std() > 20


@pytest.mark.parametrize("res", [16, 32, 64, 256])
def test_shapes_resolutions(res):
    img, label = shapes_sample(3, 0, res)
    assert img.shape == (res, res, 3) and img.dtype == np.uint8 and label == 3


@pytest.mark.parametrize("res", [8, 15, 513, 1024, 32.0])  # 16..512 (bench/data/format.py MAX_RESOLUTION)
def test_shapes_bad_resolution(res):
    with pytest.raises(DataError, match="resolution"):
        shapes_sample(0, 0, res)


# -------------------------------------------------------------------------------- shards round trip


def test_manifest(shards_dir):
    m = json.loads((shards_dir / "manifest.json").read_text())
    assert m["shards"] == [f"shard-{i:06d}.tar" for i in range(4)]
    assert m["num_samples"] == N and m["resolution"] == RES and m["source"] == "shapes"
    assert m["class_names"] == SHAPES_CLASSES and m["seed"] == 3 and m["samples_per_shard"] == PER_SHARD
    assert "created" in m
    assert load_manifest(str(shards_dir)) == m
    assert load_manifest(str(shards_dir / "shard-{000000..000003}.tar")) == m
    with tarfile.open(shards_dir / "shard-000001.tar") as tar:
        names = tar.getnames()
    assert names[:2] == ["00000050.png", "00000050.cls"] and len(names) == 2 * PER_SHARD
    assert not [p for p in shards_dir.parent.iterdir() if ".tmp-" in p.name]


def test_round_trip_one_pass(shards_dir):
    expected = sorted((label, _digest(img)) for img, label in (shapes_sample(i, 3, RES) for i in range(N)))
    loader = ShardLoader(str(shards_dir), 32, RES, LoaderSettings(num_workers=0, resampled=False))
    batches = list(loader)
    x, y = batches[0]
    assert x.dtype == torch.float32 and x.shape == (32, 3, RES, RES) and x.is_contiguous()
    assert y.dtype == torch.int64 and y.shape == (32,)
    assert all(float(b[0].min()) >= -1.0 and float(b[0].max()) <= 1.0 for b in batches)
    assert [len(b[1]) for b in batches] == [32] * 6 + [8]  # one-pass keeps the partial batch
    got = sorted((label, _digest(img)) for b in batches for img, label in zip(_to_uint8(b[0]), b[1].tolist()))
    assert got == expected and loader.skipped == 0


def test_resampled_infinite_deterministic_and_resizes(shards_dir):
    shards, _ = resolve_shards(str(shards_dir))

    def first(seed, n=4):
        it = iter(ShardLoader(shards, 16, 24, LoaderSettings(num_workers=0, seed=seed, shuffle_buffer=64)))
        return [next(it) for _ in range(n)]

    a, b, c = first(0, 20), first(0), first(1)  # 20 batches x 16 = 320 > 200: resampled keeps going
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    assert not torch.equal(a[0][0], c[0][0])
    assert a[0][0].shape == (16, 3, 24, 24)  # 16 px shards resized to the requested 24


def test_resampled_ranks_read_their_own_shards(shards_dir):
    # keys 0..199 were written in order, 50 per shard: map each image back to the shard holding it
    owner = {_digest(shapes_sample(i, 3, RES)[0]): i // PER_SHARD for i in range(N)}
    shards, _ = resolve_shards(str(shards_dir))
    for rank in range(2):
        it = iter(ShardLoader(shards, 32, RES, LoaderSettings(rank=rank, world_size=2, num_workers=0)))
        seen = {owner[_digest(img)] for _ in range(15) for img in _to_uint8(next(it)[0])}
        assert seen == {rank, rank + 2}  # shards[rank::2]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_one_pass_split_across_ranks(shards_dir, num_workers):
    per_rank = []
    for rank in range(2):
        loader = ShardLoader(str(shards_dir), 16, RES, LoaderSettings(rank=rank, world_size=2,
                                                                      num_workers=num_workers, resampled=False))
        per_rank.append(_read_all(loader))
        loader.close()
    a, b = per_rank
    assert len(a) == len(b) == N // 2
    assert not set(a) & set(b)
    assert len(set(a) | set(b)) == N


# -------------------------------------------------------------------------------- ImageFolder


def test_image_folder(tmp_path):
    root = tmp_path / "tree"
    rng = np.random.default_rng(0)
    for ci, name in enumerate(["zebra", "apple", "mango"]):  # class names are the sorted folders
        (root / name / "sub").mkdir(parents=True)
        for j in range(4):
            # wide image: red side bands, class-coloured centre square -> the crop keeps only the centre
            img = np.zeros((40, 60, 3), np.uint8)
            img[:, :10] = img[:, 50:] = (255, 0, 0)
            img[:, 10:50] = (0, 80 * ci, 200)
            img[:, 10:50] += rng.integers(0, 20, size=(40, 40, 1), dtype=np.uint8)
            where = root / name / ("sub" if j == 3 else "")
            if j % 2:
                Image.fromarray(img).save(where / f"{j}.jpg", quality=95)
            else:
                Image.fromarray(img.transpose(1, 0, 2)).save(where / f"{j}.png")  # tall
    (root / "apple" / "broken.jpg").write_bytes(b"not a jpeg")
    (root / "apple" / "notes.txt").write_text("ignored")

    out = tmp_path / "folder_shards"
    m = make_shards(out, ShardSetSpec(source="folder", folder=root, resolution=16, samples_per_shard=4),
                    progress=False)
    assert m["class_names"] == ["apple", "mango", "zebra"]
    assert m["num_samples"] == 12 and m["skipped"] == 1 and "broken.jpg" in m["skipped_examples"][0]
    # 12 images: at least MIN_FOLDER_SHARDS (8) shards asked for, so 2 per shard instead of 4
    assert len(m["shards"]) == 6 and m["samples_per_shard"] == 2 and m["source"] == "folder"

    loader = ShardLoader(str(out), 12, 16, LoaderSettings(num_workers=0, resampled=False, shuffle_buffer=0))
    (x, y), = list(loader)
    imgs = _to_uint8(x).astype(int)
    assert sorted(y.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    assert (imgs[..., 0] < 60).all()  # no red band survived the centre crop
    for img, label in zip(imgs, y.tolist()):
        green = {"apple": 80, "mango": 160, "zebra": 0}[m["class_names"][label]]
        assert abs(img[..., 1].mean() - green - 10) < 15


def test_folder_errors(tmp_path):
    with pytest.raises(DataError, match="folder="):
        make_shards(tmp_path / "o", ShardSetSpec(source="folder", folder=tmp_path / "nope"), progress=False)
    (tmp_path / "src").mkdir()
    with pytest.raises(DataError, match="no class subfolders"):
        make_shards(tmp_path / "o", ShardSetSpec(source="folder", folder=tmp_path / "src"), progress=False)
    with pytest.raises(DataError, match="source="):
        make_shards(tmp_path / "o", ShardSetSpec(source="imagenet"), progress=False)
    assert not list(tmp_path.glob(".o.tmp-*"))


# -------------------------------------------------------------------------------- corrupt samples


@pytest.mark.parametrize("num_workers", [0, 1])
def test_corrupt_png_is_skipped_and_counted(tmp_path, num_workers):
    good = [{"__key__": f"{i:04d}", "png": _png(shapes_sample(i, 0, RES)[0]), "cls": str(i % 10).encode()}
            for i in range(9)]
    bad = {"__key__": "0100", "png": b"\x89PNG garbage", "cls": b"1"}
    _write_tar(tmp_path / "a.tar", good[:5] + [bad] + good[5:])
    with pytest.warns(UserWarning, match="corrupt") if num_workers == 0 else contextlib.nullcontext():
        loader = ShardLoader([str(tmp_path / "a.tar")], 4, RES,
                             LoaderSettings(num_workers=num_workers, resampled=False))
        got = _read_all(loader)
    assert loader.skipped == 1
    assert sorted(got) == sorted((s % 10, _digest(shapes_sample(s, 0, RES)[0])) for s in range(9))


def test_other_corruptions_are_skipped_and_counted(tmp_path):
    def ok(i):
        return {"__key__": f"{i:04d}", "png": _png(shapes_sample(i, 0, RES)[0]), "cls": str(i % 10).encode()}

    samples = [ok(0), {"__key__": "0001", "png": ok(1)["png"]},  # missing cls
               ok(2), {"__key__": "0003", "png": ok(3)["png"], "cls": b"three"},  # non-integer cls
               {"__key__": "0004", "png": ok(4)["png"], "cls": b"10"},  # out of range of 10 classes
               {"__key__": "0005", "cls": b"5"},  # no image
               ok(6)]
    _write_tar(tmp_path / "b.tar", samples)
    (tmp_path / "manifest.json").write_text(json.dumps({"shards": ["b.tar"], "class_names": SHAPES_CLASSES}))
    with pytest.warns(UserWarning):
        loader = ShardLoader(str(tmp_path), 2, RES, LoaderSettings(num_workers=0, resampled=False))
        got = _read_all(loader)
    assert loader.num_classes == 10 and loader.skipped == 4
    assert sorted(label for label, _ in got) == [0, 2, 6]


# -------------------------------------------------------------------------------- errors


def test_unreadable_shard_fails_loudly_instead_of_hanging(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"this is not a tar file" * 10)
    it = iter(ShardLoader([str(tmp_path / "bad.tar")], 4, RES, LoaderSettings(num_workers=1)))  # infinite
    with pytest.raises(DataError, match="in a row") as excinfo:
        next(it)
    assert "\n" not in str(excinfo.value) and "Traceback" not in str(excinfo.value)


def test_error_messages(tmp_path, shards_dir):
    with pytest.raises(DataError, match="empty shard list.*make-shards"):
        ShardLoader([], 8, RES)
    with pytest.raises(DataError, match="no such file or directory.*make-shards"):
        resolve_shards(str(tmp_path / "missing"))
    with pytest.raises(DataError, match="no \\*.tar files"):
        resolve_shards(str(tmp_path))
    with pytest.raises(DataError, match="glob matches no files"):
        resolve_shards(str(tmp_path / "*.tar"))
    with pytest.raises(DataError, match="data.shards is empty"):
        resolve_shards("")
    with pytest.raises(DataError, match=r"4 shard\(s\) for 6 readers.*samples_per_shard.*num_workers"):
        ShardLoader(str(shards_dir), 8, RES, LoaderSettings(world_size=6, rank=1, num_workers=1))
    # more workers than this rank's shards: fewer workers, not an error
    assert ShardLoader(str(shards_dir), 8, RES, LoaderSettings(world_size=2, rank=1, num_workers=3)).num_workers == 2
    with pytest.raises(DataError, match="6 of 10 shard files are missing, first .*shard-000004.tar"):
        resolve_shards(str(shards_dir / "shard-{000000..000009}.tar"))
    with pytest.raises(DataError, match="epoch_passes"):
        ShardLoader(str(shards_dir), 8, RES, LoaderSettings(epoch_passes=True))
    # a pattern, a glob and a list all resolve to the same shards
    full, m = resolve_shards(str(shards_dir))
    assert len(full) == 4 and m is not None
    assert resolve_shards(str(shards_dir / "shard-{000000..000003}.tar"))[0] == full
    assert resolve_shards(str(shards_dir / "*.tar"))[0] == full
    assert resolve_shards(full)[0] == full


# -------------------------------------------------------------------------------- atomic writes, cache


def test_make_shards_refuses_existing_set_unless_overwrite(tmp_path):
    out = tmp_path / "set"
    make_shards(out, ShardSetSpec(resolution=RES, num_samples=20, samples_per_shard=10), progress=False)
    with pytest.raises(DataError, match="overwrite"):
        make_shards(out, ShardSetSpec(resolution=RES, num_samples=30, samples_per_shard=10), progress=False)
    assert load_manifest(str(out))["num_samples"] == 20
    m = make_shards(out, ShardSetSpec(resolution=RES, num_samples=30, samples_per_shard=10), progress=False,
                    overwrite=True)
    assert m["num_samples"] == 30 and len(resolve_shards(str(out))[0]) == 3
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "x").write_text("x")
    with pytest.raises(DataError, match="not a shard set gan-bench wrote"):
        make_shards(tmp_path / "junk", ShardSetSpec(resolution=RES, num_samples=10), progress=False)
    (tmp_path / "empty").mkdir()
    make_shards(tmp_path / "empty", ShardSetSpec(resolution=RES, num_samples=10), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "junk", "set"]  # no temp dirs left


def test_killed_write_leaves_nothing_that_looks_complete(tmp_path, monkeypatch):
    calls = {"n": 0}
    real = shapes.shapes_sample

    def dies(index, seed, res):
        calls["n"] += 1
        assert not (tmp_path / "set").exists()  # nothing appears at `out` until the set is complete
        if calls["n"] > 25:
            raise KeyboardInterrupt  # the job is killed mid-write
        return real(index, seed, res)

    monkeypatch.setattr(shapes, "shapes_sample", dies)
    with pytest.raises(KeyboardInterrupt):
        make_shards(tmp_path / "set", ShardSetSpec(resolution=RES, num_samples=40, samples_per_shard=10),
                    progress=False)
    assert list(tmp_path.iterdir()) == []


def _race(cache, q):
    q.put(str(default_shards(RES, cache_dir=cache, num_samples=40)))


def test_default_shards_cache_and_race(tmp_path, capsys, monkeypatch):
    cache = tmp_path / "cache"
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_race, args=(cache, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    results = {q.get(timeout=5), q.get(timeout=5)}
    out = cache / f"shapes-v{shapes.SHAPES_VERSION}-r{RES}-n40-s0"
    assert results == {str(out)}
    assert [p.name for p in cache.iterdir()] == [out.name]  # loser cleaned its temp dir up
    m = load_manifest(str(out))
    assert m["num_samples"] == 40 and len(m["shards"]) == 40  # small shards: many readers possible

    mtime = (out / "manifest.json").stat().st_mtime_ns
    capsys.readouterr()
    assert default_shards(RES, cache_dir=cache, num_samples=40) == out
    assert capsys.readouterr().err == ""  # reused silently
    assert (out / "manifest.json").stat().st_mtime_ns == mtime

    monkeypatch.setenv("GAN_BENCH_CACHE", str(tmp_path / "env_cache"))
    got = default_shards(RES, num_samples=10, seed=1)
    assert got == tmp_path / "env_cache" / f"shapes-v{shapes.SHAPES_VERSION}-r{RES}-n10-s1"
    assert "writing the built-in shapes dataset" in capsys.readouterr().err


def test_folder_data_takes_its_resolution_from_the_manifest(tiny_shards):
    """data=folder with no data.resolution trains at the shards' own resolution (32 here), not 128;
    an explicit value is kept; no shards is one clear error."""
    from bench.config import compose, validate

    cfg = validate(compose(["data=folder", f"data.shards={tiny_shards}"]))
    assert cfg.data.resolution == 32
    cfg = validate(compose(["data=folder", f"data.shards={tiny_shards}", "data.resolution=64"]))
    assert cfg.data.resolution == 64
    with pytest.raises(DataError, match="data.shards is empty"):
        validate(compose(["data=folder"]))
