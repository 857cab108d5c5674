"""Seeds, confidence intervals and separability in the report (torch-free): runs that differ only in
`train.seed` as one `SeedGroup` (mean ± Student-t 95% interval and n), each ablation cell tested against the
best (`mark_separability`), the variance split and the seeds-needed table (docs/architecture.md, "Report")."""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from bench import metrics_registry as registry
from bench.eval import stats
from bench.eval.stats import ALPHA, t_interval
from bench.report.collect import Run, finite
from bench.report.tables import fmt, short, short_keys

SEED_KEY = "train.seed"
NOT_GROUPED = ("run.", "hydra.", "hydra/")  # config keys that never make two runs different configurations
NOT_SEPARABLE = "≈"
DIFFERENT = "≠"
UNTESTED = "n=1, untested"
BEST_MARK = "best"
PAIRED, WELCH = "paired", "Welch"
SEPARABILITY_NOTE = (
    f"`{BEST_MARK}`: the cell with the best mean. `{NOT_SEPARABLE}`: not separable from best: the two-sided t-test "
    f"of its mean against the best cell's does not reject at α = {ALPHA:g} after Holm's correction over the cells "
    f"tested (column `p (Holm)` > {ALPHA:g}); `{DIFFERENT}`: it does (`p (Holm)` <= {ALPHA:g}). Test: `{PAIRED}` "
    f"(paired t-test of the per-seed differences) where the cell's train.seed values are exactly the best cell's, "
    f"else `{WELCH}` (Welch's unequal-variance t-test); `p`: its raw p-value. `{UNTESTED}`: the cell (or the best) "
    "has one run, which has no seed-to-seed spread to test against; its interval, if any, is over its evaluation's "
    "sample sets only. Intervals (±): Student-t 95% over the seeds of a cell (n > 1), else over its evaluation's "
    "repeated sample sets (eval.repeats > 1); a cell with neither is a point. The best cell is chosen from the "
    "same runs, so when every cell is equal `≠` comes up somewhat more often than α: confirm a difference that "
    "matters with fresh seeds.")
POWER_DELTAS = {"eval/FID": (5.0, 10.0, 20.0), "eval/intra_FID": (5.0, 10.0, 20.0), "eval/IS": (5.0, 10.0, 20.0),
                "eval/KID": (0.005, 0.01, 0.02)}
POWER_DELTAS_UNIT = (0.05, 0.1, 0.2)   # the other registry metrics: scores in [0, 1] (density a little above)
INTERNAL = ("estimate", "_values", "_seed_values", "_repeats")  # row keys that ablation.csv leaves out


@dataclass
class Estimate:
    """A metric of one configuration: the mean over n runs (seeds), with its 95% interval when there is one."""
    mean: float
    lo: float | None = None
    hi: float | None = None
    n: int = 1
    repeats: int | None = None   # n = 1: the sample sets behind the run's own interval
    values: tuple = ()           # n > 1: the per-run values the mean and interval are over

    @property
    def interval(self) -> tuple[float, float]:
        return (self.lo, self.hi) if self.lo is not None else (self.mean, self.mean)

    def text(self) -> str:
        """'53.9 ± 8.1 (n=3)'; one run with repeats: '53.9 ± 2 (n=1, 3 repeats)'; else the value."""
        if self.lo is None:
            return fmt(self.mean)
        half = max(self.mean - self.lo, self.hi - self.mean)
        extra = f", {self.repeats} repeats" if self.n == 1 and self.repeats else ""
        return f"{fmt(self.mean)} ± {fmt(half, 2)} (n={self.n}{extra})"


