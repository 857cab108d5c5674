"""The feature-space statistics gan-bench computes itself, in float64: the Frechet distance (and its low-rank
form), density / coverage, the Student-t interval, Welch / paired t-tests with Holm's correction, the variance
split, the t-test's power and the percentile bootstrap. torch and scipy.stats are imported inside the functions,
so `bench report` (torch-free) can use the intervals and tests (docs/architecture.md, "Evaluation")."""
from __future__ import annotations

import math

import numpy as np

from bench.eval.errors import EvalError

FID_IMAG_TOL = 1e-3   # largest imaginary part of sqrt(sigma1 sigma2)'s eigenvalues, relative to its trace
DC_NEIGHBOURS = 5     # k of density / coverage (the paper's choice)
DIST_BLOCK_BYTES = 1 << 27  # a block of the pairwise distance matrix: at most 128 MiB of float64
BOOTSTRAP_RESAMPLES = 2000  # B of bootstrap_ci
BOOTSTRAP_SEED = 0          # its fixed seed: the same values always give the same interval
CI_LEVEL = 0.95
ALPHA = 0.05                # the level of the separability test (two-sided, after Holm)
POWER = 0.8                 # the power seeds_for_power asks for
MAX_SEEDS = 10_000          # seeds_for_power gives up (None) beyond this many seeds per cell


def _finite_values(values, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"{what} needs finite values, got {list(x)}")
    return x


def t_interval(values, level: float = CI_LEVEL) -> tuple[float, float]:
    """(lo, hi): the Student-t interval of the mean of `values` (K finite numbers),
    mean -/+ t_{K-1, (1 + level) / 2} * s / sqrt(K) with s the sample SD (K - 1 in the denominator). Exact
    coverage for normal values at any K >= 2; K = 1 gives (value, value): one value has no spread to
    estimate."""
    from scipy import stats as sps

    x = _finite_values(values, "t_interval")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean
    half = float(sps.t.ppf((1.0 + level) / 2.0, x.size - 1)) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean - half, mean + half


def _t_p_value(diff: float, se: float, df: float) -> float:
    """Two-sided p of t = diff / se on df degrees of freedom; se = 0 (no spread on either side): 1.0 for a
    zero difference, 0.0 for any other (the values differ without noise)."""
    from scipy import stats as sps

    if se == 0.0:
        return 1.0 if diff == 0.0 else 0.0
    return float(2.0 * sps.t.sf(abs(diff / se), df))


def welch_test(a, b) -> tuple[float, float, float]:
    """(t, df, p): Welch's two-sided t-test of mean(a) = mean(b), unequal variances, each side >= 2 values.
    t = (mean(a) - mean(b)) / sqrt(va / na + vb / nb), df by Welch-Satterthwaite."""
    x, y = _finite_values(a, "welch_test"), _finite_values(b, "welch_test")
    if x.size < 2 or y.size < 2:
        raise ValueError(f"welch_test needs at least two values per side, got {x.size} and {y.size}")
    qa, qb = float(x.var(ddof=1)) / x.size, float(y.var(ddof=1)) / y.size
    diff = float(x.mean() - y.mean())
    se = math.sqrt(qa + qb)
    df = (qa + qb) ** 2 / (qa ** 2 / (x.size - 1) + qb ** 2 / (y.size - 1)) if se > 0 else float(x.size + y.size - 2)
    return (diff / se if se > 0 else (0.0 if diff == 0 else math.copysign(math.inf, diff))), df, _t_p_value(diff, se, df)


def paired_test(diffs) -> tuple[float, float, float]:
    """(t, df, p): the two-sided paired t-test of mean(diffs) = 0 (diffs: per-seed differences, >= 2)."""
    d = _finite_values(diffs, "paired_test")
    if d.size < 2:
        raise ValueError(f"paired_test needs at least two differences, got {d.size}")
    mean, se, df = float(d.mean()), float(d.std(ddof=1)) / math.sqrt(d.size), float(d.size - 1)
    return (mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))), df, _t_p_value(mean, se, df)


