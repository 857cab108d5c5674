"""Intra-class FID (eval.intra_fid): per-class Frechet distances against an independent numpy computation, their
mean and counts, eval.repeats, the sample-count rule (config validator and run time), `bench eval` end to end
and the report's per-class table. Tiny data; about a minute on 2 CPUs."""
import csv
import json
import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from bench import metrics_registry as registry
from bench import rundir
from bench.config import ConfigError, validate_eval
from bench.schema import EvalCfg
from bench.data.shapes import SHAPES_CLASSES
from bench.eval import classifier as C
from bench.eval import intra as I
from bench.eval import intra_check
from bench.eval import metrics as M
from bench.eval import runs as R
from bench.eval import sampling as S
from bench.eval import stats
from bench.eval.errors import EvalError
from conftest import TINY, classified_shards


# ---- an independent reference ------------------------------------------------------------------------

def reference_fid(a: np.ndarray, b: np.ndarray) -> float:
    """FID straight from its definition, by another route than bench.eval.stats: np.cov, and the trace of the
    matrix square root as tr sqrt(S1^1/2 S2 S1^1/2), both square roots from symmetric eigendecompositions."""
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    w, v = np.linalg.eigh(s1)
    root1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = root1 @ s2 @ root1
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((inner + inner.T) / 2), 0, None)).sum()
    d = a.mean(0) - b.mean(0)
    return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)


def synthetic(n_fake: int, n_real: int, d: int, n_classes: int, seed: int):
    """Features whose classes differ in mean and scale; fake labels drawn at random, real ones balanced."""
    rng = np.random.default_rng(seed)
    y_fake = rng.integers(0, n_classes, n_fake)
    y_real = np.arange(n_real) % n_classes
    centres = rng.normal(size=(n_classes, d)) * 2
    fake = centres[y_fake] + rng.normal(size=(n_fake, d)) * (1 + 0.2 * y_fake[:, None]) + 0.3
    real = centres[y_real] + rng.normal(size=(n_real, d))
    return fake, real, y_fake, y_real


@pytest.mark.parametrize("n_fake,n_real,d,rel", [
    (300, 240, 6, 1e-9),   # more samples per class than dimensions
    # fewer: singular covariances (the low-rank path); the reference's square root of a singular matrix takes
    # square roots of eigenvalues that rounding left at ~1e-16 of the largest, which moves it by ~1e-8
    (60, 45, 24, 1e-6)])
def test_per_class_fid_matches_an_independent_computation(n_fake, n_real, d, rel):
    names = ["a", "b", "c"]
    fake, real, y_fake, y_real = synthetic(n_fake, n_real, d, 3, seed=n_fake)
    out = I.per_class_fid(torch.from_numpy(fake), real, torch.from_numpy(y_fake), y_real, names)
    want = {name: reference_fid(fake[y_fake == c], real[y_real == c]) for c, name in enumerate(names)}
    assert list(out[I.PER_CLASS]) == names
    for name in names:
        assert out[I.PER_CLASS][name] == pytest.approx(want[name], rel=rel), name
        assert want[name] > 0.3  # the sides really differ (a shift of 0.3 per dimension at least)
    assert out["eval/intra_FID"] == pytest.approx(sum(want.values()) / 3, rel=rel)
    assert out[I.COUNTS] == {name: [int((y_fake == c).sum()), int((y_real == c).sum())]
                             for c, name in enumerate(names)}
    assert sum(c[0] for c in out[I.COUNTS].values()) == n_fake
    assert 0.0 <= out[I.RESIDUE] <= stats.FID_IMAG_TOL
    # the per-class values are not the pooled FID: intra-FID sees the class-wise differences
    assert out["eval/intra_FID"] != pytest.approx(stats.frechet_distance(fake, real)[0], rel=1e-3)


def test_frechet_low_rank_equals_the_full_computation():
    rng = np.random.default_rng(3)
    few, many = rng.normal(size=(10, 16)) * 1.5, rng.normal(size=(200, 16)) + 0.5
    full, _ = stats.frechet_distance(few, many)
    low, residue = stats.frechet_low_rank(few, *stats.feature_statistics(many))
    # singular sigma1: every route takes square roots of eigenvalues rounding left at ~1e-16 of the largest
    # instead of 0, so they agree to ~1e-8, not to the last digit
    assert low == pytest.approx(full, rel=1e-7) and low == pytest.approx(reference_fid(few, many), rel=1e-7)
    assert 0.0 <= residue <= stats.FID_IMAG_TOL


