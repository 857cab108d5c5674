"""Reference statistics: FID's real side as a file (eval.ref_stats). Reading gan-bench's, BigGAN-PyTorch's,
TTUR's and clean-fid's npz files (never unpickled), checking them against the extractor, FID against them and
the skipped metrics' line (docs/architecture.md, "Numbers that connect to the literature")."""
from __future__ import annotations

import datetime as _dt
import io
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from bench import rundir
from bench.eval.errors import EvalError

NEEDS_REAL_FEATURES = ("kid", "prc", "dc")  # torch-fidelity / stats metrics that need the real features
SKIP_LINE = ("eval.ref_stats={path}: FID's real side is that file's mean and covariance; KID, precision/recall, "
             "density/coverage{intra} need the real features themselves and are skipped")


@dataclass(frozen=True)
class RefStats:
    """FID's real side read from a file: mu (D,), sigma (D, D) float64, and what the file says about itself."""
    mu: np.ndarray
    sigma: np.ndarray
    path: str
    layout: str                      # "gan-bench" | "mu/sigma" (BigGAN-PyTorch, TTUR, clean-fid)
    num_real: Optional[int] = None
    meta: dict = field(default_factory=dict)

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    def frechet(self, features) -> tuple[float, float]:
        """(FID, imaginary residue) of generated features (N, D) against these moments (bench.eval.stats)."""
        from bench.eval.stats import feature_statistics, frechet_from_statistics

        return frechet_from_statistics(*feature_statistics(features), self.mu, self.sigma)

    def restrict(self, metric_settings):
        """bench.eval.metrics.MetricSettings without the metrics that need real features, and no real-side cache."""
        import dataclasses

        return dataclasses.replace(metric_settings, cache_dir=None, num_real=self.num_real or 2, metrics=tuple(
            m for m in metric_settings.metrics if m not in NEEDS_REAL_FEATURES))


def _scalar(a):
    v = a.item() if hasattr(a, "item") else a
    return v.decode() if isinstance(v, bytes) else v


