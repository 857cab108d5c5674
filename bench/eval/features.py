"""torch-fidelity's inputs and feature extractors: images as datasets (the real side streamed from the shards),
G as a sampler, the extractors' settings and weights, and eval.resize=clean (docs/architecture.md,
"Evaluation" and "Numbers that connect to the literature")."""
from __future__ import annotations

import ctypes
import hashlib
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

from bench.eval.classifier import DOMAIN_EXTRACTOR, DOMAIN_LAYERS, read_uint8
from bench.eval.errors import EvalError
from bench.eval.sampling import generate_uint8
from bench.eval.protocols import RESIZES
from bench.metrics_registry import EXTRACTORS

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_HUB_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's name in torch.hub's checkpoints
INCEPTION_LAYERS = {"isc": "logits_unbiased", "fid": "2048", "kid": "2048", "prc": "2048"}
INCEPTION_DIM = 2048
CLEAN_SIZE = 299


def clean_resize(images: torch.Tensor, size: int = CLEAN_SIZE) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> uint8 (B, 3, size, size): each image through PIL's bicubic resize of its RGB uint8
    values (eval.resize=clean; see the module doc). Images already of that size are returned as they are."""
    import numpy as np
    from PIL import Image

    if images.shape[-2:] == (size, size):
        return images
    arr = images.permute(0, 2, 3, 1).cpu().numpy()
    out = np.stack([np.asarray(Image.fromarray(a, "RGB").resize((size, size), Image.BICUBIC)) for a in arr])
    return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous().to(images.device)


class ProgressLine:
    """A progress line on stderr at most every `every_s` seconds, and one when `total` is reached."""

    def __init__(self, label: str, total: int, every_s: float = 5.0):
        self.label, self.total, self.every_s = label, int(total), every_s
        self.done, self.t0 = 0, time.time()
        self.last = self.t0

    def add(self, n: int) -> None:
        self.done += int(n)
        now = time.time()
        finished = self.done >= self.total
        if now - self.last >= self.every_s or (finished and self.done - int(n) < self.total):
            self.last = now
            rate = self.done / max(now - self.t0, 1e-9)
            print(f"{self.label}: {min(self.done, self.total)}/{self.total} images ({rate:.0f} img/s)",
                  file=sys.stderr, flush=True)


class ImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) as a torch-fidelity input. `images` is a tensor, or a callable that
    returns one: it is called on first access only, so a real side served from the cache never
    reads the shards. `loads` counts those calls."""

    def __init__(self, images):
        self._images = images if torch.is_tensor(images) else None
        self._load = None if torch.is_tensor(images) else images
        self.loads = 0
        self.progress = None  # a ProgressLine, counted per image read
        self.resize = None    # None, or a function of uint8 (B, 3, H, W) images (clean_resize)
        if self._images is not None:
            self._check(self._images)

    @staticmethod
    def _check(x: torch.Tensor) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[1] != 3:
            raise EvalError(f"evaluation images must be uint8 (N, 3, H, W); got {x.dtype} {tuple(x.shape)}")

    @property
    def images(self) -> torch.Tensor:
        if self._images is None:
            self._images = self._load()
            self.loads += 1
            self._check(self._images)
        return self._images

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor:
        if self.progress is not None:
            self.progress.add(1)
        if self.resize is not None:
            return self.resize(self.images[i][None])[0]
        return self.images[i]


