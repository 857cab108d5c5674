"""Reading run and sweep directories into `Run` objects, through bench/rundir.py only (torch-free).

A run directory holds config.yaml, run.json, metrics.jsonl, evals.jsonl, summary.json and
truncation/truncation.csv (docs/architecture.md, "Run directory"); a sweep directory holds sweep.json
and, while it runs, index/<n>.json. Half-written JSONL lines are skipped and counted.
"""
from __future__ import annotations

import csv
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench import metrics_registry as registry
from bench import rundir

MAX_DEPTH = 3               # folder levels searched below DIR for run directories
SWEEP_JSON = "sweep.json"   # a finished sweep's record of its jobs (written by `bench train -m`)
SWEEP_INDEX = "index"       # a sweep's index/<n>.json, one per job, fresher while the sweep runs
REPORT_DIR = "report"       # the default output folder
TRUNCATION_CSV = "truncation.csv"  # in the run's truncation/ folder (`bench truncation`)
NOT_RUNS = {rundir.CHECKPOINTS, rundir.SAMPLES, rundir.TB, rundir.TRUNCATION, SWEEP_INDEX, REPORT_DIR,
            "__pycache__"}
UNFINISHED = "unfinished"   # no summary and no other word on the run's state
TRUNC_COLUMNS = tuple(registry.BY_NAME[m].short for m in registry.HEADLINE)  # truncation.csv's metrics
STALLED_AFTER_S = 1800  # a "running" run with no file written for max(this, 10 ticks) is reported "stalled"


@dataclass
class Run:
    path: Path
    name: str                                   # the directory's name
    config: dict = field(default_factory=dict)  # flattened config.yaml: {"train.batch_size": 16, ...}
    info: dict = field(default_factory=dict)    # run.json
    summary: dict | None = None                 # summary.json (None: not finished, or unreadable)
    metrics: list = field(default_factory=list)  # metrics.jsonl rows
    evals: list = field(default_factory=list)    # evals.jsonl rows
    truncation: list = field(default_factory=list)  # truncation/truncation.csv rows
    job: dict | None = None                     # the sweep index entry, when there is one
    skipped_lines: int = 0                      # unreadable JSONL lines (a half-written last line)
    status: str = UNFINISHED
    label: str = ""                             # the swept values, or the directory name
    swept: dict = field(default_factory=dict)   # {key: value} of the swept keys

    @property
    def finished(self) -> bool:
        return self.status in rundir.FINISHED


# ---- the files of one run ---------------------------------------------------------------------------

def _flatten(d, prefix: str = "") -> dict:
    out = {}
    if isinstance(d, dict):
        for k, v in d.items():
            key = f"{prefix}.{k}" if prefix else str(k)
            if isinstance(v, dict):
                out.update(_flatten(v, key))
            else:
                out[key] = v
    return out


def _read_config(path: Path) -> dict:
    try:
        import yaml  # PyYAML (comes with hydra-core / omegaconf); no torch

        return _flatten(yaml.safe_load(path.read_text()) or {})
    except Exception:  # an unreadable config only costs the labels that would come from it
        return {}


def _read_truncation(path: Path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error):
        return []
    out = []
    for r in rows:
        psi = (r.get("psi") or "").strip()
        row = {"psi": None if psi in ("", "off", "None", "none") else num(psi),
               "extractor": r.get("extractor") or "?", "num_samples": num(r.get("num_samples")),
               "step": num(r.get("step"))}
        row.update({k: num(r.get(k)) for k in TRUNC_COLUMNS})
        if r.get("repeats"):  # eval.repeats > 1: each column's 95% interval over the sample sets
            row["repeats"] = num(r["repeats"])
            row.update({f"{k}_ci{e}": num(r.get(f"{k}_ci{e}")) for k in TRUNC_COLUMNS for e in ("_lo", "_hi")})
        out.append(row)
    return out


def num(v):
    """A CSV / JSON cell as int or float; None when empty or not a number."""
    if v is None or isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return v
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return int(f) if f.is_integer() and "." not in str(v) and "e" not in str(v).lower() else f


def load_run(r: Run) -> Run:
    p = r.path
    r.config = _read_config(p / rundir.CONFIG)
    r.info = rundir.read_json(p / rundir.RUN_JSON) or {}
    r.summary = rundir.read_json(p / rundir.SUMMARY)
    metrics = rundir.read_jsonl(p / rundir.METRICS, warn=False)  # counted in the report instead
    evals = rundir.read_jsonl(p / rundir.EVALS, warn=False)
    r.metrics = [m for m in metrics.rows if isinstance(m.get("step"), (int, float))]
    r.metrics.sort(key=lambda m: m["step"])
    r.evals = [e for e in evals.rows if isinstance(e.get("step"), (int, float))]
    r.skipped_lines = metrics.bad + evals.bad
    r.truncation = _read_truncation(p / rundir.TRUNCATION / TRUNCATION_CSV)
    r.status = status(r)
    return r


# ---- finding runs ----------------------------------------------------------------------------------

def _is_run_dir(p: Path) -> bool:
    return any((p / m).is_file() for m in rundir.RUN_MARKERS)


