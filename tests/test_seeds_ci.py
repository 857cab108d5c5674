"""Seeds and confidence intervals: the percentile bootstrap (bench.eval.stats.bootstrap_ci, kept for
quantities over many samples) against an independent computation, eval.repeats through `bench eval` (its
Student-t interval over the sample sets), and `bench report` grouping runs that differ only in train.seed
(mean ± Student-t 95% interval, n, the t-test marks against the best cell). Fabricated run directories for
the report; one tiny evaluation for eval.repeats (about 30 s on 2 CPUs). The intervals' coverage, the tests,
the variance split and the power table: tests/test_intervals.py."""
import csv
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import yaml
from omegaconf import OmegaConf

from bench import metrics_registry as registry
from bench import rundir
from bench.cli import main
from bench.config import ConfigError, validate_eval
from scipy import stats as sps

from bench.eval.stats import bootstrap_ci, t_interval
from bench.report import groups as seedgroups

# ---- the bootstrap ------------------------------------------------------------------------------------


def _percentile_by_hand(sorted_vals, p):
    """numpy's default ('linear') percentile, written out: rank p/100 * (n - 1), interpolated."""
    rank = p / 100.0 * (len(sorted_vals) - 1)
    lo = math.floor(rank)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (rank - lo) * (sorted_vals[hi] - sorted_vals[lo])


@pytest.mark.parametrize("values", [[104.6, 53.9, 71.2], [1.0, 2.0, 3.0, 4.0, 10.0], [0.5, 0.25]])
def test_bootstrap_matches_explicit_resampled_means(values):
    """Same RNG stream (default_rng(0).integers, one (B, K) draw), then the means and percentiles by hand."""
    B = 2000
    idx = np.random.default_rng(0).integers(0, len(values), size=(B, len(values)))
    means = sorted(math.fsum(values[j] for j in row) / len(values) for row in idx.tolist())
    want = (_percentile_by_hand(means, 2.5), _percentile_by_hand(means, 97.5))
    got = bootstrap_ci(values)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-12)
    assert got[0] <= sum(values) / len(values) <= got[1]
    assert got == bootstrap_ci(list(values))  # a fixed seed: the same interval every time
    many = [float(v) for v in range(20)]
    assert bootstrap_ci(many, seed=1) != bootstrap_ci(many)  # ... and the seed is what fixes it


def test_bootstrap_single_value_and_bad_input():
    assert bootstrap_ci([7.5]) == (7.5, 7.5)
    with pytest.raises(ValueError):
        bootstrap_ci([])
    with pytest.raises(ValueError):
        bootstrap_ci([1.0, float("nan")])


def test_bootstrap_width_shrinks_like_one_over_sqrt_k_and_covers():
    """iid N(0, 1): the interval contains the sample mean, its width is about 2 * 1.96 / sqrt(K) (a plain
    bootstrap of the mean is a bit narrower: sqrt((K - 1) / K)), and it covers the true mean ~95% of the time."""
    rng = random.Random(7)
    widths = {}
    for k in (10, 40, 160):
        ws = []
        for _ in range(30):
            x = [rng.gauss(0.0, 1.0) for _ in range(k)]
            lo, hi = bootstrap_ci(x)
            assert lo <= sum(x) / k <= hi
            ws.append(hi - lo)
        widths[k] = sum(ws) / len(ws)
        assert widths[k] == pytest.approx(2 * 1.959964 / math.sqrt(k) * math.sqrt((k - 1) / k), rel=0.15), k
    assert widths[10] / widths[40] == pytest.approx(2.0, rel=0.2)
    assert widths[40] / widths[160] == pytest.approx(2.0, rel=0.2)
    covered = 0
    for _ in range(200):
        x = [rng.gauss(3.0, 2.0) for _ in range(25)]
        lo, hi = bootstrap_ci(x)
        covered += lo <= 3.0 <= hi
    assert 0.85 <= covered / 200 <= 0.995


