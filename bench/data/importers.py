"""Readers of other projects' dataset files for `bench data make-shards`: npz arrays, CIFAR's python pickles,
BigGAN-PyTorch's HDF5, LSUN-style LMDB and torchvision datasets on disk. Each yields `Record`s with its class
names, labelled flag and native resolution; writer.py resizes, encodes and packs them exactly as an image
folder's images (docs/architecture.md). Input files are opened read-only and never changed.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
import hashlib
import inspect
import io
import os
import pickle
import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np
from PIL import Image

from bench.data.format import DataError

SOURCES = ("npz", "cifar", "hdf5", "lmdb", "torchvision")
UNLABELLED = ["unlabelled"]  # the class names of a set without labels (every label 0; manifest "labelled": false)
# The ShardSetSpec fields each source reads: (required, optional). shapes and folder are the writer's own.
SOURCE_KEYS = {"shapes": ((), ()), "folder": (("folder",), ()), "npz": (("file",), ()),
               "cifar": (("folder",), ("split",)), "hdf5": (("file",), ()), "lmdb": (("folder",), ()),
               "torchvision": (("dataset", "root"), ("split",))}
KEY_HELP = {"folder": {"folder": "DIR (an ImageFolder tree: one subfolder per class, or a flat folder of images)",
                       "cifar": "DIR (CIFAR-10's cifar-10-batches-py or CIFAR-100's cifar-100-python folder)",
                       "lmdb": "DIR (an LSUN-style LMDB directory holding data.mdb)"},
            "file": {"npz": "F.npz (arrays x and optionally y)", "hdf5": "F.hdf5 (datasets imgs and labels)"},
            "dataset": {"torchvision": "NAME (a torchvision.datasets class, e.g. CIFAR10, MNIST, SVHN)"},
            "root": {"torchvision": "DIR (where the dataset's files already are; nothing is downloaded)"}}
SPLITS = ("train", "test", "all")
BLOCK = 256  # records read from a random-access source at a time
EXTRAS = {"hdf5": "h5py", "lmdb": "lmdb"}


class Record(NamedTuple):
    """One input image. image: uint8 (H, W, C) with C in (1, 3) or (H, W), or encoded image bytes (decoded by the
    writer's workers), or None when the record could not be read (`where` then says why)."""
    key: int            # the sample key in the shards: the record's index in the source
    image: object
    label: int
    where: str          # names the record in messages, e.g. "x[12]", "data_batch_2[7]", "key b'00a1'"


@dataclass
class Source(ABC):
    """What the writer needs from an importer. records(seed, limit) yields `Record`s: random-access sources in
    an order shuffled by `seed` (classes mix across shards, as the folder source's), LMDB in key order."""
    name: str
    class_names: list[str]
    labelled: bool
    total: int                   # records in the input
    native: int | None           # the side of the input's square images, None when not one square size
    extra: dict = field(default_factory=dict)  # provenance for manifest.json ("file", "split", ...)

    @abstractmethod
    def records(self, seed: int, limit: int | None) -> Iterator[Record]:
        """Each importer's reader (ArraySource, LmdbSource, TorchvisionSource)."""

    def close(self) -> None:
        """Release an open file (the HDF5 and LMDB sources); nothing to release by default."""


def check_spec(source: str, given: dict) -> None:
    """DataError when a key the source needs is missing or a key it does not read is given (`given`: the spec's
    path-like fields that are set)."""
    if source not in SOURCE_KEYS:
        raise DataError(f"make-shards source={source!r}: unknown; use one of: {', '.join(SOURCE_KEYS)}")
    required, optional = SOURCE_KEYS[source]
    for key in required:
        if not given.get(key):
            raise DataError(f"make-shards source={source!r} needs {key}={KEY_HELP[key][source]}")
    for key, value in given.items():
        if value not in (None, "") and key not in required + optional:
            reads = " ".join(f"{k}=" for k in required + optional) or "no path"
            raise DataError(f"make-shards {key}={value!r} is not read by source={source!r} (it reads {reads})")


def open_source(spec) -> Source:
    """The reader for spec.source (one of SOURCES), opened read-only."""
    check_spec(spec.source, {k: getattr(spec, k) for k in ("folder", "file", "split", "dataset", "root")})
    split = spec.split or "train"
    if spec.source == "npz":
        return NpzSource(_existing(spec.file, "file", "npz", want_dir=False))
    if spec.source == "cifar":
        return CifarSource(_existing(spec.folder, "folder", "cifar", want_dir=True), _split(split, "cifar"))
    if spec.source == "hdf5":
        return Hdf5Source(_existing(spec.file, "file", "hdf5", want_dir=False))
    if spec.source == "lmdb":
        return LmdbSource(_existing(spec.folder, "folder", "lmdb", want_dir=None))
    return TorchvisionSource(str(spec.dataset), _existing(spec.root, "root", "torchvision", want_dir=True), split)


def source_path(spec) -> Path | None:
    """The user's input (file or directory) of a spec, resolved; None for the built-in set."""
    value = spec.root if spec.source == "torchvision" else spec.file if spec.source in ("npz", "hdf5") else spec.folder
    return Path(os.path.expanduser(str(value))).resolve() if value else None


def _existing(value, key: str, source: str, want_dir: bool | None) -> Path:
    path = Path(os.path.expanduser(str(value)))
    if not path.exists():
        raise DataError(f"make-shards source={source} {key}={str(value)!r}: no such file or directory")
    if want_dir is True and not path.is_dir():
        raise DataError(f"make-shards source={source} {key}={str(value)!r}: not a directory; "
                        f"pass {key}={KEY_HELP[key][source]}")
    if want_dir is False and not path.is_file():
        raise DataError(f"make-shards source={source} {key}={str(value)!r}: not a file; "
                        f"pass {key}={KEY_HELP[key][source]}")
    return path.resolve()


def _split(split: str, source: str) -> str:
    if split not in SPLITS:
        raise DataError(f"make-shards source={source} split={split!r}: use one of: {', '.join(SPLITS)}")
    return split


def _optional_module(source: str):
    name = EXTRAS[source]
    try:
        return __import__(name)
    except ImportError:
        raise DataError(f"make-shards source={source} needs the {name} package, which is not installed: "
                        f"pip install 'gan-bench[{source}]'") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------
# Arrays: layout, labels, shuffled block reads
# ---------------------------------------------------------------------------------------------

def image_layout(shape: tuple, dtype, what: str) -> str:
    """'NHWC', 'NCHW' or 'NHW' (grey) of an image array, from its shape; DataError for anything else."""
    if np.dtype(dtype) != np.uint8:
        raise DataError(f"{what} has dtype {np.dtype(dtype)}; images must be uint8 in 0..255 "
                        f"(from floats in [0, 1]: (x * 255).round().astype(np.uint8))")
    if len(shape) == 3 and shape[0] > 0 and min(shape[1:]) > 0:
        return "NHW"
    if len(shape) != 4 or not shape[0] or not min(shape[1:]):
        raise DataError(f"{what} has shape {tuple(shape)}; use (N, H, W, C) or (N, C, H, W) with C = 1 or 3, "
                        f"or (N, H, W) for grey images")
    last, second = shape[3] in (1, 3), shape[1] in (1, 3)
    if last and not second:
        return "NHWC"
    if second and not last:
        return "NCHW"
    why = "both axis 1 and axis 3 could be" if last else "neither axis 1 nor axis 3 is"
    raise DataError(f"{what} has shape {tuple(shape)}: {why} the channel axis (1 or 3), so the layout is "
                    f"ambiguous; store (N, H, W, C) or (N, C, H, W) with C = 1 or 3")


def _native(shape: tuple, layout: str) -> int | None:
    h, w = (shape[1], shape[2]) if layout in ("NHWC", "NHW") else (shape[2], shape[3])
    return int(h) if h == w else None


def _labels(y, n: int, what: str, count_what: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise DataError(f"{what} has shape {tuple(y.shape)}; labels must be one integer per image, shape (N,)")
    if len(y) != n:
        raise DataError(f"{what} has {len(y)} labels for {n} images in {count_what}; they must match one to one")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{what} has dtype {y.dtype}; labels must be integers 0..K-1")
    if len(y) and int(y.min()) < 0:
        raise DataError(f"{what} holds label {int(y.min())}; labels must be integers 0..K-1")
    return y.astype(np.int64)


def _order(name: str, seed: int, total: int, limit: int | None) -> np.ndarray:
    """The records' shuffled order (seeded by source and seed), cut to `limit`."""
    digest = hashlib.sha256(f"gan-bench/{name}/{seed}".encode()).digest()
    order = np.random.default_rng(int.from_bytes(digest[:8], "little")).permutation(total)
    return order if limit is None else order[:limit]


class ArraySource(Source):
    """A source with random access to an image array `x` (layout from image_layout) and labels `y` (or None)."""

    def setup(self, x, y, what: str, class_names: list[str] | None = None) -> None:
        self.x, self.what = x, what
        self.layout = image_layout(x.shape, x.dtype, what)
        self.total, self.native = int(x.shape[0]), _native(x.shape, self.layout)
        self.y = y
        if y is None:
            self.class_names, self.labelled = list(UNLABELLED), False
        else:
            k = int(y.max()) + 1
            if class_names is not None and len(class_names) < k:
                raise DataError(f"{what}: labels go up to {k - 1} but only {len(class_names)} class names are given")
            self.class_names = list(class_names) if class_names is not None else [str(i) for i in range(k)]
            self.labelled = True

    def read(self, idx: np.ndarray) -> np.ndarray:
        """The images at increasing indices idx, in the array's layout."""
        return np.asarray(self.x[idx])

    def records(self, seed: int, limit: int | None) -> Iterator[Record]:
        order = _order(self.name, seed, self.total, limit)
        for start in range(0, len(order), BLOCK):
            block = order[start:start + BLOCK]
            sort = np.argsort(block, kind="stable")  # h5py reads increasing indices only
            images = self.read(block[sort])
            if self.layout == "NCHW":
                images = images.transpose(0, 2, 3, 1)
            at = np.empty_like(sort)
            at[sort] = np.arange(len(sort))  # block[j]'s image is images[at[j]]
            for j, i in enumerate(block.tolist()):
                yield Record(i, np.ascontiguousarray(images[at[j]]), int(self.y[i]) if self.y is not None else 0,
                             self.where(i))

    def where(self, i: int) -> str:
        return f"{self.what}[{i}]"


# ---------------------------------------------------------------------------------------------
# npz
# ---------------------------------------------------------------------------------------------

def npz_array(path: Path, z: zipfile.ZipFile, name: str):
    """Array `name` of an .npz: memory-mapped (read-only) when stored uncompressed, as np.savez writes it, else
    read whole. Never unpickles (an object array is refused)."""
    member = f"{name}.npy"
    info = z.getinfo(member)
    if info.compress_type == zipfile.ZIP_STORED:
        with open(path, "rb") as f:
            f.seek(info.header_offset)
            local = f.read(30)
            if local[:4] == b"PK\x03\x04":
                name_len, extra_len = struct.unpack("<HH", local[26:30])
                f.seek(info.header_offset + 30 + name_len + extra_len)
                try:
                    version = np.lib.format.read_magic(f)
                    header = {(1, 0): np.lib.format.read_array_header_1_0,
                              (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if header is not None:
                        shape, fortran, dtype = header(f)
                        if dtype.hasobject:
                            raise DataError(f"file={str(path)!r}: array {name!r} holds Python objects; store "
                                            f"uint8 images and integer labels")
                        if not fortran and int(np.prod(shape)) > 0:
                            return np.memmap(path, dtype=dtype, mode="r", offset=f.tell(), shape=tuple(shape))
                except ValueError:
                    pass  # not a plain .npy header: numpy's own reader below says what is wrong
    try:
        with z.open(member) as f:
            return np.lib.format.read_array(f, allow_pickle=False)
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise DataError(f"file={str(path)!r}: cannot read array {name!r} ({_first_line(exc)})") from None


class NpzSource(ArraySource):
    def __init__(self, path: Path):
        try:
            z = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise DataError(f"make-shards source=npz file={str(path)!r}: not an .npz archive ({_first_line(exc)}); "
                            f"write one with np.savez(F, x=images, y=labels)") from None
        with z:
            arrays = sorted(n[:-4] for n in z.namelist() if n.endswith(".npy"))
            if "x" not in arrays:
                raise DataError(f"make-shards source=npz file={str(path)!r}: no array 'x' (it holds "
                                f"{', '.join(map(repr, arrays)) or 'no arrays'}); save the images as x= "
                                f"(np.savez(F, x=images, y=labels))")
            x = npz_array(path, z, "x")
            image_layout(x.shape, x.dtype, f"file={str(path)!r}: x")
            y = _labels(npz_array(path, z, "y"), x.shape[0], f"file={str(path)!r}: y", "x") if "y" in arrays else None
            names = None
            if "class_names" in arrays and y is not None:
                raw = npz_array(path, z, "class_names")
                if raw.ndim != 1 or raw.dtype.kind not in "US":
                    raise DataError(f"file={str(path)!r}: class_names must be a 1-D array of strings")
                names = [str(s.decode() if isinstance(s, bytes) else s) for s in raw]
        Source.__init__(self, "npz", [], True, 0, None, {"file": str(path)})
        self.setup(x, y, "x", names)


# ---------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 python pickles
# ---------------------------------------------------------------------------------------------

# The globals a CIFAR pickle needs (a dict of numpy arrays, lists, bytes); anything else is refused unrun.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                  ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.multiarray", "scalar"),
                  ("numpy._core.multiarray", "scalar"), ("numpy.core.numeric", "_frombuffer"),
                  ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}


class _CifarUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _CIFAR_GLOBALS:
            raise pickle.UnpicklingError(f"refusing {module}.{name}: not part of a CIFAR batch")
        return super().find_class(module, name)


def _unpickle(path: Path) -> dict:
    try:
        with open(path, "rb") as f:
            obj = _CifarUnpickler(f, encoding="latin1").load()
    except Exception as exc:  # a truncated or hostile file: nothing of it ran
        raise DataError(f"make-shards source=cifar: cannot read {str(path)!r} ({_first_line(exc)}); it is not a "
                        f"CIFAR python batch") from None
    if not isinstance(obj, dict):
        raise DataError(f"make-shards source=cifar: {str(path)!r} holds a {type(obj).__name__}, not a CIFAR batch dict")
    return {(k.decode("latin1") if isinstance(k, bytes) else k): v for k, v in obj.items()}


def _strings(values) -> list[str]:
    return [v.decode("latin1") if isinstance(v, bytes) else str(v) for v in values]


class CifarSource(ArraySource):
    """CIFAR-10 (data_batch_1..5, test_batch, batches.meta) or CIFAR-100 (train, test, meta; fine labels)."""

    def __init__(self, folder: Path, split: str):
        root = folder
        if not ((root / "batches.meta").is_file() or (root / "meta").is_file()):
            inside = [root / d for d in ("cifar-10-batches-py", "cifar-100-python") if (root / d).is_dir()]
            if len(inside) != 1:
                raise DataError(f"make-shards source=cifar folder={str(folder)!r}: no batches.meta (CIFAR-10) or "
                                f"meta (CIFAR-100) in it; pass the cifar-10-batches-py or cifar-100-python folder")
            root = inside[0]
        if (root / "batches.meta").is_file():
            kind, label_key = "CIFAR-10", "labels"
            names = _strings(_unpickle(root / "batches.meta").get("label_names", []))
            files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
        else:
            kind, label_key = "CIFAR-100", "fine_labels"
            names = _strings(_unpickle(root / "meta").get("fine_label_names", []))
            files = {"train": ["train"], "test": ["test"]}
        if not names:
            raise DataError(f"make-shards source=cifar: {root}'s meta file has no class names")
        wanted = files["train"] + files["test"] if split == "all" else files[split]
        xs, ys = [], []
        for name in wanted:
            path = root / name
            if not path.is_file():
                raise DataError(f"make-shards source=cifar folder={str(folder)!r}: {name} is missing ({kind} "
                                f"split={split} reads {', '.join(wanted)})")
            batch = _unpickle(path)
            data = batch.get("data")
            if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
                got = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
                raise DataError(f"make-shards source=cifar: {path}: 'data' is {got}; a CIFAR batch holds uint8 "
                                f"(N, 3072) rows (3 x 32 x 32)")
            if label_key not in batch:
                raise DataError(f"make-shards source=cifar: {path} has no {label_key!r}")
            ys.append(_labels(batch[label_key], len(data), f"{path}: {label_key}", name))
            xs.append(data.reshape(-1, 3, 32, 32))
        Source.__init__(self, "cifar", [], True, 0, None, {"folder": str(root), "split": split, "dataset": kind})
        self.setup(np.concatenate(xs), np.concatenate(ys), "cifar", names)
        self.batches = [(name, len(x)) for name, x in zip(wanted, xs)]

    def where(self, i: int) -> str:
        for name, n in self.batches:
            if i < n:
                return f"{name}[{i}]"
            i -= n
        return f"cifar[{i}]"


# ---------------------------------------------------------------------------------------------
# BigGAN-PyTorch HDF5
# ---------------------------------------------------------------------------------------------

class Hdf5Source(ArraySource):
    """BigGAN-PyTorch's make_hdf5.py file: `imgs` (N, 3, H, W) uint8 and `labels` (N,) (unlabelled without it)."""

    def __init__(self, path: Path):
        h5py = _optional_module("hdf5")
        try:
            self.file = h5py.File(path, "r", rdcc_nbytes=256 << 20)
        except OSError as exc:
            raise DataError(f"make-shards source=hdf5 file={str(path)!r}: not a readable HDF5 file "
                            f"({_first_line(exc)})") from None
        try:
            if not isinstance(self.file.get("imgs"), h5py.Dataset):
                raise DataError(f"make-shards source=hdf5 file={str(path)!r}: no dataset 'imgs' (it holds "
                                f"{', '.join(map(repr, self.file.keys())) or 'nothing'}); BigGAN-PyTorch's "
                                f"make_hdf5.py writes imgs (N, 3, H, W) uint8 and labels (N,)")
            x = self.file["imgs"]
            image_layout(x.shape, x.dtype, f"file={str(path)!r}: imgs")
            y = None
            if "labels" in self.file:
                y = _labels(self.file["labels"][()], x.shape[0], f"file={str(path)!r}: labels", "imgs")
            Source.__init__(self, "hdf5", [], True, 0, None, {"file": str(path)})
            self.setup(x, y, "imgs")
        except BaseException:
            self.file.close()
            raise

    def read(self, idx: np.ndarray) -> np.ndarray:
        return self.x[idx.tolist()]

    def close(self) -> None:
        self.file.close()


# ---------------------------------------------------------------------------------------------
# LSUN-style LMDB
# ---------------------------------------------------------------------------------------------

class LmdbSource(Source):
    """Values are encoded images (jpeg / png / webp), keys anything; unlabelled; read in key order."""

    def __init__(self, path: Path):
        lmdb = _optional_module("lmdb")
        try:  # readonly, no lock file: nothing is written into the user's directory
            self.env = lmdb.open(str(path), readonly=True, lock=False, readahead=False, subdir=path.is_dir(),
                                 max_readers=1)
        except lmdb.Error as exc:
            raise DataError(f"make-shards source=lmdb folder={str(path)!r}: not a readable LMDB "
                            f"({_first_line(exc)})") from None
        total = int(self.env.stat()["entries"])
        if total == 0:
            self.env.close()
            raise DataError(f"make-shards source=lmdb folder={str(path)!r}: the LMDB holds no records")
        super().__init__("lmdb", list(UNLABELLED), False, total, self._first_side(), {"folder": str(path)})

    def _first_side(self) -> int | None:
        with self.env.begin(buffers=False) as txn:
            for _, value in txn.cursor():
                try:
                    with Image.open(io.BytesIO(value)) as im:
                        return im.size[0] if im.size[0] == im.size[1] else None
                except Exception:
                    continue
        return None

    def records(self, seed: int, limit: int | None) -> Iterator[Record]:
        with self.env.begin(buffers=False) as txn:
            for i, (key, value) in enumerate(txn.cursor()):
                if limit is not None and i >= limit:
                    return
                yield Record(i, bytes(value), 0, f"key {bytes(key)[:40]!r}")

    def close(self) -> None:
        self.env.close()


# ---------------------------------------------------------------------------------------------
# torchvision datasets already on disk
# ---------------------------------------------------------------------------------------------

def _is_label(target) -> bool:
    if isinstance(target, bool):
        return False
    if isinstance(target, (int, np.integer)):
        return True
    dtype, shape = getattr(target, "dtype", None), getattr(target, "shape", None)
    return shape is not None and tuple(shape) == () and str(dtype).replace("torch.", "") in (
        "int8", "int16", "int32", "int64", "uint8")


def _as_array(img) -> np.ndarray:
    if isinstance(img, Image.Image):
        if img.mode not in ("L", "RGB"):
            img = img.convert("RGB")
        return np.asarray(img)
    arr = np.asarray(img)
    if arr.dtype != np.uint8 or arr.ndim not in (2, 3):
        raise DataError(f"the dataset returned a {type(img).__name__} {arr.dtype} {arr.shape}, not an image")
    return arr


class TorchvisionSource(Source):
    """torchvision.datasets.<NAME>(root, download=False, train= / split=): its images and integer targets."""

    def __init__(self, name: str, root: Path, split: str):
        import torchvision.datasets as tvd

        cls = getattr(tvd, name, None)
        if not inspect.isclass(cls):
            match = [n for n in dir(tvd) if n.lower() == name.lower() and inspect.isclass(getattr(tvd, n))]
            cls = getattr(tvd, match[0]) if match else None
        if cls is None:
            raise DataError(f"make-shards source=torchvision dataset={name!r}: not a torchvision.datasets class; "
                            f"e.g. CIFAR10, CIFAR100, MNIST, FashionMNIST, SVHN, STL10, ImageFolder")
        params = inspect.signature(cls).parameters
        kwargs: dict = {}
        if "download" in params:
            kwargs["download"] = False
        if "train" in params:
            if split not in ("train", "test", "all"):
                raise DataError(f"make-shards source=torchvision dataset={cls.__name__} split={split!r}: "
                                f"use train, test or all")
        elif "split" in params:
            if split == "all":
                raise DataError(f"make-shards source=torchvision dataset={cls.__name__} split=all: this dataset "
                                f"names its splits itself; give one (e.g. split=train)")
            kwargs["split"] = split
        elif split != "train":
            raise DataError(f"make-shards source=torchvision dataset={cls.__name__} has no splits; leave split unset")
        where = f"make-shards source=torchvision dataset={cls.__name__} root={str(root)!r}"
        parts: list = [None]  # one dataset, constructed without train=
        if "train" in params:
            parts = [True, False] if split == "all" else [split == "train"]
        self.parts = []
        for train in parts:
            args = dict(kwargs, **({} if train is None else {"train": train}))
            try:
                self.parts.append(cls(str(root), **args))
            except TypeError as exc:
                raise DataError(f"{where}: {cls.__name__} needs arguments make-shards does not pass "
                                f"({_first_line(exc)}); use source=folder with its images") from None
            except Exception as exc:  # torchvision says "Dataset not found or corrupted. You can use download=True"
                msg = _first_line(exc).replace("You can use download=True to download it", "").rstrip(". ")
                raise DataError(f"{where}: cannot load it ({msg}); make-shards never downloads: put the dataset's "
                                f"files under root= as torchvision lays them out") from None
        total = sum(len(p) for p in self.parts)
        if total == 0:
            raise DataError(f"{where}: the dataset is empty")
        try:
            first_img, first_target = self.parts[0][0]
            first = _as_array(first_img)
        except Exception as exc:
            raise DataError(f"{where}: cannot read its first image ({_first_line(exc)})") from None
        labelled = _is_label(first_target) and int(first_target) >= 0
        classes = getattr(self.parts[0], "classes", None)
        if labelled and isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
            names = list(classes)
        elif labelled:  # no class names (SVHN): count the classes in its targets list
            lists = [getattr(p, "targets", None) if getattr(p, "targets", None) is not None else
                     getattr(p, "labels", None) for p in self.parts]
            if any(t is None for t in lists):
                raise DataError(f"{where}: the dataset has no classes or targets list to count its classes; "
                                f"use source=folder with its images")
            names = [str(i) for i in range(max(int(np.max(np.asarray(t))) for t in lists) + 1)]
        else:
            names = list(UNLABELLED)
        native = first.shape[0] if first.shape[0] == first.shape[1] else None
        extra = {"root": str(root), "dataset": cls.__name__}
        if "train" in params or "split" in params:
            extra["split"] = split
        super().__init__("torchvision", names, labelled, total, native, extra)
        self.where_prefix = cls.__name__

    def records(self, seed: int, limit: int | None) -> Iterator[Record]:
        sizes = [len(p) for p in self.parts]
        for i in _order(f"torchvision/{self.where_prefix}", seed, self.total, limit).tolist():
            part, j = 0, i
            while j >= sizes[part]:
                j, part = j - sizes[part], part + 1
            where = f"{self.where_prefix}[{i}]"
            try:
                img, target = self.parts[part][j]
                image = _as_array(img)
            except Exception as exc:  # an unreadable file behind the dataset: counted and skipped by the writer
                yield Record(i, None, 0, f"{where}: {_first_line(exc)}")
                continue
            if not self.labelled:
                yield Record(i, image, 0, where)
            elif not _is_label(target) or not 0 <= int(target) < len(self.class_names):
                yield Record(i, None, 0, f"{where}: target {target!r} is not a class index "
                                         f"0..{len(self.class_names) - 1}")
            else:
                yield Record(i, image, int(target), where)