def test_a_class_with_fewer_than_two_samples_is_an_error_naming_the_key():
    fake, real, y_fake, y_real = synthetic(40, 40, 4, 2, seed=1)
    y_fake[:] = 0
    y_fake[0] = 1  # class "b" has one generated sample
    with pytest.raises(EvalError) as info:
        I.per_class_fid(fake, real, y_fake, y_real, ["a", "b"])
    msg = str(info.value)
    assert "\n" not in msg and "'b'" in msg and "eval.num_samples" in msg and "eval.intra_fid=false" in msg


def test_repeats_give_the_mean_and_an_interval_of_intra_fid():
    sets = []
    for seed in range(3):
        fake, real, y_fake, y_real = synthetic(90, 90, 3, 3, seed=10 + seed)
        sets.append({**I.per_class_fid(fake, real, y_fake, y_real, ["a", "b", "c"]), "eval/FID": 1.0 + seed})
    out = M.summarise_repeats(sets, seed=0)
    values = [s["eval/intra_FID"] for s in sets]
    assert out["eval/intra_FID"] == pytest.approx(sum(values) / 3)
    assert out["repeat_values"]["eval/intra_FID"] == values
    lo, hi = out[f"eval/intra_FID{registry.CI_SUFFIX}"]
    assert lo <= out["eval/intra_FID"] <= hi and (lo, hi) == stats.t_interval(values)  # Student-t over the sets
    for name in ("a", "b", "c"):
        assert out[I.PER_CLASS][name] == pytest.approx(sum(s[I.PER_CLASS][name] for s in sets) / 3)
        fake_counts = [s[I.COUNTS][name][0] for s in sets]
        assert out[I.COUNTS][name] == [pytest.approx(sum(fake_counts) / 3, abs=0.05), 30]
    # the mean over classes of the per-class means is the mean of the sets' intra-FIDs (both linear)
    assert sum(out[I.PER_CLASS].values()) / 3 == pytest.approx(out["eval/intra_FID"])
    assert out[I.RESIDUE] == max(s[I.RESIDUE] for s in sets)


# ---- the sample-count rule ---------------------------------------------------------------------------

def eval_cfg(**eval_values):
    cfg = OmegaConf.create({"eval": OmegaConf.to_container(OmegaConf.structured(EvalCfg)),
                            "data": {"name": "shapes", "shards": ""}, "model": {"n_classes": None}})
    for k, v in eval_values.items():
        cfg.eval[k] = v
    return cfg


def test_defaults_agree_and_the_default_sample_count_suffices():
    assert EvalCfg().intra_min_per_class == intra_check.DEFAULT_MIN_PER_CLASS == M.EvalSettings().intra_min_per_class
    assert EvalCfg().intra_fid is M.EvalSettings().intra_fid is False
    assert "eval/intra_FID" in registry.EVAL_METRICS and registry.lower_is_better("eval/intra_FID")
    validate_eval(eval_cfg(intra_fid=True))  # 5000 samples, 10 classes x 50: enough
    assert EvalCfg().num_samples >= intra_check.DEFAULT_MIN_PER_CLASS * len(SHAPES_CLASSES)