# ---- eval.repeats -------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [0, -1, 1.5, "3", True])
def test_eval_repeats_is_validated(bad):
    from bench.schema import EvalCfg

    cfg = OmegaConf.create({"eval": OmegaConf.to_container(OmegaConf.structured(EvalCfg))})
    validate_eval(cfg)  # the default (1) passes
    cfg.eval.repeats = 3
    validate_eval(cfg)
    cfg = OmegaConf.create({"eval": {**OmegaConf.to_container(cfg.eval), "repeats": bad}})
    with pytest.raises(ConfigError, match="eval.repeats"):
        validate_eval(cfg)


def test_summarise_repeats_against_a_hand_computation():
    from bench.eval.metrics import summarise_repeats

    reps = [{"eval/FID": 10.0, "eval/IS": 2.0, "eval/KID": 0.1, "fid_imag_residue": 1e-6,
             "cost/sample_s_per_1k": 1.0, "cost/real_features_s": 5.0},
            {"eval/FID": 14.0, "eval/IS": 2.5, "fid_imag_residue": 3e-6,
             "cost/sample_s_per_1k": 3.0, "cost/real_features_s": 0.0},
            {"eval/FID": 15.0, "eval/IS": 3.5, "eval/KID": 0.3, "fid_imag_residue": 2e-6,
             "cost/sample_s_per_1k": 2.0, "cost/real_features_s": 0.0}]
    out = summarise_repeats(reps, seed=5)
    assert out["eval/FID"] == pytest.approx(13.0) and out["eval/IS"] == pytest.approx(8.0 / 3)
    assert out["eval/FID_ci95"] == pytest.approx(list(t_interval([10.0, 14.0, 15.0])))
    half = 4.302652729911275 * math.sqrt(7.0 / 3.0)  # t_{2, .975} s / sqrt(3), s^2 = (9 + 1 + 4) / 2
    assert out["eval/FID_ci95"] == pytest.approx([13.0 - half, 13.0 + half])
    assert out["eval/FID_ci95"][0] <= 13.0 <= out["eval/FID_ci95"][1]
    assert "eval/KID" not in out and "eval/KID" not in out["repeat_values"]  # not in every sample set
    assert out["repeat_values"] == {"eval/FID": [10.0, 14.0, 15.0], "eval/IS": [2.0, 2.5, 3.5]}
    assert (out["repeats"], out["repeat_seeds"], out["fid_imag_residue"]) == (3, [5, 6, 7], 3e-6)
    assert out["cost/sample_s_per_1k"] == pytest.approx(2.0)  # per 1k images: the mean
    assert out["cost/real_features_s"] == pytest.approx(5.0)  # seconds: the sum (cached after the first)
    json.dumps(out, allow_nan=False)  # plain JSON values only


def test_evaluate_generator_refuses_bad_repeats_before_any_work():
    from dataclasses import replace

    from bench.eval import metrics as M
    from bench.eval.errors import EvalError

    for bad in (0, -2, 1.5):
        with pytest.raises(EvalError, match="eval.repeats"):
            M._checked(replace(M.EvalSettings(), repeats=bad))
    assert M._checked(replace(M.EvalSettings(), repeats=4)).repeats == 4


