"""Evaluation of a trained G: torch-fidelity metrics, feature extractors, truncation, sample sheets.

Metrics (rank 0 only): `evaluate_generator` wraps torch_fidelity.calculate_metrics. The fake side is
G (the EMA G in training) sampled as uint8 with class labels drawn uniformly inside the wrapper
(torch-fidelity 0.4.0 crashes for num_classes > 0: the wrapper says num_classes = 0). The real side
is N images read from the shards; its features are cached under a hash of (shard manifest, N,
resolution, extractor and its weights) in `cache_dir` (torch-fidelity's atomic cache files plus a
JSON sidecar written with temp file + os.replace), so later evaluations only sample G.

Feature extractors (every record names the one it used):
    domain     the small CNN of bench.classifier, trained on the dataset's own shards (offline;
               trained on first use, saved beside the shards). Also gives eval/class_acc: how often
               it labels G's samples with their conditioning class.
    inception  torch-fidelity's inception-v3-compat with the user's copy of the standard FID weights
               (eval.weights_path); never downloaded: a missing file is an EvalError.

Flat metric names: eval/IS, eval/IS_std, eval/FID, eval/KID, eval/KID_std, eval/precision,
eval/recall, eval/f_score, eval/class_acc; records add extractor, num_samples, num_real, seconds.

Also here: truncated normal latents (resample / clip / scale), standing statistics for G's
BatchNorms, `eval_run` (the `bench eval` command), `truncation_sweep` (`bench truncation`), class
grids and interpolation sheets (lerp / slerp in z or in the class-embedding space).
"""
from __future__ import annotations

import contextlib
import copy
import csv
import datetime as _dt
import hashlib
import io
import json
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

__all__ = [
    "EvalError", "EXTRACTORS", "METRIC_NAMES", "LOWER_IS_BETTER", "INCEPTION_FILE",
    "to_uint8", "grid_classes", "class_grid", "save_grid",
    "truncated_normal", "truncnorm_variance", "standing_stats", "ImageDataset", "compute_metrics",
    "evaluate_generator", "real_cache_key", "append_eval", "load_run", "eval_run", "format_table",
    "truncation_sweep", "interpolation_sheet", "ensure_classifier",
]


class EvalError(ValueError):
    """An evaluation that cannot run as configured. The message is one line naming the key to fix."""


EXTRACTORS = ("domain", "inception")
TRUNC_MODES = ("resample", "clip", "scale")
INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")
INCEPTION_LAYERS = {"isc": "logits_unbiased", "fid": "2048", "kid": "2048", "prc": "2048"}
# torch-fidelity result key -> gan-bench record key
METRIC_NAMES = {
    "inception_score_mean": "eval/IS", "inception_score_std": "eval/IS_std",
    "frechet_inception_distance": "eval/FID",
    "kernel_inception_distance_mean": "eval/KID", "kernel_inception_distance_std": "eval/KID_std",
    "precision": "eval/precision", "recall": "eval/recall", "f_score": "eval/f_score",
}
LOWER_IS_BETTER = frozenset({"eval/FID", "eval/KID"})
MAX_RESAMPLE_ROUNDS = 64  # truncated_normal: resampling rounds before the exact inverse-CDF fallback


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def grid_classes(n_classes: int, max_rows: int = 32) -> list[int]:
    """Classes shown as rows: all of them, or evenly spaced ones when there are many."""
    if n_classes <= max_rows:
        return list(range(n_classes))
    return [int(round(i * (n_classes - 1) / (max_rows - 1))) for i in range(max_rows)]


@torch.no_grad()
def class_grid(G, z: torch.Tensor, classes: Sequence[int], batch: int = 64) -> np.ndarray:
    """Rows = classes, columns = the fixed latents z (C, z_dim). Returns (rows, cols, H, W, 3) uint8."""
    device = next(G.parameters()).device
    cols = z.shape[0]
    zz = z.to(device).repeat(len(classes), 1)
    yy = torch.tensor(classes, device=device).repeat_interleave(cols)
    out = [to_uint8(G(zz[i : i + batch], yy[i : i + batch])) for i in range(0, zz.shape[0], batch)]
    imgs = np.concatenate(out)
    return imgs.reshape(len(classes), cols, *imgs.shape[1:])


