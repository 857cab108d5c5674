"""The diversity probe: `stability/diversity` (G_ema's per-class spread in the domain classifier's features over
the real images') and the class rule's `stability/class_acc`, `stability/class_sep` and `stability/probe_fd`,
measured every `telemetry.diversity_every` steps on rank 0 and broadcast (docs/architecture.md, "Telemetry")."""
from __future__ import annotations

import math
import sys
import time
from typing import Optional

import torch

from bench.eval.intra_check import class_based

DIVERSITY = "stability/diversity"
DIVERSITY_MIN = "stability/diversity_min"
CLASS_ACC = "stability/class_acc"                  # share of the probe's samples the classifier gives their own label
CLASS_ACC_X = "stability/class_acc_over_chance"    # the same over chance (1 / the data's classes)
CLASS_SEP = "stability/class_sep"                  # class_separation of G's features over the data's
PROBE_FD = "stability/probe_fd"                    # Frechet distance of G's probe features (all classes) to the data's
DIVERSITY_SEED = 20_240_613  # the fixed latents; independent of train.seed so runs compare on the same z
MAX_CLASSES = 32
REAL_READ_FACTOR = 8  # real images read at most: this x diversity_samples x the data's classes (the read stops
                      # when every measured class has diversity_samples; a class beyond that is not kept)


def pairwise_mean(features: torch.Tensor) -> float:
    """Mean Euclidean distance over all unordered pairs of rows of `features` (N, D), in float64."""
    f = features.double()
    if f.shape[0] < 2:
        return float("nan")
    return float(torch.pdist(f).mean())


def diversity_ratios(fake: dict, real: dict) -> dict:
    """{class: pairwise_mean(fake[c]) / pairwise_mean(real[c])} for the classes in both with >= 2 rows
    on each side and a real spread above zero."""
    out = {}
    for c, f in fake.items():
        r = real.get(c)
        if r is None or len(r) < 2 or len(f) < 2:
            continue
        ref = pairwise_mean(r)
        if ref > 0:
            out[c] = pairwise_mean(f) / ref
    return out


def class_separation(feats: dict) -> float:
    """How far apart the classes are: the mean distance between the per-class mean features over the mean
    within-class pairwise distance (classes with >= 2 rows; nan with fewer than 2 such classes or no spread).
    A G that ignores its class input gives class means that differ only by sampling noise: about
    sqrt(2 / samples) x the spread, well under the data's own value."""
    rows = [f.double() for f in feats.values() if len(f) >= 2]
    if len(rows) < 2:
        return float("nan")
    between = pairwise_mean(torch.stack([f.mean(0) for f in rows]))
    within = sum(pairwise_mean(f) for f in rows) / len(rows)
    return between / within if within > 0 else float("nan")


def real_per_class(shards_spec, resolution: int, classes: list, per_class: int, limit: int) -> tuple[dict, int]:
    """({class: up to per_class real images (uint8, as bench.eval.classifier.load_images gives them)}, images
    read): the shards in load_images' fixed order, kept per class (a class already full takes no more, so a
    frequent class cannot crowd out the others), stopping when every class is full or `limit` images were read."""
    from bench.eval.classifier import read_uint8

    want = set(classes)
    kept: dict = {c: [] for c in classes}
    have, read = dict.fromkeys(classes, 0), 0
    for x, y in read_uint8(shards_spec, resolution, seed=0, batch_size=64):  # small batches: stops soon after full
        for c in set(y.tolist()) & want:
            take = x[y == c][: per_class - have[c]]
            if len(take):
                kept[c].append(take)
                have[c] += len(take)
        read += len(y)
        if read >= limit or all(have[c] >= per_class for c in classes):
            break
    return {c: torch.cat(v) for c, v in kept.items() if v}, read


