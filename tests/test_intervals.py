"""The report's intervals and tests (bench.eval.stats, bench.report.groups): Student-t intervals that hold
their 95% at K = 3 and 5 where the percentile bootstrap does not, Welch / paired t-tests with Holm's
correction for "≈", the paired differences, the seed / sample-set variance split and the seeds-needed power
table, each against an independent computation (scipy.stats, numpy, a hand-worked example, a simulation).
The report test builds a synthetic sweep on disk the way `bench report` reads it."""
import csv
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from scipy import stats as sps

from bench import rundir
from bench.cli import main
from bench.eval import stats as S
from bench.report import groups as seedgroups

# ---- coverage -----------------------------------------------------------------------------------------


def _coverage(interval, k: int, sets: int = 1000, seed: int = 20260) -> float:
    """The share of `sets` synthetic sets of k N(mu, sd) values whose interval holds mu."""
    rng = np.random.default_rng(seed)
    mu, sd = 37.0, 4.0
    data = rng.normal(mu, sd, size=(sets, k))
    hits = 0
    for x in data:
        lo, hi = interval(x.tolist())
        hits += lo <= mu <= hi
    return hits / sets


@pytest.mark.parametrize("k", [3, 5])
def test_t_interval_covers_95_percent_and_the_bootstrap_does_not(k):
    t_cov = _coverage(S.t_interval, k)
    boot_cov = _coverage(S.bootstrap_ci, k)
    print(f"K={k}: t-interval coverage {t_cov:.3f}, percentile bootstrap {boot_cov:.3f}")
    assert 0.93 <= t_cov <= 0.97, t_cov
    assert boot_cov < 0.88, boot_cov  # the old interval: too narrow at a handful of seeds (theory: 0.75 / 0.85)


def test_t_interval_against_scipy_and_edge_cases():
    for vals in ([104.6, 53.9, 71.2], [1.0, 2.0, 3.0, 4.0, 10.0], [0.5, 0.25]):
        x = np.asarray(vals)
        want = sps.t.interval(0.95, len(vals) - 1, loc=x.mean(), scale=sps.sem(x))
        assert S.t_interval(vals) == pytest.approx(want, rel=1e-12)
    # by hand at K = 3: t_{2, 0.975} = 4.302652729911275, s^2 = (9 + 1 + 4) / 2 = 7
    lo, hi = S.t_interval([10.0, 14.0, 15.0])
    assert (lo + hi) / 2 == pytest.approx(13.0) and (hi - lo) / 2 == pytest.approx(4.302652729911275 * math.sqrt(7.0) / math.sqrt(3))
    assert S.t_interval([7.5]) == (7.5, 7.5)
    assert S.t_interval([2.0, 2.0, 2.0]) == (2.0, 2.0)
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            S.t_interval(bad)


# ---- tests and Holm -----------------------------------------------------------------------------------

@pytest.mark.parametrize("a,b", [([1.0, 2.0, 3.5, 4.0], [2.0, 5.0, 7.0, 9.0, 11.0]),
                                 ([50.1, 49.2, 51.3], [60.4, 58.9, 61.0, 59.5, 60.1]),
                                 ([0.31, 0.29], [0.35, 0.2, 0.4])])
def test_welch_against_scipy(a, b):
    t, df, p = S.welch_test(a, b)
    ref = sps.ttest_ind(a, b, equal_var=False)
    assert t == pytest.approx(float(ref.statistic), rel=1e-10)
    assert p == pytest.approx(float(ref.pvalue), rel=1e-9)
    assert df == pytest.approx(float(ref.df), rel=1e-10)
    with pytest.raises(ValueError):
        S.welch_test([1.0], b)


