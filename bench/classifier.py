"""The domain classifier: a small CNN trained on a dataset's own shards.

It is gan-bench's offline feature extractor (eval.extractor=domain): its penultimate activations
(`features`, FEATURE_DIM values) stand in for Inception's pool3 in FID / KID / precision-recall,
its logits stand in for Inception's in IS, and its predictions give the class-conditional accuracy
of a generator (`eval/class_acc`). Nothing is downloaded: it is trained from the shards in a few
minutes on a CPU and saved beside them.

    train_classifier(shards_spec, out=None, resolution=None, ...) -> info dict (path, accuracy, ...)
    load_classifier(path, device="cpu") -> (DomainClassifier in eval mode, meta dict)
    classifier_path(shards_spec, resolution) -> default file: <shard dir>/classifier-r{res}.pt
    manifest_hash(shards_spec) -> hex digest identifying a shard set
    load_images(shards_spec, resolution, limit=None) -> (uint8 (N,3,R,R), int64 (N,))
    DomainFeatureExtractor   the classifier as a torch-fidelity feature extractor, registered as
                             DOMAIN_EXTRACTOR ("gan-bench-domain"); its weights file is passed as
                             torch-fidelity's feature_extractor_weights_path

The checkpoint is a dict: state_dict, class_names, resolution, width, feature_dim, accuracy
(held-out), n_train, n_holdout, epochs, seconds, manifest_hash, shards, created.
"""
from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import io
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY, register_feature_extractor

from bench import data as bdata
from bench.evaluate import EvalError

__all__ = ["DomainClassifier", "FEATURE_DIM", "train_classifier", "load_classifier", "classifier_path",
           "manifest_hash", "load_images", "ClassifierError", "DomainFeatureExtractor", "DOMAIN_EXTRACTOR",
           "DOMAIN_LAYERS"]

FEATURE_DIM = 128          # features per image (the FID / KID / PRC features) at the default width 32
CLASSIFIER_FILE = "classifier-r{res}.pt"
IMAGE_BUDGET_BYTES = 2 << 30  # train_classifier keeps at most this much uint8 image data in memory


class ClassifierError(EvalError):
    """A classifier that cannot be trained or loaded; the message (one line) says what to do."""


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def _stage(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class DomainClassifier(nn.Module):
    """uint8 or [-1, 1] float images (B, 3, R, R) -> (features (B, FEATURE_DIM), logits (B, classes)).

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
# Shard identity and image loading
# ---------------------------------------------------------------------------------------------

def _shard_dir(shards_spec) -> Path:
    shards, _ = bdata.resolve_shards(str(shards_spec))
    dirs = {os.path.dirname(os.path.abspath(s)) for s in shards}
    if len(dirs) != 1:
        raise ClassifierError(f"data.shards={str(shards_spec)!r} spans {len(dirs)} directories; "
                              f"pass out=/path/classifier.pt to say where the classifier goes")
    return Path(dirs.pop())


def classifier_path(shards_spec, resolution: int) -> Path:
    """Default classifier file of a shard set: <shard dir>/classifier-r{resolution}.pt."""
    return _shard_dir(shards_spec) / CLASSIFIER_FILE.format(res=int(resolution))


def manifest_hash(shards_spec) -> str:
    """sha256 (hex, 16 chars) of the shard set's manifest.json (without its creation time); for
    shards without a manifest, of the shard paths, sizes and modification times."""
    shards, manifest = bdata.resolve_shards(str(shards_spec))
    if manifest is not None:
        ident = {k: v for k, v in manifest.items() if k != "created"}
    else:
        ident = {"shards": [[os.path.abspath(s), os.path.getsize(s), int(os.path.getmtime(s))]
                            for s in shards if os.path.isfile(s)] or shards}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def dataset_info(shards_spec) -> tuple[list[str] | None, int | None, int | None]:
    """(class names, image count, resolution) from the manifest; None where unknown."""
    _, manifest = bdata.resolve_shards(str(shards_spec))
    if manifest is None:
        return None, None, None
    return (list(manifest["class_names"]) if manifest.get("class_names") else None,
            manifest.get("num_samples"), manifest.get("resolution"))


def load_images(shards_spec, resolution: int, limit: int | None = None, seed: int = 0,
                progress: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Read up to `limit` images (all when None) from the shards, in a fixed order for a fixed seed
    (shards in a seeded shuffled order, samples in shard order). Returns uint8 (N, 3, R, R) and
    int64 labels (N,)."""
    loader = bdata.ShardLoader(str(shards_spec), batch_size=256, resolution=int(resolution), num_workers=0,
                               shuffle_buffer=0, seed=seed, resampled=False)
    xs, ys, n = [], [], 0
    t0 = last = time.time()
    with loader:
        for x, y in loader:
            # float [-1, 1] (exactly u / 127.5 - 1) back to the shard's uint8 values
            xs.append(x.add_(1.0).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8))
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