def estimate(values: list, repeat_ci=None, repeats=None, repeat_values=None) -> Estimate | None:
    """The Estimate of a configuration's per-run values (None: no finite value). n > 1: the mean and the
    Student-t interval over the values; n = 1: the value with the t-interval over `repeat_values` (the
    record's per-sample-set values, eval.repeats > 1), else `repeat_ci` ([lo, hi] as recorded)."""
    vals = [float(v) for v in values if finite(v)]
    if not vals:
        return None
    if len(vals) > 1:
        lo, hi = t_interval(vals)
        return Estimate(math.fsum(vals) / len(vals), lo, hi, len(vals), values=tuple(vals))
    reps = [float(v) for v in repeat_values or () if finite(v)]
    if len(reps) > 1:
        half = (lambda lo, hi: (hi - lo) / 2.0)(*t_interval(reps))
        return Estimate(vals[0], vals[0] - half, vals[0] + half, 1, len(reps))
    if isinstance(repeat_ci, (list, tuple)) and len(repeat_ci) == 2 and all(finite(v) for v in repeat_ci):
        return Estimate(vals[0], float(repeat_ci[0]), float(repeat_ci[1]), 1, repeats)
    return Estimate(vals[0])


@dataclass
class SeedGroup:
    label: str
    runs: list = field(default_factory=list)   # [Run]

    @property
    def seeds(self) -> list:
        return [r.config.get(SEED_KEY) for r in self.runs]


def config_key(r: Run) -> tuple:
    """What makes a configuration: config.yaml without train.seed and run.*; a run without a readable config
    is its own."""
    if not r.config:
        return ("dir", str(r.path))
    return tuple(sorted((k, short(v)) for k, v in r.config.items() if k != SEED_KEY and not k.startswith(NOT_GROUPED)))


def group_runs(runs: list[Run], keys: list[str]) -> list[SeedGroup]:
    """The runs' configurations, in the order of their first run. A group of one run is labelled as the run;
    a larger one by the swept keys other than train.seed (its first run's name when nothing else was swept)."""
    by_key: dict = {}
    for r in runs:
        by_key.setdefault(config_key(r), []).append(r)
    shorts = short_keys(keys)
    groups = []
    for members in by_key.values():
        first = members[0]
        if len(members) == 1:
            label = first.label
        else:
            label = " ".join(f"{shorts[k]}={first.swept[k]}" for k in keys
                             if k != SEED_KEY and first.swept.get(k, "") != "") or f"{first.name} (seeds)"
        groups.append(SeedGroup(label, members))
    counts = Counter(g.label for g in groups)
    for i, g in enumerate(groups):
        if counts[g.label] > 1:
            g.label = f"{g.label} #{i + 1}"
    return groups


def record_of(evals: list[dict], metric: str, step, value, extractor=None) -> dict | None:
    """The evaluation record that holds `value` of `metric` at `step` (and `extractor`), or None."""
    for e in evals:
        if e.get("step") == step and e.get(metric) == value and (extractor is None or e.get("extractor") == extractor):
            return e
    return None


def repeat_values(record: dict | None, metric: str) -> list | None:
    """The record's per-sample-set values of `metric` (eval.repeats > 1: `repeat_values`), or None."""
    vals = ((record or {}).get("repeat_values") or {}).get(metric)
    return [float(v) for v in vals] if isinstance(vals, list) and len(vals) > 1 and all(finite(v) for v in vals) \
        else None


# ---- the ablation matrix ------------------------------------------------------------------------------