def test_paired_against_scipy_and_no_spread():
    a, b = [51.0, 49.5, 53.0, 50.0], [50.0, 49.0, 51.0, 50.5]
    ref = sps.ttest_rel(a, b)
    t, df, p = S.paired_test(np.subtract(a, b))
    assert (t, df, p) == pytest.approx((float(ref.statistic), 3.0, float(ref.pvalue)), rel=1e-10)
    # no spread at all: a real difference is certain, none is none
    assert S.paired_test([2.0, 2.0, 2.0])[2] == 0.0 and S.paired_test([0.0, 0.0])[2] == 1.0
    assert S.welch_test([1.0, 1.0], [1.0, 1.0])[2] == 1.0 and S.welch_test([1.0, 1.0], [2.0, 2.0])[2] == 0.0


def test_holm_hand_worked():
    # p = 0.01, 0.04, 0.03, 0.005 (m = 4). Sorted: 0.005 x 4 = 0.02; 0.01 x 3 = 0.03; 0.03 x 2 = 0.06;
    # 0.04 x 1 = 0.04, but never below the one before: 0.06. Back in the input's order:
    assert S.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # at alpha = 0.05 the 0.005 and 0.01 tests reject, 0.03 and 0.04 do not. Two tests: 0.2 x 2 = 0.4, then
    # 0.6 x 1; three: 0.7 x 3 = 2.1 is capped at 1, and the others may not fall below it
    assert S.holm([0.6, 0.2]) == pytest.approx([0.6, 0.4]) and S.holm([0.9, 0.8, 0.7]) == pytest.approx([1.0] * 3)
    assert S.holm([]) == []


# ---- variance split -------------------------------------------------------------------------------------

def test_variance_split_by_hand_and_by_simulation():
    runs = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.5]]
    # run 1: mean 2, squared deviations 1 + 0 + 1; run 2: mean 15.5 / 3, 1.3611 + 0.0278 + 1.7778 = 3.1667;
    # pooled over (3 - 1) + (3 - 1) degrees of freedom
    within = (2.0 + 3.1666666666666665) / 4
    means = [2.0, 15.5 / 3]
    between = np.var(means, ddof=1) - within / 3
    got = S.variance_split(runs)
    assert got["within"] == pytest.approx(within) and got["between"] == pytest.approx(between)
    assert (got["runs"], got["repeats"]) == (2, 3.0)
    assert S.variance_split([[1.0, 5.0], [3.0, 3.1]])["between"] == 0.0  # floored at 0
    # a simulation: seed SD 2, sample-set SD 0.5, 400 runs x 4 sets: the estimates come back
    rng = np.random.default_rng(3)
    sim = (rng.normal(0, 2.0, size=(400, 1)) + rng.normal(0, 0.5, size=(400, 4))).tolist()
    got = S.variance_split(sim)
    assert math.sqrt(got["between"]) == pytest.approx(2.0, rel=0.1)
    assert math.sqrt(got["within"]) == pytest.approx(0.5, rel=0.05)
    with pytest.raises(ValueError):
        S.variance_split([[1.0, 2.0]])


# ---- power ----------------------------------------------------------------------------------------------

def _power_by_scipy(n, delta, sd):
    df = 2 * n - 2
    c = sps.t.isf(0.025, df)
    nc = delta / sd * math.sqrt(n / 2)
    return 1.0 - sps.nct.cdf(c, df, nc) + sps.nct.cdf(-c, df, nc)


def test_power_against_the_noncentral_t_and_a_simulation():
    assert S.power(5, 10.0, 8.0) == pytest.approx(_power_by_scipy(5, 10.0, 8.0), rel=1e-9)
    # a simulation of the two-sample t-test itself: 40,000 pairs of 5 N(0, 8) and 5 N(10, 8) values
    rng = np.random.default_rng(11)
    a, b = rng.normal(0, 8, size=(40_000, 5)), rng.normal(10, 8, size=(40_000, 5))
    t = sps.ttest_ind(a, b, axis=1).statistic
    rejected = float(np.mean(np.abs(t) > sps.t.isf(0.025, 8)))
    assert S.power(5, 10.0, 8.0) == pytest.approx(rejected, abs=0.01)