def test_bench_eval_with_three_repeats(tmp_path, capsys):
    """A tiny run evaluated through the real CLI with eval.repeats=3: three sample sets (seeds 0, 1, 2) whose
    mean is the headline value, bracketed by its interval, and which differ from each other."""
    torch = pytest.importorskip("torch")
    import test_evaluate as TE

    from bench.data.shards import ShardSetSpec, make_shards
    from bench.eval import classifier as C

    shards = tmp_path / "shapes32"
    make_shards(shards, ShardSetSpec(source="shapes", resolution=32, num_samples=120, samples_per_shard=60, seed=0),
                progress=False)
    C.train_classifier(shards, settings=C.ClassifierSettings(epochs=1, max_seconds=60, width=8, holdout=0.2,
                                                             precision="fp32"), progress=False)
    run = TE.make_run(tmp_path, shards)
    assert torch is not None
    rc = main(["eval", f"run={run}", "eval.repeats=3", "eval.num_samples=40", "eval.num_real=40",
               "eval.batch_size=40", f"eval.cache_dir={tmp_path / 'cache'}"])
    assert rc == 0
    printed = capsys.readouterr().out
    rec = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert rec["repeats"] == 3 and rec["repeat_seeds"] == [0, 1, 2]
    assert "95% CI" in printed
    for name in ("eval/FID", "eval/KID", "eval/precision", "eval/density", "eval/coverage", "eval/class_acc"):
        vals = rec["repeat_values"][name]
        assert len(vals) == 3, name
        assert rec[name] == pytest.approx(sum(vals) / 3, rel=1e-12), name
        lo, hi = rec[f"{name}{registry.CI_SUFFIX}"]
        assert lo <= rec[name] <= hi, name
        assert (lo, hi) == pytest.approx(sps.t.interval(0.95, 2, loc=np.mean(vals), scale=sps.sem(vals))), name
    fids = rec["repeat_values"]["eval/FID"]
    assert len(set(fids)) == 3  # independent sample sets, not one set three times
    # the first sample set is the plain evaluation's (seed eval.seed): evaluate again with repeats=1
    assert main(["eval", f"run={run}", "eval.num_samples=40", "eval.num_real=40", "eval.batch_size=40",
                 f"eval.cache_dir={tmp_path / 'cache'}"]) == 0
    single = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert "repeats" not in single and f"eval/FID{registry.CI_SUFFIX}" not in single
    assert single["eval/FID"] == pytest.approx(fids[0], rel=1e-9)

    # bench truncation with repeats: each psi's row carries the mean and its interval
    assert main(["truncation", f"run={run}", "psi=[0.5]", "eval.repeats=2", "eval.num_samples=40", "eval.num_real=40",
                 "eval.batch_size=40", f"eval.cache_dir={tmp_path / 'cache'}"]) == 0
    with open(run / "truncation" / "truncation.csv", newline="") as f:
        (row,) = list(csv.DictReader(f))
    record = json.loads((run / "truncation" / "sweep.json").read_text())["records"][0]
    assert row["repeats"] == "2" and len(record["repeat_values"]["eval/FID"]) == 2
    assert float(row["FID_ci_lo"]) <= float(row["FID"]) <= float(row["FID_ci_hi"])
    assert (float(row["FID_ci_lo"]), float(row["FID_ci_hi"])) == pytest.approx(
        t_interval(record["repeat_values"]["eval/FID"]))


# ---- the report ---------------------------------------------------------------------------------------