class ShardImages(torch.utils.data.Dataset):
    """The real side as a torch-fidelity input, streamed: images 0..n-1 of the shards in read_uint8's order (`seed`),
    decoded one batch at a time as torch-fidelity reads them in order, so memory does not grow with n (a
    full-ImageNet reference at 128 px is ~63 GB as one tensor). Nothing is read before the first image is asked for
    (a real side served from the cache never reads the shards); a read out of order starts the stream again
    (`passes` counts the passes). `n` None: min(`limit`, the shards' images), counted by a pass on first len().

    For intra-FID it is also the loader RealImages is (bench.eval.intra): `labels`, int64 (n,), once a pass has
    read all n images; calling it reads them (a pass that keeps only the labels) and returns them."""

    def __init__(self, shards_spec, resolution: int, n: int | None = None, *, limit: int | None = None,
                 seed: int = 0, batch_size: int = 256, progress: bool = False):
        if n is None and limit is None:
            raise ValueError("ShardImages: give the image count n or a limit")
        self.spec, self.resolution, self.seed, self.batch_size = shards_spec, int(resolution), seed, int(batch_size)
        self.n, self.limit = (None if n is None else int(n)), (int(n) if limit is None else int(limit))
        self.count_progress = progress  # "reading shards: N images" lines while a pass counts (n None)
        self.progress = None  # a ProgressLine, counted per image served (as ImageDataset's)
        self.resize = None    # None, or a function of uint8 (B, 3, H, W) images (clean_resize)
        self.labels = None
        self.passes = 0
        self._stream = None
        self._x, self._start, self._read, self._ys = None, 0, 0, []
        self._y = None  # a pass's labels, allocated once when n is known (_ys: per batch, while counting)

    def _wanted(self) -> int:
        return self.limit if self.n is None else self.n

    def _restart(self) -> None:
        self.close()
        self._stream = read_uint8(self.spec, self.resolution, self.seed, self.batch_size)
        self._x, self._start, self._read, self._ys = None, 0, 0, []
        self._y = torch.empty(self.n, dtype=torch.long) if self.labels is None and self.n is not None else None
        self.passes += 1

    def _next_batch(self) -> bool:
        """Read the next batch into _x (starting at image _start); False when the shards have no more images."""
        try:
            x, y = next(self._stream)
        except StopIteration:
            self.close()
            return False
        self._x = None
        release_freed_memory()  # the previous batch's buffers (see the function)
        self._x, self._start = x, self._read
        self._read += len(y)
        if self._y is not None:
            self._y[self._start:self._read] = y[:max(0, len(self._y) - self._start)]
        elif self.labels is None:
            self._ys.append(y)
        if self._read >= self._wanted():  # the pass has every image it needs: stop reading
            if self.labels is None:
                self.labels = self._y if self._y is not None else torch.cat(self._ys)[:self._wanted()]
                self._y, self._ys = None, []
            self.close()
        return True

    def _short(self) -> EvalError:
        return EvalError(f"data.shards={str(self.spec)!r}: the shards gave {self._read} readable images, the "
                         f"evaluation's real side needs {self.n} (its manifest counts more than can be read); "
                         f"set eval.num_real to at most {self._read}")

    def __len__(self) -> int:
        if self.n is None:  # no manifest: count by reading (the cache key needs the true count)
            self._restart()
            t0 = last = time.time()
            while self._stream is not None and self._next_batch():
                if self.count_progress and time.time() - last > 5:
                    last = time.time()
                    print(f"reading shards: {self._read} images ({self._read / (last - t0):.0f} img/s)",
                          file=sys.stderr, flush=True)
            self.n = min(self._read, self.limit)
            if self.labels is None:
                self.labels = torch.cat(self._ys)[:self.n] if self._ys else torch.zeros(0, dtype=torch.long)
                self._ys = []
            if self.n == 0:
                raise EvalError(f"data.shards={str(self.spec)!r}: no readable images")
        return self.n

    def __getitem__(self, i: int) -> torch.Tensor:
        n = len(self)
        if not 0 <= i < n:
            raise IndexError(f"image {i} of {n}")
        if self._x is None or i < self._start:
            self._restart()
        while i >= self._start + len(self._x if self._x is not None else ()):
            if self._stream is None or not self._next_batch():
                raise self._short()
        if self.progress is not None:
            self.progress.add(1)
        image = self._x[i - self._start]
        return self.resize(image[None])[0] if self.resize is not None else image

    def __call__(self) -> torch.Tensor:
        """The n labels (RealImages' call, for intra-FID): a pass that keeps only them when no pass read them yet."""
        if self.labels is None:
            n = len(self)
            self._restart()
            while self.labels is None:
                if self._stream is None or not self._next_batch():
                    raise self._short()
            self._x = None  # the pass kept only the labels
            assert len(self.labels) == n
        return self.labels

    def close(self) -> None:
        """Stop the current pass (its reader's files are closed); the batch in hand is kept."""
        if self._stream is not None:
            self._stream.close()
            self._stream = None


def release_freed_memory() -> None:
    """Hand the pages of freed memory back to the OS (glibc's malloc_trim; elsewhere nothing). A stream's batches
    are freed as it goes, but glibc keeps the pages of a freed block that lies below a live one (the features
    torch-fidelity keeps per batch, allocated between them), so without this the process's resident memory grew
    with the number of images read (+225 MiB over 50,000 32 px images) while the images themselves were gone.
    GAN_BENCH_MALLOC=default leaves malloc alone (as bench.device.keep_freed_memory does)."""
    global _MALLOC_TRIM
    if _MALLOC_TRIM is None:
        _MALLOC_TRIM = False
        if sys.platform.startswith("linux") and os.environ.get("GAN_BENCH_MALLOC", "") != "default":
            try:
                _MALLOC_TRIM = ctypes.CDLL("libc.so.6").malloc_trim
            except (OSError, AttributeError):  # not glibc
                pass
    if _MALLOC_TRIM:
        _MALLOC_TRIM(0)


