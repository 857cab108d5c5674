"""`bench report DIR [out=DIR]`: the entry point (`main`), the order of the work (`build_report`) and
report.md. What the outputs are: bench/report/__init__.py; where they come from: docs/architecture.md."""
from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bench import metrics_registry as registry
from bench import rundir
from bench.eval import stats
from bench.report import groups as seedgroups
from bench.report import per_class, plots
from bench.report.collect import MAX_DEPTH, REPORT_DIR, STALLED_AFTER_S, TRUNC_COLUMNS, Run, discover, finite
from bench.report.tables import (LEDGER, REPORT_METRICS, ForeignFile, Ledger, Writer, ablation_rows, assign_labels, best_eval_rows,
                                 eval_records, fmt, md_table, natural, psi_order, run_row, scaling_table,
                                 status_cell, swept_keys, text_table, truncation_records)

OUR_FILES = re.compile(r"^(report\.md|(runs|scaling|evals|truncation|ablation|intra_fid)\.csv|"
                       r"(throughput|losses|sigma(-\d+)?|evals|truncation|ablation|ada_p|diversity)\.png)$")
RUN_TABLE = [("run", "run"), ("status", "status"), ("steps", "steps"), ("eff. batch", "effective_batch"),
             ("world", "world_size"), ("img/s", "img_per_s"), ("ms/step", "step_ms"), ("peak GB", "peak_mem_gb"),
             ("loss/D", "loss_D"), ("loss/G", "loss_G"), ("best", "best_metric"), ("value", "best_value"),
             ("@step", "best_step"), ("collapse", "collapse_step")]


class ReportError(ValueError):
    """Bad input: one line for the user, exit code 2."""


@dataclass
class ReportData:
    """Everything report.md shows."""
    root: Path
    runs: list[Run]
    rows: list[dict]               # runs.csv
    keys: list[str]                # the swept keys
    key_source: str                # where they came from
    scaling: list[dict]            # scaling.csv
    records: list[dict]            # evals.csv
    trunc: list[dict]              # truncation.csv
    abl: list[dict]                # ablation.csv: one row per configuration (its seeds grouped)
    written: set[str]              # names of the files written
    sigma_files: list[str]         # sigma.png, sigma-2.png, ...
    skipped: dict[str, str]        # plot -> why it was not written
    groups: list = None            # [groups.SeedGroup]: runs that differ only in train.seed
    abl_keys: list = None          # the ablation's keys (the swept keys without train.seed)
    gtrunc: list = None            # truncation points per configuration (groups.group_truncation)
    abl_metric: str = None         # the ablation's headline metric (registry name, or loss/D)


# ---- the work ---------------------------------------------------------------------------------------

class _Plots:
    """Runs the plot functions: a plot that fails on odd data must not cost the rest of the report."""

    def __init__(self):
        self.skipped: dict[str, str] = {}  # plot -> why it was not written

    def __call__(self, name: str, fn, *a) -> list[str]:
        """One plot function: its file names, or [] with the reason recorded in `skipped`."""
        try:
            files, why = fn(*a)
        except ForeignFile:
            raise
        except Exception as exc:
            print(f"warning: {name} not written: {exc.__class__.__name__}: {exc}", file=sys.stderr)
            self.skipped[name] = f"failed: {exc.__class__.__name__}: {exc}"
            return []
        if not files:
            self.skipped[name] = why
        return [files] if isinstance(files, str) else list(files or [])


