"""`bench data make-shards` from other projects' dataset files (bench/data/importers.py): every test writes its own
small input in the real on-disk format, runs the real CLI, and reads the shards back with tarfile + PIL (not the
training loader), so an image that comes back must equal the input exactly at native resolution. npz and CIFAR
also go on through 20 training steps and `bench sample`."""
import hashlib
import io
import json
import os
import pickle
import struct
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.cli import main
from bench.data.format import square_resize
from conftest import TINY

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# ------------------------------------------------------------------------------------------------ helpers

def make_shards(out: Path, *args: str) -> int:
    return main(["data", "make-shards", f"out={out}", *args])


def manifest(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shard_samples(out: Path) -> dict[int, tuple[np.ndarray, int]]:
    """{sample key: (uint8 HWC image, label)} from the tar shards the manifest lists."""
    got: dict[int, dict] = {}
    for name in manifest(out)["shards"]:
        with tarfile.open(out / name) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".")
                data = tar.extractfile(m).read()
                got.setdefault(int(key), {})[ext] = data
    return {k: (np.asarray(Image.open(io.BytesIO(v["png"]))), int(v["cls"])) for k, v in got.items()}


def one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


def fingerprint(path: Path) -> dict:
    """Every file under path (or the file): its bytes' sha256 and mtime, so a test sees any change."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns) for p in files}


def noise(n: int, h: int, w: int, c: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, h, w, c), dtype=np.uint8)


def train_and_sample(tmp_path: Path, shards: Path, capsys, steps: int = 20) -> np.lib.npyio.NpzFile:
    """`steps` tiny training steps on the shards, then `bench sample n=100`; returns the npz."""
    run = tmp_path / "run"
    assert main(["train", "data=folder", f"data.shards={shards}", f"run.dir={run}", *TINY, f"train.steps={steps}",
                 "train.batch_size=4", "train.precision=fp32", f"train.ckpt_every={steps}",
                 "train.sample_every=0"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == steps
    out = tmp_path / "samples.npz"
    capsys.readouterr()
    assert main(["sample", f"run={run}", "n=100", f"out={out}"]) == 0
    return np.load(out)


# ------------------------------------------------------------------------------------------------ npz

def test_npz_nhwc_labelled_round_trip_train_and_sample(tmp_path, capsys):
    x, y = noise(60, 32, 32), np.arange(60) % 3
    src = tmp_path / "in.npz"
    np.savez(src, x=x, y=y, class_names=np.array(["ant", "bee", "cow"]))  # stored: read memory-mapped
    before = fingerprint(src)
    out = tmp_path / "shards"
    assert make_shards(out, "source=npz", f"file={src}") == 0
    err = capsys.readouterr().err
    assert "make-shards npz: wrote 60 images (32x32, 3 classes)" in err
    m = manifest(out)
    assert m["num_samples"] == 60 and m["class_names"] == ["ant", "bee", "cow"] and m["labelled"] is True
    assert m["resolution"] == 32 and m["source"] == "npz" and m["format"] == "png+cls"
    assert m["skipped"] == 0 and m["num_records"] == 60 and m["file"] == str(src.resolve())
    assert len(m["shards"]) == 8  # small sets still get MIN_FOLDER_SHARDS shards, as a folder does
    got = shard_samples(out)
    assert sorted(got) == list(range(60))  # the sample key is the record's index in x
    for k, (img, label) in got.items():
        assert np.array_equal(img, x[k]) and label == y[k]
    with tarfile.open(out / m["shards"][0]) as tar:
        first = [int(n.split(".")[0]) for n in tar.getnames()[::2]]
    assert first != list(range(len(first)))  # shuffled before sharding (seeded), so classes mix across shards
    assert fingerprint(src) == before

    a = train_and_sample(tmp_path, out, capsys)
    assert a["x"].shape == (100, 32, 32, 3) and a["x"].dtype == np.uint8
    assert a["z"].shape[0] == 100 and a["y"].shape == (100,) and set(a["y"].tolist()) <= {0, 1, 2}


def test_npz_nchw_grey_unlabelled_compressed(tmp_path, capsys):
    grey = noise(12, 20, 20, 1, seed=1).transpose(0, 3, 1, 2)  # (N, 1, H, W)
    src = tmp_path / "grey.npz"
    np.savez_compressed(src, x=grey)  # deflated: read whole
    out = tmp_path / "shards"
    assert make_shards(out, "source=npz", f"file={src}") == 0
    m = manifest(out)
    assert m["class_names"] == ["unlabelled"] and m["labelled"] is False and m["resolution"] == 20
    for k, (img, label) in shard_samples(out).items():
        assert label == 0 and img.shape == (20, 20, 3)
        assert all(np.array_equal(img[..., c], grey[k, 0]) for c in range(3))  # grey becomes RGB


def test_npz_resizes_like_the_folder_source(tmp_path):
    x = noise(8, 24, 40, seed=2)  # not square: centre crop, then resize
    src = tmp_path / "wide.npz"
    np.savez(src, x=x)
    out = tmp_path / "shards"
    assert make_shards(out, "source=npz", f"file={src}", "data.resolution=16") == 0
    assert manifest(out)["resolution"] == 16
    for k, (img, _) in shard_samples(out).items():
        assert np.array_equal(img, np.asarray(square_resize(Image.fromarray(x[k]), 16)))


def test_npz_cap_and_seed(tmp_path):
    src = tmp_path / "in.npz"
    np.savez(src, x=noise(40, 16, 16), y=np.arange(40) % 4)
    keys = []
    for seed in (0, 0, 1):
        out = tmp_path / f"s{len(keys)}"
        assert make_shards(out, "source=npz", f"file={src}", "data.num_samples=10", f"seed={seed}") == 0
        assert manifest(out)["num_samples"] == 10 and manifest(out)["class_names"] == ["0", "1", "2", "3"]
        keys.append(sorted(shard_samples(out)))
    assert keys[0] == keys[1] != keys[2]  # the capped subset is a seeded random one


@pytest.mark.parametrize("arrays, needles", [
    ({"x": noise(4, 16, 16).astype(np.float32)}, ["x has dtype float32", "uint8"]),
    ({"x": noise(4, 16, 16), "y": np.arange(3)}, ["y has 3 labels for 4 images"]),
    ({"x": noise(4, 16, 16), "y": np.array([0.0, 1.0, 0.0, 1.0])}, ["y has dtype float64", "integers"]),
    ({"x": noise(4, 16, 16), "y": np.array([0, -1, 0, 1])}, ["y holds label -1"]),
    ({"images": noise(4, 16, 16)}, ["no array 'x'", "'images'"]),
    ({"x": np.zeros((4, 3, 16, 3), np.uint8)}, ["(4, 3, 16, 3)", "ambiguous"]),
    ({"x": np.zeros((4, 16, 16, 4), np.uint8)}, ["(4, 16, 16, 4)", "neither axis 1 nor axis 3"]),
    ({"x": np.zeros((16, 16), np.uint8)}, ["(16, 16)", "(N, H, W, C)"]),
])
def test_npz_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, arrays, needles):
    src = tmp_path / "bad.npz"
    np.savez(src, **arrays)
    out = tmp_path / "shards"
    assert make_shards(out, "source=npz", f"file={src}") == 2
    one_line_error(capsys, *needles)
    assert not out.exists() and not list(tmp_path.glob(".shards.tmp-*"))


def test_make_shards_argument_errors(tmp_path, capsys):
    src = tmp_path / "in.npz"
    np.savez(src, x=noise(4, 16, 16))
    (tmp_path / "adir").mkdir()
    cases = [
        (["source=npz", f"file={tmp_path / 'missing.npz'}"], ["file=", "missing.npz", "no such file"]),
        (["source=npz"], ["source='npz' needs file="]),
        (["source=npz", f"file={src}", f"folder={tmp_path}"], ["folder=", "is not read by source='npz'"]),
        (["source=npz", f"file={src}", "colour=red"], ["unknown key 'colour'"]),
        (["source=cifar"], ["source='cifar' needs folder="]),
        (["source=torchvision", f"root={tmp_path}"], ["source='torchvision' needs dataset="]),
        (["source=npz", f"file={src.parent / 'adir'}"], ["not a file"]),
    ]
    for args, needles in cases:
        assert make_shards(tmp_path / "o", *args) == 2, args
        one_line_error(capsys, *needles)
    text = tmp_path / "notzip.npz"
    text.write_text("hello")
    assert make_shards(tmp_path / "o", "source=npz", f"file={text}") == 2
    one_line_error(capsys, "not an .npz archive")
    assert not (tmp_path / "o").exists()


# ------------------------------------------------------------------------------------------------ CIFAR

def write_cifar10(folder: Path, per_batch: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """CIFAR-10's python layout: data_batch_1..5 and test_batch (dicts with 'data' (N, 3072) uint8 rows, channel
    planes R, G, B of 32 x 32, and 'labels'), batches.meta with 'label_names'. Returns (x NHWC, y) of train + test
    in file order."""
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        x = noise(per_batch, 32, 32, seed=10 + i)
        y = [(i + j) % 10 for j in range(per_batch)]
        rows = x.transpose(0, 3, 1, 2).reshape(per_batch, 3072)
        batch = {"batch_label": f"batch {i}", "labels": y, "data": rows,
                 "filenames": [f"img_{i}_{j}.png" for j in range(per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        xs.append(x)
        ys.extend(y)
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": CIFAR10_NAMES, "num_cases_per_batch": per_batch,
                                                        "num_vis": 3072}, protocol=2))
    return np.concatenate(xs), np.array(ys)


def test_cifar10_splits_round_trip_train_and_sample(tmp_path, capsys):
    root = tmp_path / "data"
    x, y = write_cifar10(root / "cifar-10-batches-py")
    before = fingerprint(root)
    for split, lo, hi in (("train", 0, 20), ("test", 20, 24), ("all", 0, 24)):
        out = tmp_path / f"shards-{split}"
        args = [] if split == "train" else [f"split={split}"]  # train is the default
        assert make_shards(out, "source=cifar", f"folder={root / 'cifar-10-batches-py'}", *args) == 0
        m = manifest(out)
        assert m["num_samples"] == hi - lo and m["class_names"] == CIFAR10_NAMES and m["labelled"] is True
        assert m["split"] == split and m["dataset"] == "CIFAR-10" and m["resolution"] == 32
        got = shard_samples(out)
        assert sorted(got) == list(range(hi - lo))
        for k, (img, label) in got.items():
            assert np.array_equal(img, x[lo + k]) and label == y[lo + k]
    out = tmp_path / "shards-parent"  # the folder above cifar-10-batches-py (a torchvision root) works too
    assert make_shards(out, "source=cifar", f"folder={root}") == 0 and manifest(out)["num_samples"] == 20
    assert fingerprint(root) == before

    a = train_and_sample(tmp_path, tmp_path / "shards-train", capsys)
    assert a["x"].shape == (100, 32, 32, 3) and a["x"].dtype == np.uint8
    assert a["y"].shape == (100,) and a["y"].max() < 10 and a["z"].shape[0] == 100


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    names = [f"class{i:02d}" for i in range(100)]
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["c"] * 20},
                                               protocol=2))
    parts = {}
    for name, n in (("train", 6), ("test", 3)):
        x = noise(n, 32, 32, seed=len(name))
        fine = [(7 * j + n) % 100 for j in range(n)]
        (folder / name).write_bytes(pickle.dumps({"data": x.transpose(0, 3, 1, 2).reshape(n, 3072), "fine_labels": fine,
                                                  "coarse_labels": [f % 20 for f in fine]}, protocol=2))
        parts[name] = (x, fine)
    out = tmp_path / "shards"
    assert make_shards(out, "source=cifar", f"folder={folder}", "split=test") == 0
    m = manifest(out)
    assert m["class_names"] == names and m["num_samples"] == 3 and m["dataset"] == "CIFAR-100"
    x, fine = parts["test"]
    for k, (img, label) in shard_samples(out).items():
        assert np.array_equal(img, x[k]) and label == fine[k]


class _Hostile:
    def __reduce__(self):
        return (os.system, ("touch HACKED",))


def test_cifar_errors_and_a_hostile_pickle_never_runs(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    (folder / "data_batch_3").unlink()
    assert make_shards(tmp_path / "o", "source=cifar", f"folder={folder}") == 2
    one_line_error(capsys, "data_batch_3 is missing")
    assert make_shards(tmp_path / "o", "source=cifar", f"folder={folder}", "split=valid") == 2
    one_line_error(capsys, "split='valid'", "train, test, all")
    monkeypatch.chdir(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": _Hostile(), "labels": []}, protocol=2))
    assert make_shards(tmp_path / "o", "source=cifar", f"folder={folder}") == 2
    one_line_error(capsys, "data_batch_3", "refusing", "system")
    assert not (tmp_path / "HACKED").exists()
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": np.zeros((4, 3072), np.float32), "labels": [0] * 4}))
    assert make_shards(tmp_path / "o", "source=cifar", f"folder={folder}") == 2
    one_line_error(capsys, "data_batch_3", "float32", "(N, 3072)")
    (tmp_path / "empty").mkdir()
    assert make_shards(tmp_path / "o", "source=cifar", f"folder={tmp_path / 'empty'}") == 2  # no meta, no CIFAR inside
    one_line_error(capsys, "no batches.meta")


# ------------------------------------------------------------------------------------------------ HDF5

def test_hdf5_biggan_layout(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    imgs = noise(30, 24, 24, seed=5).transpose(0, 3, 1, 2)  # BigGAN-PyTorch's make_hdf5.py: (N, 3, H, W)
    labels = np.arange(30) % 5
    src = tmp_path / "ILSVRC24.hdf5"
    with h5py.File(src, "w") as f:
        f.create_dataset("imgs", data=imgs, chunks=(8, 3, 24, 24))
        f.create_dataset("labels", data=labels)
    before = fingerprint(src)
    out = tmp_path / "shards"
    assert make_shards(out, "source=hdf5", f"file={src}") == 0
    m = manifest(out)
    assert m["num_samples"] == 30 and m["class_names"] == [str(i) for i in range(5)] and m["labelled"] is True
    assert m["resolution"] == 24
    for k, (img, label) in shard_samples(out).items():
        assert np.array_equal(img, imgs[k].transpose(1, 2, 0)) and label == labels[k]
    assert fingerprint(src) == before
    capsys.readouterr()

    with h5py.File(tmp_path / "bad.hdf5", "w") as f:
        f.create_dataset("imgs", data=imgs)
        f.create_dataset("labels", data=labels[:29])
    assert make_shards(tmp_path / "o", "source=hdf5", f"file={tmp_path / 'bad.hdf5'}") == 2
    one_line_error(capsys, "labels has 29 labels for 30 images")
    with h5py.File(tmp_path / "nokey.hdf5", "w") as f:
        f.create_dataset("images", data=imgs)
    assert make_shards(tmp_path / "o", "source=hdf5", f"file={tmp_path / 'nokey.hdf5'}") == 2
    one_line_error(capsys, "no dataset 'imgs'", "'images'")

    # the round trip: shards at 32 px from the same file train, and the run samples its 5 classes
    assert make_shards(tmp_path / "s32", "source=hdf5", f"file={src}", "data.resolution=32") == 0
    a = train_and_sample(tmp_path, tmp_path / "s32", capsys, steps=4)
    assert a["x"].shape == (100, 32, 32, 3) and set(a["y"].tolist()) == set(range(5))


@pytest.mark.parametrize("source, package, path_key", [("hdf5", "h5py", "file"), ("lmdb", "lmdb", "folder")])
def test_missing_optional_package_is_one_line(tmp_path, capsys, monkeypatch, source, package, path_key):
    """sys.modules[name] = None makes `import name` raise ImportError, as when the package is not installed."""
    monkeypatch.setitem(sys.modules, package, None)
    target = tmp_path / "input"
    target.mkdir() if path_key == "folder" else target.write_bytes(b"\x89HDF\r\n\x1a\n")
    assert make_shards(tmp_path / "o", f"source={source}", f"{path_key}={target}") == 2
    one_line_error(capsys, f"needs the {package} package", f"pip install 'gan-bench[{source}]'")


# ------------------------------------------------------------------------------------------------ LMDB

def _encoded(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return buf.getvalue()


def test_lmdb_unlabelled_with_a_corrupt_record(tmp_path, capsys):
    lmdb = pytest.importorskip("lmdb")
    x = noise(9, 16, 16, seed=7)
    folder = tmp_path / "bedroom_train_lmdb"
    env = lmdb.open(str(folder), map_size=1 << 24)
    with env.begin(write=True) as txn:  # LSUN's keys are hex ids; records come back in key order
        for i in range(9):
            txn.put(f"{0xa0 + i:x}-{i}".encode(), _encoded(x[i], "WEBP" if i % 3 == 0 else "PNG"))
        txn.put(b"ab-corrupt", b"\x00not an image")
    env.close()
    before = fingerprint(folder)
    out = tmp_path / "shards"
    assert make_shards(out, "source=lmdb", f"folder={folder}") == 0
    assert "skipped 1 unreadable images" in capsys.readouterr().err
    m = manifest(out)
    assert m["class_names"] == ["unlabelled"] and m["labelled"] is False and m["num_samples"] == 9
    assert m["skipped"] == 1 and "ab-corrupt" in m["skipped_examples"][0] and m["num_records"] == 10
    got = shard_samples(out)
    assert sorted(got) == list(range(9))  # keys a0-0 .. a8-8 sort before ab-corrupt
    for k, (img, label) in got.items():
        assert np.array_equal(img, x[k]) and label == 0
    assert fingerprint(folder) == before and sorted(p.name for p in folder.iterdir()) == ["data.mdb", "lock.mdb"]
    capsys.readouterr()

    wide = tmp_path / "wide_lmdb"  # LSUN's images are not square: the side must be given
    env = lmdb.open(str(wide), map_size=1 << 24)
    with env.begin(write=True) as txn:
        txn.put(b"0", _encoded(noise(1, 20, 30)[0], "PNG"))
    env.close()
    assert make_shards(tmp_path / "o", "source=lmdb", f"folder={wide}") == 2
    one_line_error(capsys, "not all one square size", "data.resolution=N")
    assert make_shards(tmp_path / "o", "source=lmdb", f"folder={wide}", "data.resolution=16") == 0
    assert manifest(tmp_path / "o")["resolution"] == 16

    # the round trip: the unlabelled LSUN-style set at 32 px trains one class, and the run samples it
    assert make_shards(tmp_path / "s32", "source=lmdb", f"folder={folder}", "data.resolution=32") == 0
    a = train_and_sample(tmp_path, tmp_path / "s32", capsys, steps=4)
    assert a["x"].shape == (100, 32, 32, 3) and set(a["y"].tolist()) == {0}


# ------------------------------------------------------------------------------------------------ torchvision

def write_mnist_raw(raw: Path, prefix: str, x: np.ndarray, y: np.ndarray) -> None:
    """MNIST's idx files as torchvision reads them from ROOT/<Dataset>/raw (big-endian header, then bytes)."""
    raw.mkdir(parents=True, exist_ok=True)
    (raw / f"{prefix}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 0x803, *x.shape) + x.tobytes())
    (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 0x801, len(y)) + y.astype(np.uint8).tobytes())


