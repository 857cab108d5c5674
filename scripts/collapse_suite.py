#!/usr/bin/env python3
"""The labelled collapse suite (configs/experiment/collapse_suite.yaml): how well does the collapse detector find
collapses? The cells, their intent, the precisions and the ground-truth rule all live in the configs; this script
runs the cells, judges each run by that rule from its FINAL samples, and prints the confusion matrix (flagged /
not flagged against collapsed / healthy), recall and false-positive rate, per precision and overall, and which
rule flagged each run.

    python scripts/collapse_suite.py --out /tmp/suite                 # every cell, both precisions, 2 at a time
    python scripts/collapse_suite.py --out /tmp/suite --cells demo,dcgan_sn --precisions bf16
    python scripts/collapse_suite.py --out /tmp/suite --report        # the tables again from what is on disk
    python scripts/collapse_suite.py --judge runs/sweep-...           # judge a `bench train -m +experiment=collapse_suite`

Each run lives in <out>/<cell>-<precision>/ (a normal run directory; rerunning the script resumes or skips
finished runs), its ground truth in truth.json there, the tables in <out>/suite.md and <out>/suite.json.
Set GAN_BENCH_CACHE for the built-in data; the domain classifier is trained on first use. The ground truth reads
the rule from each run's own config.yaml (suite.truth_*), so a run is judged by the rule it was started with.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # this checkout's bench, also when another one is installed

EXPERIMENT = "collapse_suite"
CELL_DIR = REPO / "configs" / "collapse_cell"
DIVERSITY_SAMPLES = 32  # latents per class of the ground truth's diversity measurement (the probe's default)


def suite_plan() -> tuple[dict, tuple]:
    """({cell: intent} in the experiment's sweep order, precisions): read from the experiment's sweep and the cell
    files (a cell's suite.intent), the same lists `bench train -m +experiment=collapse_suite` runs."""
    from omegaconf import OmegaConf

    params = OmegaConf.load(REPO / "configs" / "experiment" / f"{EXPERIMENT}.yaml").hydra.sweeper.params
    cells = [c.strip() for c in str(params.collapse_cell).split(",")]
    precisions = tuple(p.strip() for p in str(params["train.precision"]).split(","))
    return {c: str(OmegaConf.load(CELL_DIR / f"{c}.yaml").suite.intent) for c in cells}, precisions


CELLS, PRECISIONS = suite_plan()


def truth_rule(rd: Path) -> dict:
    """The ground-truth rule a run was started with: suite.truth_* of its config.yaml (the schema's defaults for a
    run from before the keys existed)."""
    from omegaconf import OmegaConf

    suite = OmegaConf.select(OmegaConf.load(rd / "config.yaml"), "suite", default=None) or {}
    return {k: suite.get(k, v) for k, v in TRUTH_DEFAULTS.items()}


def _truth_defaults() -> dict:
    from bench.schema import SuiteCfg

    return {k: v for k, v in vars(SuiteCfg()).items() if k.startswith("truth_")}


TRUTH_DEFAULTS = _truth_defaults()


def run_dir(out: Path, cell: str, precision: str) -> Path:
    return out / f"{cell}-{precision}"


def train(rd: Path, cell: str, precision: str, python: str, threads: int, classifier: Path) -> dict:
    """One run (resumed or skipped when already complete); returns its summary.json (or {} when it has none)."""
    out = rd.parent
    cmd = [python, "-m", "bench.cli", "train", f"+experiment={EXPERIMENT}", f"collapse_cell={cell}",
           f"eval.classifier_path={classifier}", f"train.precision={precision}", f"run.dir={rd}", *EXTRA]
    env = _env(threads)
    rd.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / f"{cell}-{precision}.log", "a") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    summary = _read(rd / "summary.json")
    summary["suite_train_s"] = time.perf_counter() - t0
    return summary


def _read(path: Path) -> dict:
    from bench.rundir import read_json

    return read_json(path) or {}


def reference() -> tuple[Path, Path]:
    """The full built-in set (10000 images, 32 px) and its domain classifier, made on first use: every run's probe
    and every ground truth judge with this one classifier, against this one set (the small-data cells train on
    prefixes of it)."""
    from bench.data.shards import default_shards
    from bench.eval.classifier import classifier_path
    from bench.eval.metrics import ensure_classifier

    full = default_shards(32)
    ensure_classifier(full, 32, None, train_if_missing=True, progress=True)
    return full, classifier_path(full, 32)


def ground_truth(rd: Path) -> dict:
    """The final checkpoint's class_acc, FID (domain extractor, against the full built-in set) and diversity
    ratio, and the verdict of the rule above."""
    import torch

    from bench.eval.runs import eval_run, load_run
    from bench.train.diversity import DIVERSITY, DiversityProbe

    summary = _read(rd / "summary.json")
    rule = truth_rule(rd)
    out = {"status": summary.get("status"), "rule": rule}
    if summary.get("status") == "diverged":
        return {**out, "collapsed": True, "collapsed_no_class": True, "why": "diverged"}
    if not list((rd / "checkpoints").glob("ckpt-*.pt")):
        return {**out, "collapsed": True, "collapsed_no_class": True, "why": "no checkpoint"}
    full, clf = reference()
    overrides = [f"data.shards={full}", f"eval.classifier_path={clf}", f"eval.num_samples={rule['truth_samples']}",
                 "eval.num_real=null", "eval.extractor=domain", "eval.repeats=1", "eval.intra_fid=false",
                 "eval.truncation=null", "eval.standing_stats=0"]
    rec = eval_run(rd, overrides, which="last", progress=False, sheets=True, show=False)
    run = load_run(rd, overrides, which="last", device="cpu")
    probe = DiversityProbe(1, DIVERSITY_SAMPLES, str(full), run["resolution"], run["n_classes"],
                           torch.device("cpu"), classifier_path=str(clf))
    probe.quiet = True
    div = probe.measure(run["G"]).get(DIVERSITY, float("nan"))
    acc, fid = rec.get("eval/class_acc"), rec.get("eval/FID")
    chance = 1.0 / run["n_classes"]
    reasons = []
    if div == div and div <= rule["truth_diversity_floor"]:
        reasons.append(f"diversity {div:.3f} <= {rule['truth_diversity_floor']}")
    if fid is not None and fid >= rule["truth_fid_ceil"]:
        reasons.append(f"FID {fid:.1f} >= {rule['truth_fid_ceil']}")
    secondary = bool(reasons)
    if acc is not None and acc <= rule["truth_chance_factor"] * chance:
        reasons.insert(0, f"class_acc {acc:.3f} <= {rule['truth_chance_factor']} x chance")
    return {**out, "step": run["step"], "class_acc": acc, "chance": chance, "FID": fid, "diversity": div,
            "collapsed": bool(reasons), "collapsed_no_class": secondary, "why": "; ".join(reasons) or "healthy"}


def _env(threads: int) -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def truth_in_subprocess(rd: Path, python: str, threads: int) -> dict:
    """ground_truth(rd) in its own process (its own torch threads; a crash is one cell's), written to truth.json."""
    with open(rd.parent / f"{rd.name}.log", "a") as log:
        subprocess.run([python, str(Path(__file__).resolve()), "--truth", str(rd)], cwd=REPO, env=_env(threads),
                       stdout=log, stderr=subprocess.STDOUT, check=False)
    return _read(rd / "truth.json") or {"collapsed": None, "why": f"ground truth failed: see {rd.name}.log"}


def one(rd: Path, cell: str, precision: str, python: str, threads: int, classifier: Path, mode: str) -> dict:
    """One run's row: mode "run" trains it (unless finished) and judges it, "judge" judges a finished run that has
    no verdict yet, "report" reads what is on disk."""
    row = {"cell": cell, "intent": CELLS.get(cell, "?"), "precision": precision, "run": str(rd)}
    done = _read(rd / "truth.json")
    summary = _read(rd / "summary.json")
    decided = bool(done) and done.get("collapsed") is not None  # a failed ground truth is retried
    finished = summary.get("status") in ("completed", "collapsed", "diverged")
    if (mode == "run" and not (decided and finished)) or (mode == "judge" and not decided):
        if mode == "run":
            summary = train(rd, cell, precision, python, threads, classifier)
        t0 = time.perf_counter()
        done = truth_in_subprocess(rd, python, threads)
        done["suite_truth_s"] = time.perf_counter() - t0
        done["suite_train_s"] = summary.get("suite_train_s")
        (rd / "truth.json").write_text(json.dumps(done, indent=1))
    row.update(truth=done, flagged=summary.get("collapse_step") is not None,
               collapse_step=summary.get("collapse_step"), reason=summary.get("collapse_reason"))
    from bench.train.collapse import rule_of  # the detector's own reading of a reason

    row["rule"] = rule_of(row["reason"])
    row["rules"] = rules_fired(rd)
    if REPLAY:
        row["live"] = {k: row[k] for k in ("flagged", "collapse_step", "reason", "rule", "rules")}
        step, reason, rules = replay(rd)
        row.update(flagged=step is not None, collapse_step=step, reason=reason, rule=rule_of(reason), rules=rules)
    print(f"{cell:>16s} {precision}: flagged {row['collapse_step']} ({row['rule']}) | truth "
          f"{ {True: 'collapsed', False: 'healthy'}.get(done.get('collapsed'), '?')} ({done.get('why')})", flush=True)
    return row


EXTRA: list = []  # --set KEY=VALUE: more overrides for every run (e.g. train.seed=1 for a held-out repeat)
REPLAY = False  # --replay: judge the detector of this checkout on the recorded runs instead of what flagged live


def replay(rd: Path) -> tuple:
    """(collapse step, reason, rules in order) of this checkout's CollapseDetector fed the run's recorded ticks and
    evaluations, configured from the run's config.yaml over the schema's defaults (a key added since the run
    takes its default). Exact for a run whose flags changed nothing (telemetry.stop_on_collapse=false, no
    rollback): the detector only reads the records."""
    from omegaconf import OmegaConf

    from bench.train.objectives import loss_of
    from bench.train.collapse import RULE_KEY, CollapseDetector

    from bench.config import check_schema

    cfg = check_schema(OmegaConf.load(rd / "config.yaml"))  # the schema's defaults, renamed keys mapped
    loss = loss_of(cfg.loss)
    det = CollapseDetector.from_cfg(cfg.telemetry, float("inf") if loss.gap_unbounded
                                    else cfg.telemetry.collapse_loss_gap, relativistic=loss.relativistic)
    n_classes = int(_read(rd / "run.json").get("n_classes") or 0)
    evals = {}
    for line in _lines(rd / "evals.jsonl"):
        evals.setdefault(line.get("step"), line)
    for row in _lines(rd / "metrics.jsonl"):
        row = {k: v for k, v in row.items() if not k.startswith(RULE_KEY) and k != "stability/collapse"}
        det.update(row)
        if row.get("step") in evals:
            det.update_eval(row["step"], evals.pop(row["step"]), n_classes)
    return det.collapse_step, det.reason, list(det.fired)


def _lines(path: Path) -> list:
    from bench.rundir import read_jsonl

    return read_jsonl(path, warn=False).rows


def rules_fired(rd: Path) -> list:
    """Every rule that fired in the run, in order (metrics.jsonl's stability/collapse_rule/<rule> keys)."""
    out = [k.rsplit("/", 1)[1] for row in _lines(rd / "metrics.jsonl") for k in row
           if k.startswith("stability/collapse_rule/")]
    return list(dict.fromkeys(out))


def _secondary(r: dict) -> dict:
    """The row judged without the class criterion and without the class rule."""
    t = r["truth"]
    flagged = any(rule != "class" for rule in r.get("rules") or []) or (r["flagged"] and r["rule"] != "class")
    return {**r, "flagged": flagged, "truth": {**t, "collapsed": t.get("collapsed_no_class")}}


def confusion(rows: list[dict]) -> dict:
    known = [r for r in rows if r["truth"].get("collapsed") is not None]
    c = {"tp": 0, "fn": 0, "fp": 0, "tn": 0}
    for r in known:
        c[("tp" if r["flagged"] else "fn") if r["truth"]["collapsed"] else ("fp" if r["flagged"] else "tn")] += 1
    pos, neg = c["tp"] + c["fn"], c["fp"] + c["tn"]
    c["recall"] = c["tp"] / pos if pos else None
    c["fp_rate"] = c["fp"] / neg if neg else None
    c["runs"] = len(known)
    return c


def _fmt(v, spec=".3f"):
    return "-" if v is None else (format(v, spec) if isinstance(v, float) else str(v))


def tables(rows: list[dict]) -> str:
    def verdict(v):
        return "collapsed" if v else "healthy" if v is False else "?"

    lines = ["| cell | intent | precision | flagged at (first rule; all rules) | class_acc | diversity | FID | "
             "ground truth | without class |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["truth"]
        lines.append(f"| {r['cell']} | {r['intent']} | {r['precision']} | "
                     f"{_fmt(r['collapse_step'])} ({r['rule'] or '-'}; {', '.join(r.get('rules') or []) or '-'}) | "
                     f"{_fmt(t.get('class_acc'))} | {_fmt(t.get('diversity'))} | {_fmt(t.get('FID'), '.1f')} | "
                     f"{verdict(t.get('collapsed'))} | {verdict(t.get('collapsed_no_class'))} |")
    for title, judged in (("all rules against the ground truth", rows),
                          ("without the class rule, against the ground truth without the class criterion",
                           [_secondary(r) for r in rows])):
        lines += ["", title, "", "| precision | collapsed, flagged | collapsed, not flagged | healthy, flagged | "
                                 "healthy, not flagged | recall | FP rate |", "|---|---|---|---|---|---|---|"]
        for name, sel in [*((p, [r for r in judged if r["precision"] == p]) for p in PRECISIONS), ("both", judged)]:
            c = confusion(sel)
            lines.append(f"| {name} | {c['tp']} | {c['fn']} | {c['fp']} | {c['tn']} | {_fmt(c['recall'], '.2f')} | "
                         f"{_fmt(c['fp_rate'], '.2f')} |")
    rules: dict = {}
    for r in rows:
        if r["flagged"]:
            key = (r["rule"], bool(r["truth"].get("collapsed")))
            rules[key] = rules.get(key, 0) + 1
    lines += ["", "| first rule | on collapsed runs | on healthy runs |", "|---|---|---|"]
    for rule in sorted({k[0] for k in rules}):
        lines.append(f"| {rule} | {rules.get((rule, True), 0)} | {rules.get((rule, False), 0)} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, help="the suite's directory (required)")
    ap.add_argument("--cells", default=",".join(CELLS), help="comma-separated cells (default: all)")
    ap.add_argument("--precisions", default=",".join(PRECISIONS))
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per run")
    ap.add_argument("--report", action="store_true", help="only print the tables of the runs on disk")
    ap.add_argument("--judge", type=Path, metavar="SWEEP_DIR",
                    help="judge the suite runs under SWEEP_DIR (a `bench train -m +experiment=collapse_suite` sweep): "
                         "each run directory whose config.yaml has a suite.cell")
    ap.add_argument("--replay", action="store_true",
                    help="flag each run with this checkout's collapse detector replayed on its records (the live "
                         "flags are kept in suite.json as `live`); with --report or --judge")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="an override for every run (repeatable), e.g. --set train.seed=1 for a held-out repeat")
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--truth", type=Path, help=argparse.SUPPRESS)  # internal: one run's ground truth, in-process
    args = ap.parse_args(argv)
    global REPLAY
    REPLAY = args.replay
    EXTRA[:] = args.set
    if args.truth:
        (args.truth / "truth.json").write_text(json.dumps(ground_truth(args.truth), indent=1))
        return 0
    if args.judge:
        args.out = args.out or args.judge
        jobs = suite_runs(args.judge)
        if not jobs:
            ap.error(f"--judge {args.judge}: no suite run directories under it (config.yaml with suite.cell)")
        precisions = sorted({p for _, _, p in jobs})
        return finish(args, jobs, precisions, "judge", classifier=None)
    if args.out is None:
        ap.error("--out DIR (or --judge SWEEP_DIR) is required")
    cells = [c for c in args.cells.split(",") if c]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        ap.error(f"unknown cells {unknown}; the cells are {list(CELLS)}")
    precisions = [p for p in args.precisions.split(",") if p]
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(run_dir(args.out, c, p), c, p) for c in cells for p in precisions]
    if args.report:
        jobs = [job for job in jobs if (job[0] / "truth.json").is_file()]
        classifier = None
    else:
        _, classifier = reference()  # before the runs start: they all read it
    return finish(args, jobs, precisions, "report" if args.report else "run", classifier=classifier)


def suite_runs(root: Path) -> list:
    """(run dir, cell, precision) of every suite run under root, in cell order."""
    from omegaconf import OmegaConf

    found = []
    for cfg_file in sorted(root.rglob("config.yaml")):
        if cfg_file.parent.name == ".hydra":
            continue
        cfg = OmegaConf.load(cfg_file)
        cell = OmegaConf.select(cfg, "suite.cell", default="")
        if cell:
            found.append((cfg_file.parent, cell, str(cfg.train.precision)))
    order = {c: i for i, c in enumerate(CELLS)}
    return sorted(found, key=lambda j: (order.get(j[1], len(order)), j[1], j[2]))


def finish(args, jobs: list, precisions: list, mode: str, classifier) -> int:
    """Run (when train_runs) and judge every job, then write and print the tables."""
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda job: one(*job, args.python, args.threads, classifier, mode), jobs))
    text = tables(rows)
    (args.out / "suite.md").write_text(text + "\n")
    (args.out / "suite.json").write_text(json.dumps({"rows": rows, "by_precision": {
        p: confusion([r for r in rows if r["precision"] == p]) for p in precisions}, "all": confusion(rows),
        "secondary_all": confusion([_secondary(r) for r in rows]),
        "rule": TRUTH_DEFAULTS}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