def fake_run(root: Path, name: str, seed: int, clamp, fid: float, repeats=None) -> Path:
    """A finished run directory as training leaves it: config.yaml, run.json, summary.json, evals.jsonl."""
    d = root / name
    d.mkdir(parents=True)
    cfg = {"train": {"seed": seed, "batch_size": 16, "steps": 10}, "reg": {"sigma_clamp": clamp},
           "eval": {"extractor": "domain", "best_metric": "eval/FID"}, "run": {"name": name, "dir": str(d)}}
    (d / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
    rundir.write_json(d / rundir.RUN_JSON, {"status": "completed", "world_size": 1, "batch_size": 16})
    rundir.write_json(d / rundir.SUMMARY, {"status": "completed", "steps": 10,
                                           "best": {"metric": "eval/FID", "value": fid, "step": 10,
                                                    "extractor": "domain"}})
    rec = {"step": 10, "eval/FID": fid, "eval/IS": 2.0 + seed, "extractor": "domain", "num_samples": 40}
    if repeats:
        rec.update({"eval/FID_ci95": [fid - repeats, fid + repeats], "repeats": 3,
                    "repeat_values": {"eval/FID": [fid - repeats, fid, fid + repeats]}})
    rundir.append_jsonl(d / rundir.EVALS, {"step": 5, "eval/FID": fid + 20.0, "extractor": "domain",
                                           "num_samples": 40})
    rundir.append_jsonl(d / rundir.EVALS, rec)
    return d


FIDS = {"null": [50.0, 58.0, 54.0], "ratio:1.5": [52.0, 60.0, 53.0], "ratio:3": [100.0, 101.0, 102.0]}


@pytest.fixture
def seeded(tmp_path):
    root = tmp_path / "runs"
    for clamp, fids in FIDS.items():
        for seed, fid in enumerate(fids):
            fake_run(root, f"clamp{clamp.replace(':', '')}-s{seed}", seed, clamp, fid)
    return root


def _ablation_md_rows(md: str) -> dict:
    table = md.split("## Ablation matrix", 1)[1].split("\n\n")[1]  # the matrix, not the tables below it
    rows = [line for line in table.splitlines() if line.startswith("| sigma_clamp=")]
    return {line.split("|")[1].strip(): line for line in rows}


def test_report_groups_seeds_with_mean_interval_and_n(seeded, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(seeded), f"out={out}"]) == 0
    capsys.readouterr()
    md = (out / "report.md").read_text()
    with open(out / "ablation.csv", newline="") as f:
        abl = list(csv.DictReader(f))
    assert len(abl) == 3  # nine runs, three configurations: one cell each
    by_clamp = {a["reg.sigma_clamp"]: a for a in abl}
    assert set(by_clamp) == set(FIDS)
    for clamp, fids in FIDS.items():
        a = by_clamp[clamp]
        lo, hi = sps.t.interval(0.95, 2, loc=np.mean(fids), scale=sps.sem(fids))
        assert a["n"] == "3" and a["seeds"] == "0,1,2"
        assert float(a["value"]) == pytest.approx(sum(fids) / 3)
        assert (float(a["ci_lo"]), float(a["ci_hi"])) == pytest.approx((lo, hi))
        half = max(sum(fids) / 3 - lo, hi - sum(fids) / 3)
        assert a["value_text"] == f"{sum(fids) / 3:.4g} ± {half:.2g} (n=3)"
        assert a["value_text"] in md
    # the best cell is the lowest mean FID; every cell has the best's seeds 0, 1, 2: paired t-tests of the
    # per-seed differences, Holm over the two. ratio:1.5 (+2, +2, -1) is not separable, ratio:3 (+50, +43, +48) is
    p = {c: float(sps.ttest_rel(FIDS[c], FIDS["null"]).pvalue) for c in ("ratio:1.5", "ratio:3")}
    assert p["ratio:3"] < p["ratio:1.5"]
    holm = {"ratio:3": 2 * p["ratio:3"], "ratio:1.5": max(2 * p["ratio:3"], p["ratio:1.5"])}
    assert holm["ratio:3"] <= 0.05 < holm["ratio:1.5"]
    assert (by_clamp["null"]["vs_best"], by_clamp["ratio:1.5"]["vs_best"], by_clamp["ratio:3"]["vs_best"]) == \
        (seedgroups.BEST_MARK, seedgroups.NOT_SEPARABLE, seedgroups.DIFFERENT)
    for c in p:
        assert by_clamp[c]["test"] == seedgroups.PAIRED
        assert (float(by_clamp[c]["p"]), float(by_clamp[c]["p_holm"])) == pytest.approx((p[c], holm[c]), rel=1e-9)
        d = np.subtract(FIDS[c], FIDS["null"])
        assert float(by_clamp[c]["paired_diff"]) == pytest.approx(d.mean())
        assert (float(by_clamp[c]["paired_lo"]), float(by_clamp[c]["paired_hi"])) == pytest.approx(
            sps.t.interval(0.95, 2, loc=d.mean(), scale=sps.sem(d)))
    rows = _ablation_md_rows(md)
    assert f"| {seedgroups.NOT_SEPARABLE} | paired | {p['ratio:1.5']:.3g} | {holm['ratio:1.5']:.3g} |" in rows["sigma_clamp=ratio:1.5"]
    assert f"| {seedgroups.DIFFERENT} | paired | {p['ratio:3']:.3g} | {holm['ratio:3']:.3g} |" in rows["sigma_clamp=ratio:3"]
    assert "n=3" in rows["sigma_clamp=ratio:3"]
    assert "not separable from best" in md and "Holm" in md  # the legend line
    # the other tables: the seeds table and the best-evaluation table show mean ± interval and n
    assert "Seeds:" in md and "| sigma_clamp=null | 3 | 0, 1, 2 |" in md
    evals = md.split("## Evaluations", 1)[1].split("\n## ", 1)[0]
    assert evals.count("± ") >= 3 and evals.count("(n=3)") >= 3
    assert "| sigma_clamp=ratio:3 | domain | FID |" in evals
    for name in ("evals.png", "ablation.png"):
        assert (out / name).stat().st_size > 10_000