def test_seeds_for_power_is_the_smallest_n_and_monotone():
    sd = 6.3
    for delta in (5.0, 10.0, 20.0):
        n = S.seeds_for_power(delta, sd)
        assert _power_by_scipy(n, delta, sd) >= 0.8
        assert n == 2 or _power_by_scipy(n - 1, delta, sd) < 0.8
    ns = [S.seeds_for_power(d, sd) for d in (1.0, 2.0, 5.0, 10.0, 20.0, 40.0)]
    assert ns == sorted(ns, reverse=True) and ns[0] > ns[-1]  # more seeds for smaller differences
    ps = [S.power(6, d, sd) for d in (1.0, 2.0, 5.0, 10.0, 20.0)]
    assert all(x < y for x, y in zip(ps, ps[1:]))  # power rises with delta at fixed n
    # the normal approximation 2 (z_.975 + z_.8)^2 (sd/delta)^2 is a little low; the exact answer is above it
    assert S.seeds_for_power(5.0, sd) >= math.ceil(2 * (1.959964 + 0.841621) ** 2 * (sd / 5.0) ** 2)
    assert S.seeds_for_power(5.0, 0.0) == 2 and S.seeds_for_power(0.0, 1.0) is None


# ---- a report of a synthetic sweep -----------------------------------------------------------------------

Z = np.array([-1.2, 0.3, 0.9, -0.5, 0.5])
Z = (Z - Z.mean()) / Z.std(ddof=1)          # mean 0, SD 1 exactly
Z2 = np.array([0.4, -1.1, 0.2, 1.3, -0.8])
Z2 = (Z2 - Z2.mean()) / Z2.std(ddof=1)
OFFSETS = np.array([-1.0, 0.3, 0.7])        # three sample sets around each run's value (mean 0)

# cell -> (train.seed values, per-seed values, sample-set spread)
CELLS = {
    "base": (list(range(5)), 50.0 + 1.0 * Z, 0.4),          # the best
    "far": (list(range(5)), 60.0 + 1.0 * Z2, 0.4),          # 10 FID worse, SD 1, the same seeds: paired
    "near": (list(range(10, 15)), 50.5 + 3.0 * Z2, 0.4),    # 0.5 worse, SD 3, other seeds: Welch
    "lone": ([0], np.array([70.0]), 0.4),                    # one run: untested
}


def synth_run(root: Path, cell: str, seed: int, fid: float, spread: float) -> Path:
    """A finished run directory as training leaves it, evaluated with eval.repeats=3."""
    d = root / f"{cell}-s{seed}"
    d.mkdir(parents=True)
    cfg = {"train": {"seed": seed, "batch_size": 16, "steps": 10}, "reg": {"variant": cell},
           "eval": {"extractor": "domain", "best_metric": "eval/FID", "repeats": 3},
           "run": {"name": d.name, "dir": str(d)}}
    (d / rundir.CONFIG).write_text(yaml.safe_dump(cfg))
    rundir.write_json(d / rundir.RUN_JSON, {"status": "completed", "world_size": 1, "batch_size": 16})
    for step in (5, 10):
        rundir.append_jsonl(d / rundir.METRICS, {"step": step, "kimg": step * 16 / 1000, "loss/D": 1.0, "loss/G": 0.7,
                                                 "throughput/img_per_s": 100.0})
    rundir.write_json(d / rundir.SUMMARY, {"status": "completed", "steps": 10, "best": {
        "metric": "eval/FID", "value": fid, "step": 10, "extractor": "domain"}})
    reps = (fid + spread * (1 + seed % 3) * OFFSETS).tolist()
    rundir.append_jsonl(d / rundir.EVALS, {"step": 5, "eval/FID": fid + 20.0, "extractor": "domain", "num_samples": 40})
    rundir.append_jsonl(d / rundir.EVALS, {"step": 10, "eval/FID": fid, "extractor": "domain", "num_samples": 40,
                                           "eval/FID_ci95": list(S.t_interval(reps)), "repeats": 3,
                                           "repeat_seeds": [0, 1, 2], "repeat_values": {"eval/FID": reps}})
    return d