def build_report(root: Path, out: Path) -> dict:
    """Read every run under root, write the tables and plots to out; returns what was written."""
    runs = discover(root, out)
    if not runs:
        raise ReportError(f"no run directories under {root} (expected run.json, metrics.jsonl or config.yaml in "
                          f"it or up to {MAX_DEPTH} levels below, or a sweep's sweep.json / index/)")
    keys, key_source = swept_keys(runs)
    assign_labels(runs, keys)
    rows = [run_row(r) for r in runs]
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ReportError(f"cannot create the output folder {out}: {exc.strerror or exc}") from None
    ledger = Ledger(out)
    _refuse_foreign(out, ledger)
    w = Writer(out, ledger)
    plot = _Plots()

    w.csv("runs.csv", rows)
    pts = [r for r in rows if finite(r["img_per_s"]) and finite(r["effective_batch"])]
    scaling = scaling_table(pts) if pts else []
    if scaling:
        w.csv("scaling.csv", scaling)
    plot("throughput.png", plots.plot_throughput, scaling, w)
    plot("losses.png", plots.plot_losses, runs, w)
    sigma_files = plot("sigma.png", plots.plot_sigma, runs, w)
    records = eval_records(runs)
    if records:
        w.csv("evals.csv", records)
    intra_rows = per_class.records(runs)
    if intra_rows:
        w.csv(per_class.INTRA_CSV, intra_rows)
    groups = seedgroups.group_runs(runs, keys)
    if plots.ada_series(runs):  # only reports with an ADA run have (or miss) this figure
        plot(plots.ADA_FILE, plots.plot_ada_p, runs, w, groups)
    if plots.diversity_runs(runs):  # only reports with a diversity-measuring run have (or miss) this figure
        plot(plots.DIVERSITY_FILE, plots.plot_diversity, runs, w)
    plot("evals.png", plots.plot_evals, runs, records, w, groups)
    trunc = truncation_records(runs)
    if trunc:
        w.csv("truncation.csv", trunc)
    gtrunc = seedgroups.group_truncation(groups, trunc, TRUNC_COLUMNS)
    plot("truncation.png", plots.plot_truncation, trunc, w, gtrunc)
    abl, metric = ablation_rows(runs, rows, keys)
    abl, abl_keys = seedgroups.grouped_ablation(groups, abl, keys, metric)
    if len(abl) >= 2:
        w.csv("ablation.csv", seedgroups.csv_rows(abl))
    plot("ablation.png", plots.plot_ablation, abl, abl_keys, metric, w)
    written_names = {p.name for p in w.written} | {"report.md"}
    w.text("report.md", render_markdown(ReportData(root, runs, rows, keys, key_source, scaling, records, trunc,
                                                   abl, written_names, sigma_files, plot.skipped, groups, abl_keys,
                                                   gtrunc, metric)))
    ledger.finish({p.name for p in w.written})
    return {"runs": runs, "rows": rows, "written": w.written, "skipped": plot.skipped, "keys": keys}


def _refuse_foreign(out: Path, ledger: Ledger) -> None:
    """ReportError, before anything is written, if a file named like one of our outputs is in `out` and
    the ledger does not say we wrote it: replacing it would destroy the user's file."""
    for p in sorted(out.iterdir()):
        if OUR_FILES.match(p.name) and p.name not in ledger.previous:
            raise ReportError(f"{p} was not written by `bench report` (not listed in {out / LEDGER}); "
                              f"nothing was changed: move it away or choose another out=")


# ---- report.md ---------------------------------------------------------------------------------------

def render_markdown(d: ReportData) -> str:
    sections = (_md_head, _md_runs, _md_throughput, _md_losses_sigma, _md_diversity, _md_ada, _md_evals, _md_intra,
                _md_truncation, _md_ablation, _md_tail)
    return "\n".join(line for section in sections for line in section(d))


def _md_head(d: ReportData) -> list[str]:
    runs = d.runs
    n_fin = sum(r.finished for r in runs)
    L = [f"# gan-bench report: `{d.root.resolve()}`", "",
         f"{len(runs)} run(s): {n_fin} finished, {len(runs) - n_fin} not "
         f"(generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `bench report`; all numbers read from the run "
         "directories).", ""]
    if d.keys:
        L += [f"Swept ({d.key_source}): " + ", ".join(f"`{k}`" for k in d.keys), ""]
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        L += ["**Not finished** (numbers are what their files hold so far): "
              + "; ".join(f"{r.label} ({r.status})" for r in unfinished), ""]
        if any(r.status == rundir.STALLED for r in unfinished):
            L += [f"`stalled`: marked running, but nothing written for over {STALLED_AFTER_S // 60} minutes (or "
                  "10 ticks): its job most likely died without a signal (killed with its node). Running "
                  "the same command with the same `run.dir` resumes it from its last checkpoint.", ""]
    partial = [r for r in runs if r.skipped_lines]
    if partial:
        L += ["Skipped unreadable JSONL lines (a half-written last line of a running job): "
              + "; ".join(f"{r.label}: {r.skipped_lines}" for r in partial), ""]
    return L