def load_ref_stats(path, *, dim: Optional[int] = None, extractor: Optional[str] = None,
                   extractor_id: Optional[str] = None, resolution: Optional[int] = None) -> RefStats:
    """The file's statistics; EvalError (one line naming the file) when it is missing, not an npz with mu and
    sigma, not finite, or of another feature dimension / extractor than this evaluation's."""
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise EvalError(f"eval.ref_stats={path}: no such file (write one with `bench eval stats data.shards=DIR "
                        f"out=FILE.npz`, or give BigGAN-PyTorch's / TTUR's / clean-fid's mu-sigma npz)")
    try:
        with np.load(p, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except Exception as exc:  # noqa: BLE001 - numpy raises many kinds for a damaged or foreign file
        text = str(exc).strip().splitlines()
        raise EvalError(f"eval.ref_stats={path}: not a readable npz file ({type(exc).__name__}: "
                        f"{text[0][:160] if text else ''})") from None
    if "mu" not in arrays or "sigma" not in arrays:
        raise EvalError(f"eval.ref_stats={path}: has no mu and sigma arrays (has: {', '.join(sorted(arrays)) or 'none'}"
                        f"); give a file with the real features' mean mu (D,) and covariance sigma (D, D)")
    mu = np.asarray(arrays["mu"], dtype=np.float64).reshape(-1)
    sigma = np.asarray(arrays["sigma"], dtype=np.float64)
    if sigma.shape != (mu.shape[0], mu.shape[0]):
        raise EvalError(f"eval.ref_stats={path}: mu has {mu.shape[0]} dimensions but sigma is {tuple(sigma.shape)}")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise EvalError(f"eval.ref_stats={path}: mu or sigma is not finite")
    meta = {k: _scalar(v) for k, v in arrays.items() if k not in ("mu", "sigma") and np.ndim(v) == 0}
    layout = "gan-bench" if "extractor_id" in meta else "mu/sigma"
    num = meta.get("num_real")
    stats = RefStats(mu, sigma, str(p), layout, int(num) if num is not None else None, meta)
    if dim is not None and stats.dim != int(dim):
        raise EvalError(f"eval.ref_stats={path}: its statistics have {stats.dim} feature dimensions, but the "
                        f"{extractor or 'chosen'} extractor's FID features have {dim}; use statistics made with the "
                        f"same extractor (`bench eval stats ... eval.extractor={extractor or '...'}`)")
    if layout == "gan-bench" and extractor is not None and meta.get("extractor") not in (None, extractor):
        raise EvalError(f"eval.ref_stats={path}: made with eval.extractor={meta.get('extractor')}, this evaluation "
                        f"uses eval.extractor={extractor}; use statistics made with the same extractor")
    made_at = meta.get("resolution")
    if layout == "gan-bench" and resolution is not None and made_at not in (None, "") and int(made_at) != int(resolution):
        raise EvalError(f"eval.ref_stats={path}: made from images at {made_at}x{made_at}, this generator makes "
                        f"{resolution}x{resolution}; write it with `bench eval stats ... data.resolution={resolution}`")
    if layout == "gan-bench" and extractor_id is not None and meta.get("extractor_id") not in (None, extractor_id):
        print(f"warning: eval.ref_stats={path} was made with {meta.get('extractor_id')}, this evaluation uses "
              f"{extractor_id} (other weights or resize of the same extractor)", file=sys.stderr, flush=True)
    return stats


def skip_line(path, intra: bool) -> str:
    return SKIP_LINE.format(path=path, intra=" and intra-FID" if intra else "")


def save_ref_stats(out, mu: np.ndarray, sigma: np.ndarray, **meta) -> Path:
    """mu, sigma (float64) and plain scalar metadata as one npz, written atomically."""
    out = Path(str(out))
    if out.suffix.lower() != ".npz":
        raise EvalError(f"out={out}: reference statistics are written as FILE.npz")
    plain = {k: np.asarray("" if v is None else v) for k, v in meta.items()}
    plain["created"] = np.asarray(_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    buf = io.BytesIO()
    np.savez(buf, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64), **plain)
    return rundir.atomic_write(out, buf.getvalue())



def reference_side(s, shards_spec, resolution: int, classifier_files, progress: bool):
    """(extractor weights file, domain classifier file or None, RefStats, extractor identity) of an evaluation with
    eval.ref_stats (bench.eval.metrics' eval_setup; `classifier_files` is its function of (settings, shards,
    resolution, progress)). The file is checked against the extractor's feature dimension, and the metrics that
    need real features are said to be skipped, in one line. One process only."""
    import torch

    from bench.eval.features import extractor_settings, feature_dim

    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        raise EvalError("eval.ref_stats is for one-process evaluations (bench eval run=DIR, bench eval watch); a "
                        "multi-rank training evaluates against the shards")
    if shards_spec:
        weights_path, clf_file = classifier_files(s, shards_spec, resolution, progress)
    elif s.extractor == "domain" and not s.classifier_path:
        raise EvalError("eval.ref_stats with eval.extractor=domain needs the domain classifier: give data.shards=DIR "
                        "(the classifier beside them) or eval.classifier_path=FILE")
    else:
        clf_file = s.classifier_path or None
        weights_path = s.weights_path if s.extractor == "inception" else clf_file
    fe_name, _, _, fe_id = extractor_settings(s.extractor, weights_path, s.resize)
    ref = load_ref_stats(s.ref_stats, dim=feature_dim(s.extractor, weights_path), extractor=s.extractor,
                         extractor_id=fe_id, resolution=resolution)
    print(skip_line(s.ref_stats, bool(s.intra_fid)), file=sys.stderr, flush=True)
    if progress:
        print(f"gan-bench eval: {s.extractor} features ({fe_name}), {s.num_samples} generated vs the moments of "
              f"{ref.path} ({ref.layout}, {ref.num_real or 'unknown'} real images)", file=sys.stderr, flush=True)
    return weights_path, clf_file, ref, fe_id