def test_truncation_curves_of_seeds_are_grouped(seeded, tmp_path, capsys):
    """Each seed's truncation.csv (as `bench truncation` writes it): the report's truncation table shows
    each configuration's mean ± interval per psi with n=3, and truncation.png draws them."""
    fid_at = {}
    for run in sorted(seeded.iterdir()):
        seed = int(run.name[-1])
        base = FIDS[yaml.safe_load((run / rundir.CONFIG).read_text())["reg"]["sigma_clamp"] or "null"][seed]
        (run / rundir.TRUNCATION).mkdir()
        lines = ["psi,IS,FID,KID,precision,recall,density,coverage,class_acc,extractor,num_samples,step"]
        for psi, shift in (("0.5", 10.0), ("off", 0.0)):
            fid_at.setdefault((run.name[:-3], psi), []).append(base + shift)
            lines.append(f"{psi},{2 + seed},{base + shift},0.01,{0.5 + seed / 10},0.4,0.9,0.6,0.3,domain,40,10")
        (run / rundir.TRUNCATION / "truncation.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "out"
    assert main(["report", str(seeded), f"out={out}"]) == 0
    capsys.readouterr()
    section = (out / "report.md").read_text().split("## Truncation trade-off", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| sigma_clamp=")]
    assert len(rows) == 6  # three configurations x two psi, not nine runs x two
    for (name, psi), fids in fid_at.items():
        mean = sum(fids) / 3
        lo, hi = t_interval(fids)
        text = f"{mean:.4g} ± {max(mean - lo, hi - mean):.2g} (n=3)"
        assert any(text in line and f"| {psi} |" in line for line in rows), (name, psi, text)
    assert (out / "truncation.png").stat().st_size > 10_000


def test_runs_differing_in_more_than_the_seed_stay_apart(tmp_path):
    root = tmp_path / "runs"
    fake_run(root, "a", 0, "null", 50.0)
    fake_run(root, "b", 1, "null", 52.0)
    other = fake_run(root, "c", 2, "null", 51.0)
    cfg = yaml.safe_load((other / rundir.CONFIG).read_text())
    cfg["train"]["batch_size"] = 32  # not only the seed: another configuration
    (other / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
    from bench.report import collect, tables

    runs = collect.discover(root)
    keys, _ = tables.swept_keys(runs)
    tables.assign_labels(runs, keys)
    groups = seedgroups.group_runs(runs, keys)
    assert sorted(len(g.runs) for g in groups) == [1, 2]
    pair = next(g for g in groups if len(g.runs) == 2)
    assert sorted(r.name for r in pair.runs) == ["a", "b"] and pair.label == "batch_size=16"


def test_one_run_with_repeats_shows_its_own_interval_and_separability(tmp_path, capsys):
    """n = 1 per configuration: the cell's interval is the Student-t interval over the record's sample sets
    (49, 50, 51: ± t_{2, .975} / sqrt(3)), and no cell is tested against the best: one run has no seed spread
    (its sample sets say nothing of it), so they are marked untested however far apart they are."""
    root = tmp_path / "runs"
    for clamp, fid in (("null", 50.0), ("ratio:1.5", 51.0), ("ratio:3", 60.0)):
        fake_run(root, f"c{clamp.replace(':', '')}", 0, clamp, fid, repeats=1.0)
    out = tmp_path / "out"
    assert main(["report", str(root), f"out={out}"]) == 0
    capsys.readouterr()
    with open(out / "ablation.csv", newline="") as f:
        abl = {a["reg.sigma_clamp"]: a for a in csv.DictReader(f)}
    assert abl["null"]["value_text"] == f"50 ± {4.302652729911275 / math.sqrt(3):.2g} (n=1, 3 repeats)" == \
        "50 ± 2.5 (n=1, 3 repeats)"
    assert (abl["null"]["vs_best"], abl["ratio:1.5"]["vs_best"], abl["ratio:3"]["vs_best"]) == \
        (seedgroups.BEST_MARK, seedgroups.UNTESTED, seedgroups.UNTESTED)
    assert abl["ratio:3"]["p"] == abl["ratio:3"]["p_holm"] == "" and abl["ratio:3"]["test"] == ""
    with open(out / "evals.csv", newline="") as f:
        recs = [r for r in csv.DictReader(f) if r["step"] == "10"]
    assert {(float(r["eval/FID_ci_lo"]), float(r["eval/FID_ci_hi"])) for r in recs} == \
        {(49.0, 51.0), (50.0, 52.0), (59.0, 61.0)}
    # without repeats and one seed: the plain value, no interval, no mark
    plain = tmp_path / "plain"
    for clamp, fid in (("null", 50.0), ("ratio:3", 60.0)):
        fake_run(plain, f"c{clamp.replace(':', '')}", 0, clamp, fid)
    assert main(["report", str(plain), f"out={tmp_path / 'out2'}"]) == 0
    with open(tmp_path / "out2" / "ablation.csv", newline="") as f:
        abl = {a["reg.sigma_clamp"]: a for a in csv.DictReader(f)}
    assert abl["ratio:3"]["value_text"] == "60" and abl["ratio:3"]["vs_best"] == seedgroups.UNTESTED
    assert "±" not in (tmp_path / "out2" / "report.md").read_text().split("## Ablation matrix")[1].split("`≈`")[0]


def test_ablation_sweep_with_seeds_groups_into_one_cell(tmp_path, capsys):
    """A real multirun of the stability ablation narrowed to one cell, with `train.seed=0,1`: two jobs whose
    overrides differ in train.seed only, one configuration (n=2) in the report."""
    from bench.data.shards import ShardSetSpec, make_shards
    from bench.eval.classifier import ClassifierSettings, train_classifier
    from conftest import TINY_NETS as TINY  # the experiment's own eval.final holds

    shards = tmp_path / "shapes32"
    make_shards(shards, ShardSetSpec(source="shapes", resolution=32, num_samples=120, samples_per_shard=60, seed=0),
                progress=False)
    train_classifier(shards, settings=ClassifierSettings(epochs=1, max_seconds=30, width=8, holdout=0.2),
                     progress=False)
    sweep = tmp_path / "sweep"
    assert main(["train", "-m", "+experiment=stability_ablation", f"data.shards={shards}", *TINY, "loss=hinge",
                 "model.d_sn=true", "reg.r1_gamma=0", "reg.ortho_beta=0", "reg.sigma_clamp=null", "train.seed=0,1",
                 "train.steps=2", "train.batch_size=4", "eval.num_samples=40", "eval.batch_size=20",
                 f"hydra.sweep.dir={sweep}"]) == 0
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert sorted(o for j in jobs for o in j["overrides"] if o.startswith("train.seed=")) == \
        ["train.seed=0", "train.seed=1"]
    assert all(j["state"] == "completed" for j in jobs)
    out = tmp_path / "out"
    assert main(["report", str(sweep), f"out={out}"]) == 0
    capsys.readouterr()
    md = (out / "report.md").read_text()
    assert "Swept (index overrides): `train.seed`" in md
    seeds = md.split("Seeds:", 1)[1].split("\n## ", 1)[0]
    assert "| 2 | 0, 1 |" in seeds and "(n=2)" in seeds
    evals = md.split("## Evaluations", 1)[1].split("\n## ", 1)[0]
    assert evals.count("(n=2)") >= 3  # FID, KID, precision, ... of the one configuration
