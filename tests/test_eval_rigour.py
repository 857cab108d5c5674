"""Evaluation a paper can trust: density / coverage against a brute-force reference, the float64 Frechet
distance against torch-fidelity's own, its imaginary residue, and sampling that does not depend on
eval.batch_size (in-process and through `python -m bench.cli eval`). Tiny data; about a minute on 2 CPUs."""
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from bench import metrics_registry as registry
from bench import rundir
from bench.eval import classifier as C
from bench.eval import metrics as M
from bench.eval import runs as R
from bench.eval import sampling as S
from bench.eval import stats
from bench.eval.errors import EvalError
from conftest import ROOT, TINY, classified_shards

K = 5  # density / coverage neighbours (the paper's k)


# ---- density and coverage ---------------------------------------------------------------------------

def brute_force_density_coverage(real: np.ndarray, fake: np.ndarray, k: int) -> tuple[float, float]:
    """Naeem et al. 2020 straight from the definitions, with explicit loops (no shared code with bench)."""
    n, m = len(real), len(fake)

    def dist(a, b):
        return math.sqrt(sum((float(p) - float(q)) ** 2 for p, q in zip(a, b)))

    radius = []
    for i in range(n):
        others = sorted(dist(real[i], real[j]) for j in range(n) if j != i)
        radius.append(others[k - 1])  # the k-th nearest other real point
    inside = [[dist(fake[j], real[i]) <= radius[i] for i in range(n)] for j in range(m)]
    density = sum(sum(row) for row in inside) / (k * m)
    coverage = sum(any(inside[j][i] for j in range(m)) for i in range(n)) / n
    return density, coverage


@pytest.mark.parametrize("n,m,d,shift", [(40, 30, 3, 0.3), (25, 60, 8, 0.0), (50, 50, 2, 1.0)])
def test_density_coverage_match_a_brute_force_reference(n, m, d, shift, monkeypatch):
    rng = np.random.default_rng(n * 1000 + m)
    real = rng.normal(size=(n, d))
    fake = rng.normal(size=(m, d)) * 1.3 + shift
    want = brute_force_density_coverage(real, fake, K)
    assert 0 < want[0] and 0 < want[1] < 1  # neither trivially empty nor trivially full
    got = stats.density_coverage(real, fake, K)
    assert abs(got[0] - want[0]) <= 1e-12 and abs(got[1] - want[1]) <= 1e-12, (got, want)
    # the same from torch tensors, and with distance blocks of 3 rows (the blocked path)
    monkeypatch.setattr(stats, "DIST_BLOCK_BYTES", 8 * max(n, m) * 3)
    got = stats.density_coverage(torch.from_numpy(real), torch.from_numpy(fake), K)
    assert abs(got[0] - want[0]) <= 1e-12 and abs(got[1] - want[1]) <= 1e-12, (got, want)


def test_density_coverage_of_a_set_against_itself_and_of_the_same_distribution():
    rng = np.random.default_rng(7)
    x = rng.normal(size=(300, 6))
    # The very same set: every real ball holds its own centre and its k nearest neighbours, k + 1 fake
    # points (no ties in continuous data), so density is exactly (k + 1) / k = 1.2 and coverage 1.
    density, coverage = stats.density_coverage(x, x.copy(), K)
    assert coverage == 1.0
    assert density == pytest.approx((K + 1) / K, abs=1e-12)
    # An independent sample of the same distribution: E[density] = 1 (the paper's Lemma) and
    # E[coverage] = 1 - prod_{i<k} (N - 1 - i) / (N + M - 1 - i), about 1 - 1/2^k = 0.969 for N = M.
    # Tolerances: about five standard deviations of each at N = M = 2000 (density's spread is ~0.02,
    # coverage's ~0.004).
    n = 2000
    real, fake = rng.normal(size=(n, 4)), rng.normal(size=(n, 4))
    density, coverage = stats.density_coverage(real, fake, K)
    expected_cov = 1 - math.prod((n - 1 - i) / (2 * n - 1 - i) for i in range(K))
    assert abs(density - 1.0) < 0.1, density
    assert abs(coverage - expected_cov) < 0.02, (coverage, expected_cov)