_MALLOC_TRIM = None  # glibc's malloc_trim, False where there is none (release_freed_memory)


def real_images(shards_spec, resolution: int, num_real: int, progress: bool = False) -> tuple[ShardImages, int]:
    """An evaluation's real side (bench.eval.metrics, bench eval stats): the first min(num_real, the shards' images)
    images in read_uint8's order (seed 0) as ShardImages, and their count (from the manifest; without one,
    counted by one pass that keeps only the labels)."""
    from bench.data.shards import dataset_info

    _, n_available, _ = dataset_info(shards_spec)
    n = min(int(num_real), int(n_available)) if n_available else None
    real = ShardImages(shards_spec, resolution, n, limit=int(num_real), progress=progress)
    return real, len(real)


class Sampler(nn.Module):
    """G as a torch-fidelity generative model (registered as a virtual GenerativeModelBase).

    The latents z (N, z_dim) and labels y (N,) of every sample are drawn before sampling starts
    (sampling.eval_latents); each call takes the next noise.shape[0] of them, so torch-fidelity's noise
    only sets the batch size and the i-th image does not depend on it. num_classes is 0 for
    torch-fidelity (0.4.0 breaks on num_classes > 0). Returns uint8 (B, 3, R, R). With a classifier,
    counts how often it labels a sample with its conditioning class (class_acc). `seconds`: the time
    spent in G (CUDA synchronised per batch).
    """

    z_type = "normal"
    num_classes = 0

    def __init__(self, G, z: torch.Tensor, y: torch.Tensor, *, autocast, classifier=None):
        super().__init__()
        # Plain attributes, not submodules or buffers: torch-fidelity calls .cuda() on its input, which
        # must not move the caller's G (it already lives on the evaluation device).
        self.__dict__["G"] = G
        self.__dict__["classifier"] = classifier
        self.__dict__["z"], self.__dict__["y"] = z, y
        if z.shape[0] != y.shape[0] or z.shape[1] != G.z_dim:
            raise EvalError(f"sampler: latents {tuple(z.shape)} and labels {tuple(y.shape)} do not match "
                            f"z_dim={G.z_dim}")
        self.z_size = G.z_dim
        self.autocast = autocast
        self.device = next(G.parameters()).device
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.count = 0
        self.cursor = 0      # samples handed out so far
        self.seconds = 0.0   # time in G
        self.__dict__["progress"] = None  # a ProgressLine, counted per batch
        self.__dict__["resize"] = None    # None, or a function of the uint8 batch (clean_resize), after class_acc

    @torch.no_grad()
    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        n, i = noise.shape[0], self.cursor
        if i + n > self.z.shape[0]:
            raise EvalError(f"sampler: asked for samples {i}..{i + n} of {self.z.shape[0]} drawn")
        z, y = self.z[i:i + n].to(self.device), self.y[i:i + n].to(self.device)
        self.cursor += n
        t0 = time.perf_counter()
        images = generate_uint8(self.G, z, y, self.autocast)  # (B, 3, R, R)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - t0
        if self.classifier is not None:
            _, logits = self.classifier(images)
            self.correct += (logits.argmax(1) == y).sum()
            self.count += n
        if self.progress is not None:
            self.progress.add(n)
        if self.resize is not None:
            images = self.resize(images)
        return images

    def class_acc(self):
        """How often the classifier labelled a sample with its class; None without one."""
        return int(self.correct) / self.count if self.count else None  # host sync: once, at the end


def register_sampler() -> None:
    from torch_fidelity.generative_model_base import GenerativeModelBase

    if not issubclass(Sampler, GenerativeModelBase):
        GenerativeModelBase.register(Sampler)


def feature_extractor(kw: dict, layers):
    """torch-fidelity's feature extractor of `kw` (calculate_metrics' settings) for these layers."""
    from torch_fidelity.utils import create_feature_extractor

    return create_feature_extractor(kw["feature_extractor"], sorted(set(layers)), **kw)