def _md_runs(d: ReportData) -> list[str]:
    def cell(r: dict, k: str):
        if k == "status":
            return status_cell(r[k])
        if k == "img_per_s" and r.get("contended"):
            return f"{fmt(r[k], 3)} †"  # taken beside another CPU-bound process: not a clean figure
        return r[k]

    table = md_table([h for h, _ in RUN_TABLE], [[cell(r, k) for _, k in RUN_TABLE] for r in d.rows])
    contended = [r for r in d.rows if r.get("contended")]
    L = ["## Runs", "", table, "",
         "img/s and ms/step: median over ticks, first tick dropped (steady training throughput; "
         "`img_per_s_overall` in `runs.csv` is summary.json's images / wall seconds, evaluations and "
         "checkpoints included). best: the best evaluation by the run's `eval.best_metric` (summary.json, "
         "else evals.jsonl; the rule of checkpoints/best.pt). All columns: `runs.csv`.", ""]
    if contended:
        L += [f"† {len(contended)} run(s) with ticks measured under contention: their training steps got under "
              f"{registry.CONTENDED:.0%} of their threads' CPU time (`perf/cpu_util`): another CPU-bound process, or "
              f"the run's own data workers, shared the cores, so those ticks' img/s are not clean figures (the img/s "
              f"column is the median over the run's ticks; `runs.csv` has `contended_share` and `img_per_s_clean`; "
              f"the first tick after each start or resume, which waits for its first batches, is not counted):", ""]
        for r in contended:
            n, k = r["util_ticks"], r["contended_ticks"]
            if r.get("img_per_s_clean") is not None:
                clean = f"the median img/s of its other {n - k} is {fmt(r['img_per_s_clean'], 3)}"
            else:
                clean = "no tick was clean: rerun it alone to compare speeds" if k == n else \
                    f"its other {n - k} recorded no img/s"
            L.append(f"- {r['run']}: {k} of {n} ticks ({r['contended_share']:.0%}), the lowest at "
                     f"{r['cpu_util_lowest']:.0%} (median over its ticks {r['cpu_util']:.0%}); {clean}")
        L.append("")
    seeds = seedgroups.seed_table(d.groups or [], d.abl)
    if seeds:
        L += ["Seeds: runs whose config.yaml differs only in `train.seed` are one configuration; its numbers "
              "below are mean ± the half-width of the Student-t 95% interval over the seeds, with n = the "
              "number of runs:", "", md_table(["configuration", "n", "train.seed", d.abl[0]["metric"] if d.abl
                                               else "metric"], seeds), ""]
    errors = [(row["run"], row["error"]) for row in d.rows if row.get("error")]
    if errors:
        L += ["Errors:", ""] + [f"- {name}: `{err}`" for name, err in errors] + [""]
    return L


def _md_throughput(d: ReportData) -> list[str]:
    L = ["## Throughput scaling", ""]
    if d.scaling:
        L += [md_table(["run", "status", "eff. batch", "world", "batch/dev", "accum", "img/s", "img/s/dev",
                        "ideal img/s", "efficiency", "ms/step", "MFU", "peak GB"],
                       [[s["run"], status_cell(s["status"]), s["effective_batch"], s["world_size"], s["batch_size"],
                         s["accumulate"], s["img_per_s"], s["img_per_s_per_device"], s["ideal_img_per_s"],
                         s["efficiency"], s["step_ms"], s["mfu"], s["peak_mem_gb"]] for s in d.scaling]), "",
              "ideal = world size / smallest world size x img/s of the same per-device batch and accumulation on "
              "the smallest world size (linear scaling in devices); efficiency = actual / ideal. `scaling.csv`.", ""]
    L += _img(d, "throughput.png")
    timing = [r for r in d.rows if r["step_ms"] is not None]
    if timing:
        L += ["Step time split (median ms per tick):", "",
              md_table(["run", "step", "data", "D", "G", "reg", "telemetry"],
                       [[r["run"], r["step_ms"], r["data_ms"], r["D_ms"], r["G_ms"], r["reg_ms"], r["telemetry_ms"]]
                        for r in timing]), ""]
    return L