def test_density_coverage_of_disjoint_sets_are_zero():
    rng = np.random.default_rng(3)
    real = rng.normal(size=(60, 5))
    far = rng.normal(size=(40, 5)) + 100.0
    assert stats.density_coverage(real, far, K) == (0.0, 0.0)
    with pytest.raises(EvalError, match="k=5"):
        stats.density_coverage(real[:5], far, K)  # 5 real points have only 4 others


def test_too_few_samples_for_density_coverage_is_one_evalerror_before_any_work(tmp_path):
    from bench import models

    G, _ = models.build({"family": "biggan", "ch": 8, "d_ch": 8, "z_dim": 32, "shared_dim": 16, "attn": []}, 32, 10)
    with pytest.raises(EvalError, match=f"at least {K + 1}") as err:
        M.evaluate_generator(G, M.EvalSettings(num_samples=K), shards_spec=tmp_path / "no-shards", progress=False)
    assert "\n" not in str(err.value)


def test_metrics_registry_knows_density_and_coverage():
    for name in ("eval/density", "eval/coverage"):
        assert name in registry.EVAL_METRICS and name in registry.HEADLINE and name in registry.BEST_METRICS
        assert not registry.lower_is_better(name) and registry.is_better(name, 0.6, 0.5)
    assert {"density", "coverage"} <= set(R.SWEEP_COLUMNS)


# ---- the Frechet distance -----------------------------------------------------------------------------