def holm(p_values) -> list[float]:
    """Holm's step-down adjusted p-values, in the input's order: with p_(1) <= ... <= p_(m) sorted,
    adjusted p_(i) = max over j <= i of min(1, (m - j + 1) p_(j)). Rejecting where adjusted <= alpha keeps
    the family-wise error rate at alpha over the m tests."""
    p = [float(v) for v in p_values]
    m = len(p)
    out = [0.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=lambda i: p[i])):
        running = max(running, min(1.0, (m - rank) * p[i]))
        out[i] = running
    return out


def variance_split(per_run: list) -> dict:
    """One-way random-effects ANOVA of a configuration's runs (seeds), each with R_i >= 2 repeated sample-set
    values: {within, between, runs, repeats}. within: the pooled sample-set variance, sum over runs of the
    squared deviations from the run's mean over sum(R_i - 1). between (seed to seed): the variance of the run
    means less what the sample sets put into them, var(run means) - within * mean(1 / R_i) (= within / R for
    equal R), floored at 0. repeats: the mean R. Needs two runs or more."""
    runs = [_finite_values(v, "variance_split") for v in per_run]
    if len(runs) < 2 or any(r.size < 2 for r in runs):
        raise ValueError("variance_split needs two runs or more, each with two repeated values or more")
    ss = math.fsum(float(((r - r.mean()) ** 2).sum()) for r in runs)
    within = ss / sum(r.size - 1 for r in runs)
    means = np.array([r.mean() for r in runs])
    between = max(0.0, float(means.var(ddof=1)) - within * float(np.mean([1.0 / r.size for r in runs])))
    return {"within": within, "between": between, "runs": len(runs), "repeats": float(np.mean([r.size for r in runs]))}


def power(n: int, delta: float, sd: float, alpha: float = ALPHA) -> float:
    """The power of the two-sided two-sample t-test (equal variances, n per group) to detect a difference of
    means `delta` when each value has SD `sd`: with df = 2n - 2, ncp = delta / (sd sqrt(2 / n)) and c the
    1 - alpha/2 quantile of t_df, P(|T| > c) for T noncentral t(df, ncp) = 1 - F(c) + F(-c)."""
    from scipy import stats as sps

    if n < 2:
        raise ValueError(f"power needs n >= 2 per group, got {n}")
    if sd <= 0:
        return 1.0 if delta != 0 else alpha
    df = 2 * n - 2
    ncp = abs(delta) / (sd * math.sqrt(2.0 / n))
    c = float(sps.t.ppf(1.0 - alpha / 2.0, df))
    return float(sps.nct.sf(c, df, ncp) + sps.nct.cdf(-c, df, ncp))


def seeds_for_power(delta: float, sd: float, target: float = POWER, alpha: float = ALPHA) -> int | None:
    """The smallest n (seeds per cell, >= 2) whose two-sample t-test has power >= target for a difference
    `delta` at SD `sd` (see power); None past MAX_SEEDS. Starts from the normal approximation
    2 ((z_{1-alpha/2} + z_target) sd / delta)^2 and walks to the exact noncentral-t answer."""
    from scipy import stats as sps

    if sd <= 0:
        return 2
    if delta == 0:
        return None
    z = float(sps.norm.ppf(1.0 - alpha / 2.0) + sps.norm.ppf(target))
    n = max(2, math.ceil(2.0 * (z * sd / abs(delta)) ** 2))
    if n > MAX_SEEDS:
        return None
    while n > 2 and power(n - 1, delta, sd, alpha) >= target:
        n -= 1
    while power(n, delta, sd, alpha) < target:
        n += 1
        if n > MAX_SEEDS:
            return None
    return n


