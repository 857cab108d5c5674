"""Intra-class FID (eval.intra_fid): each class's generated samples against that class's real images, from the
features the evaluation already extracted for FID, their mean over the classes and the record's per-class
fields; the sample-count rule is bench.eval.intra_check (docs/architecture.md, "Evaluation")."""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from bench import rundir
from bench.metrics_registry import INTRA_FIELDS
from bench.eval.errors import EvalError
from bench.eval.intra_check import INTRA_METRIC, class_based, min_per_class_problem, samples_problem
from bench.eval.stats import feature_statistics, frechet_distance, frechet_low_rank

PER_CLASS, COUNTS, RESIDUE = INTRA_FIELDS  # the record's per-class fields (bench.metrics_registry)
LABELS_VERSION = 1


def _array(x) -> np.ndarray:
    return (x.detach().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)).astype(np.float64, copy=False)


def _labels(y) -> np.ndarray:
    return (y.detach().cpu().numpy() if hasattr(y, "detach") else np.asarray(y)).astype(np.int64).ravel()


def _drawn_labels_check(s, names: Sequence[str], z_dim: int) -> None:
    """Labels are drawn per sample, so the rule's num_samples / n_classes is only their mean: with a small
    eval.intra_min_per_class a class can get fewer than the 2 samples a covariance needs. Every latent and label
    comes from the seed before any image (sampling.eval_latents), so each sample set's labels are counted here and
    a short class is an EvalError now, not after the sampling."""
    from bench.eval.sampling import eval_latents

    for i in range(int(s.repeats)):
        seed = int(s.seed) + i
        _, y = eval_latents(int(s.num_samples), int(z_dim), len(names), truncation=s.truncation,
                            trunc_mode=s.trunc_mode, seed=seed)
        counts = np.bincount(_labels(y), minlength=len(names))
        c = int(counts.argmin())
        if counts[c] < 2:
            which = f" (sample set {i + 1} of eval.repeats={s.repeats}: seed {seed})" if int(s.repeats) > 1 else ""
            raise EvalError(f"intra-class FID: the labels of eval.seed={s.seed}{which} give class {names[c]!r} "
                            f"{counts[c]} of eval.num_samples={s.num_samples} samples, a covariance needs 2; raise "
                            f"eval.num_samples (or eval.intra_min_per_class with it), or set eval.intra_fid=false")


def _class_rows(features: np.ndarray, labels: np.ndarray, names: Sequence[str], side: str) -> list:
    """[(count, rows)] per class; an EvalError naming the key to raise when a class has < 2. (Rows, not
    covariances: a D x D covariance per class would be 33 GB for 1000 classes of Inception features.)"""
    out = []
    for c, name in enumerate(names):
        rows = features[labels == c]
        if rows.shape[0] < 2:
            key = "eval.num_samples" if side == "generated" else "eval.num_real"
            raise EvalError(f"intra-class FID: class {name!r} has {rows.shape[0]} {side} sample(s), a covariance "
                            f"needs 2; raise {key} or set eval.intra_fid=false")
        out.append((int(rows.shape[0]), rows))
    return out


def _fid_of(name: str, fake: tuple, real: tuple) -> tuple[float, float]:
    """The class's Frechet distance: from a side's rows when it has fewer than D + 1 of them (stats.frechet_low_rank,
    the same value without a D x D eigendecomposition), else from both sides' statistics."""
    few, other = (fake, real) if fake[0] <= real[0] else (real, fake)
    try:
        if few[0] - 1 < few[1].shape[1]:
            return frechet_low_rank(few[1], *feature_statistics(other[1]))
        return frechet_distance(fake[1], real[1])
    except EvalError as exc:
        raise EvalError(f"intra-class FID of class {name!r} ({fake[0]} generated, {real[0]} real): {exc}; or raise "
                        f"eval.intra_min_per_class, or set eval.intra_fid=false") from None


def _combine(names, fake_stats, real_stats) -> dict:
    values, counts, residue = {}, {}, 0.0
    for name, fake, real in zip(names, fake_stats, real_stats):
        fid, res = _fid_of(name, fake, real)
        values[name], counts[name] = fid, [fake[0], real[0]]
        residue = max(residue, res)
    return {INTRA_METRIC: float(np.mean(list(values.values()))), PER_CLASS: values, COUNTS: counts,
            RESIDUE: residue}


def per_class_fid(fake_features, real_features, fake_labels, real_labels, class_names: Sequence[str]) -> dict:
    """Intra-class FID of (N1, D) generated and (N2, D) real features with their labels in
    [0, len(class_names)): {eval/intra_FID: mean over classes, intra_fid_per_class: {name: FID},
    intra_fid_counts: {name: [generated, real]}, intra_fid_imag_residue: largest residue}. Each class's FID is
    bench.eval.stats' float64 Frechet distance of that class's rows; a class with fewer than 2 rows on a side
    is an EvalError."""
    names = list(class_names)
    fake, real = _array(fake_features), _array(real_features)
    return _combine(names, _class_rows(fake, _labels(fake_labels), names, "generated"),
                    _class_rows(real, _labels(real_labels), names, "real"))