@pytest.fixture(scope="module")
def synth_report(tmp_path_factory):
    root = tmp_path_factory.mktemp("study") / "runs"
    reps = {}
    for cell, (seeds, fids, spread) in CELLS.items():
        for seed, fid in zip(seeds, fids):
            synth_run(root, cell, seed, float(fid), spread)
            reps.setdefault(cell, []).append((float(fid) + spread * (1 + seed % 3) * OFFSETS).tolist())
    out = root.parent / "out"
    assert main(["report", str(root), f"out={out}"]) == 0
    with open(out / "ablation.csv", newline="") as f:
        abl = {a["reg.variant"]: a for a in csv.DictReader(f)}
    return (out / "report.md").read_text(), abl, reps


def _section(md: str, start: str) -> str:
    return md.split(start, 1)[1].split("\n\n", 2)[1]


def _p_text(p: float) -> str:
    return "< 1e-06" if p < 1e-6 else f"{p:.3g}"


def test_report_marks_by_welch_or_paired_t_with_holm(synth_report):
    md, abl, _ = synth_report
    base, far, near = (CELLS[c][1] for c in ("base", "far", "near"))
    p_far = float(sps.ttest_rel(far, base).pvalue)                   # same seeds: paired
    p_near = float(sps.ttest_ind(near, base, equal_var=False).pvalue)  # other seeds: Welch
    small, large = sorted([p_far, p_near])
    holm = {p_far: min(1, 2 * p_far) if p_far == small else max(2 * small, p_far),
            p_near: min(1, 2 * p_near) if p_near == small else max(2 * small, p_near)}
    assert abl["base"]["vs_best"] == seedgroups.BEST_MARK
    assert (abl["far"]["vs_best"], abl["far"]["test"]) == (seedgroups.DIFFERENT, seedgroups.PAIRED)
    assert (abl["near"]["vs_best"], abl["near"]["test"]) == (seedgroups.NOT_SEPARABLE, seedgroups.WELCH)
    assert abl["lone"]["vs_best"] == seedgroups.UNTESTED and abl["lone"]["p"] == ""
    for cell, p in (("far", p_far), ("near", p_near)):
        assert float(abl[cell]["p"]) == pytest.approx(p, rel=1e-9)
        assert float(abl[cell]["p_holm"]) == pytest.approx(holm[p], rel=1e-9)
    # the Markdown table prints the test, the raw p and Holm's p, and the marks
    matrix = md.split("## Ablation matrix", 1)[1].split("\n\n", 2)[1]
    rows = {line.split("|")[2].strip(): line for line in matrix.splitlines() if line.startswith("| variant=")}
    assert f"| {seedgroups.DIFFERENT} | paired | {_p_text(p_far)} | {_p_text(holm[p_far])} | 5 |" in rows["far"]
    assert f"| {seedgroups.NOT_SEPARABLE} | Welch | {_p_text(p_near)} | {_p_text(holm[p_near])} | 5 |" in rows["near"]
    assert f"| {seedgroups.UNTESTED} | — | — | — | 1 |" in rows["lone"] and "| best | — | — | — | 5 |" in rows["base"]
    assert "Holm" in md and "Welch" in md and "not separable from best" in md
    # intervals: Student-t over the 5 seeds
    lo, hi = sps.t.interval(0.95, 4, loc=near.mean(), scale=sps.sem(near))
    assert (float(abl["near"]["ci_lo"]), float(abl["near"]["ci_hi"])) == pytest.approx((lo, hi))
    assert abl["near"]["value_text"] == f"{near.mean():.4g} ± {(hi - lo) / 2:.2g} (n=5)"