def save_grid(images: np.ndarray, path: str | Path, row_labels: Sequence[str] | None = None, scale: int = 2) -> Path:
    """Save a (rows, cols, H, W, 3) uint8 array as one PNG, with a label column on the left. Atomic."""
    rows, cols, h, w, _ = images.shape
    h, w = h * scale, w * scale
    pad = 2
    label_w = 0
    font = ImageFont.load_default()
    if row_labels:
        label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(s, font=font)) for s in row_labels) + 8
    sheet = Image.new("RGB", (label_w + cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        top = pad + r * (h + pad)
        if row_labels:
            draw.text((4, top + h // 2 - 5), row_labels[r], fill=(0, 0, 0), font=font)
        for c in range(cols):
            tile = Image.fromarray(images[r, c]).resize((w, h), Image.NEAREST)
            sheet.paste(tile, (label_w + pad + c * (w + pad), top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------
# Truncation and standing statistics
# ---------------------------------------------------------------------------------------------

def truncnorm_variance(psi: float) -> float:
    """Variance of N(0, 1) truncated to [-psi, psi]: 1 - 2 psi phi(psi) / (2 Phi(psi) - 1)."""
    phi = math.exp(-0.5 * psi * psi) / math.sqrt(2.0 * math.pi)
    mass = math.erf(psi / math.sqrt(2.0))  # 2 Phi(psi) - 1
    return 1.0 - 2.0 * psi * phi / mass


def _check_psi(psi) -> float | None:
    if psi is None:
        return None
    if isinstance(psi, str) and psi.strip().lower() in ("", "none", "null", "off"):
        return None
    try:
        value = float(psi)
    except (TypeError, ValueError):
        raise EvalError(f"eval.truncation={psi!r}: use a positive number, or null for no truncation") from None
    if not (value > 0 and math.isfinite(value)):
        raise EvalError(f"eval.truncation={psi!r}: use a positive number, or null for no truncation")
    return value


def truncated_normal(shape, psi: float | None = None, mode: str = "resample",
                     generator: torch.Generator | None = None, device=None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Latents drawn from N(0, 1) with BigGAN's truncation trick at threshold `psi` (None = off).

    mode  resample  (default, BigGAN) values with |z| > psi are drawn again until none is left:
                    N(0, 1) truncated to [-psi, psi], variance `truncnorm_variance(psi)`
          clip      values are clamped to [-psi, psi] (the tails pile up at +-psi)
          scale     every value is multiplied by psi (N(0, psi^2), unbounded)
    """
    if mode not in TRUNC_MODES:
        raise EvalError(f"eval.trunc_mode={mode!r}: choose one of {', '.join(TRUNC_MODES)}")
    psi = _check_psi(psi)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if psi is None:
        return z
    if mode == "clip":
        return z.clamp_(-psi, psi)
    if mode == "scale":
        return z.mul_(psi)
    flat = z.view(-1)
    for _ in range(MAX_RESAMPLE_ROUNDS):
        bad = (flat.abs() > psi).nonzero().squeeze(1)  # host sync, once per round
        if bad.numel() == 0:
            return z
        flat[bad] = torch.randn(bad.numel(), generator=generator, device=device, dtype=dtype)
    # Tiny psi: acceptance 2 Phi(psi) - 1 is low; draw the few leftovers exactly by inverse CDF.
    bad = (flat.abs() > psi).nonzero().squeeze(1)
    if bad.numel():
        lo = float(torch.special.ndtr(torch.tensor(-psi, dtype=torch.float64)))
        u = torch.rand(bad.numel(), generator=generator, device=device, dtype=torch.float64)
        flat[bad] = torch.special.ndtri(lo + u * (1.0 - 2.0 * lo)).clamp_(-psi, psi).to(dtype)
    return z


def _batchnorms(G: nn.Module) -> list[nn.Module]:
    return [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def standing_stats(G: nn.Module, n_classes: int, passes: int, *, batch_size: int = 64,
                   truncation: float | None = None, trunc_mode: str = "resample",
                   generator: torch.Generator | None = None, autocast=None) -> int:
    """Recompute G's BatchNorm running statistics in place from `passes` forward passes of
    `batch_size` latents at the given truncation (BigGAN-PyTorch's "standing statistics").

    Every BatchNorm's running stats are reset and accumulated as a cumulative average
    (momentum=None). Only the BatchNorm modules are in train mode during the passes, so nothing
    else changes: parameters, spectral-norm u / v / sigma and all other buffers stay as they were.
    Module modes and momenta are restored afterwards. Returns the number of BatchNorms updated.
    """
    bns = _batchnorms(G)
    if passes <= 0 or not bns:
        return 0
    device = next(G.parameters()).device
    modes = [(m, m.training) for m in G.modules()]
    momenta = [(m, m.momentum) for m in bns]
    try:
        G.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the passes
            m.train()
        for _ in range(int(passes)):
            z = truncated_normal((batch_size, G.z_dim), truncation, trunc_mode, generator, device)
            y = torch.randint(0, n_classes, (batch_size,), device=device, generator=generator)
            with (autocast or contextlib.nullcontext)():
                G(z, y)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return len(bns)


_standing_stats = standing_stats  # evaluate_generator's argument of the same name shadows it


# ---------------------------------------------------------------------------------------------
# torch-fidelity inputs
# ---------------------------------------------------------------------------------------------

class ImageDataset(torch.utils.data.Dataset):
    """uint8 images (N, 3, H, W) as a torch-fidelity input. `images` is a tensor, or a callable that
    returns one: it is called on first access only, so a real side served from the cache never
    reads the shards. `loads` counts those calls."""

    def __init__(self, images):
        self._images = images if torch.is_tensor(images) else None
        self._load = None if torch.is_tensor(images) else images
        self.loads = 0
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
        return self.images[i]


class _Sampler(nn.Module):
    """G as a torch-fidelity generative model (registered as a virtual GenerativeModelBase).

    torch-fidelity 0.4.0 breaks on num_classes > 0, so num_classes is 0 and each batch draws its own
    labels uniformly from [0, n_classes) and its own latents (truncated if asked) from `generator`;
    torch-fidelity's noise only sets the batch size. Returns uint8 (B, 3, R, R). With a classifier,
    counts how often it labels a sample with its conditioning class (class_acc).
    """

    z_type = "normal"
    num_classes = 0

    def __init__(self, G, n_classes: int, *, truncation, trunc_mode, generator, autocast, classifier=None):
        super().__init__()
        # Plain attributes, not submodules: torch-fidelity calls .cuda() on its input, which must not
        # move the caller's G (it already lives on the evaluation device).
        self.__dict__["G"] = G
        self.__dict__["classifier"] = classifier
        self.z_size = G.z_dim
        self.n_classes, self.truncation, self.trunc_mode = n_classes, truncation, trunc_mode
        self.generator, self.autocast = generator, autocast
        self.device = next(G.parameters()).device
        self.correct = torch.zeros((), dtype=torch.long, device=self.device)
        self.count = 0

    @torch.no_grad()
    def forward(self, noise: torch.Tensor) -> torch.Tensor:
        n = noise.shape[0]
        z = truncated_normal((n, self.z_size), self.truncation, self.trunc_mode, self.generator, self.device)
        y = torch.randint(0, self.n_classes, (n,), device=self.device, generator=self.generator)
        with self.autocast():
            x = self.G(z, y)
        images = ((x.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)  # (B, 3, R, R)
        if self.classifier is not None:
            _, logits = self.classifier(images)
            self.correct += (logits.argmax(1) == y).sum()
            self.count += n
        return images


def _register_sampler() -> None:
    from torch_fidelity.generative_model_base import GenerativeModelBase

    if not issubclass(_Sampler, GenerativeModelBase):
        GenerativeModelBase.register(_Sampler)


def _autocast_for(precision: str, device: torch.device):
    if precision not in ("auto", "bf16", "fp32"):
        raise EvalError(f"eval.precision={precision!r}: choose auto, bf16 or fp32")
    use = precision == "bf16"
    if precision == "auto":
        from bench.classifier import fast_bf16

        use = device.type == "cuda" or (device.type == "cpu" and fast_bf16())
    if not use:
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


def _inception_weights(weights_path) -> Path:
    """The user's Inception weights file, or an EvalError saying what is needed and where it goes."""
    need = (f"eval.extractor=inception needs the torch-fidelity FID Inception weights {INCEPTION_FILE} "
            f"({INCEPTION_URL}, about 91 MB; nothing is downloaded here)")
    if weights_path in (None, ""):
        raise EvalError(f"{need}: copy it to this machine and set eval.weights_path=/path/to/{INCEPTION_FILE}, "
                        f"or use eval.extractor=domain")
    p = Path(os.path.expanduser(str(weights_path)))
    if not p.is_file():
        raise EvalError(f"{need}: eval.weights_path={str(weights_path)!r} does not exist; copy the file there "
                        f"or set eval.weights_path=/path/to/{INCEPTION_FILE}, or use eval.extractor=domain")
    return p


def _extractor_settings(extractor: str, weights_path) -> tuple[str, dict, str, str]:
    """(torch-fidelity extractor name, feature layer per metric, weights file, identity for cache keys)."""
    if extractor == "inception":
        p = _inception_weights(weights_path)
        return "inception-v3-compat", INCEPTION_LAYERS, str(p), f"inception:{p.name}:{p.stat().st_size}"
    if extractor == "domain":
        from bench import classifier as C

        if not weights_path:
            raise EvalError("extractor=domain needs the classifier file (see ensure_classifier)")
        sha = hashlib.sha256(Path(weights_path).read_bytes()).hexdigest()[:16]
        return C.DOMAIN_EXTRACTOR, C.DOMAIN_LAYERS, str(weights_path), f"domain:{sha}"
    raise EvalError(f"eval.extractor={extractor!r}: choose one of {', '.join(EXTRACTORS)}")


def compute_metrics(input1, input2, *, extractor: str = "domain", weights_path=None,
                    metrics: Sequence[str] = ("isc", "fid", "kid", "prc"), num_samples: int | None = None,
                    num_real: int | None = None, batch_size: int = 64, device="cpu", cache_dir=None,
                    input2_cache_name: str | None = None, progress: bool = False, seed: int = 0) -> dict:
    """torch_fidelity.calculate_metrics with gan-bench's settings; returns eval/* keys.

    input1       the evaluated side (precision = fraction of input1 inside input2's manifold):
                 an ImageDataset of uint8 images, or a generative model (then num_samples is needed)
    input2       the reference side (real images), an ImageDataset
    extractor    "domain" (weights_path = the classifier file) or "inception" (weights_path = the
                 FID Inception weights; a missing file raises EvalError, nothing is downloaded)
    num_real     len(input2) when known (so a cached input2 is not loaded just to count it)
    cache_dir    torch-fidelity's feature cache (None = no caching); input2 is cached only when
                 input2_cache_name is given
    """
    import torch_fidelity

    _register_sampler()
    fe_name, layers, fe_weights, _ = _extractor_settings(extractor, weights_path)
    device = torch.device(device)
    n1 = len(input1) if isinstance(input1, torch.utils.data.Dataset) else int(num_samples)
    n2 = int(num_real) if num_real is not None else len(input2)
    kw = dict(
        input1=input1, input2=input2,
        isc="isc" in metrics, fid="fid" in metrics, kid="kid" in metrics, prc="prc" in metrics,
        feature_extractor=fe_name, feature_extractor_weights_path=fe_weights,
        **{f"feature_layer_{m}": layers[m] for m in ("isc", "fid", "kid", "prc")},
        batch_size=int(batch_size), cuda=device.type == "cuda", verbose=bool(progress),
        save_cpu_ram=True,  # no DataLoader worker processes; PRC in blocks
        rng_seed=int(seed), isc_splits=max(1, min(10, n1 // 2)), kid_subset_size=min(1000, n1, n2),
        cache=cache_dir is not None, cache_root=str(cache_dir) if cache_dir is not None else None,
    )
    if not isinstance(input1, torch.utils.data.Dataset):
        kw["input1_model_num_samples"] = n1
    if input2_cache_name:
        kw["input2_cache_name"] = input2_cache_name
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        raw = torch_fidelity.calculate_metrics(**kw)
    return {METRIC_NAMES[k]: float(v) for k, v in raw.items() if k in METRIC_NAMES}


# ---------------------------------------------------------------------------------------------
# Evaluating a generator
# ---------------------------------------------------------------------------------------------

def default_cache_dir() -> Path:
    """$GAN_BENCH_CACHE/eval, else ~/.cache/gan-bench/eval (beside the built-in shards' cache)."""
    root = os.environ.get("GAN_BENCH_CACHE") or "~/.cache/gan-bench"
    return Path(os.path.expanduser(root)).absolute() / "eval"


def ensure_classifier(shards_spec, resolution: int, path=None, *, train_if_missing: bool = True,
                      progress: bool = True) -> Path:
    """The domain classifier file for these shards at this resolution: `path`, else the default
    <shard dir>/classifier-r{res}.pt. Trained (about 1.5 min for 10k 32x32 images on 2 CPU cores)
    when missing, or when the default file was trained on other shards or at another resolution."""
    from bench import classifier as C

    p = Path(os.path.expanduser(str(path))) if path else C.classifier_path(shards_spec, resolution)
    reason = "is missing"
    if p.is_file():
        _, meta = C.load_classifier(p)
        same_data = meta.get("manifest_hash") == C.manifest_hash(shards_spec)
        if int(meta["resolution"]) == int(resolution) and (same_data or path):
            if not same_data:
                print(f"warning: domain classifier {p} was trained on other shards ({meta.get('shards')})",
                      file=sys.stderr, flush=True)
            return p
        reason = "was trained on other shards" if not same_data else f"is for resolution {meta['resolution']}"
    if not train_if_missing:
        raise EvalError(f"eval.extractor=domain: the domain classifier {p} {reason}; train it with "
                        f"`bench eval train-classifier data.shards={shards_spec}`")
    if progress:
        print(f"gan-bench eval: the domain classifier {p} {reason}; training it now (once per shard set)",
              file=sys.stderr, flush=True)
    C.train_classifier(shards_spec, out=p, resolution=int(resolution), progress=progress)
    return p


def real_cache_key(shards_spec, num_real: int, resolution: int, extractor_id: str) -> str:
    """Cache key of the real side's features: a hash of the shard manifest, N, the resolution and
    the extractor's identity (its name and weights)."""
    from bench.classifier import manifest_hash

    ident = {"manifest": manifest_hash(shards_spec), "num_real": int(num_real), "resolution": int(resolution),
             "extractor": extractor_id, "order": "seed0", "version": 1}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:20]


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def evaluate_generator(G: nn.Module, *, shards_spec, n_classes: int | None = None, num_samples: int = 5000,
                       extractor: str = "domain", weights_path=None, truncation: float | None = None,
                       trunc_mode: str = "resample", standing_stats: int = 0, batch_size: int = 64,
                       device=None, cache_dir=None, progress: bool = True, seed: int = 0,
                       num_real: int | None = None, precision: str = "auto", classifier_path=None,
                       train_classifier: bool = True) -> dict:
    """IS / FID / KID / precision-recall (and class_acc) of generator G against the shards. Rank 0
    only: other ranks return {} at once. G is not modified (standing stats run on a copy).

    G               a gan-bench generator (G.z_dim, G.resolution, G(z, y))
    device          where sampling and features run (None = G's device; another one: a copy of G)
    shards_spec     the real data (shard directory / pattern)
    n_classes       labels are drawn uniformly from [0, n_classes); None = the dataset's classes
    num_samples     generated images; num_real = real images (None = num_samples, capped at the
                    dataset size)
    extractor       "domain" | "inception" (weights_path = the FID Inception weights file)
    truncation      psi for truncated latents (None = off); trunc_mode resample | clip | scale
    standing_stats  M > 0: recompute G's BatchNorm statistics from M batches first (on a copy)
    precision       auto (bf16 autocast where fast: CUDA, or CPUs with AVX512-BF16 / AMX) | bf16 | fp32
    cache_dir       real-side feature cache (None = default_cache_dir())
    classifier_path domain classifier file (None = beside the shards; trained if missing when
                    train_classifier)

    Returns flat keys: eval/IS, eval/IS_std, eval/FID, eval/KID, eval/KID_std, eval/precision,
    eval/recall, eval/f_score, eval/class_acc (when a domain classifier is available), extractor,
    num_samples, num_real, truncation, trunc_mode, standing_stats, seconds.
    """
    if not _is_rank0():
        return {}
    t0 = time.time()
    from bench import classifier as C

    if extractor not in EXTRACTORS:
        raise EvalError(f"eval.extractor={extractor!r}: choose one of {', '.join(EXTRACTORS)}")
    if int(num_samples) < 4:
        raise EvalError(f"eval.num_samples={num_samples}: use at least 4 (KID / precision-recall need neighbours)")
    truncation = _check_psi(truncation)
    if trunc_mode not in TRUNC_MODES:
        raise EvalError(f"eval.trunc_mode={trunc_mode!r}: choose one of {', '.join(TRUNC_MODES)}")
    if extractor == "inception":
        _inception_weights(weights_path)  # fail before any work
    g_device = next(G.parameters()).device
    device = torch.device(device) if device is not None else g_device
    resolution = int(getattr(G, "resolution"))
    class_names, n_available, _ = C.dataset_info(shards_spec)
    n_classes = int(n_classes or (len(class_names) if class_names else G.n_classes))

    # Domain classifier: the extractor for extractor=domain, and the judge of class_acc.
    if extractor == "domain":
        clf_file = ensure_classifier(shards_spec, resolution, classifier_path, train_if_missing=train_classifier,
                                     progress=progress)
        weights_path = clf_file
    else:
        try:  # class_acc only where a domain classifier for these shards already exists
            clf_file = ensure_classifier(shards_spec, resolution, classifier_path, train_if_missing=False,
                                         progress=False)
        except EvalError:
            clf_file = None
    fe_name, _, _, fe_id = _extractor_settings(extractor, weights_path)
    clf = C.load_classifier(clf_file, device)[0] if clf_file is not None else None

    n_real = int(num_real or num_samples)
    if n_available:
        n_real = min(n_real, int(n_available))
    limit = n_real
    real = ImageDataset(lambda: C.load_images(shards_spec, resolution, limit=limit, seed=0, progress=progress)[0])
    if not n_available:  # no manifest: count by reading (the cache key needs the true count)
        n_real = len(real)
    key = real_cache_key(shards_spec, n_real, resolution, fe_id)
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    cache_dir.mkdir(parents=True, exist_ok=True)

    if progress:
        psi = f", truncation {truncation} ({trunc_mode})" if truncation is not None else ""
        print(f"gan-bench eval: {extractor} features ({fe_name}), {num_samples} generated vs {n_real} real "
              f"images{psi}", file=sys.stderr, flush=True)
    autocast = _autocast_for(precision, device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    was_training = G.training
    # A copy where G would change: standing stats rewrite BatchNorm buffers; another device moves it.
    copy_G = (standing_stats and int(standing_stats) > 0) or device != g_device
    Gs = copy.deepcopy(G).to(device) if copy_G else G
    try:
        Gs.eval()
        if Gs is not G:
            _standing_stats(Gs, n_classes, int(standing_stats), batch_size=int(batch_size), truncation=truncation,
                            trunc_mode=trunc_mode, generator=gen, autocast=autocast)
        sampler = _Sampler(Gs, n_classes, truncation=truncation, trunc_mode=trunc_mode, generator=gen,
                           autocast=autocast, classifier=clf)
        out = compute_metrics(sampler, real, extractor=extractor, weights_path=weights_path,
                              num_samples=int(num_samples), num_real=n_real, batch_size=batch_size, device=device,
                              cache_dir=cache_dir, input2_cache_name=f"real-{key}", progress=progress, seed=seed)
    finally:
        G.train(was_training)
    if sampler.count:
        out["eval/class_acc"] = int(sampler.correct) / sampler.count
    sidecar = cache_dir / f"real-{key}.json"
    if not sidecar.exists():
        _atomic_write_bytes(sidecar, json.dumps({
            "key": key, "shards": str(shards_spec), "manifest_hash": C.manifest_hash(shards_spec),
            "num_real": n_real, "resolution": resolution, "extractor": extractor, "extractor_id": fe_id,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}, indent=2).encode())
    out.update(extractor=extractor, num_samples=int(num_samples), num_real=n_real, truncation=truncation,
               trunc_mode=trunc_mode if truncation is not None else None, standing_stats=int(standing_stats or 0),
               seconds=round(time.time() - t0, 3))
    return out


def eval_settings(cfg) -> dict:
    """evaluate_generator keyword arguments from a config's eval.* keys (missing keys: defaults)."""
    from omegaconf import OmegaConf

    def get(key, default):
        value = OmegaConf.select(cfg, f"eval.{key}", default=default)
        return default if value is None and default is not None else value

    return {
        "num_samples": int(get("num_samples", 5000)),
        "extractor": str(get("extractor", "domain")),
        "weights_path": get("weights_path", None),
        "batch_size": int(get("batch_size", 64)),
        "standing_stats": int(get("standing_stats", 0)),
        "truncation": get("truncation", None),
        "trunc_mode": str(get("trunc_mode", "resample")),
        "precision": str(get("precision", "auto")),
        "num_real": get("num_real", None),
        "cache_dir": get("cache_dir", None),
        "classifier_path": get("classifier_path", None),
        "seed": int(get("seed", 0)),
    }


def _json_value(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON: NaN / inf become null
    if isinstance(v, (np.floating, np.integer)):
        return _json_value(v.item())
    if isinstance(v, Path):
        return str(v)
    return v


def append_eval(run_dir, step: int, metrics: Mapping, **extra) -> dict:
    """Append one record to run_dir/evals.jsonl: step, the metric values, extractor, num_samples,
    seconds (from `metrics`), then `extra` (e.g. source="bench eval", checkpoint=...) and the time.
    Returns the record. Empty `metrics` (a rank other than 0) writes nothing."""
    if not metrics:
        return {}
    rec = {"step": int(step)}
    rec.update({k: _json_value(v) for k, v in metrics.items()})
    rec.update({k: _json_value(v) for k, v in extra.items()})
    rec["time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    path = Path(run_dir) / "evals.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")
        f.flush()
        os.fsync(f.fileno())
    return rec


def format_table(rec: Mapping, title: str | None = None) -> str:
    """A plain-text table of an evaluation record."""
    fmt = {"eval/FID": "{:.3f}", "eval/KID": "{:.5f}", "eval/KID_std": "{:.5f}"}
    rows = []
    for key in ("eval/IS", "eval/IS_std", "eval/FID", "eval/KID", "eval/KID_std", "eval/precision", "eval/recall",
                "eval/f_score", "eval/class_acc"):
        if rec.get(key) is not None:
            rows.append((key, fmt.get(key, "{:.4f}").format(rec[key])))
    for key in ("extractor", "num_samples", "num_real", "truncation", "trunc_mode", "standing_stats", "step",
                "checkpoint", "seconds"):
        if rec.get(key) not in (None, ""):
            rows.append((key, str(rec[key])))
    w = max(len(k) for k, _ in rows) if rows else 10
    lines = [title] if title else []
    lines.append("-" * (w + 16))
    lines += [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append("-" * (w + 16))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Runs: `bench eval run=DIR` and `bench truncation run=DIR psi=[...]`
# ---------------------------------------------------------------------------------------------

def _merge_overrides(cfg, overrides):
    from omegaconf import DictConfig, OmegaConf

    if overrides is None:
        return cfg
    if isinstance(overrides, DictConfig):
        extra = overrides
    elif isinstance(overrides, Mapping):
        extra = OmegaConf.create(dict(overrides))
    else:  # a list of dotted overrides: ["eval.extractor=domain", ...]
        extra = OmegaConf.from_dotlist([str(o) for o in overrides])
    return OmegaConf.merge(cfg, extra)


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _pick_checkpoint(run_dir: Path, which, best_metric: str) -> tuple[Path, str]:
    """(checkpoint file, how it was chosen). which: best | last | a step number | a file path."""
    from bench.loop import CKPT_PREFIX, list_checkpoints  # lazy: bench.loop imports this module

    ckpt_dir = run_dir / "checkpoints"
    ckpts = list_checkpoints(ckpt_dir)
    by_step = dict(ckpts)
    if which not in ("best", "last"):
        if str(which).isdigit():
            if int(which) in by_step:
                return by_step[int(which)], f"step {int(which)}"
            raise EvalError(f"checkpoint step {which} is not in {ckpt_dir} (have: {sorted(by_step)[-5:]})")
        p = Path(str(which))
        if p.is_file():
            return p, p.name
        raise EvalError(f"which={which!r}: use best, last, a checkpoint step or a checkpoint file")
    if which == "best":
        if (ckpt_dir / "best.pt").is_file():
            return ckpt_dir / "best.pt", "best (checkpoints/best.pt)"
        best = _read_json(run_dir / "summary.json").get("best") or {}
        step = best.get("step") if isinstance(best, Mapping) else None
        if isinstance(step, int) and step in by_step:
            return by_step[step], f"best (summary.json, step {step})"
        lower = best_metric in LOWER_IS_BETTER
        chosen = None
        evals = run_dir / "evals.jsonl"
        if evals.is_file():
            for line in evals.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except ValueError:
                    continue
                v, s = rec.get(best_metric), rec.get("step")
                if v is None or s not in by_step or rec.get("source") == "bench eval":
                    continue
                if chosen is None or (v < chosen[0] if lower else v > chosen[0]):
                    chosen = (v, s)
        if chosen is not None:
            return by_step[chosen[1]], f"best by {best_metric} in evals.jsonl (step {chosen[1]})"
        if ckpts:
            print(f"note: {run_dir} records no best checkpoint; evaluating the last one", file=sys.stderr)
    if not ckpts:
        raise EvalError(f"run={run_dir}: no checkpoints in {ckpt_dir} ({CKPT_PREFIX}XXXXXXX.pt); "
                        f"is it a gan-bench run directory, and did it save a checkpoint?")
    return ckpts[-1][1], f"last (step {ckpts[-1][0]})"


def load_run(run_dir, overrides=None, which="best", device=None) -> dict:
    """A finished run's EMA generator and what evaluating it needs.

    Reads run_dir/config.yaml (+ `overrides`: a mapping or a list of "key=value"), run.json, and the
    chosen checkpoint; rebuilds G with models.build and loads its G_ema weights. Returns a dict:
    G (eval mode, on `device`), cfg, shards, n_classes (classes to sample: the dataset's), class_names,
    step, checkpoint (path), chosen (how), device.
    """
    from omegaconf import OmegaConf

    import models
    from bench import classifier as C
    from bench import data as bdata

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise EvalError(f"run={str(run_dir)!r}: no config.yaml there; point run= at a run directory "
                        f"(runs/<name>) written by `bench train`")
    cfg = _merge_overrides(OmegaConf.load(run_dir / "config.yaml"), overrides)
    best_metric = str(OmegaConf.select(cfg, "eval.best_metric", default=None) or "eval/FID")
    path, chosen = _pick_checkpoint(run_dir, which, best_metric)
    state = torch.load(path, map_location="cpu", weights_only=False)
    if "G_ema" not in state:
        raise EvalError(f"checkpoint {path} has no G_ema weights; is it a gan-bench checkpoint?")
    scfg = state.get("config") or {}
    model_cfg = dict(scfg.get("model") or OmegaConf.to_container(cfg.model, resolve=True))
    resolution = int((scfg.get("data") or {}).get("resolution") or cfg.data.resolution)
    info = _read_json(run_dir / "run.json")

    # Shards: an explicit override, else what the run trained on (run.json), else its config.
    shards = OmegaConf.select(_merge_overrides(OmegaConf.create(), overrides), "data.shards", default=None)
    shards = shards or info.get("shards") or OmegaConf.select(cfg, "data.shards", default=None)
    if not shards:
        shards = str(bdata.default_shards(resolution, num_samples=int(OmegaConf.select(
            cfg, "data.num_samples", default=bdata.DEFAULT_NUM_SAMPLES))))
    class_names, _, _ = C.dataset_info(shards)
    n_model = int(info.get("n_classes") or model_cfg.get("n_classes") or len(class_names or []) or 0)
    if n_model <= 0:
        raise EvalError(f"run={run_dir}: cannot tell the class count (no run.json n_classes, model.n_classes "
                        f"or manifest); pass model.n_classes=...")
    n_data = len(class_names) if class_names else n_model
    class_names = list(class_names or [str(i) for i in range(n_model)])

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    G, _ = models.build(model_cfg, resolution, n_model)
    G.load_state_dict(state["G_ema"])
    from bench.classifier import fast_bf16

    fmt = torch.channels_last if device.type == "cuda" or fast_bf16() else torch.contiguous_format
    G = G.to(device, memory_format=fmt).eval().requires_grad_(False)
    return {"G": G, "cfg": cfg, "shards": str(shards), "n_classes": n_data, "class_names": class_names,
            "step": int(state.get("step", 0)), "checkpoint": path, "chosen": chosen, "device": device,
            "resolution": resolution}


def eval_run(run_dir, overrides_cfg=None, which="best", *, device=None, progress: bool = True,
             sheets: bool = True, show: bool = True) -> dict:
    """`bench eval run=DIR`: evaluate a run's best (or last) checkpoint's EMA generator with the
    run's eval.* settings plus `overrides_cfg`; append the record to run_dir/evals.jsonl with
    "source": "bench eval", write sample sheets to run_dir/samples/ (sheets=True) and print a table.
    Returns the record."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, overrides_cfg, which, device)
    settings = eval_settings(run["cfg"])
    metrics = evaluate_generator(run["G"], shards_spec=run["shards"], n_classes=run["n_classes"],
                                 device=run["device"], progress=progress, **settings)
    ckpt = Path(run["checkpoint"])
    rec = append_eval(run_dir, run["step"], metrics, source="bench eval",
                      checkpoint=str(ckpt.relative_to(run_dir) if ckpt.is_relative_to(run_dir) else ckpt))
    if sheets:
        write_sheets(run, run_dir / "samples", truncation=settings["truncation"], trunc_mode=settings["trunc_mode"])
    if show:
        print(format_table(rec, title=f"{run_dir} | {run['chosen']}"), flush=True)
    return rec


def write_sheets(run: dict, out_dir: Path, truncation=None, trunc_mode: str = "resample") -> list[Path]:
    """Class grid and the four interpolation sheets (lerp / slerp, z / class) of a loaded run."""
    G, names, step = run["G"], run["class_names"], run["step"]
    rows = grid_classes(run["n_classes"])
    z = truncated_normal((8, G.z_dim), truncation, trunc_mode, torch.Generator().manual_seed(12345))
    paths = [save_grid(class_grid(G, z, rows), out_dir / f"eval-{step:07d}-classes.png",
                       [names[r] for r in rows])]
    for space in ("z", "class"):
        for mode in ("lerp", "slerp"):
            p = out_dir / f"eval-{step:07d}-interp-{space}-{mode}.png"
            interpolation_sheet(G, mode=mode, space=space, path=p, n_classes=run["n_classes"], class_names=names,
                                truncation=truncation, trunc_mode=trunc_mode)
            paths.append(p)
    return paths


def _psi_label(psi) -> str:
    return "off" if psi is None else f"{psi:g}"


def _save_figure(fig, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    _atomic_write_bytes(path, buf.getvalue())


def truncation_sweep(run_dir, psis: Sequence, extractor: str | None = None, num_samples: int | None = None, *,
                     overrides_cfg=None, which="best", trunc_mode: str | None = None, device=None,
                     progress: bool = True, out_dir=None) -> list[dict]:
    """`bench truncation run=DIR psi=[...]`: metrics of a run's EMA G for each truncation psi
    (None / "off" = no truncation), written to run_dir/truncation/ (or out_dir):

        truncation.csv           psi, IS, FID, KID, precision, recall, class_acc (+ extractor, num_samples, step)
        is_vs_fid.png            IS against FID, one labelled point per psi
        precision_recall.png     precision against recall, one labelled point per psi
        samples-psi<psi>.png     a sample strip per psi (same latents seed, one image per class)
        sweep.json               the full records

    Settings come from the run's eval.* (+ overrides_cfg); extractor / num_samples / trunc_mode
    override them. Returns the rows (dicts with the CSV columns).
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir, overrides_cfg, which, device)
    settings = eval_settings(run["cfg"])
    if extractor is not None:
        settings["extractor"] = extractor
    if num_samples is not None:
        settings["num_samples"] = int(num_samples)
    if trunc_mode is not None:
        settings["trunc_mode"] = trunc_mode
    settings.pop("truncation")
    values = [_check_psi(p) for p in psis]
    if not values:
        raise EvalError("psi=[]: give the truncation values to sweep, e.g. psi=[0.25,0.5,1.0,2.0]")
    out = Path(out_dir) if out_dir is not None else run_dir / "truncation"
    G, names, n = run["G"], run["class_names"], run["n_classes"]
    cols = min(n, 10)
    rows, records = [], []
    for psi in values:
        m = evaluate_generator(G, shards_spec=run["shards"], n_classes=n, truncation=psi, device=run["device"],
                               progress=progress, **settings)
        records.append({"step": run["step"], **{k: _json_value(v) for k, v in m.items()}})
        rows.append({"psi": psi, "IS": m.get("eval/IS"), "FID": m.get("eval/FID"), "KID": m.get("eval/KID"),
                     "precision": m.get("eval/precision"), "recall": m.get("eval/recall"),
                     "class_acc": m.get("eval/class_acc"), "extractor": m["extractor"],
                     "num_samples": m["num_samples"], "step": run["step"]})
        # Sample strip: the same base seed for every psi, classes 0..cols-1.
        gen = torch.Generator().manual_seed(777)
        z = truncated_normal((cols, G.z_dim), psi, settings["trunc_mode"], gen)
        with torch.no_grad():
            imgs = to_uint8(G(z.to(run["device"]), torch.arange(cols, device=run["device"])))
        save_grid(imgs[None], out / f"samples-psi{_psi_label(psi)}.png", [f"psi={_psi_label(psi)}"])
        if progress:
            print(f"truncation psi={_psi_label(psi)}: " + ", ".join(
                f"{k} {v:.4g}" for k, v in rows[-1].items() if k in ("IS", "FID", "KID", "precision", "recall",
                                                                      "class_acc") and v is not None),
                  file=sys.stderr, flush=True)

    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("off" if k == "psi" and v is None else ("" if v is None else v)) for k, v in r.items()})
    _atomic_write_bytes(out / "truncation.csv", buf.getvalue().encode())
    _atomic_write_bytes(out / "sweep.json", json.dumps(
        {"run": str(run_dir), "checkpoint": str(run["checkpoint"]), "step": run["step"],
         "trunc_mode": settings["trunc_mode"], "records": records}, indent=2).encode())
    _plot_pairs(rows, "FID", "IS", out / "is_vs_fid.png",
                f"IS vs FID by truncation ({rows[0]['extractor']}, {rows[0]['num_samples']} samples)")
    _plot_pairs(rows, "recall", "precision", out / "precision_recall.png",
                f"precision vs recall by truncation ({rows[0]['extractor']})")
    return rows


def _plot_pairs(rows: list[dict], xkey: str, ykey: str, path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    pts = [(r[xkey], r[ykey], r["psi"]) for r in rows if r[xkey] is not None and r[ykey] is not None]
    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    if pts:
        ordered = sorted(pts, key=lambda p: math.inf if p[2] is None else p[2])
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], "-o", color="tab:blue", ms=5)
        for x, y, psi in ordered:
            ax.annotate(f"psi={_psi_label(psi)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xkey)
    ax.set_ylabel(ykey)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, path)


# ---------------------------------------------------------------------------------------------
# Interpolation sheets
# ---------------------------------------------------------------------------------------------

def _lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return a + (b - a) * t


def _slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation along the great circle between the directions of a and b (the
    vectors' own lengths are carried along); lerp where a and b are (anti)parallel."""
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    bn = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    omega = (an * bn).sum(-1, keepdim=True).clamp(-1.0, 1.0).acos()
    so = omega.sin()
    safe = so.abs() > 1e-6
    so = torch.where(safe, so, torch.ones_like(so))
    s = torch.sin((1.0 - t) * omega) / so * a + torch.sin(t * omega) / so * b
    return torch.where(safe, s, _lerp(a, b, t))


@torch.no_grad()
def interpolation_sheet(G: nn.Module, mode: str = "lerp", space: str = "z", steps: int = 8,
                        rows: int | None = None, path=None, *, n_classes: int | None = None,
                        class_names: Sequence[str] | None = None, truncation: float | None = None,
                        trunc_mode: str = "resample", seed: int = 0, batch: int = 64) -> np.ndarray:
    """Interpolation sheet: `rows` rows of `steps` images. Returns (rows, steps, H, W, 3) uint8 and
    saves a PNG when `path` is given.

    space "z"      row r keeps class r % n_classes and moves from latent z0 to z1
    space "class"  row r keeps its latent and moves from class r's embedding to class r+1's
                   (G.class_embedding(y), fed as class_vec)
    mode           "lerp" (straight line) or "slerp" (great circle)
    """
    if mode not in ("lerp", "slerp"):
        raise EvalError(f"interpolation mode={mode!r}: choose lerp or slerp")
    if space not in ("z", "class"):
        raise EvalError(f"interpolation space={space!r}: choose z or class")
    interp = _lerp if mode == "lerp" else _slerp
    device = next(G.parameters()).device
    n = int(n_classes or G.n_classes)
    rows = int(rows or min(n, 8))
    names = list(class_names) if class_names else [str(i) for i in range(n)]
    gen = torch.Generator().manual_seed(seed)
    t = torch.linspace(0.0, 1.0, steps, device=device)[None, :, None]      # (1, steps, 1)
    a = torch.arange(rows, device=device) % n
    if space == "z":
        z0 = truncated_normal((rows, G.z_dim), truncation, trunc_mode, gen).to(device)
        z1 = truncated_normal((rows, G.z_dim), truncation, trunc_mode, gen).to(device)
        zz = interp(z0[:, None], z1[:, None], t).flatten(0, 1)            # (rows * steps, z_dim)
        yy = a.repeat_interleave(steps)
        labels = [names[int(c)] for c in a]

        def run(i, j):
            return G(zz[i:j], yy[i:j])
    else:
        b = (a + 1) % n
        z = truncated_normal((rows, G.z_dim), truncation, trunc_mode, gen).to(device)
        zz = z.repeat_interleave(steps, dim=0)
        ea, eb = G.class_embedding(a).float(), G.class_embedding(b).float()
        ee = interp(ea[:, None], eb[:, None], t).flatten(0, 1)            # (rows * steps, E)
        labels = [f"{names[int(i)]} > {names[int(j)]}" for i, j in zip(a, b)]

        def run(i, j):
            return G(zz[i:j], None, class_vec=ee[i:j])
    was_training = G.training
    G.eval()
    try:
        imgs = np.concatenate([to_uint8(run(i, i + batch)) for i in range(0, rows * steps, batch)])
    finally:
        G.train(was_training)
    imgs = imgs.reshape(rows, steps, *imgs.shape[1:])
    if path is not None:
        save_grid(imgs, path, labels)
    return imgs