class RealImages:
    """The real side's loader for ImageDataset (called on first access only: a cached real side is not
    read), which keeps the labels of the images it read (`labels`, None until then). `read()` returns uint8
    images (N, 3, R, R) and their labels (N,) (bench.eval.classifier.load_images)."""

    def __init__(self, read: Callable[[], tuple]):
        self.read = read
        self.labels = None

    def __call__(self):
        x, y = self.read()
        self.labels = y
        return x


class IntraFID:
    """Intra-class FID of one evaluation (all its sample sets). `bind(fake_labels)` gives compute_metrics the
    function of (generated FID features, real FID features) -> record fields."""

    def __init__(self, class_names: Sequence[str], images: RealImages, labels_file: Path, n_real: int):
        self.names, self.images, self.labels_file, self.n_real = list(class_names), images, Path(labels_file), n_real
        self._real_rows = None

    @staticmethod
    def check(s, class_names: Optional[Sequence[str]], n_classes: int, n_real: int,
              z_dim: Optional[int] = None) -> Optional[list[str]]:
        """The names of the n_classes classes an evaluation samples (the manifest's, else "0", "1", ...) after
        the sample-count rule of bench.eval.intra_check with the run's class count and real images (an
        EvalError in its words; n_real below the asked count is the dataset's size, and the message says so).
        With G's z_dim, also the labels themselves (_drawn_labels_check), before any image is generated.
        None for one class (unlabelled data: intra-FID is skipped, intra_check.UNLABELLED_SKIP)."""
        if not class_based(n_classes):
            return None
        names = list(class_names) if class_names and len(class_names) == n_classes else [str(c) for c in
                                                                                        range(n_classes)]
        capped = n_real < int(s.num_real or s.num_samples)
        source = "the dataset's classes" + (f"; the dataset has {n_real} images" if capped else "")
        problem = (min_per_class_problem(s.intra_min_per_class)
                   or samples_problem(int(s.num_samples), n_real, n_classes, int(s.intra_min_per_class), source))
        if problem:
            raise EvalError(problem)
        if z_dim is not None:
            _drawn_labels_check(s, names, z_dim)
        return names

    def bind(self, fake_labels):
        return lambda fake_features, real_features: self.compute(fake_features, real_features, fake_labels)

    def compute(self, fake_features, real_features, fake_labels) -> dict:
        if self._real_rows is None:  # the real side is the same for every sample set: split it once
            self._real_rows = _class_rows(_array(real_features), self.real_labels(), self.names, "real")
        fake_rows = _class_rows(_array(fake_features), _labels(fake_labels), self.names, "generated")
        return _combine(self.names, fake_rows, self._real_rows)

    def real_labels(self) -> np.ndarray:
        """The real images' labels, in the order of their features: those read with the images; else the cache
        file beside the real features (real-<key>-labels.json); else read from the shards (once per cache key:
        a real side cached before intra-FID existed), then cached."""
        if self.images.labels is not None:
            labels = _labels(self.images.labels)
        else:
            labels = self._cached()
            if labels is None:
                self.images()
                labels = _labels(self.images.labels)
        if labels.shape[0] != self.n_real:
            raise EvalError(f"intra-class FID: {labels.shape[0]} real labels for {self.n_real} real images; remove "
                            f"{self.labels_file} and the real-statistics cache beside it")
        if not self.labels_file.is_file():
            rundir.atomic_write(self.labels_file, json.dumps({"version": LABELS_VERSION, "num_real": self.n_real,
                                                              "labels": labels.tolist()}))
        return labels

    def _cached(self) -> Optional[np.ndarray]:
        if not self.labels_file.is_file():
            return None
        try:
            data = json.loads(self.labels_file.read_text())
            labels = np.asarray(data["labels"], dtype=np.int64)
            ok = data.get("version") == LABELS_VERSION and labels.shape == (self.n_real,) and (
                labels.size == 0 or (labels.min() >= 0 and labels.max() < len(self.names)))
        except (OSError, ValueError, KeyError, TypeError):
            ok = False
        if not ok:
            print(f"warning: real-label cache {self.labels_file} is unreadable or does not match; rebuilding it",
                  file=sys.stderr, flush=True)
            self.labels_file.unlink(missing_ok=True)
            return None
        return labels


def summarise_intra(per_repeat: list[dict]) -> dict:
    """The per-class fields of K sample sets as one record's: each class's FID and generated count the mean
    over the K sets (the count to one decimal), its real count (the same in every set), the largest residue.
    eval/intra_FID itself is summarised with the other registry metrics (bench.eval.metrics.summarise_repeats).
    {} when a set has no per-class values."""
    if not per_repeat or not all(isinstance(r.get(PER_CLASS), dict) for r in per_repeat):
        return {}
    k = len(per_repeat)
    names = list(per_repeat[0][PER_CLASS])
    values = {n: float(sum(r[PER_CLASS][n] for r in per_repeat) / k) for n in names}
    counts = {}
    for n in names:
        fake = sum(r[COUNTS][n][0] for r in per_repeat) / k
        counts[n] = [int(fake) if float(fake).is_integer() else round(fake, 1), per_repeat[0][COUNTS][n][1]]
    return {PER_CLASS: values, COUNTS: counts, RESIDUE: max(float(r.get(RESIDUE) or 0.0) for r in per_repeat)}
