"""The domain classifier: a small CNN trained on a dataset's own shards, gan-bench's offline feature extractor
(eval.extractor=domain) and the judge of `eval/class_acc`: training, loading, its default file, and the
classifier as a torch-fidelity feature extractor. A one-class set is refused in one line (`unlabelled_message`)
(docs/architecture.md, "Evaluation")."""
from __future__ import annotations

import datetime as _dt
import hashlib
import io
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from bench import rundir
from bench.data.loader import LoaderSettings, ShardLoader
from bench.data.shards import dataset_info, manifest_hash, shard_dir
from bench.device import autocast, eval_precision
from bench.eval.errors import ClassifierError
from bench.eval.safeload import first_line, load_weights

__all__ = ["DomainClassifier", "ClassifierSettings", "train_classifier", "load_classifier", "classifier_path",
           "load_images", "DomainFeatureExtractor", "DOMAIN_EXTRACTOR", "DOMAIN_LAYERS"]

CLASSIFIER_FILE = "classifier-r{res}.pt"
IMAGE_BUDGET_BYTES = 2 << 30  # train_classifier keeps at most this much uint8 image data in memory


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DomainClassifier(nn.Module):
    """uint8 or [-1, 1] float images (B, 3, R, R) -> (features (B, feature_dim), logits (B, classes)).

    Conv stages (two 3x3 conv + BN + ReLU each), 2x max-pool between stages until the side is 4:
    R=32: 32x32 (w) -> 16x16 (2w) -> 8x8 (4w) -> 4x4 (4w); global average pooling gives the
    features (4w = 128 values at the default width), a linear layer the logits. Inputs of another
    side are resized to R (area / bilinear) first.
    """

    def __init__(self, n_classes: int, resolution: int, width: int = 32):
        super().__init__()
        if n_classes < 2:
            raise ClassifierError(f"domain classifier: the dataset has {n_classes} class(es); it needs >= 2")
        self.n_classes, self.resolution, self.width = n_classes, resolution, width
        n_pool = max(1, int(math.log2(max(resolution, 8))) - 2)  # down to a 4x4 map (8 -> 4 at least)
        chans = [width * min(2 ** i, 4) for i in range(n_pool + 1)]
        layers: list[nn.Module] = [_stage(3, chans[0])]
        for i in range(n_pool):
            layers += [nn.MaxPool2d(2), _stage(chans[i], chans[i + 1])]
        self.body = nn.Sequential(*layers)
        self.feature_dim = chans[-1]
        self.head = nn.Linear(self.feature_dim, n_classes)

    def prepare(self, x: torch.Tensor) -> torch.Tensor:
        """uint8 [0, 255] or float [-1, 1] (B, 3, H, W) -> float [-1, 1] at the classifier's side."""
        if x.dtype == torch.uint8:
            x = x.float().mul_(1.0 / 127.5).sub_(1.0)
        else:
            x = x.float()
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            mode = "area" if x.shape[-1] > self.resolution else "bilinear"
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode=mode,
                              **({} if mode == "area" else {"align_corners": False}))
        return x

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.body(self.prepare(x))                  # (B, C, 4, 4)
        feats = h.float().mean(dim=(2, 3))              # (B, feature_dim)
        return feats, self.head(feats).float()          # features, logits


# ---------------------------------------------------------------------------------------------
# Images
# ---------------------------------------------------------------------------------------------

def classifier_path(shards_spec, resolution: int) -> Path:
    """Default classifier file of a shard set: <shard dir>/classifier-r{resolution}.pt."""
    return shard_dir(shards_spec) / CLASSIFIER_FILE.format(res=int(resolution))


def unlabelled_message(shards_spec, resolution) -> str:
    """Why a one-class (unlabelled) shard set has no domain classifier, and what to do instead (one line)."""
    return (f"data.shards={str(shards_spec)!r} has 1 class (unlabelled data): the domain extractor "
            f"(eval.extractor=domain) learns its features from class labels and needs >= 2 classes; use "
            f"eval.extractor=inception with eval.weights_path=FILE, or eval.classifier_path=a classifier trained "
            f"on labelled shards at resolution {resolution}, or eval.every=0 (train without evaluating)")


def read_uint8(shards_spec, resolution: int, seed: int = 0, batch_size: int = 256):
    """(uint8 (B, 3, R, R), int64 labels (B,)) batches of the shards in a fixed order for a fixed seed (shards in a
    seeded shuffled order, samples in shard order), one pass; stop iterating to stop reading."""
    loader = ShardLoader(str(shards_spec), batch_size=int(batch_size), resolution=int(resolution),
                         settings=LoaderSettings(num_workers=0, shuffle_buffer=0, seed=seed, resampled=False))
    with loader:
        for x, y in loader:
            # float [-1, 1] (exactly u / 127.5 - 1) back to the shard's uint8 values
            yield x.add_(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8), y