def fast_bf16() -> bool:
    """True where bf16 autocast is worth it on this CPU (AVX512-BF16 or AMX)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


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


def train_classifier(shards_spec, out: str | os.PathLike | None = None, resolution: int | None = None, *,
                     epochs: int = 10, max_seconds: float = 170.0, batch_size: int = 128, lr: float = 3e-3,
                     weight_decay: float = 5e-4, width: int = 32, holdout: float = 0.1,
                     max_images: int | None = None, precision: str = "auto", augment: bool = True,
                     device: str | torch.device | None = None, seed: int = 0, progress: bool = True) -> dict:
    """Train the domain classifier on a shard set and save it (atomically). Returns its info dict.

    shards_spec  shard directory / pattern (see bench.data.resolve_shards); needs class labels
    out          output file; None = <shard dir>/classifier-r{resolution}.pt
    resolution   image side; None = the manifest's resolution
    epochs       passes over the training split (the cosine learning-rate schedule ends with them)
    max_seconds  wall-clock budget for the passes: the schedule is stretched over
                 max(step / total steps, elapsed / max_seconds), so it always finishes in time
    holdout      fraction of images held out (seeded) to measure accuracy; 0 = none (accuracy null)
    max_images   cap on images read (None = all that fit in IMAGE_BUDGET_BYTES of uint8)
    precision    "auto" (bf16 autocast + channels_last where the CPU has fast bf16, or on CUDA),
                 "bf16" or "fp32"
    """
    t_start = time.time()
    class_names, _, man_res = dataset_info(shards_spec)
    resolution = int(resolution or man_res or 0)
    if resolution <= 0:
        raise ClassifierError(f"data.shards={str(shards_spec)!r} has no manifest.json giving its resolution; "
                              f"pass resolution=")
    out = Path(out) if out is not None else classifier_path(shards_spec, resolution)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if max_images is None:
        max_images = max(1000, IMAGE_BUDGET_BYTES // (3 * resolution * resolution))
    if progress:
        print(f"train-classifier: reading up to {max_images} images ({resolution}x{resolution}) from "
              f"{shards_spec}", file=sys.stderr, flush=True)
    x, y = load_images(shards_spec, resolution, limit=max_images, seed=seed, progress=progress)
    n_classes = len(class_names) if class_names else int(y.max()) + 1
    class_names = class_names or [str(i) for i in range(n_classes)]

    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n_hold = int(round(holdout * len(y))) if holdout > 0 else 0
    hold_idx, train_idx = perm[:n_hold], perm[n_hold:]
    x_tr, y_tr = x[train_idx], y[train_idx]
    batch_size = max(2, min(batch_size, len(y_tr), max(16, len(y_tr) // 20)))  # small sets: >= ~20 steps/epoch

    use_bf16 = precision == "bf16" or (precision == "auto" and (dev.type == "cuda" or fast_bf16()))
    fmt = torch.channels_last if use_bf16 else torch.contiguous_format
    torch.manual_seed(seed)
    model = DomainClassifier(n_classes, resolution, width=width).to(dev, memory_format=fmt)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    autocast = (lambda: torch.autocast(dev.type, dtype=torch.bfloat16)) if use_bf16 else contextlib.nullcontext
    steps_per_epoch = len(y_tr) // batch_size
    total = max(1, epochs * steps_per_epoch)
    warmup = min(100, total // 10)
    pad = max(1, resolution // 16) if augment else 0

    model.train()
    step, t0, done, epoch = 0, time.time(), False, 0
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(y_tr), generator=g)
        loss_sum, seen = 0.0, 0
        for b in range(steps_per_epoch):
            frac = max(step / total, (time.time() - t0) / max_seconds)
            if frac >= 1.0:
                done = True
                break
            scale = min(1.0, (step + 1) / max(1, warmup)) * 0.5 * (1.0 + math.cos(math.pi * frac))
            for group in opt.param_groups:
                group["lr"] = lr * scale
            idx = order[b * batch_size:(b + 1) * batch_size]
            xb = x_tr[idx].to(dev).float().mul_(1.0 / 127.5).sub_(1.0)
            if augment:
                xb = _augment(xb, g, pad)
            xb = xb.contiguous(memory_format=fmt)
            yb = y_tr[idx].to(dev)
            with autocast():
                _, logits = model(xb)
            loss = F.cross_entropy(logits.float(), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1
            loss_sum += float(loss.detach()) * len(idx)  # host sync: once per step, for the progress line
            seen += len(idx)
        if progress and seen:
            print(f"train-classifier: epoch {epoch}/{epochs} loss {loss_sum / seen:.4f} "
                  f"({time.time() - t0:.0f} s)", file=sys.stderr, flush=True)
        if done:
            break
    train_seconds = time.time() - t0

    model = model.to(memory_format=torch.contiguous_format)
    acc = accuracy(model, x[hold_idx], y[hold_idx], device=dev) if n_hold else None
    model.cpu().eval()
    info = {
        "class_names": list(class_names), "resolution": resolution, "width": width,
        "feature_dim": model.feature_dim, "accuracy": acc, "n_train": len(y_tr), "n_holdout": n_hold,
        "epochs": epoch, "steps": step, "train_seconds": round(train_seconds, 2),
        "seconds": round(time.time() - t_start, 2), "precision": "bf16" if use_bf16 else "fp32",
        "manifest_hash": manifest_hash(shards_spec), "shards": str(shards_spec),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        torch.save({"state_dict": model.state_dict(), **info}, tmp)
        os.replace(tmp, out)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise ClassifierError(f"cannot write the domain classifier to {out} ({exc.strerror}); "
                              f"pass out=/writable/path/classifier.pt") from None
    info["path"] = str(out)
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
    ckpt = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=False)
    meta = {k: v for k, v in ckpt.items() if k != "state_dict"}
    model = DomainClassifier(len(meta["class_names"]), int(meta["resolution"]), width=int(meta["width"]))
    model.load_state_dict(ckpt["state_dict"])
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
                                  "feature_extractor_weights_path (see bench.classifier.train_classifier)")
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