@pytest.mark.parametrize("key,value", [("num_samples", 400), ("num_real", 499)])
def test_the_validator_refuses_too_few_samples_per_class(key, value):
    with pytest.raises(ConfigError) as info:
        validate_eval(eval_cfg(intra_fid=True, **{key: value}))
    msg = str(info.value)
    assert "\n" not in msg
    assert f"eval.{key}={value}" in msg and "eval.intra_min_per_class=50" in msg and "n_classes=10" in msg
    assert f"eval.{key} >= 500" in msg
    validate_eval(eval_cfg(intra_fid=False, **{key: value}))  # off: no rule
    validate_eval(eval_cfg(intra_fid=True, intra_min_per_class=value // 10, **{key: value}))  # lower minimum


def test_the_validator_uses_model_n_classes_and_checks_the_other_keys():
    cfg = eval_cfg(intra_fid=True, num_samples=600)
    cfg.data.name, cfg.model.n_classes = "folder", 13  # no manifest to read: model.n_classes
    with pytest.raises(ConfigError, match=r"n_classes=13 \(model.n_classes\).*eval.num_samples >= 650"):
        validate_eval(cfg)
    for bad in (1, 0, True):
        with pytest.raises(ConfigError, match="eval.intra_min_per_class"):
            validate_eval(eval_cfg(intra_fid=True, intra_min_per_class=bad))
    with pytest.raises(ConfigError, match="eval.best_metric=eval/intra_FID needs eval.intra_fid=true"):
        validate_eval(eval_cfg(best_metric="eval/intra_FID"))
    validate_eval(eval_cfg(best_metric="eval/intra_FID", intra_fid=True))


# ---- evaluation and `bench eval` ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """300 images of 10 classes (shard order mixes them: 10 per class in every 100), a quickly trained domain
    classifier (width 8: 32 features) beside them, and a 2-step `bench train` run."""
    from bench.cli import main

    root = tmp_path_factory.mktemp("intra")
    shards = classified_shards(root)
    run = root / "run"
    rc = main(["train", f"data.shards={shards}", f"run.dir={run}", *TINY, "train.steps=2", "train.batch_size=4",
               "train.ckpt_every=2", "train.sample_every=0", "telemetry.mfu=false", "telemetry.sigma_every=0",
               "eval.every=0"])
    assert rc == 0
    return run, shards


def test_the_run_time_rule_counts_the_dataset_before_any_work(trained_run, tmp_path):
    run, shards = trained_run
    G = R.load_run(run, which="last", device="cpu")["G"]
    settings = M.EvalSettings(num_samples=600, intra_fid=True, cache_dir=tmp_path / "cache", train_classifier=False,
                              classifier_path=str(tmp_path / "missing.pt"))
    with pytest.raises(EvalError) as info:  # 300 images < 50 x 10: said before the missing classifier is
        M.evaluate_generator(G, settings, shards_spec=shards, progress=False)
    msg = str(info.value)
    assert "\n" not in msg and "eval.num_real=300" in msg and "eval.intra_min_per_class=50" in msg
    assert "n_classes=10" in msg and "the dataset has 300 images" in msg


def test_bench_eval_records_per_class_fid_and_the_report_shows_it(trained_run, tmp_path, capsys, one_thread):
    from bench.cli import main
    from torch_fidelity.utils import create_feature_extractor

    run, shards = trained_run
    cache = tmp_path / "cache"
    n = 200
    args = ["eval", f"run={run}", "which=last", f"eval.num_samples={n}", "eval.batch_size=50", "eval.precision=fp32",
            "eval.intra_fid=true", "eval.intra_min_per_class=10", f"eval.cache_dir={cache}"]
    # the validator, before anything is loaded: 10 classes (the shards' manifest) x 30 > 200
    assert main(args + ["eval.intra_min_per_class=30"]) == 2
    err = capsys.readouterr().err
    assert "eval.num_samples=200" in err and "eval.intra_min_per_class=30" in err

    assert main(args) == 0
    out = capsys.readouterr().out
    assert "eval/intra_FID" in out  # the bench eval table
    rec = rundir.read_jsonl(run / rundir.EVALS).rows[-1]
    per_class, counts = rec["intra_fid_per_class"], rec["intra_fid_counts"]
    assert list(per_class) == SHAPES_CLASSES == list(counts)
    assert sum(c[0] for c in counts.values()) == n and all(c[1] == 20 for c in counts.values())
    assert rec["eval/intra_FID"] == pytest.approx(sum(per_class.values()) / 10, rel=1e-12)
    assert all(math.isfinite(v) and v > 0 for v in per_class.values())

    # the same numbers from features recomputed here (the same images, the same extractor)
    loaded = R.load_run(run, which="last", device="cpu")
    G = loaded["G"]
    z, y = S.eval_latents(n, G.z_dim, loaded["n_classes"], seed=0)
    real, y_real = C.load_images(shards, 32, limit=n, seed=0, progress=False)
    extractor = create_feature_extractor(C.DOMAIN_EXTRACTOR, ["features"], cuda=False,
                                         feature_extractor_weights_path=str(C.classifier_path(shards, 32)))
    with torch.no_grad():
        f_fake = extractor(S.sample_images(G, z, y, 50))[0].double().numpy()
        f_real = extractor(real)[0].double().numpy()
    y, y_real = y.numpy(), y_real.numpy()
    for c, name in enumerate(SHAPES_CLASSES):
        assert counts[name] == [int((y == c).sum()), int((y_real == c).sum())]
        assert per_class[name] == pytest.approx(reference_fid(f_fake[y == c], f_real[y_real == c]), rel=1e-4), name

    # eval.repeats=2 with the real side cached: the labels come from their cache file beside the features
    labels_files = list(cache.glob("real-*-labels.json"))
    assert len(labels_files) == 1 and json.loads(labels_files[0].read_text())["labels"] == y_real.tolist()
    assert main(args + ["eval.repeats=2"]) == 0
    rec2 = rundir.read_jsonl(run / rundir.EVALS).rows[-1]
    assert rec2["repeats"] == 2 and len(rec2["repeat_values"]["eval/intra_FID"]) == 2
    assert rec2["repeat_values"]["eval/intra_FID"][0] == pytest.approx(rec["eval/intra_FID"], rel=1e-9)
    lo, hi = rec2[f"eval/intra_FID{registry.CI_SUFFIX}"]
    assert lo <= rec2["eval/intra_FID"] <= hi
    assert list(rec2["intra_fid_per_class"]) == SHAPES_CLASSES

    # bench report: the per-class table in report.md, every value in intra_fid.csv
    report = tmp_path / "report"
    assert main(["report", str(run), f"out={report}"]) == 0
    md = (report / "report.md").read_text()
    section = md[md.index("## Intra-class FID"):]
    section = section[:section.index("\n## ", 1)]
    assert "| class | intra-FID | generated | real |" in section and "mean of 2 sample sets" in section
    for name in SHAPES_CLASSES:
        row = next(line for line in section.splitlines() if line.startswith(f"| {name} |"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert float(cells[1]) == pytest.approx(rec2["intra_fid_per_class"][name], rel=1e-3)
        assert float(cells[3]) == 20
    with open(report / "intra_fid.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(SHAPES_CLASSES)  # both records, one row per class
    first = [r for r in rows if r["repeats"] == "1"]
    assert {r["class"]: float(r["intra_fid"]) for r in first} == pytest.approx(per_class, rel=1e-9)
    with open(report / "evals.csv") as f:
        evals = list(csv.DictReader(f))
    assert float(evals[-1]["eval/intra_FID"]) == pytest.approx(rec2["eval/intra_FID"], rel=1e-9)


def test_a_class_the_drawn_labels_leave_short_is_an_error_before_any_image_is_made():
    """40 samples over 10 classes pass the rule at eval.intra_min_per_class=4, but the labels are drawn per sample:
    eval.seed 2 and 3 give every class >= 2, seed 4 leaves one with none. The check counts the drawn labels (they
    come from the seed before any image), so the second set fails now, naming its seed and class."""
    names = [str(c) for c in range(10)]
    ok = M.EvalSettings(num_samples=40, intra_fid=True, intra_min_per_class=4, seed=2, repeats=2)
    assert I.IntraFID.check(ok, names, 10, 1000, z_dim=8) == names
    short = M.EvalSettings(num_samples=40, intra_fid=True, intra_min_per_class=4, seed=3, repeats=2)
    with pytest.raises(EvalError) as info:
        I.IntraFID.check(short, names, 10, 1000, z_dim=8)
    counts = np.bincount(S.eval_latents(40, 8, 10, seed=4)[1].numpy(), minlength=10)
    c = int(counts.argmin())
    assert counts[c] < 2 and (f"eval.seed=3 (sample set 2 of eval.repeats=2: seed 4) give class '{c}' {counts[c]} of "
                             f"eval.num_samples=40") in str(info.value)
    assert "\n" not in str(info.value)