def _md_losses_sigma(d: ReportData) -> list[str]:
    L = ["## Losses", ""] + _img(d, "losses.png")
    L += ["## Spectral norms (sigma0 of every G and D layer)", ""]
    if d.sigma_files:
        L += [f"![{f}]({f})" for f in d.sigma_files] + [""]
        L += ["Dashed red line: collapse step (summary.json, else the first flagged tick); red triangles: ticks "
              "with `stability/collapse` = 1.", ""]
    else:
        L += _img(d, "sigma.png")
    collapsed = [r for r in d.rows if r["collapse_step"] is not None]
    if collapsed:
        L += [md_table(["run", "collapse step", "reason", "flagged ticks"],
                       [[r["run"], r["collapse_step"], r["collapse_reason"], r["collapse_ticks"]] for r in collapsed]),
              ""]
    return L


def _md_ada(d: ReportData) -> list[str]:
    name = plots.ADA_FILE
    if name not in d.written and name not in d.skipped:
        return []  # no run used ADA
    return ["## ADA augmentation probability", "",
            f"p (`{plots.ADA_P}` in metrics.jsonl) per tick of every run with `aug.ada_target` set: ADA raises "
            "p while r_t = E[sign D(real)] is above the target, i.e. while D is overconfident on the reals.", ""
            ] + _img(d, name)


def _md_diversity(d: ReportData) -> list[str]:
    name = plots.DIVERSITY_FILE
    if name not in d.written and name not in d.skipped:
        return []
    return ["## Diversity", "",
            f"`{plots.DIVERSITY}` (telemetry.diversity_every): for fixed latents per class, the mean pairwise "
            "distance of G_ema's samples in the domain classifier's features over the same for real images of the "
            "class, averaged over classes (1 = as diverse as the data), beside D's largest sigma0. A sustained drop "
            "is a partial mode collapse (telemetry.collapse_diversity_factor).", ""] + _img(d, name)


def _md_evals(d: ReportData) -> list[str]:
    L = ["## Evaluations", ""]
    best_rows = best_eval_rows(d.runs, d.records) if d.records else []
    best_rows = seedgroups.group_best_rows(d.groups or [], best_rows, d.records, REPORT_METRICS)
    if best_rows:
        L += ["Best evaluation per configuration and feature extractor, by the run's `eval.best_metric` (column "
              "`by`; the rule of checkpoints/best.pt; numbers from different extractors are not comparable). "
              "Several seeds: mean ± Student-t 95% interval (n seeds); one run evaluated with eval.repeats > 1: its "
              "t-interval over the sample sets:", "",
              md_table(["run", "extractor", "by", "samples", "step", "evals"]
                       + [registry.BY_NAME[k].short for k in REPORT_METRICS], best_rows), "",
              "Every record: `evals.csv`.", ""]
    return L + _img(d, "evals.png")


def _md_intra(d: ReportData) -> list[str]:
    return per_class.md_section(d.runs, d.written)


def _md_truncation(d: ReportData) -> list[str]:
    L = ["## Truncation trade-off", ""]
    if d.gtrunc:
        L += [md_table(["run", "extractor", "psi", *TRUNC_COLUMNS, "samples", "step"],
                       [[t["run"], t["extractor"], "off" if t["psi"] is None else t["psi"],
                         *[t[k].text() if t[k] else None for k in TRUNC_COLUMNS], t["num_samples"], t["step"]]
                        for t in sorted(d.gtrunc, key=lambda t: (t["run"], t["extractor"], psi_order(t["psi"])))]),
              "", "`truncation.csv` (every run's points).", ""]
    return L + _img(d, "truncation.png")