def _is_sweep_dir(p: Path) -> bool:
    return (p / SWEEP_JSON).is_file() or any((p / SWEEP_INDEX).glob("*.json"))


def _sweep_jobs(sweep: Path) -> list[dict]:
    """The sweep's jobs: index/<n>.json (fresher while the sweep runs), else sweep.json."""
    jobs = {}
    data = rundir.read_json(sweep / SWEEP_JSON) or {}
    for i, j in enumerate(data.get("jobs") or []):
        if isinstance(j, dict):
            jobs[j.get("job_num", i)] = j
    for p in (sweep / SWEEP_INDEX).glob("*.json"):
        j = rundir.read_json(p)
        if j is not None:
            jobs[j.get("job_num", p.stem)] = j
    return [jobs[k] for k in sorted(jobs, key=lambda k: (str(type(k)), k))]


def _job_run_dir(job: dict, sweep: Path) -> Path | None:
    if not job.get("run_dir"):
        return None
    p = Path(job["run_dir"])
    inside = sweep / p.name
    if inside.is_dir() and _is_run_dir(inside):  # the sweep folder as it is now (it may have been moved or copied)
        return inside
    return p


def discover(root: Path, out_dir: Path | None = None) -> list[Run]:
    """Every run under root: run directories found up to MAX_DEPTH levels down, and every job of every
    sweep found there (a job that never got a run directory still gets a row, with its state)."""
    found: dict[str, Run] = {}
    jobs_without_dir: list[Run] = []
    skip = out_dir.resolve() if out_dir else None

    def visit(p: Path, depth: int):
        if skip is not None and p.resolve() == skip:
            return
        if _is_sweep_dir(p):
            for job in _sweep_jobs(p):
                d = _job_run_dir(job, p)
                if d is not None and d.is_dir():
                    found.setdefault(str(d.resolve()), Run(path=d, name=d.name)).job = job
                else:
                    name = Path(job["run_dir"]).name if job.get("run_dir") else f"job {job.get('job_num', '?')}"
                    jobs_without_dir.append(Run(path=Path(job.get("run_dir") or p), name=name, job=job))
        if _is_run_dir(p):
            found.setdefault(str(p.resolve()), Run(path=p, name=p.name))
            return  # a run directory's subfolders are its own (checkpoints/, samples/, ...)
        if depth >= MAX_DEPTH:
            return
        try:
            children = sorted(c for c in p.iterdir() if c.is_dir())
        except OSError:
            return
        for c in children:
            if not c.name.startswith(".") and c.name not in NOT_RUNS:
                visit(c, depth + 1)

    visit(root, 0)
    runs = sorted(found.values(), key=lambda r: (r.job is None, _job_order(r.job), natural_key(str(r.path))))
    for r in runs:
        load_run(r)
    for r in jobs_without_dir:
        r.status = status(r)
    return runs + jobs_without_dir


def _job_order(job):
    n = (job or {}).get("job_num")
    return (0, n, "") if isinstance(n, int) else (1, 0, str(n))


def natural_key(name: str):
    """Sort key with digit runs as numbers: layer10 after layer9."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# ---- status ----------------------------------------------------------------------------------------

def status(r: Run) -> str:
    recorded = _recorded_status(r)
    if recorded == rundir.RUNNING and _idle_seconds(r) > max(STALLED_AFTER_S, 10 * _longest_tick_s(r)):
        return rundir.STALLED  # its job died without a signal (killed with its machine) or hangs
    return recorded


def _idle_seconds(r: Run) -> float:
    """Seconds since the training process last wrote one of its records (not a report written into the
    run directory: that is not the run's activity)."""
    newest = 0.0
    for p in (r.path / rundir.METRICS, r.path / rundir.EVALS, r.path / rundir.RUN_JSON,
              *[e for d in (rundir.CHECKPOINTS, rundir.SAMPLES) for e in _entries(r.path / d)]):
        try:
            newest = max(newest, p.stat().st_mtime)
        except OSError:
            pass
    return time.time() - newest if newest else 0.0


def _entries(d: Path) -> list[Path]:
    try:
        return list(d.iterdir())
    except OSError:
        return []


def _longest_tick_s(r: Run) -> float:
    walls = [m["time/wall_s"] for m in r.metrics if finite(m.get("time/wall_s"))]
    return max((b - a for a, b in zip(walls, walls[1:])), default=walls[0] if walls else 0.0)


def _recorded_status(r: Run) -> str:
    """summary.json's status; else the sweep index's final state; else run.json's; else 'unfinished'."""
    if r.summary and r.summary.get("status"):
        return str(r.summary["status"])
    state = (r.job or {}).get("state")
    if state and state not in (rundir.RUNNING, rundir.COMPLETED):  # failed / interrupted before a summary
        return str(state)
    if r.info.get("status") and r.info["status"] not in rundir.FINISHED:
        return str(r.info["status"])  # "running" (or a run that died without a summary)
    if state == rundir.RUNNING:
        return rundir.RUNNING
    return UNFINISHED


def finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