def _feature_pair(n1, n2, d, seed):
    """Correlated features as an extractor would give them (float32), the second set shifted and rescaled."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64) / math.sqrt(d)
    f1 = (torch.randn(n1, d, generator=g, dtype=torch.float64) @ mix + 2.0).float()
    f2 = (torch.randn(n2, d, generator=g, dtype=torch.float64) @ (1.3 * mix) + 2.4).float()
    return f1, f2


@pytest.mark.parametrize("n1,n2,d", [(500, 400, 32), (40, 50, 64)])  # well-conditioned; N < D (singular)
def test_frechet_distance_equals_torch_fidelitys(n1, n2, d):
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_features_to_statistics, fid_statistics_to_metric

    f1, f2 = _feature_pair(n1, n2, d, seed=d)
    ours, residue = stats.frechet_distance(f1, f2)
    theirs = fid_statistics_to_metric(fid_features_to_statistics(f1), fid_features_to_statistics(f2),
                                      False)[KEY_METRIC_FID]
    assert ours > 1.0 and ours == pytest.approx(theirs, rel=1e-6)
    assert 0.0 <= residue <= stats.FID_IMAG_TOL
    # our statistics are numpy's float64 mean and covariance
    mu, sigma = stats.feature_statistics(f1)
    x = f1.double().numpy()
    assert mu.dtype == sigma.dtype == np.float64
    assert np.allclose(mu, x.mean(0), rtol=0, atol=1e-12) and np.allclose(sigma, np.cov(x, rowvar=False), atol=1e-12)


def test_frechet_distance_of_known_gaussians_and_its_shift_invariance():
    """Diagonal Gaussians: FID = |mu1 - mu2|^2 + sum (s1 - s2)^2 for standard deviations s1, s2."""
    mu1, mu2 = np.array([0.0, 1.0, 2.0]), np.array([1.0, 1.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5]), np.array([2.0, 2.0, 1.5])
    fid, residue = stats.frechet_from_statistics(mu1, np.diag(s1 ** 2), mu2, np.diag(s2 ** 2))
    assert fid == pytest.approx(np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2), rel=1e-12) and residue == 0.0
    # float64 all through: a common offset of 1e4 changes nothing beyond 1e-9 (float32 statistics would drift)
    f1, f2 = _feature_pair(300, 300, 16, seed=1)
    f1, f2 = f1.double(), f2.double()
    base = stats.frechet_distance(f1, f2)[0]
    assert stats.frechet_distance(f1 + 1e4, f2 + 1e4)[0] == pytest.approx(base, rel=1e-9)


def test_an_imaginary_square_root_is_one_evalerror():
    # sigma1 sigma2 with eigenvalues 1 +- 2i (not a product of covariances): its square root is far from real
    sigma1, sigma2, mu = np.array([[1.0, 2.0], [-2.0, 1.0]]), np.eye(2), np.zeros(2)
    with pytest.raises(EvalError) as err:
        stats.frechet_from_statistics(mu, sigma1, mu, sigma2)
    msg = str(err.value)
    assert "\n" not in msg and "imaginary residue" in msg and "eval.num_samples" in msg
    with pytest.raises(EvalError, match="not finite"):
        stats.frechet_from_statistics(mu, np.eye(2), np.array([np.nan, 0.0]), np.eye(2))


# ---- sampling that does not depend on eval.batch_size ---------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """Tiny shards with a quickly trained domain classifier beside them, and a 2-step `bench train` run."""
    from bench.cli import main

    root = tmp_path_factory.mktemp("rigour")
    shards = classified_shards(root)
    run = root / "run"
    rc = main(["train", f"data.shards={shards}", f"run.dir={run}", *TINY, "train.steps=2", "train.batch_size=4",
               "train.ckpt_every=2", "train.sample_every=0", "telemetry.mfu=false", "telemetry.sigma_every=0",
               "eval.every=0", "train.precision=fp32"])
    assert rc == 0
    return run, shards


def test_sampled_images_do_not_depend_on_the_batch_size(trained_run, one_thread):
    """The evaluation's latents and labels are drawn before batching (sampling.eval_latents). Each image is
    then a per-sample computation (G in eval mode: BatchNorm uses its running statistics), so batches of
    16 and 250 give the same images. Tolerance: a convolution library may pick another algorithm for
    another batch size, which moves a float32 output by ~1e-7 and can flip a uint8 rounding by 1; on
    this CPU they come out bit-equal."""
    run, _ = trained_run
    loaded = R.load_run(run, which="last", device="cpu")
    G = loaded["G"]
    for psi in (None, 0.5):
        z, y = S.eval_latents(300, G.z_dim, loaded["n_classes"], truncation=psi, seed=0)
        assert torch.equal(z, S.eval_latents(300, G.z_dim, loaded["n_classes"], truncation=psi, seed=0)[0])
        a, b = S.sample_images(G, z, y, 16), S.sample_images(G, z, y, 250)
        assert a.shape == (300, 3, 32, 32) and a.dtype == torch.uint8
        diff = (a.int() - b.int()).abs()
        assert diff.max() <= 1 and (diff > 0).float().mean() <= 1e-3
        with torch.no_grad():
            xa = torch.cat([G(z[i:i + 16], y[i:i + 16]) for i in range(0, 300, 16)])
            xb = torch.cat([G(z[i:i + 250], y[i:i + 250]) for i in range(0, 300, 250)])
        assert torch.allclose(xa, xb, rtol=0, atol=1e-5)
        assert a.float().std() > 1.0  # images, not a constant


def _cli_eval(run: Path, batch_size: int, cache: Path, precision: str) -> dict:
    # one math thread: on a 2-core machine shared with other work, busy-waiting threads slow tiny runs 8x
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "eval", f"run={run}", "which=last",
                           "eval.num_samples=300", f"eval.batch_size={batch_size}", f"eval.cache_dir={cache}",
                           f"eval.precision={precision}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return rundir.read_jsonl(run / rundir.EVALS).rows[-1]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_bench_eval_gives_the_same_numbers_at_batch_16_and_250(trained_run, tmp_path, precision):
    run, _ = trained_run
    cache = tmp_path / "cache"
    small = _cli_eval(run, 16, cache, precision)
    large = _cli_eval(run, 250, cache, precision)
    assert small["source"] == large["source"] == rundir.SOURCE_BENCH_EVAL
    assert small["num_samples"] == large["num_samples"] == 300
    assert math.isfinite(small["eval/FID"]) and small["eval/FID"] > 0
    # a batch size can flip a uint8 rounding by 1 (test_sampled_images_do_not_depend_on_the_batch_size), which moves
    # the FID by ~1e-6 absolute: that matters for a near-zero FID (0.59 here at step 2), never for a reported one
    assert large["eval/FID"] == pytest.approx(small["eval/FID"], rel=1e-6, abs=1e-5)
    for key in ("eval/KID", "eval/precision", "eval/recall", "eval/density", "eval/coverage", "eval/class_acc"):
        assert large[key] == pytest.approx(small[key], rel=1e-6, abs=1e-6), key
    for rec in (small, large):
        assert 0.0 <= rec["fid_imag_residue"] <= stats.FID_IMAG_TOL
        assert rec["eval/density"] >= 0 and 0.0 <= rec["eval/coverage"] <= 1.0
        for key in registry.COST_FIELDS:
            assert rec[key] >= 0 and math.isfinite(rec[key]), key


def test_evaluate_generator_density_coverage_are_those_of_its_own_features(trained_run, tmp_path, one_thread):
    """The record's density / coverage are stats.density_coverage of precision / recall's features: the
    real and generated features recomputed here (the same images, the same extractor) give the same values."""
    from torch_fidelity.utils import create_feature_extractor

    run, shards = trained_run
    loaded = R.load_run(run, which="last", device="cpu")
    G, n = loaded["G"], 120
    settings = M.EvalSettings(num_samples=n, batch_size=50, cache_dir=tmp_path / "cache", precision="fp32")
    rec = M.evaluate_generator(G, settings, shards_spec=shards, n_classes=loaded["n_classes"], progress=False)

    clf_file = C.classifier_path(shards, 32)
    z, y = S.eval_latents(n, G.z_dim, loaded["n_classes"], seed=0)
    fake = S.sample_images(G, z, y, 50)
    real = C.load_images(shards, 32, limit=n, seed=0, progress=False)[0]
    extractor = create_feature_extractor(C.DOMAIN_EXTRACTOR, ["features"], cuda=False,
                                         feature_extractor_weights_path=str(clf_file))
    with torch.no_grad():
        f_fake, f_real = extractor(fake)[0], extractor(real)[0]
    density, coverage = stats.density_coverage(f_real, f_fake, K)
    assert rec["eval/density"] == pytest.approx(density, abs=1e-9)
    assert rec["eval/coverage"] == pytest.approx(coverage, abs=1e-9)
    fid, _ = stats.frechet_distance(f_fake, f_real)
    assert rec["eval/FID"] == pytest.approx(fid, rel=1e-6)


def test_compute_metrics_agrees_with_torch_fidelitys_calculate_metrics(trained_run, one_thread):
    """One extraction of the features for every metric changes none of torch-fidelity's numbers: IS, KID and
    precision / recall equal calculate_metrics' on the same inputs, and our float64 FID its FID to 1e-6."""
    import torch_fidelity

    from bench.eval.features import ImageDataset, extractor_settings

    _, shards = trained_run
    x = C.load_images(shards, 32, progress=False)[0]
    a, b = ImageDataset(x[:150] // 2 + 60), ImageDataset(x[150:])
    clf_file = str(C.classifier_path(shards, 32))
    ours = M.compute_metrics(a, b, M.MetricSettings(extractor="domain", weights_path=clf_file, batch_size=50))
    fe_name, layers, weights, _ = extractor_settings("domain", clf_file)
    theirs = torch_fidelity.calculate_metrics(
        input1=a, input2=b, isc=True, fid=True, kid=True, prc=True, feature_extractor=fe_name,
        feature_extractor_weights_path=weights, **{f"feature_layer_{m}": layers[m] for m in ("isc", "fid", "kid", "prc")},
        batch_size=50, cuda=False, verbose=False, save_cpu_ram=True, rng_seed=0, isc_splits=10, kid_subset_size=150,
        cache=False)
    for key, name in registry.FIDELITY_KEYS.items():
        if name == "eval/FID":
            assert ours[name] == pytest.approx(theirs[key], rel=1e-6)
        else:
            assert ours[name] == theirs[key], name
    # dimmed vs plain images: ~0.8 in the shape-only set's domain features (an unchanged split: ~0.02)
    assert ours["eval/FID"] > 0.5 and 0 <= ours["eval/coverage"] <= 1