def _md_ablation(d: ReportData) -> list[str]:
    abl, keys = d.abl, (d.abl_keys if d.abl_keys is not None else d.keys)
    L = ["## Ablation matrix", ""]
    if len(abl) >= 2:
        L += [md_table(["run", *keys, "status", abl[0]["metric"], "vs best", "test", "p", "p (Holm)", "n",
                        "collapse step", "img/s"],
                       [[a["run"], *[a[k] for k in keys], status_cell(a["status"]), a.get("value_text", a["value"]),
                         a.get("vs_best"), a.get("test"), _p(a.get("p")), _p(a.get("p_holm")), a.get("n"),
                         a["collapse_step"], a["img_per_s"]] for a in abl]), "",
              seedgroups.SEPARABILITY_NOTE + " `ablation.csv`.", ""]
        if len(keys) == 2 and len({(a[keys[0]], a[keys[1]]) for a in abl}) == len(abl):  # one row per cell
            L += _pivot(abl, keys)
        L += _md_paired(abl) + _md_variance(abl) + _md_power(abl, d.abl_metric)
    return L + _img(d, "ablation.png")


def _p(p) -> str | None:
    """A p-value as printed: 3 significant digits, '< 1e-06' below that."""
    if p is None:
        return None
    return "< 1e-06" if p < 1e-6 else f"{p:.3g}"


def _md_paired(abl: list[dict]) -> list[str]:
    rows = seedgroups.paired_rows(abl)
    if not rows:
        return []
    best = next(a for a in abl if a["vs_best"] == seedgroups.BEST_MARK)
    return [f"Paired differences to the best cell ({best['run']}), over the train.seed values both hold (same "
            "initialisation, data order and latents, so the seed's share of the noise cancels): mean of (cell − best) "
            "per seed ± the half-width of its Student-t 95% interval, and the interval:", "",
            md_table(["run", "seeds paired", "of n", "cell − best", "95% interval"],
                     [[a["run"], a["paired_n"], a["n"], f"{fmt(a['paired_diff'])} ± "
                       f"{fmt((a['paired_hi'] - a['paired_lo']) / 2, 2)}",
                       f"[{fmt(a['paired_lo'])}, {fmt(a['paired_hi'])}]"] for a in rows]), ""]


def _md_variance(abl: list[dict]) -> list[str]:
    rows = seedgroups.variance_rows(abl)
    if not rows:
        return []
    return ["Where the variance comes from (cells whose runs were all evaluated with eval.repeats >= 2; one-way "
            "random-effects ANOVA): sample-set SD = the spread of one sample set's value around its run's mean "
            "(pooled within runs); seed SD = sqrt(var(run means) − sample-set variance / R), floored at 0; seed "
            "share = the seed's part of the variance of a run's value (its R sample sets averaged):", "",
            md_table(["run", "runs", "sample sets (R)", "seed SD", "sample-set SD", "seed share"],
                     [[v["run"], v["n"], v["repeats"], v["seed_sd"], v["set_sd"],
                       None if v["seed_share"] is None else f"{100 * v['seed_share']:.0f}%"] for v in rows]), ""]


def _md_power(abl: list[dict], metric: str | None) -> list[str]:
    if metric not in registry.BY_NAME:
        return []
    sd, df, rows = seedgroups.power_rows(abl, metric)
    if not rows:
        return []
    short = registry.BY_NAME[metric].short
    return [f"Seeds needed: seeds per cell at which a two-sided two-sample t-test (α = {seedgroups.ALPHA:g}) detects a "
            f"difference of Δ {short} with {stats.POWER:.0%} power (exact noncentral t), from this study's pooled "
            f"seed-to-seed SD of {short}, {fmt(sd)} ({df} degrees of freedom):", "",
            md_table([f"Δ {short}", "seeds per cell"],
                     [[fmt(delta), n if n is not None else f"> {stats.MAX_SEEDS}"] for delta, n in rows]), ""]


def _md_tail(d: ReportData) -> list[str]:
    L = []
    if d.skipped:
        L += ["## Plots not written", ""] + [f"- `{k}`: {v}" for k, v in d.skipped.items()] + [""]
    return L + ["## Files", ""] + [f"- `{n}`" for n in sorted(d.written)] + [""]


