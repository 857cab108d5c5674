#!/usr/bin/env python3
"""The labelled collapse suite (issue 22 §2): how well does the collapse detector find collapses?

Runs every cell of CELLS under each of PRECISIONS (train.precision=fp32 and bf16), each a small `bench train` run
with the collapse detector as configured (the diversity probe on, so that the probe-based rules can see), then
decides each run's ground truth from its FINAL samples with the rule written down below, and prints the
confusion matrix (flagged / not flagged against collapsed / healthy), recall and false-positive rate, per
precision and overall, and which rule flagged each run.

    python scripts/collapse_suite.py --out /tmp/suite                 # every cell, both precisions, 2 at a time
    python scripts/collapse_suite.py --out /tmp/suite --cells demo,dcgan --precisions bf16
    python scripts/collapse_suite.py --out /tmp/suite --report        # the tables again from what is on disk

Each run lives in <out>/<cell>-<precision>/ (a normal run directory; rerunning the script resumes or skips
finished runs), its ground truth in truth.json there, the tables in <out>/suite.md and <out>/suite.json.
Set GAN_BENCH_CACHE for the built-in data; the domain classifier is trained on first use.

GROUND TRUTH (fixed before the suite was first run; not to be tuned to the detector's results):
a run has COLLAPSED iff, for its final checkpoint's EMA G,
  * eval/class_acc <= CHANCE_FACTOR x chance  (G ignores its class input; 10 classes: <= 0.15), or
  * diversity ratio <= DIVERSITY_FLOOR        (its samples spread at most half as much as the data's, per class,
                                               in the domain classifier's features; DIVERSITY_SAMPLES latents per
                                               class, the diversity probe's measurement), or
  * eval/FID >= FID_CEIL                      (domain extractor, GT_SAMPLES samples: far from the data);
  * or training diverged (non-finite: status "diverged") or left no checkpoint.
Otherwise it is HEALTHY. The cell's intent (collapse recipe / healthy default) is shown beside it but does not
decide anything: a "collapse recipe" that trains fine counts as healthy and vice versa.

SECONDARY (also fixed before the first run): on the shape-only set no tiny run learnt the classes in development
(class_acc at chance after 1500 DCGAN steps), so the class criterion may call every run collapsed. The suite
therefore also reports a second matrix: ground truth without the class criterion (diversity <= DIVERSITY_FLOOR or
FID >= FID_CEIL or diverged: a mode collapse or garbage), against the detector without its class rule (a run
counts as flagged if any other rule fired: every rule's first tick is in metrics.jsonl as
stability/collapse_rule/<rule>).
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

# ---- the ground-truth rule (see the docstring) --------------------------------------------------------------
CHANCE_FACTOR = 1.5
DIVERSITY_FLOOR = 0.5
FID_CEIL = 100.0   # loose: development runs on the shape-only set gave 33-62 (no class learnt, not collapsed-looking)
                   # and 74-95 (the collapse demo); no run at this scale learnt the classes, so no healthy reference
GT_SAMPLES = 1000
DIVERSITY_SAMPLES = 32

# ---- the cells -------------------------------------------------------------------------------------------------
# Every run: 32 px built-in shapes (the shape-only set), tiny widths, a metrics tick every 10 steps, sigma every 10,
# the diversity probe every 25 steps (the class rule reads it), no evaluation during training (the ground truth's
# evaluation comes after, on the final checkpoint), no sample grid but the last. DCGAN cells are the cheap ones
# (about 0.25 s per step of batch 32 on a busy 2-core CPU); BigGAN / LeCam cells take 1-3 s per step of batch 16.
COMMON = ["train.tick_every=10", "telemetry.sigma_every=10", "telemetry.diversity_every=25", "train.sample_every=0",
          "train.ckpt_every=0", "eval.every=0", "eval.final=false"]
SMALL_BIGGAN = ["model.ch=16", "model.d_ch=16", "train.batch_size=16", "train.steps=200"]
DCGAN = ["model=dcgan", "model.ch=32", "model.d_ch=32", "train.batch_size=32", "train.steps=400"]
DCGAN_SN = DCGAN + ["model.d_sn=true", "train.g_lr=1e-3", "train.d_lr=1e-3", "train.betas=[0.5,0.999]"]
HIGH_LR = ["train.g_lr=1e-2", "train.d_lr=1e-2", "train.betas=[0.5,0.999]"]  # stability_ablation's rates

CELLS: dict[str, tuple[str, list[str]]] = {
    # collapse recipes
    "demo": ("collapse", ["+experiment=collapse"]),                 # the README demo: BigGAN, no SN in D, lr 1e-2
    "nosn_dcgan": ("collapse", DCGAN + HIGH_LR),                    # DCGAN (no SN), lr 1e-2 both
    "frozen_d": ("collapse", ["model=dcgan", "model.ch=16", "model.d_ch=16", "data.num_samples=200",
                              "train.batch_size=16", "train.steps=400", "train.d_lr=1e-6",
                              "train.g_lr=2e-3"]),                  # the README's partial collapse: D all but frozen
    "lecam03": ("collapse", SMALL_BIGGAN + HIGH_LR + ["reg.lecam=0.3", "data.num_samples=1000"]),  # modern ablation
    "wgan_noclip": ("collapse", DCGAN + ["train.steps=300", "loss=wgan", "loss.clip=1e6", "train.d_steps=2",
                                         "train.g_lr=1e-4", "train.d_lr=1e-4"]),  # an unconstrained critic
    "tiny_data_big_g": ("collapse", ["model=dcgan", "model.ch=64", "model.d_ch=16", "data.num_samples=50",
                                     "train.batch_size=32", "train.steps=400", "train.g_lr=2e-4", "train.d_lr=2e-4",
                                     "train.betas=[0.5,0.999]"]),   # 50 images, a G four times D's width
    # healthy defaults
    "biggan": ("healthy", SMALL_BIGGAN),                            # the default small BigGAN's recipe (lr 2e-4 / 4e-4)
    "biggan_r1": ("healthy", SMALL_BIGGAN + ["reg.r1_gamma=1"]),
    "dcgan_sn": ("healthy", DCGAN_SN),                              # DCGAN, SN in D, hinge
    "dcgan_sn_r1": ("healthy", DCGAN_SN + ["reg.r1_gamma=1"]),
    "dcgan_sn_ns": ("healthy", DCGAN_SN + ["loss=ns"]),
    "dcgan_sn_diffaug": ("healthy", DCGAN_SN + ["aug.policy=[color,translation,cutout]"]),
}
PRECISIONS = ("fp32", "bf16")


def run_dir(out: Path, cell: str, precision: str) -> Path:
    return out / f"{cell}-{precision}"


def train(out: Path, cell: str, precision: str, python: str, threads: int, classifier: Path) -> dict:
    """One run (resumed or skipped when already complete); returns its summary.json (or {} when it has none)."""
    rd = run_dir(out, cell, precision)
    _, overrides = CELLS[cell]
    cmd = [python, "-m", "bench.cli", "train", *overrides, *COMMON, f"eval.classifier_path={classifier}",
           f"train.precision={precision}", f"run.dir={rd}"]
    env = _env(threads)
    rd.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(out / f"{cell}-{precision}.log", "a") as log:
        subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, check=False)
    summary = _read(rd / "summary.json")
    summary["suite_train_s"] = time.perf_counter() - t0
    return summary


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


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
    out = {"status": summary.get("status")}
    if summary.get("status") == "diverged":
        return {**out, "collapsed": True, "collapsed_no_class": True, "why": "diverged"}
    if not list((rd / "checkpoints").glob("ckpt-*.pt")):
        return {**out, "collapsed": True, "collapsed_no_class": True, "why": "no checkpoint"}
    full, clf = reference()
    overrides = [f"data.shards={full}", f"eval.classifier_path={clf}", f"eval.num_samples={GT_SAMPLES}",
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
    if div == div and div <= DIVERSITY_FLOOR:
        reasons.append(f"diversity {div:.3f} <= {DIVERSITY_FLOOR}")
    if fid is not None and fid >= FID_CEIL:
        reasons.append(f"FID {fid:.1f} >= {FID_CEIL}")
    secondary = bool(reasons)
    if acc is not None and acc <= CHANCE_FACTOR * chance:
        reasons.insert(0, f"class_acc {acc:.3f} <= {CHANCE_FACTOR} x chance")
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


def one(out: Path, cell: str, precision: str, python: str, threads: int, classifier: Path, train_runs: bool) -> dict:
    rd = run_dir(out, cell, precision)
    row = {"cell": cell, "intent": CELLS[cell][0], "precision": precision, "run": str(rd)}
    done = _read(rd / "truth.json")
    summary = _read(rd / "summary.json")
    decided = bool(done) and done.get("collapsed") is not None  # a failed ground truth is retried
    if train_runs and not (decided and summary.get("status") in ("completed", "collapsed", "diverged")):
        summary = train(out, cell, precision, python, threads, classifier)
        t0 = time.perf_counter()
        done = truth_in_subprocess(rd, python, threads)
        done["suite_truth_s"] = time.perf_counter() - t0
        done["suite_train_s"] = summary.get("suite_train_s")
        (rd / "truth.json").write_text(json.dumps(done, indent=1))
    row.update(truth=done, flagged=summary.get("collapse_step") is not None,
               collapse_step=summary.get("collapse_step"), reason=summary.get("collapse_reason"))
    from bench.train.telemetry import rule_of  # the detector's own reading of a reason

    row["rule"] = rule_of(row["reason"])
    row["rules"] = rules_fired(rd)
    print(f"{cell:>16s} {precision}: flagged {row['collapse_step']} ({row['rule']}) | truth "
          f"{ {True: 'collapsed', False: 'healthy'}.get(done.get('collapsed'), '?')} ({done.get('why')})", flush=True)
    return row


def rules_fired(rd: Path) -> list:
    """Every rule that fired in the run, in order (metrics.jsonl's stability/collapse_rule/<rule> keys)."""
    out = []
    try:
        lines = (rd / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        out += [k.rsplit("/", 1)[1] for k in row if k.startswith("stability/collapse_rule/")]
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
    ap.add_argument("--python", default=sys.executable)
    ap.add_argument("--truth", type=Path, help=argparse.SUPPRESS)  # internal: one run's ground truth, in-process
    args = ap.parse_args(argv)
    if args.truth:
        (args.truth / "truth.json").write_text(json.dumps(ground_truth(args.truth), indent=1))
        return 0
    if args.out is None:
        ap.error("--out DIR is required")
    cells = [c for c in args.cells.split(",") if c]
    unknown = [c for c in cells if c not in CELLS]
    if unknown:
        ap.error(f"unknown cells {unknown}; the cells are {list(CELLS)}")
    precisions = [p for p in args.precisions.split(",") if p]
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(c, p) for c in cells for p in precisions]
    if args.report:
        jobs = [(c, p) for c, p in jobs if (run_dir(args.out, c, p) / "truth.json").is_file()]
        classifier = None
    else:
        _, classifier = reference()  # before the runs start: they all read it
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(lambda cp: one(args.out, *cp, args.python, args.threads, classifier,
                                            not args.report), jobs))
    text = tables(rows)
    (args.out / "suite.md").write_text(text + "\n")
    (args.out / "suite.json").write_text(json.dumps({"rows": rows, "by_precision": {
        p: confusion([r for r in rows if r["precision"] == p]) for p in precisions}, "all": confusion(rows),
        "secondary_all": confusion([_secondary(r) for r in rows]),
        "rule": {"chance_factor": CHANCE_FACTOR, "diversity_floor": DIVERSITY_FLOOR, "fid_ceil": FID_CEIL,
                 "gt_samples": GT_SAMPLES}}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