def test_report_paired_differences(synth_report):
    md, abl, _ = synth_report
    d = CELLS["far"][1] - CELLS["base"][1]
    lo, hi = sps.t.interval(0.95, 4, loc=d.mean(), scale=sps.sem(d))
    assert int(abl["far"]["paired_n"]) == 5
    assert (float(abl["far"]["paired_diff"]), float(abl["far"]["paired_lo"]), float(abl["far"]["paired_hi"])) == \
        pytest.approx((d.mean(), lo, hi))
    assert abl["near"]["paired_n"] == "" and abl["lone"]["paired_n"] == ""  # no seed in common / only one
    table = _section(md, "Paired differences to the best cell (variant=base)")
    (row,) = [line for line in table.splitlines() if line.startswith("| variant=far")]
    assert f"| 5 | 5 | {d.mean():.4g} ± {(hi - lo) / 2:.2g} | [{lo:.4g}, {hi:.4g}] |" in row


def test_report_variance_split(synth_report):
    md, _, reps = synth_report
    table = _section(md, "Where the variance comes from")
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table.splitlines()
            if line.startswith("| variant=")}
    assert set(rows) == {"variant=base", "variant=far", "variant=near"}  # the lone run has no seed spread
    for cell in ("base", "far", "near"):
        x = np.asarray(reps[cell])          # runs x sample sets
        within = float(((x - x.mean(axis=1, keepdims=True)) ** 2).sum() / (x.shape[0] * (x.shape[1] - 1)))
        between = max(0.0, float(np.var(x.mean(axis=1), ddof=1)) - within / 3)
        share = between / (between + within / 3)
        assert rows[f"variant={cell}"] == ["5", "3", f"{math.sqrt(between):.4g}", f"{math.sqrt(within):.4g}",
                                           f"{100 * share:.0f}%"], cell


def test_report_power_table(synth_report):
    md, _, _ = synth_report
    vals = [CELLS[c][1] for c in ("base", "far", "near")]
    sd = math.sqrt(sum(((v - v.mean()) ** 2).sum() for v in vals) / sum(len(v) - 1 for v in vals))
    assert sd == pytest.approx(math.sqrt((4 + 4 + 36) / 12))
    text = md.split("Seeds needed:", 1)[1]
    assert f"SD of FID, {sd:.4g} (12 degrees of freedom)" in text
    table = text.split("\n\n", 2)[1]
    for delta in (5, 10, 20):
        n = 2
        while _power_by_scipy(n, float(delta), sd) < 0.8:
            n += 1
        assert f"| {delta} | {n} |" in table, (delta, n, table)



def test_marks_where_the_old_overlap_rule_claimed_a_difference():
    """Three seeds each, 50, 52, 54 against 54.5, 56.5, 58.5 (other seeds): the old percentile-bootstrap
    intervals do not overlap ([50, 54] and [54.5, 58.5]: "different"), but Welch's test does not reject
    (p = 0.051, one test so Holm changes nothing): "≈" now."""
    a, b = [50.0, 52.0, 54.0], [54.5, 56.5, 58.5]
    assert S.bootstrap_ci(a)[1] < S.bootstrap_ci(b)[0]
    rows = [{"run": name, "estimate": seedgroups.estimate(vals), "_values": vals,
             "_seed_values": {str(seed + off): v for seed, v in enumerate(vals)}}
            for name, vals, off in (("a", a, 0), ("b", b, 10))]
    seedgroups.mark_separability(rows, "eval/FID")
    p = float(sps.ttest_ind(b, a, equal_var=False).pvalue)
    assert p == pytest.approx(0.05107578485404692, rel=1e-9)
    assert (rows[0]["vs_best"], rows[1]["vs_best"], rows[1]["test"]) == (seedgroups.BEST_MARK, seedgroups.NOT_SEPARABLE, seedgroups.WELCH)
    assert rows[1]["p"] == pytest.approx(p, rel=1e-9) and rows[1]["p_holm"] == pytest.approx(p, rel=1e-9)
    assert rows[1]["paired_n"] is None  # no seed in common
    # higher is better (IS): the same values, b is now the best and a is tested against it
    seedgroups.mark_separability(rows, "eval/IS")
    assert (rows[0]["vs_best"], rows[1]["vs_best"]) == (seedgroups.NOT_SEPARABLE, seedgroups.BEST_MARK)