def bootstrap_ci(values, n_resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                 level: float = CI_LEVEL) -> tuple[float, float]:
    """(lo, hi): the percentile-bootstrap interval of the mean of `values` (K finite numbers), for quantities
    over many samples only (at small K it is too narrow: docs/architecture.md, "Evaluation"). Draws
    n_resamples index sets of size K with replacement (numpy's default_rng(seed).integers, one
    (n_resamples, K) array), takes each resample's mean, and returns the (1 - level) / 2 and
    (1 + level) / 2 quantiles of those means (np.percentile, linear). K = 1 gives (value, value)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"bootstrap_ci needs finite values, got {list(x)}")
    if x.size == 1:
        return float(x[0]), float(x[0])
    idx = np.random.default_rng(seed).integers(0, x.size, size=(int(n_resamples), x.size))
    means = x[idx].mean(axis=1)
    tail = 100.0 * (1.0 - level) / 2.0
    lo, hi = np.percentile(means, [tail, 100.0 - tail])
    return float(lo), float(hi)


def _float64(features) -> np.ndarray:
    x = features.detach().cpu().numpy() if hasattr(features, "detach") else np.asarray(features)
    x = x.astype(np.float64, copy=False)
    if x.ndim != 2 or x.shape[0] < 2:
        raise EvalError(f"features must be (N >= 2, D); got shape {tuple(x.shape)}")
    return x


def feature_statistics(features) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D) with N - 1 in the denominator), both float64."""
    x = _float64(features)
    mu = x.mean(axis=0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_from_statistics(mu1, sigma1, mu2, sigma2) -> tuple[float, float]:
    """(Frechet distance, imaginary residue) of N(mu1, sigma1) and N(mu2, sigma2), in float64:

        |mu1 - mu2|^2 + tr(sigma1) + tr(sigma2) - 2 tr(sqrtm(sigma1 sigma2))

    tr(sqrtm(A)) is the sum of the principal square roots of A's eigenvalues. For covariances those
    eigenvalues are real and >= 0 (A is similar to sqrt(sigma1) sigma2 sqrt(sigma1)); rounding leaves
    small imaginary parts or negative values. The residue is the largest imaginary part of a root
    relative to the trace term; past FID_IMAG_TOL the value is not trusted (EvalError)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise EvalError(f"Frechet distance: statistics of different shapes ({mu1.shape}, {sigma1.shape} vs "
                        f"{mu2.shape}, {sigma2.shape})")
    if not all(np.isfinite(a).all() for a in (mu1, sigma1, mu2, sigma2)):
        raise EvalError("Frechet distance: the feature statistics are not finite (NaN or inf features)")
    roots = np.sqrt(np.linalg.eigvals(sigma1 @ sigma2).astype(np.complex128))
    tr_covmean = float(roots.real.sum())
    imag = float(np.abs(roots.imag).max(initial=0.0))
    residue = 0.0 if imag == 0.0 else imag / max(abs(tr_covmean), np.finfo(np.float64).tiny)
    if not np.isfinite(tr_covmean) or residue > FID_IMAG_TOL:
        raise EvalError(f"Frechet distance: the matrix square root of sigma1 sigma2 has an imaginary residue of "
                        f"{residue:.3g} of its trace (tolerance {FID_IMAG_TOL:g}): the feature covariances are "
                        f"singular or ill-conditioned; use more samples (eval.num_samples, eval.num_real)")
    diff = mu1 - mu2
    fid = float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean)
    return fid, residue


def frechet_distance(features1, features2) -> tuple[float, float]:
    """(FID, imaginary residue) of two feature sets (N1, D) and (N2, D); see frechet_from_statistics."""
    return frechet_from_statistics(*feature_statistics(features1), *feature_statistics(features2))


def frechet_low_rank(features1, mu2, sigma2) -> tuple[float, float]:
    """(Frechet distance, imaginary residue) of N1 samples (N1, D) against N(mu2, sigma2), for N1 - 1 < D: the
    same value as frechet_from_statistics (intra-class FID's few samples per class), in O(N1^2 D + N1 D^2)
    instead of a D x D eigendecomposition. With X1 the centred rows and sigma1 = X1^T X1 / (N1 - 1),
    sigma1 sigma2 and the symmetric PSD (N1, N1) matrix X1 sigma2 X1^T / (N1 - 1) share their nonzero
    eigenvalues, so tr(sqrtm(sigma1 sigma2)) is the sum of the square roots of the latter's (eigvalsh). The
    residue is the square root of the most negative such eigenvalue (rounding), relative to the trace term,
    and past FID_IMAG_TOL it is an EvalError as there."""
    x = _float64(features1)
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if sigma2.shape != (x.shape[1], x.shape[1]) or mu2.shape != (x.shape[1],):
        raise EvalError(f"Frechet distance: statistics of different shapes ({x.shape} vs {mu2.shape}, {sigma2.shape})")
    mu1 = x.mean(axis=0)
    xc = x - mu1
    small = xc @ sigma2 @ xc.T / (x.shape[0] - 1)
    eig = np.linalg.eigvalsh((small + small.T) / 2.0)
    if not (np.isfinite(eig).all() and np.isfinite(mu2).all()):
        raise EvalError("Frechet distance: the feature statistics are not finite (NaN or inf features)")
    tr_covmean = float(np.sqrt(np.clip(eig, 0.0, None)).sum())
    imag = float(np.sqrt(max(0.0, -float(eig.min(initial=0.0)))))
    residue = 0.0 if imag == 0.0 else imag / max(abs(tr_covmean), np.finfo(np.float64).tiny)
    if residue > FID_IMAG_TOL:
        raise EvalError(f"Frechet distance: the matrix square root of sigma1 sigma2 has an imaginary residue of "
                        f"{residue:.3g} of its trace (tolerance {FID_IMAG_TOL:g}): the feature covariances are "
                        f"singular or ill-conditioned; use more samples (eval.num_samples, eval.num_real)")
    diff = mu1 - mu2
    tr1 = float((xc * xc).sum() / (x.shape[0] - 1))
    return float(diff @ diff + tr1 + np.trace(sigma2) - 2.0 * tr_covmean), residue


def _distance_blocks(a: "torch.Tensor", b: "torch.Tensor"):
    """Yield (row slice, Euclidean distances of a[rows] to all of b) in blocks of rows, in float64 through
    matrix products (|a|^2 + |b|^2 - 2 a.b: BLAS speed; relative error ~1e-16 of the squared norms). One
    function and one blocking compute every distance, so equal inputs give bit-equal distances (a set
    against itself ties exactly at the k-th neighbour)."""
    import torch

    rows = max(1, DIST_BLOCK_BYTES // (8 * max(1, b.shape[0])))
    for start in range(0, a.shape[0], rows):
        stop = min(start + rows, a.shape[0])
        yield slice(start, stop), torch.cdist(a[start:stop], b, compute_mode="use_mm_for_euclid_dist")


def knn_radii(real: torch.Tensor, k: int) -> torch.Tensor:
    """NND_k: each real point's distance to its k-th nearest other real point (itself excluded by index;
    a duplicate of it counts as a neighbour at distance 0)."""
    import torch

    out = torch.empty(real.shape[0], dtype=real.dtype)
    for rows, d in _distance_blocks(real, real):
        d[torch.arange(d.shape[0]), torch.arange(rows.start, rows.stop)] = float("inf")
        out[rows] = d.kthvalue(k, dim=1).values
    return out


def density_coverage(real_features, fake_features, k: int = DC_NEIGHBOURS) -> tuple[float, float]:
    """(density, coverage) of fake against real features (Naeem et al. 2020), X real (N), Y fake (M):

        density  = 1 / (k M) sum_j sum_i 1[|Y_j - X_i| <= NND_k(X_i)]
        coverage = 1 / N sum_i 1[exists j: |Y_j - X_i| <= NND_k(X_i)]

    Distances in float64. Identical distributions give E[density] = 1 and E[coverage] close to
    1 - (1/2)^k for N = M."""
    import torch

    real = torch.from_numpy(_float64(real_features))
    fake = torch.from_numpy(_float64(fake_features))
    if real.shape[1] != fake.shape[1]:
        raise EvalError(f"density / coverage: real features have {real.shape[1]} dimensions, fake {fake.shape[1]}")
    if not 1 <= k < real.shape[0]:
        raise EvalError(f"density / coverage: k={k} needs more than k real samples, have {real.shape[0]}; raise "
                        f"eval.num_real (or use a larger dataset)")
    radii = knn_radii(real, k)
    inside_count = 0
    covered = torch.zeros(real.shape[0], dtype=torch.bool)
    # Real rows against fake columns, as the radii are real rows against real columns: a fake set equal to
    # the real one gives bit-equal distances in the same places, so the k-th neighbour ties exactly.
    for rows, d in _distance_blocks(real, fake):
        inside = d <= radii[rows, None]   # (real block, M): fake j inside real i's ball
        inside_count += int(inside.sum())
        covered[rows] = inside.any(dim=1)
    density = inside_count / (k * fake.shape[0])
    coverage = float(covered.double().mean())
    return density, coverage