class DiversityProbe:
    """Built once per run; the classifier and the real side are loaded on the first measurement."""

    def __init__(self, every: int, samples: int, shards_spec, resolution: int, n_classes: int, device, *,
                 classifier_path=None, train_if_missing: bool = False):
        from bench.eval.sampling import grid_classes

        self.every, self.samples = int(every), int(samples)
        self.shards_spec, self.resolution, self.device = shards_spec, int(resolution), device
        self.n_classes = int(n_classes)
        self.classes = grid_classes(n_classes, MAX_CLASSES)
        self.classifier_path, self.train_if_missing = classifier_path, train_if_missing
        self.quiet = False           # no progress or skip lines
        self.net = None              # the domain classifier (eval mode, on `device`)
        self.real: Optional[dict] = None  # {class: real features}
        self.real_sep = float("nan")      # class_separation of the real features
        self.off = False             # no classifier: said once, then off for the run
        self.seconds: list[float] = []  # cost of each measurement (the first includes the set-up)

    @classmethod
    def from_run(cls, run) -> "DiversityProbe":
        """The probe of a training run (loop.Run): telemetry.diversity_every / _samples on its data."""
        cfg, tc = run.cfg, run.cfg.telemetry
        probe = cls(tc.diversity_every, tc.diversity_samples, run.shards_spec, cfg.data.resolution, run.n_data_classes,
                    run.device, classifier_path=cfg.eval.classifier_path,
                    train_if_missing=True)  # as training does before step 1 (loop._prepare_classifier)
        probe.quiet = run.quiet or not run.is_main
        return probe

    def due(self, step: int) -> bool:
        return self.every > 0 and not self.off and step % self.every == 0

    def report(self, ranks, G) -> float:
        """Measure on rank 0, hand the numbers to every rank, report them to the tick (every rank the same).
        Returns the seconds it took: the training loop sets them aside, so they stay out of the tick's img/s."""
        from bench.train import telemetry

        t0 = time.perf_counter()
        values = ranks.broadcast(ranks.rank0("measuring the diversity of G's samples", lambda: self.measure(G)))
        for key, value in (values or {}).items():
            telemetry.report(key, value)
        self.off = self.off or not values  # the same on every rank (broadcast)
        return time.perf_counter() - t0

    # ---- set-up --------------------------------------------------------------------------------------
    def _classifier(self):
        from bench.eval.classifier import classifier_path, load_classifier
        from bench.eval.errors import EvalError
        from bench.eval.metrics import ensure_classifier

        path = self.classifier_path or classifier_path(self.shards_spec, self.resolution)
        try:
            path = ensure_classifier(self.shards_spec, self.resolution, self.classifier_path,
                                     train_if_missing=self.train_if_missing, progress=not self.quiet)
        except EvalError:
            if not self.quiet:
                print(f"telemetry.diversity_every={self.every}: no domain classifier at {path}; stability/diversity "
                      f"is off for this run (train it with `bench eval train-classifier data.shards="
                      f"{self.shards_spec}`, or evaluate during training: eval.every > 0)", file=sys.stderr,
                      flush=True)
            return None
        return load_classifier(path, self.device)[0]

    def _setup(self) -> bool:
        from bench.data.shards import dataset_info

        self.net = self._classifier()
        if self.net is None:
            return False
        _, n_available, _ = dataset_info(self.shards_spec)
        limit = REAL_READ_FACTOR * self.samples * self.n_classes  # all the data's classes, of which some are measured
        if n_available:
            limit = min(limit, int(n_available))
        per_class, read = real_per_class(self.shards_spec, self.resolution, self.classes, self.samples, limit)
        self.real = {c: self._features(x) for c, x in per_class.items() if len(x) >= 2}
        self.real_sep = class_separation(self.real)
        short = [c for c in self.classes if c not in self.real]
        if short and not self.quiet:
            print(f"diversity: {len(short)} of {len(self.classes)} measured classes have fewer than 2 real images "
                  f"among the {read} read for telemetry.diversity_samples={self.samples} (classes {short[:8]}"
                  f"{' ...' if len(short) > 8 else ''}; shards sorted by class?); {DIVERSITY} covers the other "
                  f"{len(self.real)}", file=sys.stderr, flush=True)
        return True

    @torch.no_grad()
    def _features(self, images: torch.Tensor, batch: int = 256, logits: bool = False):
        out = [self.net(images[i:i + batch].to(self.device)) for i in range(0, len(images), batch)]
        feats = torch.cat([f.float().cpu() for f, _ in out])
        return (feats, torch.cat([lg.float().cpu() for _, lg in out])) if logits else feats

    # ---- measuring -------------------------------------------------------------------------------------
    def latents(self, z_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed latents (classes x samples, z_dim) and their labels, on the CPU."""
        g = torch.Generator().manual_seed(DIVERSITY_SEED)
        z = torch.randn(len(self.classes) * self.samples, z_dim, generator=g)
        y = torch.tensor(self.classes, dtype=torch.long).repeat_interleave(self.samples)
        return z, y

    @torch.no_grad()
    def measure(self, G) -> dict:
        """{DIVERSITY: mean ratio over classes, DIVERSITY_MIN: smallest class's}; {} when off."""
        from bench.eval.sampling import sample_images

        t0 = time.perf_counter()
        if self.real is None and (self.off or not self._setup()):
            self.off = True
            return {}
        was_training = G.training
        G.eval()
        try:
            z, y = self.latents(G.z_dim)
            images = sample_images(G, z, y, batch_size=256)
        finally:
            G.train(was_training)
        feats, logits = self._features(images, logits=True)
        fake = {c: feats[y == c] for c in self.classes}
        ratios = diversity_ratios(fake, self.real)
        self.seconds.append(time.perf_counter() - t0)
        if not ratios:
            return {}
        vals = [v for v in ratios.values() if math.isfinite(v)]
        out = {DIVERSITY: sum(vals) / len(vals), DIVERSITY_MIN: min(vals)} if vals else {}
        # the class rule's numbers (CollapseDetector "class"): does G's output follow its class input? (none for
        # one class: an unconditional G has no class input to ignore)
        if class_based(self.n_classes):
            acc = float((logits.argmax(1) == y).float().mean())
            out[CLASS_ACC], out[CLASS_ACC_X] = acc, acc * self.n_classes
            sep = class_separation({c: f for c, f in fake.items() if c in self.real})
            if math.isfinite(sep) and math.isfinite(self.real_sep) and self.real_sep > 0:
                out[CLASS_SEP] = sep / self.real_sep
        # how far G still is from the data (the class rule waits while this falls): the fixed latents make the
        # measurements comparable from one probe to the next, though few samples make its level biased upward
        from bench.eval.stats import frechet_distance
        fd, _ = frechet_distance(feats, torch.cat([self.real[c] for c in self.classes if c in self.real]))
        if math.isfinite(fd):
            out[PROBE_FD] = fd
        return out