def features_of(input_id: int, extractor, kw: dict) -> tuple[dict, float]:
    """(torch-fidelity's featuresdict of kw's input1 or input2 ({layer: (N, D) float tensor on the CPU}; input2
    from torch-fidelity's cache when kw names one), seconds)."""
    from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

    t0 = time.perf_counter()
    return extract_featuresdict_from_input_id_cached(input_id, extractor, **kw), time.perf_counter() - t0


def extract_features(kw: dict, layers) -> tuple[dict, dict, float, float]:
    """(features of input1, features of input2, seconds of each) for these layers, with the settings `kw` of
    torch_fidelity.calculate_metrics (features_of)."""
    extractor = feature_extractor(kw, layers)
    features1, t1 = features_of(1, extractor, kw)
    features2, t2 = features_of(2, extractor, kw)
    return features1, features2, t1, t2


def check_extractor(extractor: str) -> str:
    if extractor not in EXTRACTORS:
        raise EvalError(f"eval.extractor={extractor!r}: choose one of {', '.join(EXTRACTORS)}")
    return extractor


def fidelity_weights_file() -> Path:
    """Where torch-fidelity keeps its own download of the Inception weights (torch.hub's checkpoints directory)."""
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_HUB_FILE


def inception_weights(weights_path) -> Path:
    """The Inception weights file: eval.weights_path, else torch-fidelity's own copy (fidelity_weights_file), or an
    EvalError (one line) naming the file, where torch-fidelity expects it and the key to set."""
    need = (f"eval.extractor=inception needs the torch-fidelity FID Inception weights {INCEPTION_FILE} "
            f"({INCEPTION_URL}, about 91 MB; nothing is downloaded here)")
    if weights_path in (None, ""):
        hub = fidelity_weights_file()
        if hub.is_file():
            return hub
        raise EvalError(f"{need}: not found where torch-fidelity keeps it ({hub}); copy it there or set "
                        f"eval.weights_path=/path/to/{INCEPTION_FILE}, or use eval.extractor=domain")
    p = Path(os.path.expanduser(str(weights_path)))
    if not p.is_file():
        raise EvalError(f"{need}: eval.weights_path={str(weights_path)!r} does not exist; copy the file there "
                        f"or set eval.weights_path=/path/to/{INCEPTION_FILE}, or use eval.extractor=domain")
    return p


def check_resize(resize: str) -> str:
    if resize not in RESIZES:
        raise EvalError(f"eval.resize={resize!r}: choose one of {', '.join(RESIZES)}")
    return resize


def resizer(extractor: str, resize: str):
    """The transform applied to every image before the extractor: clean_resize for eval.resize=clean (Inception
    only: the domain extractor reads the data's own resolution), else None."""
    check_resize(resize)
    dist = torch.distributed
    if resize == "clean" and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise EvalError("eval.resize=clean is for one-process evaluations (bench eval run=DIR, bench eval watch); "
                        "a multi-rank training's evaluation shares use torch-fidelity's resize")
    if resize == "clean" and extractor != "inception":
        raise EvalError(f"eval.resize=clean resizes to Inception's 299 x 299; it needs eval.extractor=inception "
                        f"(got {extractor})")
    return clean_resize if resize == "clean" else None


def feature_dim(extractor: str, weights_path) -> int:
    """The dimension of the extractor's FID features (2048 for Inception; the domain classifier's width)."""
    if extractor == "inception":
        return INCEPTION_DIM
    from bench.eval.classifier import load_classifier

    net, _ = load_classifier(weights_path, torch.device("cpu"))
    return int(net.feature_dim)


def extractor_settings(extractor: str, weights_path, resize: str = "fidelity") -> tuple[str, dict, str, str]:
    """(torch-fidelity extractor name, feature layer per metric, weights file, identity for cache keys; the
    identity names eval.resize=clean, so the real side's cache differs)."""
    tail = "" if check_resize(resize) == "fidelity" else f":resize-{resize}"
    if extractor == "inception":
        p = inception_weights(weights_path)
        return "inception-v3-compat", INCEPTION_LAYERS, str(p), f"inception:{p.name}:{p.stat().st_size}{tail}"
    if extractor == "domain":
        if not weights_path:
            raise EvalError("extractor=domain needs the classifier file (see ensure_classifier)")
        sha = hashlib.sha256(Path(weights_path).read_bytes()).hexdigest()[:16]
        return DOMAIN_EXTRACTOR, DOMAIN_LAYERS, str(weights_path), f"domain:{sha}{tail}"
    raise EvalError(f"eval.extractor={extractor!r}: choose one of {', '.join(EXTRACTORS)}")