def grouped_ablation(groups: list[SeedGroup], abl: list[dict], keys: list[str], metric: str) -> tuple[list, list]:
    """(rows, keys without train.seed): one ablation row per configuration. value: the mean over its seeds,
    value_text: Estimate.text(), ci_lo / ci_hi, n, seeds, and mark_separability's columns (vs_best, test, p,
    p_holm, paired_*). Internal (not in ablation.csv): _values, _seed_values {seed: value} (seeds that occur
    once in the cell), _repeats (each run's per-sample-set values, None where a run has none)."""
    by_run = {a["run"]: a for a in abl}
    gkeys = [k for k in keys if k != SEED_KEY]
    rows = []
    for g in groups:
        pairs = [(r, by_run[r.label]) for r in g.runs if r.label in by_run]
        if not pairs:
            continue
        members = [a for _, a in pairs]
        first = members[0]
        recs = [record_of(r.evals, metric, _best_step(r, metric), a["value"]) for r, a in pairs]
        reps = [repeat_values(rec, metric) for rec in recs]
        ci, n_reps = (None, None)
        if len(members) == 1 and recs[0] is not None and recs[0].get(f"{metric}{registry.CI_SUFFIX}") is not None:
            ci, n_reps = recs[0][f"{metric}{registry.CI_SUFFIX}"], recs[0].get("repeats")
        est = estimate([a["value"] for a in members], ci, n_reps, reps[0] if len(members) == 1 else None)
        statuses = Counter(a["status"] for a in members)
        collapses = [a["collapse_step"] for a in members if a["collapse_step"] is not None]
        ips = [a["img_per_s"] for a in members if finite(a["img_per_s"])]
        seeds = [r.config.get(SEED_KEY) for r, _ in pairs]
        once = {s for s, c in Counter(short(x) for x in seeds).items() if c == 1}
        row = {"run": g.label, **{k: first.get(k) for k in gkeys},
               "status": first["status"] if len(statuses) == 1 else ", ".join(f"{n} {s}" for s, n in statuses.items()),
               "metric": first["metric"], "value": est.mean if est else None,
               "value_text": est.text() if est else fmt(None), "ci_lo": est.lo if est else None,
               "ci_hi": est.hi if est else None, "n": len(members), "seeds": ",".join(short(s) for s in g.seeds),
               "collapse_step": min(collapses) if collapses else None,
               "collapsed": f"{len(collapses)}/{len(members)}" if len(members) > 1 else None,
               "img_per_s": math.fsum(ips) / len(ips) if ips else None, "estimate": est,
               "_values": [float(a["value"]) for a in members if finite(a["value"])],
               "_seed_values": {short(s): float(a["value"]) for s, (_, a) in zip(seeds, pairs)
                                if short(s) in once and s is not None and finite(a["value"])},
               "_repeats": reps}
        rows.append(row)
    mark_separability(rows, metric)
    return rows, gkeys


def _best_step(r: Run, metric: str):
    from bench.report.tables import best_eval

    b = best_eval(r)
    return b.get("step") if b.get("metric") == metric else None


def _paired(row: dict, best: dict) -> tuple[list, bool]:
    """([(seed, row's value - best's value)] over the seeds both cells hold once, in the row's order; whether
    the two cells' seeds are exactly the same set)."""
    mine, theirs = row["_seed_values"], best["_seed_values"]
    diffs = [(s, v - theirs[s]) for s, v in mine.items() if s in theirs]
    whole = len(diffs) == len(row["_values"]) == len(best["_values"]) and len(diffs) >= 2
    return diffs, whole


def mark_separability(rows: list[dict], metric: str) -> None:
    """Each row's vs_best: BEST_MARK for the best mean (by the metric's direction; loss/D: no marks at all),
    DIFFERENT / NOT_SEPARABLE by the t-test against the best cell with Holm's correction over the rows tested,
    UNTESTED where the row or the best has n < 2. Also test (PAIRED or WELCH), p (raw), p_holm, and the paired
    differences to the best cell over the seeds they share (>= 2): paired_n, paired_diff (row - best),
    paired_lo / paired_hi (its Student-t 95% interval)."""
    for r in rows:
        r.update(vs_best="", test=None, p=None, p_holm=None, paired_n=None, paired_diff=None, paired_lo=None,
                 paired_hi=None)
    have = [r for r in rows if r.get("estimate") is not None]
    if len(have) < 2 or metric not in registry.BY_NAME or registry.BY_NAME[metric].lower_is_better is None:
        return
    lower = registry.lower_is_better(metric)
    best = min(have, key=lambda r: r["estimate"].mean if lower else -r["estimate"].mean)
    best["vs_best"] = BEST_MARK
    tested = []
    for r in have:
        if r is best:
            continue
        diffs, whole = _paired(r, best)
        if len(diffs) >= 2:
            d = [x for _, x in diffs]
            lo, hi = t_interval(d)
            r.update(paired_n=len(d), paired_diff=math.fsum(d) / len(d), paired_lo=lo, paired_hi=hi)
        if len(r["_values"]) < 2 or len(best["_values"]) < 2:
            r["vs_best"] = UNTESTED
            continue
        if whole:
            r["test"], r["p"] = PAIRED, stats.paired_test([x for _, x in diffs])[2]
        else:
            r["test"], r["p"] = WELCH, stats.welch_test(r["_values"], best["_values"])[2]
        tested.append(r)
    for r, adj in zip(tested, stats.holm([r["p"] for r in tested])):
        r["p_holm"] = adj
        r["vs_best"] = DIFFERENT if adj <= ALPHA else NOT_SEPARABLE