def test_torchvision_mnist_on_disk(tmp_path, capsys):
    pytest.importorskip("torchvision")
    root = tmp_path / "tv"
    train_x, train_y = noise(10, 28, 28, 1, seed=8)[..., 0], np.arange(10) % 10
    test_x, test_y = noise(4, 28, 28, 1, seed=9)[..., 0], np.array([3, 1, 4, 1])
    write_mnist_raw(root / "MNIST" / "raw", "train", train_x, train_y)
    write_mnist_raw(root / "MNIST" / "raw", "t10k", test_x, test_y)
    before = fingerprint(root)
    out = tmp_path / "shards"
    assert make_shards(out, "source=torchvision", "dataset=MNIST", f"root={root}", "split=all") == 0
    m = manifest(out)
    assert m["num_samples"] == 14 and m["labelled"] is True and len(m["class_names"]) == 10
    assert m["class_names"][3] == "3 - three" and m["dataset"] == "MNIST" and m["resolution"] == 28
    x, y = np.concatenate([train_x, test_x]), np.concatenate([train_y, test_y])
    for k, (img, label) in shard_samples(out).items():
        assert all(np.array_equal(img[..., c], x[k]) for c in range(3)) and label == y[k]
    assert fingerprint(root) == before and not (root / "MNIST" / "processed").exists()
    capsys.readouterr()

    assert make_shards(tmp_path / "o", "source=torchvision", "dataset=FashionMNIST", f"root={root}") == 2
    one_line_error(capsys, "dataset=FashionMNIST", f"root={str(root)!r}", "never downloads")
    assert make_shards(tmp_path / "o", "source=torchvision", "dataset=NotADataset", f"root={root}") == 2
    one_line_error(capsys, "dataset='NotADataset'", "not a torchvision.datasets class")

    # the round trip: MNIST's grey 28 px digits at 32 px train, and the run samples the classes it saw
    assert make_shards(tmp_path / "s32", "source=torchvision", "dataset=MNIST", f"root={root}", "split=all",
                       "data.resolution=32") == 0
    a = train_and_sample(tmp_path, tmp_path / "s32", capsys, steps=4)
    assert a["x"].shape == (100, 32, 32, 3) and set(a["y"].tolist()) <= set(range(10))