def load_images(shards_spec, resolution: int, limit: int | None = None, seed: int = 0,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Read up to `limit` images (all when None) from the shards in read_uint8's order. Returns uint8
    (N, 3, R, R) and int64 labels (N,)."""
    xs, ys, n = [], [], 0
    t0 = last = time.time()
    for x, y in read_uint8(shards_spec, resolution, seed):
        xs.append(x)
        ys.append(y)
        n += len(y)
        if progress and time.time() - last > 5:
            last = time.time()
            print(f"reading shards: {n} images ({n / (last - t0):.0f} img/s)", file=sys.stderr, flush=True)
        if limit is not None and n >= limit:
            break
    if not xs:
        raise ClassifierError(f"data.shards={str(shards_spec)!r}: no readable images")
    x, y = torch.cat(xs), torch.cat(ys)
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return x, y


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ClassifierSettings:
    """How train_classifier trains (`bench eval train-classifier` uses the defaults)."""
    epochs: int = 10             # passes over the training split (the cosine schedule ends with them)
    max_seconds: float = 170.0   # compute budget of the passes: the schedule runs over max(step / total steps,
                                 # elapsed / max_seconds), so it ends in time; on the CPU `elapsed` is this process's
                                 # CPU time / its threads, so a busy machine slows the clock instead of cutting training
    min_steps: int = 0           # at least this many steps (more epochs on a small set); DEFAULT_SETTINGS: 600
    batch_size: int = 128        # at most; small sets take smaller batches (>= ~20 steps per epoch)
    lr: float = 3e-3             # AdamW peak learning rate (linear warm-up, cosine decay)
    weight_decay: float = 5e-4
    width: int = 32              # channels of the first stage (features = 4 x width)
    holdout: float = 0.1         # fraction of images held out (seeded) to measure accuracy; 0 = none
    max_images: Optional[int] = None  # cap on images read (None = all that fit in IMAGE_BUDGET_BYTES)
    precision: str = "auto"      # auto (bf16 autocast + channels_last on CUDA or CPUs with fast bf16) | bf16 | fp32
    augment: bool = True         # random translations and horizontal flips
    seed: int = 0                # image order, split, initialisation, batches, augmentation


DEFAULT_SETTINGS = ClassifierSettings(min_steps=600)  # `bench eval train-classifier` and a classifier built on first use



def _augment(x: torch.Tensor, gen: torch.Generator, pad: int) -> torch.Tensor:
    """Random translation by up to `pad` pixels (reflect padding) and horizontal flips, per batch
    (one shift per batch keeps it a single cheap crop)."""
    if pad > 0:
        R = x.shape[-1]
        xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        i, j = torch.randint(0, 2 * pad + 1, (2,), generator=gen).tolist()
        x = xp[:, :, i:i + R, j:j + R]
    flip = torch.rand(x.shape[0], generator=gen) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(3), x)


@torch.no_grad()
def accuracy(model: DomainClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500,
             device: torch.device | str = "cpu") -> float:
    """Top-1 accuracy of `model` (eval mode) on uint8 images x with labels y."""
    model.eval()
    correct = 0
    for i in range(0, len(y), batch_size):
        _, logits = model(x[i:i + batch_size].to(device))
        correct += int((logits.argmax(1).cpu() == y[i:i + batch_size]).sum())
    return correct / max(1, len(y))


@dataclass
class _Fit:
    """One training of the classifier: the model, its training split and the shared generator."""
    model: DomainClassifier
    x: torch.Tensor          # uint8 training images
    y: torch.Tensor
    gen: torch.Generator     # batches and augmentation (after the split's permutation)
    device: torch.device
    bf16: bool


def _budget_clock(dev: torch.device):
    """Seconds of the training budget used so far: wall time on a GPU; on the CPU this process's CPU time over its
    threads (at least a quarter of the wall time), which runs slower when another process takes the cores (a wall-clock budget then ended training
    before the classifier had learned anything: chance accuracy on a busy 2-core machine)."""
    if dev.type != "cpu":
        t0 = time.time()
        return lambda: time.time() - t0
    c0, t0, threads = time.process_time(), time.time(), max(1, torch.get_num_threads())
    # wall / 4: with many cores that small convolutions leave idle, CPU time over threads would barely move
    return lambda: max((time.process_time() - c0) / threads, (time.time() - t0) / 4)


def _fit(fit: _Fit, s: ClassifierSettings, progress: bool) -> tuple[int, int, float]:
    """Train fit.model in place. Returns (epochs run, steps, seconds)."""
    model, x_tr, y_tr, g, dev = fit.model, fit.x, fit.y, fit.gen, fit.device
    batch_size = max(2, min(s.batch_size, len(y_tr), max(16, len(y_tr) // 20)))  # small sets: >= ~20 steps/epoch
    fmt = torch.channels_last if fit.bf16 else torch.contiguous_format
    opt = torch.optim.AdamW(model.parameters(), lr=s.lr, weight_decay=s.weight_decay)
    amp = autocast("bf16" if fit.bf16 else "fp32", dev)
    steps_per_epoch = len(y_tr) // batch_size
    epochs = max(s.epochs, math.ceil(s.min_steps / max(1, steps_per_epoch)))  # a small set: enough steps to learn
    total = max(1, epochs * steps_per_epoch)
    warmup = min(100, total // 10)
    pad = max(1, model.resolution // 16) if s.augment else 0

    model.train()
    step, t0, done, epoch = 0, time.time(), False, 0
    clock = _budget_clock(dev)
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y_tr), generator=g)
        loss_sum, seen = 0.0, 0
        for b in range(steps_per_epoch):
            frac = max(step / total, clock() / s.max_seconds)
            if frac >= 1.0:
                done = True
                break
            scale = min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1.0 + math.cos(math.pi * frac))
            for group in opt.param_groups:
                group["lr"] = s.lr * scale
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb = x_tr[idx].to(dev).float().mul_(1.0 / 127.5).sub_(1.0)
            if s.augment:
                xb = _augment(xb, g, pad)
            xb = xb.contiguous(memory_format=fmt)
            yb = y_tr[idx].to(dev)
            with amp():
                _, logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            torch.clear_autocast_cache()  # nested in another autocast region, the cast cache would outlive the step
            step += 1
            loss_sum += float(loss.detach()) * len(idx)  # host sync: once per step, for the progress line
            seen += len(idx)
        if progress and seen:
            print(f"train-classifier: epoch {epoch}/{epochs} loss {loss_sum / seen:.4f} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        if done:
            break
    return epoch, step, time.time() - t0


def _save(model: DomainClassifier, info: dict, out: Path) -> None:
    try:
        rundir.atomic_write(out, write=lambda f: torch.save({"state_dict": model.state_dict(), **info}, f))
    except OSError as exc:
        raise ClassifierError(f"cannot write the domain classifier to {out} ({exc.strerror}); "
                              f"pass out=/writable/path/classifier.pt") from None


def train_classifier(shards_spec, out: str | os.PathLike | None = None, resolution: int | None = None,
                     settings: ClassifierSettings = DEFAULT_SETTINGS, *,
                     device: str | torch.device | None = None, progress: bool = True) -> dict:
    """Train the domain classifier on a shard set and save it (atomically). Returns its info dict.

    shards_spec  shard directory / pattern (see bench.data.shards.resolve_shards); needs class labels
    out          output file; None = <shard dir>/classifier-r{resolution}.pt
    resolution   image side; None = the manifest's resolution
    settings     epochs, time budget, optimiser, width, hold-out, precision (see ClassifierSettings)
    """
    t_start, s = time.time(), settings
    class_names, _, man_res = dataset_info(shards_spec)
    resolution = int(resolution or man_res or 0)
    if resolution <= 0:
        raise ClassifierError(f"data.shards={str(shards_spec)!r} has no manifest.json giving its resolution; "
                              f"pass resolution=")
    if class_names is not None and len(class_names) < 2:  # before reading any image
        raise ClassifierError(unlabelled_message(shards_spec, resolution))
    out = Path(out) if out is not None else classifier_path(shards_spec, resolution)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    max_images = s.max_images if s.max_images is not None else max(1000, IMAGE_BUDGET_BYTES // (3 * resolution**2))
    if progress:
        print(f"train-classifier: reading up to {max_images} images ({resolution}x{resolution}) from "
              f"{shards_spec}", file=sys.stderr, flush=True)
    x, y = load_images(shards_spec, resolution, limit=max_images, seed=s.seed, progress=progress)
    n_classes = len(class_names) if class_names else int(y.max()) + 1
    class_names = class_names or [str(i) for i in range(n_classes)]

    g = torch.Generator().manual_seed(s.seed)
    perm = torch.randperm(len(y), generator=g)
    n_hold = int(round(s.holdout * len(y))) if s.holdout > 0 else 0
    hold_idx, train_idx = perm[:n_hold], perm[n_hold:]
    use_bf16 = eval_precision(s.precision, dev) == "bf16"
    torch.manual_seed(s.seed)
    model = DomainClassifier(n_classes, resolution, width=s.width).to(
        dev, memory_format=torch.channels_last if use_bf16 else torch.contiguous_format)
    epoch, step, train_seconds = _fit(_Fit(model, x[train_idx], y[train_idx], g, dev, use_bf16), s, progress)

    model = model.to(memory_format=torch.contiguous_format)
    acc = accuracy(model, x[hold_idx], y[hold_idx], device=dev) if n_hold else None
    model.cpu().eval()
    info = {
        "class_names": list(class_names), "resolution": resolution, "width": s.width,
        "feature_dim": model.feature_dim, "accuracy": acc, "n_train": len(train_idx), "n_holdout": n_hold,
        "epochs": epoch, "steps": step, "train_seconds": round(train_seconds, 2),
        "seconds": round(time.time() - t_start, 2), "precision": "bf16" if use_bf16 else "fp32",
        "manifest_hash": manifest_hash(shards_spec), "shards": str(shards_spec),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    _save(model, info, out)
    info["path"] = str(out)
    if acc is not None and acc < min(0.5, 3.0 / n_classes):
        print(f"warning: the domain classifier {out} reaches {100 * acc:.1f}% held-out accuracy on {n_classes} classes "
              f"(chance {100 / n_classes:.1f}%): metrics in its features (domain FID, class_acc, diversity) will "
              f"mean little; train it longer (bench eval train-classifier) or give eval.classifier_path",
              file=sys.stderr, flush=True)
    if progress:
        acc_s = f"{100 * acc:.2f}%" if acc is not None else "n/a"
        print(f"train-classifier: held-out accuracy {acc_s} on {n_hold} images, {epoch} epochs in "
              f"{train_seconds:.0f} s -> {out}", file=sys.stderr, flush=True)
    return info


def load_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[DomainClassifier, dict]:
    """(model in eval mode on `device`, meta dict incl. path and sha256) from a train_classifier file."""
    p = Path(path)
    if not p.is_file():
        raise ClassifierError(f"domain classifier {p} does not exist; train it with "
                              f"`bench eval train-classifier data.shards=...`")
    raw = p.read_bytes()
    try:  # an untrusted file: weights_only unpickling runs no code
        ckpt = load_weights(io.BytesIO(raw))
        meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
        model = DomainClassifier(len(meta["class_names"]), int(meta["resolution"]), width=int(meta["width"]))
        model.load_state_dict(ckpt["state_dict"])
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged or hostile file
        raise ClassifierError(f"domain classifier {p} is unreadable ({first_line(exc)})") from None
    model.eval().requires_grad_(False)
    meta["path"] = str(p)
    meta["sha256"] = hashlib.sha256(raw).hexdigest()[:16]
    return model.to(device), meta


# ---------------------------------------------------------------------------------------------
# torch-fidelity feature extractor
# ---------------------------------------------------------------------------------------------

DOMAIN_EXTRACTOR = "gan-bench-domain"
# torch-fidelity feature layer per metric (its feature_layer_isc / _fid / _kid / _prc arguments)
DOMAIN_LAYERS = {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}


class DomainFeatureExtractor(FeatureExtractorBase):
    """The domain classifier for torch_fidelity.calculate_metrics(feature_extractor=DOMAIN_EXTRACTOR,
    feature_extractor_weights_path=<classifier file>, ...). Input: uint8 (B, 3, H, W). Features:
    'features' (B, feature_dim) pooled activations (FID / KID / PRC), 'logits' (B, classes) (IS),
    'logits_unbiased' (logits without the bias, as Inception provides)."""

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        if not feature_extractor_weights_path:
            raise ClassifierError("the domain feature extractor needs its classifier file as "
                                  "feature_extractor_weights_path (see bench.eval.classifier.train_classifier)")
        self.net, self.meta = load_classifier(feature_extractor_weights_path)

    def forward(self, x: torch.Tensor):
        if not (torch.is_tensor(x) and x.dtype == torch.uint8 and x.dim() == 4 and x.shape[1] == 3):
            raise ValueError(f"domain extractor: expected uint8 (B, 3, H, W) images, got "
                             f"{getattr(x, 'dtype', type(x))} {tuple(getattr(x, 'shape', ()))}")
        feats, logits = self.net(x)
        out = {"features": feats, "logits": logits}
        if "logits_unbiased" in self.features_list:
            out["logits_unbiased"] = logits - self.net.head.bias.float()
        return tuple(out[name] for name in self.features_list)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits_unbiased", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return DOMAIN_LAYERS[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 32, 32, dtype=torch.uint8)


if DOMAIN_EXTRACTOR not in FEATURE_EXTRACTORS_REGISTRY:
    register_feature_extractor(DOMAIN_EXTRACTOR, DomainFeatureExtractor)