def paired_rows(rows: list[dict]) -> list[dict]:
    """The rows with paired differences to the best cell (mark_separability's paired_*)."""
    return [r for r in rows if r.get("paired_n")]


def variance_rows(rows: list[dict]) -> list[dict]:
    """Where a cell's variance comes from, for each row with n >= 2 runs that all have repeated sample sets
    (eval.repeats >= 2): {run, n, repeats, seed_sd, set_sd, seed_share}. seed_sd = sqrt(between) and set_sd =
    sqrt(within) of stats.variance_split (the SD of one run's value from seed to seed, of one sample set's
    value around its run's); seed_share = between / (between + within / R): the part of a run's headline value's
    variance (R sample sets averaged) that comes from the seed."""
    out = []
    for r in rows:
        reps = r.get("_repeats") or []
        if len(reps) < 2 or any(v is None for v in reps):
            continue
        v = stats.variance_split(reps)
        total = v["between"] + v["within"] / v["repeats"]
        out.append({"run": r["run"], "n": len(reps), "repeats": v["repeats"], "seed_sd": math.sqrt(v["between"]),
                    "set_sd": math.sqrt(v["within"]), "seed_share": v["between"] / total if total > 0 else None})
    return out


def pooled_sd(rows: list[dict]) -> tuple[float | None, int]:
    """(pooled SD of the per-run values within cells, its degrees of freedom): sqrt(sum (n_i - 1) s_i^2 /
    sum (n_i - 1)) over the rows with n_i >= 2; (None, 0) when there is none."""
    ss, df = 0.0, 0
    for r in rows:
        vals = r.get("_values") or []
        if len(vals) >= 2:
            m = math.fsum(vals) / len(vals)
            ss += math.fsum((v - m) ** 2 for v in vals)
            df += len(vals) - 1
    return (math.sqrt(ss / df), df) if df else (None, 0)


def power_deltas(metric: str) -> tuple:
    return POWER_DELTAS.get(metric, POWER_DELTAS_UNIT)


def power_rows(rows: list[dict], metric: str) -> tuple[float | None, int, list]:
    """(pooled SD, its df, [(Δ, seeds per cell)]): for each Δ of power_deltas(metric), the seeds per cell at
    which the two-sided two-sample t-test (α = ALPHA) detects a difference of Δ with power POWER, the SD being
    the pooled SD measured in this study (stats.seeds_for_power: the exact noncentral t). Nothing for a metric
    that is not a quality score (loss/D)."""
    sd, df = pooled_sd(rows)
    if sd is None or metric not in registry.BY_NAME or registry.BY_NAME[metric].lower_is_better is None:
        return sd, df, []
    return sd, df, [(d, stats.seeds_for_power(d, sd)) for d in power_deltas(metric)]


def cell_text(a: dict) -> str:
    """An ablation cell's metric: 'value_text' with its mark ('53.9 ± 8.1 (n=3) ≈')."""
    text = a.get("value_text") or fmt(a.get("value"))
    return f"{text} {a['vs_best']}".rstrip() if a.get("vs_best") else text


def csv_rows(rows: list[dict]) -> list[dict]:
    """ablation.csv's rows: without the Estimate objects and the per-run values (INTERNAL)."""
    return [{k: v for k, v in r.items() if k not in INTERNAL} for r in rows]


# ---- the other tables -------------------------------------------------------------------------------