def test_torchvision_image_folder_skips_an_unreadable_file(tmp_path, capsys):
    pytest.importorskip("torchvision")
    root = tmp_path / "tree"
    x = noise(6, 16, 16, seed=11)
    for i in range(6):
        (root / ("cat" if i < 3 else "dog")).mkdir(parents=True, exist_ok=True)
        Image.fromarray(x[i]).save(root / ("cat" if i < 3 else "dog") / f"{i}.png")
    (root / "dog" / "broken.png").write_bytes(b"not a png")
    out = tmp_path / "shards"
    assert make_shards(out, "source=torchvision", "dataset=ImageFolder", f"root={root}") == 0
    assert "skipped 1 unreadable images" in capsys.readouterr().err
    m = manifest(out)
    assert m["class_names"] == ["cat", "dog"] and m["num_samples"] == 6 and m["skipped"] == 1
    assert "broken.png" in m["skipped_examples"][0] or "ImageFolder[" in m["skipped_examples"][0]
    images = sorted((img.tobytes(), label) for img, label in shard_samples(out).values())
    assert images == sorted((x[i].tobytes(), int(i >= 3)) for i in range(6))


def test_out_inside_the_input_is_refused(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    write_cifar10(folder)
    before = fingerprint(folder)
    assert make_shards(folder / "shards", "source=cifar", f"folder={folder}") == 2
    one_line_error(capsys, "is inside the source folder=")
    assert fingerprint(folder) == before


def test_flat_image_folder_is_unlabelled(tmp_path):
    root = tmp_path / "faces"
    root.mkdir()
    x = noise(5, 16, 16, seed=12)
    for i in range(5):
        Image.fromarray(x[i]).save(root / f"{i}.png")
    out = tmp_path / "shards"
    assert make_shards(out, "source=folder", f"folder={root}", "data.resolution=16") == 0
    m = manifest(out)
    assert m["class_names"] == ["unlabelled"] and m["labelled"] is False and m["num_samples"] == 5
    images = sorted(img.tobytes() for img, label in shard_samples(out).values() if label == 0)
    assert images == sorted(x[i].tobytes() for i in range(5))