def _pivot(abl: list[dict], keys: list[str]) -> list[str]:
    rk, ck = keys
    rvals = sorted(dict.fromkeys(a[rk] for a in abl), key=natural)
    cvals = sorted(dict.fromkeys(a[ck] for a in abl), key=natural)
    cell = {(a[rk], a[ck]): a for a in abl}
    body = []
    for rv in rvals:
        line = [f"{rk}={rv}"]
        for cv in cvals:
            a = cell.get((rv, cv))
            line.append("" if a is None else f"{seedgroups.cell_text(a)} / {fmt(a['collapse_step'])} / {fmt(a['img_per_s'], 3)}")
        body.append(line)
    return [f"{abl[0]['metric']} / collapse step / img/s:", "",
            md_table([f"{rk} \\ {ck}"] + [f"{ck}={c}" for c in cvals], body), ""]


def _img(d: ReportData, name: str) -> list[str]:
    if name in d.written:
        return [f"![{name}]({name})", ""]
    return [f"_{name} not written: {d.skipped.get(name, 'no data')}._", ""]


# ---- command line ---------------------------------------------------------------------------------

USAGE = "usage: bench report DIR [out=DIR]   (DIR: a run directory, a sweep directory, or a folder of runs)"


def parse_args(args: list[str]) -> tuple[Path, Path]:
    """`bench report DIR [out=DIR]` through bench/args.py's grammar (DIR: a bare word, or an existing path)."""
    from bench.args import TEXT, parse_kv
    from bench.errors import UsageError

    try:
        known, _ = parse_kv(args, {"out": TEXT}, "report", positional="DIR")
    except UsageError as exc:
        raise ReportError(f"{exc}; {USAGE[7:]}") from None
    dirs, out = known.get("DIR", []), known.get("out")
    if out is not None and not out.strip():
        raise ReportError("out= needs a folder, e.g. out=/tmp/report")
    if len(dirs) > 1:
        raise ReportError(f"one DIR only (got {dirs[0]!r} and {dirs[1]!r}); {USAGE[7:]}")
    root = dirs[0] if dirs else None
    if root is None:
        raise ReportError(f"missing DIR; {USAGE[7:]}")
    root_p = Path(root).expanduser()
    if not root_p.exists():
        raise ReportError(f"{root_p} does not exist; expected a run directory (run.json, metrics.jsonl) "
                          "or a sweep directory (sweep.json, index/)")
    if not root_p.is_dir():
        raise ReportError(f"{root_p} is not a directory; expected a run directory (run.json, metrics.jsonl) "
                          "or a sweep directory (sweep.json, index/)")
    return root_p, Path(out).expanduser() if out else root_p / REPORT_DIR


def main(args: list[str] | None = None) -> int:
    args = sys.argv[1:] if args is None else list(args)
    if any(a in ("-h", "--help") for a in args):
        print(USAGE)
        return 0
    try:
        root, out = parse_args(args)
        result = build_report(root, out)
    except ReportError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ForeignFile as exc:  # appeared while the report was being written
        print(f"error: {exc.path} was not written by `bench report`; it was left alone: move it away or "
              f"choose another out=", file=sys.stderr)
        return 2
    except OSError as exc:  # e.g. the output folder is read-only
        print(f"error: report: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    _print_summary(result, out)
    return 0


def _print_summary(result: dict, out: Path) -> None:
    rows = result["rows"]
    print(text_table([h for h, _ in RUN_TABLE], [[r[k] for _, k in RUN_TABLE] for r in rows]))
    unfinished = [r for r in result["runs"] if not r.finished]
    if unfinished:
        print(f"\n{len(unfinished)} run(s) not finished: " + ", ".join(f"{r.label} ({r.status})" for r in unfinished))
    print(f"\nreport written to {out}:")
    for p in result["written"]:
        print(f"  {p.name}")
    for name, why in result["skipped"].items():
        print(f"  (skipped {name}: {why})")
    print(f"open {out / 'report.md'}")


if __name__ == "__main__":
    sys.exit(main())
