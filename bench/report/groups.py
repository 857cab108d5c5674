"""Seeds and confidence intervals in the report (torch-free).

Runs whose resolved config.yaml is the same apart from `train.seed` (and the run.* keys: name, folder) are
one configuration trained from several seeds: a `SeedGroup`. Every table that shows a run's metric shows
a group's as mean ± the half-width of its 95% interval and n (its number of runs), the interval being the
percentile bootstrap over the per-seed values (`bench.eval.stats.bootstrap_ci`, the same function as
eval.repeats' interval over sample sets). One run (n = 1) shows its value, with the interval over its
evaluation's repeated sample sets when the record has one (eval.repeats > 1), else the plain value.

In the ablation matrix, a cell whose interval overlaps the best cell's interval is "not separable from
best" (NOT_SEPARABLE); a point (no interval) counts as the interval [value, value].
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from bench import metrics_registry as registry
from bench.eval.stats import bootstrap_ci
from bench.report.collect import Run, finite
from bench.report.tables import fmt, short, short_keys

SEED_KEY = "train.seed"
NOT_GROUPED = ("run.", "hydra.", "hydra/")  # config keys that never make two runs different configurations
NOT_SEPARABLE = "≈"
BEST_MARK = "best"
SEPARABILITY_NOTE = (f"`{NOT_SEPARABLE}`: not separable from best (its 95% interval overlaps the best cell's); "
                     f"`{BEST_MARK}`: the best cell by mean. Intervals: percentile bootstrap (2000 resamples) over "
                     "the seeds of a cell (n > 1), else over its evaluation's repeated sample sets "
                     "(eval.repeats > 1); a cell with neither is a point.")


@dataclass
class Estimate:
    """A metric of one configuration: the mean over n runs (seeds), with its 95% interval when there is one."""
    mean: float
    lo: float | None = None
    hi: float | None = None
    n: int = 1
    repeats: int | None = None   # n = 1: the sample sets behind the run's own interval

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


def estimate(values: list, repeat_ci=None, repeats=None) -> Estimate | None:
    """The Estimate of a configuration's per-run values (None: no finite value). n > 1: the mean and the
    bootstrap interval over the values; n = 1: the value and `repeat_ci` ([lo, hi] of its sample sets)."""
    vals = [float(v) for v in values if finite(v)]
    if not vals:
        return None
    if len(vals) > 1:
        lo, hi = bootstrap_ci(vals)
        return Estimate(math.fsum(vals) / len(vals), lo, hi, len(vals))
    if isinstance(repeat_ci, (list, tuple)) and len(repeat_ci) == 2 and all(finite(v) for v in repeat_ci):
        return Estimate(vals[0], float(repeat_ci[0]), float(repeat_ci[1]), 1, repeats)
    return Estimate(vals[0])


def overlaps(a: Estimate, b: Estimate) -> bool:
    (alo, ahi), (blo, bhi) = a.interval, b.interval
    return alo <= bhi and blo <= ahi


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


def record_ci(evals: list[dict], metric: str, step, value, extractor=None) -> tuple[list | None, int | None]:
    """([lo, hi], repeats) of the evaluation record that holds `value` of `metric` at `step`, when it was
    made with eval.repeats > 1; (None, None) otherwise."""
    for e in evals:
        if e.get("step") == step and e.get(metric) == value and (extractor is None or e.get("extractor") == extractor):
            ci = e.get(f"{metric}{registry.CI_SUFFIX}")
            if ci is not None:
                return ci, e.get("repeats")
    return None, None


# ---- the ablation matrix ------------------------------------------------------------------------------

def grouped_ablation(groups: list[SeedGroup], abl: list[dict], keys: list[str], metric: str) -> tuple[list, list]:
    """(rows, keys without train.seed): one ablation row per configuration. value: the mean over its seeds,
    value_text: Estimate.text(), ci_lo / ci_hi, n, seeds, vs_best: BEST_MARK, NOT_SEPARABLE or ''."""
    by_run = {a["run"]: a for a in abl}
    gkeys = [k for k in keys if k != SEED_KEY]
    rows = []
    for g in groups:
        members = [by_run[r.label] for r in g.runs if r.label in by_run]
        if not members:
            continue
        first = members[0]
        ci, reps = (None, None)
        if len(members) == 1:
            best = next((r for r in g.runs if r.label == first["run"]), None)
            ci, reps = record_ci(best.evals, metric, _best_step(best, metric), first["value"]) if best else (None, None)
        est = estimate([a["value"] for a in members], ci, reps)
        statuses = Counter(a["status"] for a in members)
        collapses = [a["collapse_step"] for a in members if a["collapse_step"] is not None]
        ips = [a["img_per_s"] for a in members if finite(a["img_per_s"])]
        row = {"run": g.label, **{k: first.get(k) for k in gkeys},
               "status": first["status"] if len(statuses) == 1 else ", ".join(f"{n} {s}" for s, n in statuses.items()),
               "metric": first["metric"], "value": est.mean if est else None,
               "value_text": est.text() if est else fmt(None), "ci_lo": est.lo if est else None,
               "ci_hi": est.hi if est else None, "n": len(members), "seeds": ",".join(short(s) for s in g.seeds),
               "collapse_step": min(collapses) if collapses else None,
               "collapsed": f"{len(collapses)}/{len(members)}" if len(members) > 1 else None,
               "img_per_s": math.fsum(ips) / len(ips) if ips else None, "estimate": est}
        rows.append(row)
    mark_separability(rows, metric)
    return rows, gkeys


def _best_step(r: Run, metric: str):
    from bench.report.tables import best_eval

    b = best_eval(r)
    return b.get("step") if b.get("metric") == metric else None


def mark_separability(rows: list[dict], metric: str) -> None:
    """vs_best of each row: BEST_MARK for the best mean (by the metric's direction; loss/D: none), NOT_SEPARABLE
    where the interval overlaps the best's, '' where it is clearly apart."""
    have = [r for r in rows if r.get("estimate") is not None]
    for r in rows:
        r["vs_best"] = ""
    if len(have) < 2 or metric not in registry.BY_NAME or registry.BY_NAME[metric].lower_is_better is None:
        return
    lower = registry.lower_is_better(metric)
    best = min(have, key=lambda r: r["estimate"].mean if lower else -r["estimate"].mean)
    for r in have:
        r["vs_best"] = BEST_MARK if r is best else (NOT_SEPARABLE if overlaps(r["estimate"], best["estimate"]) else "")


def cell_text(a: dict) -> str:
    """An ablation cell's metric: 'value_text' with its mark ('53.9 ± 8.1 (n=3) ≈')."""
    text = a.get("value_text") or fmt(a.get("value"))
    return f"{text} {a['vs_best']}".rstrip() if a.get("vs_best") else text


def csv_rows(rows: list[dict]) -> list[dict]:
    """ablation.csv's rows: without the Estimate objects."""
    return [{k: v for k, v in r.items() if k != "estimate"} for r in rows]


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


# ---- figures ------------------------------------------------------------------------------------------

def draw_series(ax, series: list[tuple], color, group: SeedGroup) -> None:
    """On matplotlib axes: a group of several runs as its mean line with a 95% band; one run's repeat
    intervals as error bars (nothing else: its line is drawn with the other runs)."""
    pts = [(x, e) for x, e in series if e is not None and e.lo is not None]
    if len(group.runs) > 1 and series:
        xs = [x for x, _ in series]
        ax.plot(xs, [e.mean for _, e in series], "s-", color=color, ms=4, lw=2.0,
                label=f"{group.label} (mean, 95% band, n={len(group.runs)})")
        if pts:
            ax.fill_between([x for x, _ in pts], [e.lo for _, e in pts], [e.hi for _, e in pts], color=color,
                            alpha=0.2, lw=0)
    elif pts:
        ax.errorbar([x for x, _ in pts], [e.mean for _, e in pts],
                    yerr=[[e.mean - e.lo for _, e in pts], [e.hi - e.mean for _, e in pts]], fmt="none",
                    ecolor=color, capsize=3, lw=1.0)


def draw_truncation(ax, points: list[dict], xk: str, yk: str, colors: dict) -> None:
    """On matplotlib axes: error bars in x and y at each group_truncation point that has an interval; a
    configuration of several seeds also gets its mean curve (diamonds, dashed)."""
    by_group: dict = {}
    for t in points:
        if t.get(xk) is not None and t.get(yk) is not None:
            by_group.setdefault(t["run"], []).append(t)
    for label, pts in by_group.items():
        pts.sort(key=lambda t: math.inf if t["psi"] is None else t["psi"])
        color = colors.get(label, "black")
        if max(t["n"] for t in pts) > 1:
            ax.plot([t[xk].mean for t in pts], [t[yk].mean for t in pts], "D--", color=color, ms=5, lw=1.2,
                    label=f"{label} (mean ± 95% CI, n={max(t['n'] for t in pts)})")
            for t in pts:
                ax.annotate("off" if t["psi"] is None else f"{t['psi']:g}", (t[xk].mean, t[yk].mean),
                            textcoords="offset points", xytext=(5, 4), fontsize=7, color=color)
        bars = [t for t in pts if t[xk].lo is not None or t[yk].lo is not None]
        if bars:
            ax.errorbar([t[xk].mean for t in bars], [t[yk].mean for t in bars],
                        xerr=[[t[xk].mean - t[xk].interval[0] for t in bars], [t[xk].interval[1] - t[xk].mean
                                                                              for t in bars]],
                        yerr=[[t[yk].mean - t[yk].interval[0] for t in bars], [t[yk].interval[1] - t[yk].mean
                                                                              for t in bars]],
                        fmt="none", ecolor=color, capsize=3, lw=1.0)


def shared_colors(labels: list, points: list[dict], palette) -> tuple[dict, set]:
    """({run or configuration label: colour}, labels of runs inside a configuration of several seeds): the
    runs of one configuration share its colour; `palette(n)` gives n colours."""
    owner = {m: t["run"] for t in points if t["n"] > 1 for m in t["members"]}
    keys = list(dict.fromkeys(owner.get(label, label) for label in labels))
    by_key = dict(zip(keys, palette(len(keys))))
    return {**by_key, **{label: by_key[owner.get(label, label)] for label in labels}}, set(owner)