def group_best_rows(groups: list[SeedGroup], best_rows: list[list], records: list[dict], metrics) -> list[list]:
    """best_eval_rows ([run, extractor, by, samples, step, evals, *metrics] per run) per configuration: the
    metric cells become Estimate.text() over the group's runs (n = 1: with the record's repeat interval); step
    and evals list each run's."""
    out = []
    for g in groups:
        labels = [r.label for r in g.runs]
        for ext in dict.fromkeys(row[1] for row in best_rows if row[0] in labels):
            rows = [row for row in best_rows if row[0] in labels and row[1] == ext]
            cells = []
            for i, m in enumerate(metrics):
                vals = [row[6 + i] for row in rows]
                ci, reps = (None, None)
                if len(rows) == 1:
                    mine = [e for e in records if e["run"] == rows[0][0] and e["extractor"] == ext]
                    rec = next((e for e in mine if e["step"] == rows[0][4] and e.get(m) == vals[0]), None)
                    ci = [rec.get(f"{m}_ci_lo"), rec.get(f"{m}_ci_hi")] if rec else None
                    reps = rec.get("repeats") if rec else None
                est = estimate(vals, ci, reps)
                cells.append(est.text() if est else None)
            joined = (lambda j: rows[0][j] if len(rows) == 1 else ",".join(fmt(row[j]) for row in rows))
            out.append([g.label, ext, rows[0][2], rows[0][3], joined(4), joined(5), *cells])
    return out


def seed_table(groups: list[SeedGroup], abl_rows: list[dict]) -> list[list]:
    """report.md's "Seeds" table: [configuration, n, seeds, metric] for each group of more than one run."""
    by_label = {a["run"]: a for a in abl_rows}
    return [[g.label, len(g.runs), ", ".join(short(s) for s in g.seeds),
             (by_label.get(g.label) or {}).get("value_text")] for g in groups if len(g.runs) > 1]


def group_truncation(groups: list[SeedGroup], trunc: list[dict], columns) -> list[dict]:
    """truncation_records per configuration, extractor and psi: each column a dict {mean, lo, hi, text} over
    the group's runs (n = 1: the CSV's own <column>_ci_lo / _ci_hi from eval.repeats)."""
    out = []
    for g in groups:
        labels = {r.label for r in g.runs}
        points: dict = {}
        for t in trunc:
            if t["run"] in labels:
                points.setdefault((t["extractor"], t["psi"]), []).append(t)
        for (ext, psi), pts in points.items():
            row = {"run": g.label, "members": [p["run"] for p in pts], "extractor": ext, "psi": psi, "n": len(pts),
                   "num_samples": pts[0]["num_samples"], "step": ",".join(fmt(p["step"]) for p in pts)}
            for c in columns:
                one = len(pts) == 1
                est = estimate([p.get(c) for p in pts], [pts[0].get(f"{c}_ci_lo"), pts[0].get(f"{c}_ci_hi")]
                               if one else None, pts[0].get("repeats") if one else None)
                row[c] = est
            out.append(row)
    return out


def step_series(group: SeedGroup, records: list[dict], key: str, ext: str) -> list[tuple]:
    """[(step, Estimate)] of a group's untruncated evaluations of `key` with extractor `ext`, per step over
    its runs (steps where fewer than two runs have a value are left out when the group has several)."""
    labels = {r.label for r in group.runs}
    per_step: dict = {}
    for e in records:
        if e["run"] in labels and e["extractor"] == ext and e.get("truncation") is None and finite(e.get(key)):
            per_step.setdefault(e["step"], []).append(e)
    out = []
    for step in sorted(per_step):
        recs = per_step[step]
        if len(group.runs) > 1 and len({e["run"] for e in recs}) < 2:
            continue
        ci = [recs[0].get(f"{key}_ci_lo"), recs[0].get(f"{key}_ci_hi")] if len(recs) == 1 else None
        out.append((step, estimate([e[key] for e in recs], ci, recs[0].get("repeats"))))
    return out


def shared_colors(labels: list, points: list[dict], palette) -> tuple[dict, set]:
    """({run or configuration label: colour}, labels of runs inside a configuration of several seeds): the
    runs of one configuration share its colour; `palette(n)` gives n colours."""
    owner = {m: t["run"] for t in points if t["n"] > 1 for m in t["members"]}
    keys = list(dict.fromkeys(owner.get(label, label) for label in labels))
    by_key = dict(zip(keys, palette(len(keys))))
    return {**by_key, **{label: by_key[owner.get(label, label)] for label in labels}}, set(owner)
