"""`bench report DIR [out=DIR]`: Markdown + CSV tables and PNG plots for one run or a whole sweep.

Reads run directories only (config.yaml, run.json, metrics.jsonl, evals.jsonl, summary.json,
truncation/truncation.csv; see "Run directory (contract)" in the design) plus a sweep's sweep.json /
index/<n>.json. Never imports torch: this runs on a login node or a laptop, on sweeps still running.

DIR may be
  - one run directory (has run.json, metrics.jsonl or config.yaml),
  - a sweep directory (sweep.json, or index/*.json while the sweep still runs), or
  - any folder with run directories up to MAX_DEPTH levels below it.

Unfinished runs (no summary.json, or a status other than completed, collapsed or diverged) are reported with what
their files hold so far, and their status says so: "running", or "stalled" when nothing in the run was
written for max(30 min, 10 ticks); a half-written last line of a JSONL file is skipped.

Outputs (default DIR/report/), each written atomically (temp file, then os.replace):
  report.md       every table below, the plots, and which plots were skipped and why
  runs.csv        one row per run: status, steps, batch, world size, img/s, timing, losses, best metric, collapse
  scaling.csv     throughput against effective batch, ideal linear scaling in devices and efficiency
  evals.csv       every evaluation record, with its feature extractor
  truncation.csv  every run's truncation curve
  ablation.csv    one row per run: its swept values, headline metric, collapse step, img/s
  throughput.png  losses.png  sigma.png (sigma-2.png ...)  evals.png  truncation.png  ablation.png
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

MAX_DEPTH = 3               # folder levels searched below DIR for run directories
RUN_MARKERS = ("run.json", "metrics.jsonl", "config.yaml", "summary.json")
NOT_RUNS = {"checkpoints", "samples", "tb", "truncation", "index", "report", "__pycache__"}
FINISHED = {"completed", "collapsed", "diverged"}  # a run that ended with a result (diverged: non-finite)
EVAL_METRICS = ("eval/FID", "eval/IS", "eval/KID", "eval/precision", "eval/recall", "eval/class_acc")
LOWER_IS_BETTER = {"eval/FID", "eval/KID"}
TRUNC_COLUMNS = ("IS", "FID", "KID", "precision", "recall", "class_acc")
SIGMA_RUNS_PER_FILE = 6     # rows (runs) per sigma figure; more runs go to sigma-2.png, ...
MAX_LEGEND = 12             # more runs than this: the legend goes outside the axes, in small type
OUR_FILES = re.compile(r"^(report\.md|(runs|scaling|evals|truncation|ablation)\.csv|"
                       r"(throughput|losses|sigma(-\d+)?|evals|truncation|ablation)\.png)$")


class ReportError(ValueError):
    """Bad input: one line for the user, exit code 2."""


# ---- reading run directories -----------------------------------------------------------------------

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
    status: str = "unfinished"
    label: str = ""                             # the swept values, or the directory name
    swept: dict = field(default_factory=dict)   # {key: value} of the swept keys

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _read_jsonl(path: Path) -> tuple[list[dict], int]:
    """Rows of a JSONL file, and how many lines could not be read (a half-written last line)."""
    rows, bad = [], 0
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return rows, bad
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(row, dict):
            rows.append(row)
        else:
            bad += 1
    return rows, bad


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
        row = {"psi": None if psi in ("", "off", "None", "none") else _num(psi),
               "extractor": r.get("extractor") or "?", "num_samples": _num(r.get("num_samples")),
               "step": _num(r.get("step"))}
        row.update({k: _num(r.get(k)) for k in TRUNC_COLUMNS})
        out.append(row)
    return out


def _num(v):
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


def _is_run_dir(p: Path) -> bool:
    return any((p / m).is_file() for m in RUN_MARKERS)


def _is_sweep_dir(p: Path) -> bool:
    return (p / "sweep.json").is_file() or any((p / "index").glob("*.json"))


def _sweep_jobs(sweep: Path) -> list[dict]:
    """The sweep's jobs: index/<n>.json (fresher while the sweep runs), else sweep.json."""
    jobs = {}
    data = _read_json(sweep / "sweep.json") or {}
    for i, j in enumerate(data.get("jobs") or []):
        if isinstance(j, dict):
            jobs[j.get("job_num", i)] = j
    for p in (sweep / "index").glob("*.json"):
        j = _read_json(p)
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
    runs = sorted(found.values(), key=lambda r: (r.job is None, _job_order(r.job), _layer_key(str(r.path))))
    for r in runs:
        load_run(r)
    for r in jobs_without_dir:
        r.status = _status(r)
    return runs + jobs_without_dir


def _job_order(job):
    n = (job or {}).get("job_num")
    return (0, n, "") if isinstance(n, int) else (1, 0, str(n))


def load_run(r: Run) -> Run:
    p = r.path
    r.config = _read_config(p / "config.yaml")
    r.info = _read_json(p / "run.json") or {}
    r.summary = _read_json(p / "summary.json")
    r.metrics, bad_m = _read_jsonl(p / "metrics.jsonl")
    r.evals, bad_e = _read_jsonl(p / "evals.jsonl")
    r.metrics = [m for m in r.metrics if isinstance(m.get("step"), (int, float))]
    r.metrics.sort(key=lambda m: m["step"])
    r.evals = [e for e in r.evals if isinstance(e.get("step"), (int, float))]
    r.skipped_lines = bad_m + bad_e
    r.truncation = _read_truncation(p / "truncation" / "truncation.csv")
    r.status = _status(r)
    return r


STALLED_AFTER_S = 1800  # a "running" run with no file written for max(this, 10 ticks) is reported "stalled"


def _status(r: Run) -> str:
    status = _recorded_status(r)
    if status == "running" and _idle_seconds(r) > max(STALLED_AFTER_S, 10 * _longest_tick_s(r)):
        return "stalled"  # its job died without a signal (killed with its machine) or hangs
    return status


def _idle_seconds(r: Run) -> float:
    """Seconds since the training process last wrote one of its records (not a report written into the
    run directory: that is not the run's activity)."""
    newest = 0.0
    for p in (r.path / "metrics.jsonl", r.path / "evals.jsonl", r.path / "run.json",
              *[e for d in ("checkpoints", "samples") for e in _entries(r.path / d)]):
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
    walls = [m["time/wall_s"] for m in r.metrics if _finite(m.get("time/wall_s"))]
    return max((b - a for a, b in zip(walls, walls[1:])), default=walls[0] if walls else 0.0)


def _recorded_status(r: Run) -> str:
    """summary.json's status; else the sweep index's final state; else run.json's; else 'unfinished'."""
    if r.summary and r.summary.get("status"):
        return str(r.summary["status"])
    state = (r.job or {}).get("state")
    if state and state not in ("running", "completed"):  # failed / interrupted before writing a summary
        return str(state)
    if r.info.get("status") and r.info["status"] not in FINISHED:
        return str(r.info["status"])  # "running" (or a run that died without a summary)
    if state == "running":
        return "running"
    return "unfinished"


# ---- labels: which keys were swept ----------------------------------------------------------------

PREFERRED_KEYS = ("model", "model.family", "loss", "loss.name", "data", "data.name")


def _override_pairs(overrides) -> dict:
    out = {}
    for o in overrides or []:
        if "=" in o:
            k, v = o.split("=", 1)
            out[k.lstrip("+~")] = re.sub(r"\\(.)", r"\1", v)  # Hydra escapes ':' etc. in recorded overrides
    return out


def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(_short(x) for x in v) + "]"
    return "null" if v is None else str(v)


def swept_keys(runs: list[Run]) -> tuple[list[str], str]:
    """Keys whose values differ between runs, and where they came from ("index overrides" or
    "config.yaml diff"). Keys that split the runs exactly like an earlier key are dropped (choosing
    model=sagan also changes a dozen model.* keys), and run.* / hydra.* never count."""
    with_data = [r for r in runs if r.config or r.job]
    if len(with_data) < 2:
        return [], ""
    if all(r.job and r.job.get("overrides") is not None for r in with_data):
        values = [_override_pairs(r.job["overrides"]) for r in with_data]
        source = "index overrides"
    else:
        values = [{k: _short(v) for k, v in r.config.items()} for r in with_data]
        source = "config.yaml diff"
    keys: list[str] = []
    for v in values:
        keys += [k for k in v if k not in keys]
    keys = [k for k in keys if not k.startswith(("run.", "hydra.", "hydra/"))]
    keys.sort(key=lambda k: (PREFERRED_KEYS.index(k) if k in PREFERRED_KEYS else len(PREFERRED_KEYS)))
    chosen, partitions = [], set()
    for k in keys:
        col = tuple(v.get(k, "") for v in values)
        if len(set(col)) < 2:
            continue
        first_seen: dict = {}
        partition = tuple(first_seen.setdefault(x, len(first_seen)) for x in col)
        if partition in partitions:
            continue
        partitions.add(partition)
        chosen.append(k)
    for r, v in zip(with_data, values):
        r.swept = {k: v.get(k, "") for k in chosen}
    return chosen, source


def assign_labels(runs: list[Run], keys: list[str]) -> None:
    short = _short_keys(keys)
    for r in runs:
        if keys and r.swept:
            r.label = " ".join(f"{short[k]}={r.swept[k]}" for k in keys if r.swept[k] != "")
        else:
            r.label = r.name
    # Repeated labels (the same point run twice): add the folder name, then, for sweeps that reuse the
    # same folder names (run names hash the overrides), the sweep folder too. Plots look runs up by label.
    for tag in (lambda r: r.name, lambda r: f"{r.path.parent.name}/{r.name}"):
        counts = Counter(r.label for r in runs)
        for r in runs:
            if counts[r.label] > 1:
                base = r.label.split(" (", 1)[0] if r.label != r.name else ""
                r.label = f"{base} ({tag(r)})" if base else tag(r)


def _short_keys(keys: list[str]) -> dict[str, str]:
    """train.batch_size -> batch_size, unless two keys would end the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


# ---- numbers per run ------------------------------------------------------------------------------

def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def steady_values(rows: list[dict], key: str) -> list[float]:
    """The key's finite values over ticks, without the first tick (warm-up: compilation, cudnn
    autotuning, loader start) when there are at least three."""
    vals = [r[key] for r in rows if _finite(r.get(key))]
    return vals[1:] if len(vals) >= 3 else vals


def steady_median(rows: list[dict], key: str):
    vals = steady_values(rows, key)
    return statistics.median(vals) if vals else None


def _last(rows: list[dict], key: str):
    for r in reversed(rows):
        if key in r:
            return r[key]
    return None


def _first_not_none(*vals):
    return next((v for v in vals if v is not None), None)


def collapse_info(r: Run) -> tuple[int | None, str | None, list]:
    """(collapse step, reason, steps where the tick's stability/collapse flag was set)."""
    flagged = [m["step"] for m in r.metrics if _finite(m.get("stability/collapse")) and m["stability/collapse"] >= 1]
    s = r.summary or {}
    step = s.get("collapse_step")
    if step is None and flagged:
        step = flagged[0]
    return step, s.get("collapse_reason"), flagged


def primary_extractor(r: Run) -> str | None:
    exts = [e.get("extractor") for e in r.evals if e.get("extractor")]
    cfg = r.config.get("eval.extractor")
    if cfg in exts or (cfg and not exts):
        return cfg
    return Counter(exts).most_common(1)[0][0] if exts else cfg  # ties: the first seen


def best_eval(r: Run) -> dict:
    """{metric, value, step, extractor, from}: summary.json's best, else the best of evals.jsonl
    (the run's own extractor, untruncated records only)."""
    ext = primary_extractor(r)
    best = (r.summary or {}).get("best") or {}
    if best.get("metric") and _finite(best.get("value")):
        return {"metric": best["metric"], "value": best["value"], "step": best.get("step"), "extractor": ext,
                "from": "summary.json"}
    metric = r.config.get("eval.best_metric") or "eval/FID"
    cands = [e for e in r.evals if _finite(e.get(metric)) and e.get("extractor", ext) == ext
             and e.get("truncation") is None]
    if not cands:
        return {}
    pick = (min if metric in LOWER_IS_BETTER else max)(cands, key=lambda e: e[metric])
    return {"metric": metric, "value": pick[metric], "step": pick["step"], "extractor": ext, "from": "evals.jsonl"}


def run_row(r: Run) -> dict:
    """One runs.csv row. Where each number comes from (the tests re-derive them from the files):
    img_per_s          steady training throughput: median of the ticks' throughput/img_per_s, first tick
                       dropped (see steady_values); a tick after an evaluation is slow, the median ignores it
    img_per_s_overall  summary.json's images seen / training seconds (evaluations, checkpoints and sample
                       grids included); empty until the run finishes
    step_ms, *_ms      medians over ticks the same way; mfu the mean; peak_mem_gb the maximum
    loss_D, loss_G     the last tick's values
    best_*             summary.json's best evaluation, else the best in evals.jsonl (see best_eval)
    collapse_step      summary.json's collapse_step, else the first tick with stability/collapse = 1"""
    s, info, cfg, m = r.summary or {}, r.info, r.config, r.metrics
    world = _first_not_none(s.get("world_size"), info.get("world_size"), _last(m, "dist/world_size"),
                            (r.job or {}).get("world_size"))
    batch = _first_not_none(info.get("batch_size"), _last(m, "batch/per_device"), cfg.get("train.batch_size"))
    accum = _first_not_none(info.get("accumulate"), cfg.get("train.accumulate"))
    eff = _first_not_none(s.get("effective_batch"), info.get("effective_batch"), _last(m, "batch/effective"))
    if eff is None and None not in (batch, accum, world):
        eff = batch * accum * world
    overall = s.get("img_per_s") if _finite(s.get("img_per_s")) else None
    ips = _first_not_none(steady_median(m, "throughput/img_per_s"), overall)
    c_step, c_reason, flagged = collapse_info(r)
    best = best_eval(r)
    mfu = steady_values(m, "perf/mfu")
    mem = [x["mem/peak_gb"] for x in m if _finite(x.get("mem/peak_gb"))]
    row = {
        "run": r.label, "dir": str(r.path), "status": r.status, "finished": r.finished,
        "steps": _first_not_none(s.get("steps"), _last(m, "step")),
        "target_steps": _first_not_none(s.get("target_steps"), cfg.get("train.steps")),
        "kimg": _first_not_none(s.get("kimg"), _last(m, "kimg")),
        "model": cfg.get("model.family"), "loss": cfg.get("loss.name"),
        "world_size": world, "num_nodes": info.get("num_nodes"), "batch_size": batch, "accumulate": accum,
        "effective_batch": eff, "precision": _first_not_none(info.get("precision"), cfg.get("train.precision")),
        "device": info.get("device"),
        "img_per_s": ips, "img_per_s_overall": overall,
        "img_per_s_per_device": ips / world if _finite(ips) and world else None,
        "step_ms": steady_median(m, "time/step_ms"), "data_ms": steady_median(m, "time/data_ms"),
        "D_ms": steady_median(m, "time/D_ms"), "G_ms": steady_median(m, "time/G_ms"),
        "reg_ms": steady_median(m, "time/reg_ms"), "telemetry_ms": steady_median(m, "time/telemetry_ms"),
        "mfu": statistics.mean(mfu) if mfu else None, "peak_mem_gb": max(mem) if mem else None,
        "loss_D": _last(m, "loss/D"), "loss_G": _last(m, "loss/G"),
        "best_metric": best.get("metric"), "best_value": best.get("value"), "best_step": best.get("step"),
        "best_extractor": best.get("extractor"), "evals": len(r.evals),
        "collapse_step": c_step, "collapse_reason": c_reason, "collapse_ticks": len(flagged),
        "skipped_lines": r.skipped_lines, "error": (r.summary or {}).get("error") or (r.job or {}).get("error"),
    }
    for k, v in r.swept.items():
        row[f"swept:{k}"] = v
    return row


# ---- atomic output --------------------------------------------------------------------------------

class Writer:
    """Writes each output to a temp file beside it, then os.replace: never a half-written file."""

    def __init__(self, out: Path):
        self.out = out
        self.written: list[Path] = []

    def _commit(self, name: str, write) -> Path:
        path = self.out / name
        tmp = self.out / f".{name}.tmp-{os.getpid()}"
        try:
            write(tmp)
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        self.written.append(path)
        return path

    def text(self, name: str, text: str) -> Path:
        return self._commit(name, lambda p: p.write_text(text))

    def csv(self, name: str, rows: list[dict]) -> Path:
        columns = _columns(rows)
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        w.writeheader()
        for row in rows:
            w.writerow({k: _csv_cell(row.get(k)) for k in columns})
        return self.text(name, buf.getvalue())

    def figure(self, name: str, fig) -> Path:
        from matplotlib.backends.backend_agg import FigureCanvasAgg

        FigureCanvasAgg(fig)
        return self._commit(name, lambda p: fig.savefig(p, format="png", dpi=110, bbox_inches="tight"))


def _columns(rows: list[dict]) -> list[str]:
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _csv_cell(v):
    if v is None:
        return ""
    if isinstance(v, bool):
        return "yes" if v else "no"
    return v  # floats keep full precision (str(float) is repr)


# ---- formatting -----------------------------------------------------------------------------------

def fmt(v, digits: int = 4) -> str:
    if v is None or v == "":
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if v != 0 and (abs(v) >= 10 ** (digits + 2) or abs(v) < 10 ** -(digits - 1)):
            return f"{v:.{digits - 1}e}"
        if abs(v) >= 10 ** digits:
            return f"{v:.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def md_table(header: list[str], rows: list[list]) -> str:
    def cell(x):
        return fmt(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def text_table(header: list[str], rows: list[list]) -> str:
    cells = [header] + [[fmt(x) for x in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _status_cell(status: str) -> str:
    return status if status == "completed" else f"**{status}**"


# ---- plots ----------------------------------------------------------------------------------------

def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(w, h), layout="constrained")


def _colors(n: int):
    from matplotlib import colormaps

    if n <= 10:
        return [colormaps["tab10"](i) for i in range(n)]
    cmap = colormaps["viridis"]
    return [cmap(i / max(n - 1, 1)) for i in range(n)]


def _auto_yscale(ax, values, positive_only: bool = False) -> None:
    """Log (symlog where values reach zero or below) when the largest values dwarf the typical one:
    a collapse spike of 1e3 over losses of about 1 would otherwise flatten every other curve."""
    vals = [v for v in values if _finite(v)]
    mags = [abs(v) for v in vals if v != 0]
    if len(mags) < 2:
        return
    typical = statistics.median(mags)
    if positive_only and all(v > 0 for v in vals):
        if max(vals) / min(vals) > 30:
            ax.set_yscale("log")
            _plain_ticks(ax.yaxis)
    elif max(mags) > 20 * typical and max(mags) > 10:
        ax.set_yscale("symlog", linthresh=10.0 ** math.floor(math.log10(max(typical, 1e-3))))
        _plain_ticks(ax.yaxis)
        ax.yaxis.set_minor_formatter(lambda v, _: "")


def _legend_kw(outside: bool) -> dict:
    """Legend settings: small, and to the right of the axes when there are many entries."""
    if outside:
        return dict(fontsize=6, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return dict(fontsize=7)


def _legend(ax, n: int, **kw) -> None:
    ax.legend(**_legend_kw(n > MAX_LEGEND), **kw)


def _collapse_marks(ax, r: Run, color, offset: int = 0) -> bool:
    """A dashed vertical line at the collapse step, and a small triangle along the top edge at every
    flagged tick (one row of triangles per run: `offset`)."""
    from matplotlib.transforms import blended_transform_factory

    step, _, flagged = collapse_info(r)
    if step is not None:
        ax.axvline(step, color=color, ls="--", lw=1.6, alpha=0.8)
    if flagged:
        tr = blended_transform_factory(ax.transData, ax.transAxes)
        ax.plot(flagged, [0.97 - 0.045 * offset] * len(flagged), ls="none", marker="v",
                ms=6 if len(flagged) < 40 else 3.5, color=color,
                transform=tr, clip_on=False)
    return step is not None or bool(flagged)


def _collapse_legend(ax, **kw) -> None:
    """The axes' own legend plus proxies explaining the collapse marks."""
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles += [Line2D([], [], color="grey", ls="--", lw=1.6),
                Line2D([], [], color="grey", ls="none", marker="v", ms=6)]
    labels += ["collapse step", "tick with stability/collapse = 1"]
    ax.legend(handles, labels, **kw)


def _series(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if key in r and r[key] is not None and isinstance(r[key], (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_throughput(table: list[dict], w: Writer) -> tuple[str | None, str | None]:
    """img/s against effective batch (log2 x), one line per world size, dashed: ideal linear scaling in
    devices (see scaling_table); scaling efficiency = actual / ideal below. `table`: scaling_table()."""
    batches = sorted({t["effective_batch"] for t in table})
    if len(batches) < 2:
        why = ("no img/s recorded" if not table else
               f"only one effective batch size ({fmt(batches[0])}): nothing to scale against")
        return None, why
    worlds = sorted({t["world_size"] or 1 for t in table})
    fig = _figure(7.5, 6.5)
    ax, ax2 = fig.subplots(2, 1, sharex=True, height_ratios=[3, 2])
    colors = _colors(len(worlds))
    for world, c in zip(worlds, colors):
        g = [t for t in table if (t["world_size"] or 1) == world]
        name = f"world size {world}" if len(worlds) > 1 else "runs"
        xs = sorted({t["effective_batch"] for t in g})
        for axis, key in ((ax, "img_per_s"), (ax2, "efficiency")):
            # every run a point (hollow: not finished); the line joins the medians of repeated points
            for fin in (True, False):
                pts = [t for t in g if t["finished"] == fin]
                axis.plot([t["effective_batch"] for t in pts], [t[key] for t in pts], "o", color=c, ms=6,
                          mfc=c if fin else "white", label=(name if fin else f"{name}, not finished")
                          if pts and axis is ax else None)
            axis.plot(xs, [statistics.median(t[key] for t in g if t["effective_batch"] == x) for x in xs], "-",
                      color=c, lw=1.5, label="median" if axis is ax and len(xs) < len(g) else None)
    # ideal linear scaling in devices: w / w0 x the same per-device work at the smallest world size
    for world, c in zip(worlds, colors):
        g = sorted((t for t in table if (t["world_size"] or 1) == world), key=lambda t: t["effective_batch"])
        if world != worlds[0] and g:
            xs = sorted({t["effective_batch"] for t in g})
            ideal = [statistics.median(t["ideal_img_per_s"] for t in g if t["effective_batch"] == x) for x in xs]
            ax.plot(xs, ideal, "--", color=c, lw=1,
                    label=f"ideal for world size {world} ({world / worlds[0]:g}x world {worlds[0]})")
    ax2.axhline(1.0, color="k", ls="--", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    _plain_ticks(ax.yaxis)
    ax.set_ylabel("throughput (img/s)")
    ax.set_title("Throughput vs effective batch (batch x processes x accumulate)")
    ax.grid(True, which="both", alpha=0.3)
    _legend(ax, len(worlds) + 2)
    ax2.set_xscale("log", base=2)
    ax2.set_xticks(batches, [fmt(b) for b in batches])
    ax2.set_xlabel("effective batch (images per optimiser step)")
    ax2.set_ylabel("scaling efficiency\n(actual / ideal)")
    ax2.set_ylim(0, max(1.1, max(t["efficiency"] for t in table) * 1.1))
    ax2.grid(True, alpha=0.3)
    w.figure("throughput.png", fig)
    return "throughput.png", None


def _plain_ticks(axis) -> None:
    """Log-axis tick labels as plain numbers (60, not 6 x 10^1); minor ticks labelled only at 2 and 5 x
    10^k when the axis spans more than a decade, so that the labels do not run into each other."""
    from matplotlib.ticker import FuncFormatter

    def minor(v, _):
        lo, hi = sorted(abs(x) for x in axis.get_view_interval())
        if lo > 0 and hi / lo > 10:
            mant = abs(v) / 10 ** math.floor(math.log10(abs(v))) if v else 0
            if round(mant, 6) not in (2.0, 5.0):
                return ""
        return fmt(float(v), 3)

    axis.set_major_formatter(FuncFormatter(lambda v, _: fmt(float(v), 3)))
    axis.set_minor_formatter(FuncFormatter(minor))


def _no_offset(ax) -> None:
    """Plain tick labels (1.0025, not 0.0005 + 1.002) on linear axes."""
    for axis in (ax.xaxis, ax.yaxis):
        f = axis.get_major_formatter()
        if hasattr(f, "set_useOffset"):
            f.set_useOffset(False)


def _int_steps(ax) -> None:
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def scaling_table(rows: list[dict]) -> list[dict]:
    """Scaling in devices (weak scaling): the ideal img/s of a run with world size w is w / w0 times the
    img/s of the same per-device work (batch_size, accumulate) at the smallest world size w0 (median
    over repeats); with no such reference run, the smallest configuration's img/s per device x w.
    efficiency = actual / ideal, so 1.0 means adding devices added throughput linearly."""
    w0 = min((r["world_size"] or 1) for r in rows)
    at_w0 = [r for r in rows if (r["world_size"] or 1) == w0]
    small = min(at_w0, key=lambda r: (r["effective_batch"], r["run"]))
    fallback = statistics.median(r["img_per_s"] for r in at_w0 if r["effective_batch"] == small["effective_batch"]
                                 and r["batch_size"] == small["batch_size"]) / w0

    def per_device_ref(r):
        same = [x["img_per_s"] for x in at_w0 if x["batch_size"] == r["batch_size"]
                and x["accumulate"] == r["accumulate"]]
        return statistics.median(same) / w0 if same else fallback

    out = []
    for r in sorted(rows, key=lambda r: (r["effective_batch"], r["world_size"] or 1, r["run"])):
        ideal = per_device_ref(r) * (r["world_size"] or 1)
        out.append({"run": r["run"], "status": r["status"], "finished": r["finished"],
                    "effective_batch": r["effective_batch"], "world_size": r["world_size"],
                    "batch_size": r["batch_size"], "accumulate": r["accumulate"], "img_per_s": r["img_per_s"],
                    "img_per_s_per_device": r["img_per_s_per_device"], "ideal_img_per_s": ideal,
                    "efficiency": r["img_per_s"] / ideal if ideal else None, "step_ms": r["step_ms"],
                    "mfu": r["mfu"], "peak_mem_gb": r["peak_mem_gb"]})
    return out


def plot_losses(runs: list[Run], w: Writer) -> tuple[str | None, str | None]:
    have = [r for r in runs if any("loss/D" in m or "loss/G" in m for m in r.metrics)]
    if not have:
        return None, "no loss/D or loss/G in any metrics.jsonl"
    fig = _figure(8, 6.5)
    axes = fig.subplots(2, 1, sharex=True)
    colors = _colors(len(have))
    marked = False
    for ax, key in zip(axes, ("loss/D", "loss/G")):
        allv = []
        for i, (r, c) in enumerate(zip(have, colors)):
            xs, ys = _series(r.metrics, key)
            allv += ys
            ax.plot(xs, ys, color=c, lw=1.3, marker="." if len(xs) < 30 else None, label=r.label)
            marked = _collapse_marks(ax, r, c, offset=i) or marked
        _auto_yscale(ax, allv)
        _int_steps(ax)
        ax.set_ylabel(key)
        ax.grid(True, alpha=0.3)
    axes[0].set_title("Losses per tick")
    axes[1].set_xlabel("step (G updates)")
    kw = _legend_kw(len(have) > MAX_LEGEND)
    if marked:
        _collapse_legend(axes[0], **kw)
    else:
        axes[0].legend(**kw)
    w.figure("losses.png", fig)
    return "losses.png", None


def _layer_key(name: str):
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def plot_sigma(runs: list[Run], w: Writer) -> tuple[list[str], str | None]:
    """sigma0 per layer against step: one row per run, G left, D right; collapse marked."""
    have = []
    for r in runs:
        layers = {}
        for net in ("G", "D"):
            keys = {k for m in r.metrics for k in m if k.startswith(f"sigma/{net}/") and k.endswith("/s0")}
            layers[net] = sorted(keys, key=lambda k: _layer_key(k[len(f"sigma/{net}/"):-3]))
        if layers["G"] or layers["D"]:
            have.append((r, layers))
    if not have:
        return [], "no sigma/<net>/<layer>/s0 keys in metrics.jsonl (telemetry.sigma_every = 0?)"
    names = []
    for chunk_i in range(0, len(have), SIGMA_RUNS_PER_FILE):
        chunk = have[chunk_i:chunk_i + SIGMA_RUNS_PER_FILE]
        fig = _figure(15, max(4.5, 3.4 * len(chunk) + 0.4))
        axes = fig.subplots(len(chunk), 2, squeeze=False)
        previous = {"G": None, "D": None}
        for row, (r, layers) in enumerate(chunk):
            for col, net in enumerate(("G", "D")):
                ax = axes[row][col]
                keys = layers[net]
                if not keys:
                    ax.text(0.5, 0.5, f"no sigma for {net}", ha="center", va="center", transform=ax.transAxes)
                    ax.set_axis_off()
                    continue
                allv = []
                colors = _colors(len(keys)) if len(keys) <= 10 else _layer_colors(len(keys))
                for i, (k, c) in enumerate(zip(keys, colors)):
                    xs, ys = _series(r.metrics, k)
                    allv += ys
                    ax.plot(xs, ys, color=c, lw=1.1, ls=("-", "--", ":")[i % 3] if len(keys) > 10 else "-",
                            marker="." if len(xs) < 30 else None, label=k[len(f"sigma/{net}/"):-3])
                _collapse_marks(ax, r, "red")
                _auto_yscale(ax, allv, positive_only=True)
                _int_steps(ax)
                _no_offset(ax)
                ax.set_title(f"{r.label}: {net} sigma0" + (f" [{r.status}]" if not r.finished else ""), fontsize=9)
                ax.set_ylabel("largest singular value")
                ax.set_xlabel("step")
                ax.grid(True, alpha=0.3)
                if previous[net] != keys:  # same layers as the row above: no second legend
                    ax.legend(**_legend_kw(True), ncol=1 if len(keys) <= 24 else 2)
                previous[net] = keys
        fig.suptitle("sigma0 (largest singular value) per layer; red dashed line: collapse step; "
                     "red triangles: ticks with stability/collapse = 1", fontsize=10)
        name = "sigma.png" if chunk_i == 0 else f"sigma-{chunk_i // SIGMA_RUNS_PER_FILE + 1}.png"
        w.figure(name, fig)
        names.append(name)
    return names, None


def _layer_colors(n: int):
    from matplotlib import colormaps

    cmap = colormaps["turbo"]
    return [cmap(0.05 + 0.9 * i / max(n - 1, 1)) for i in range(n)]


def eval_records(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        for e in sorted(r.evals, key=lambda e: e["step"]):
            row = {"run": r.label, "dir": str(r.path), "step": e["step"], "extractor": e.get("extractor") or "?",
                   "num_samples": e.get("num_samples"), "truncation": e.get("truncation"),
                   "source": e.get("source") or "training", "checkpoint": e.get("checkpoint")}
            row.update({k: e.get(k) for k in EVAL_METRICS + ("eval/IS_std", "eval/KID_std", "eval/f_score")})
            rows.append(row)
    return rows


def plot_evals(runs: list[Run], records: list[dict], w: Writer) -> tuple[str | None, str | None]:
    """Metrics against step: one row of panels per feature extractor (numbers from different
    extractors are not comparable, so they never share an axis), one line per run."""
    if not records:
        return None, "no evals.jsonl records (eval.every = 0 and no `bench eval`)"
    extractors = sorted({e["extractor"] for e in records})
    metrics = [k for k in EVAL_METRICS if any(_finite(e.get(k)) for e in records)]
    if not metrics:
        return None, "evals.jsonl records hold none of " + ", ".join(EVAL_METRICS)
    labels = [r.label for r in runs if r.evals]
    colors = dict(zip(labels, _colors(len(labels))))
    ncol = min(3, len(metrics))
    per_ext = -(-len(metrics) // ncol)  # rows of panels per extractor
    fig = _figure(4.0 * ncol + 2.5, 3.0 * per_ext * len(extractors) + 0.4)
    axes = fig.subplots(per_ext * len(extractors), ncol, squeeze=False)
    for ax in axes.flat[len(metrics) * len(extractors):]:
        ax.set_axis_off()
    for i, ext in enumerate(extractors):
        for j, key in enumerate(metrics):
            ax = axes[i * per_ext + j // ncol][j % ncol]
            allv = []
            for label in labels:
                groups: dict = {}
                for e in records:
                    if e["run"] == label and e["extractor"] == ext and _finite(e.get(key)):
                        groups.setdefault(e["truncation"], []).append(e)
                for psi, g in groups.items():
                    xs, ys = [e["step"] for e in g], [e[key] for e in g]
                    allv += ys
                    name = label if psi is None else f"{label} (psi={_short(psi)})"
                    ax.plot(xs, ys, "o-" if psi is None else "x:", color=colors[label], ms=4, lw=1.2, label=name)
            if not allv:
                ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
            elif key in ("eval/FID", "eval/KID"):
                _auto_yscale(ax, allv, positive_only=True)
            better = " (lower is better)" if key in LOWER_IS_BETTER else ""
            ax.set_title(f"{key.split('/', 1)[1]}{better}  [extractor: {ext}]", fontsize=9)
            ax.set_xlabel("step")
            _int_steps(ax)
            _no_offset(ax)
            ax.grid(True, alpha=0.3)
    handles, names = [], []
    for ax in axes.flat:
        for h, n in zip(*ax.get_legend_handles_labels()):
            if n not in names:
                handles.append(h)
                names.append(n)
    fig.legend(handles, names, loc="outside right upper", fontsize=7)
    w.figure("evals.png", fig)
    return "evals.png", None


def truncation_records(runs: list[Run]) -> list[dict]:
    out = []
    for r in runs:
        for t in r.truncation:
            out.append({"run": r.label, "dir": str(r.path), **{k: t.get(k) for k in
                        ("psi",) + TRUNC_COLUMNS + ("extractor", "num_samples", "step")}})
    return out


def _psi_order(psi):
    return math.inf if psi is None else psi


def plot_truncation(records: list[dict], w: Writer) -> tuple[str | None, str | None]:
    """IS against FID and precision against recall, points labelled by psi; one row per extractor."""
    if not records:
        return None, "no truncation/truncation.csv in any run (`bench truncation run=DIR` writes one)"
    extractors = sorted({t["extractor"] for t in records})
    labels = list(dict.fromkeys(t["run"] for t in records))
    colors = dict(zip(labels, _colors(len(labels))))
    fig = _figure(12, 4.6 * len(extractors) + 0.4)
    axes = fig.subplots(len(extractors), 2, squeeze=False)
    for i, ext in enumerate(extractors):
        for ax, (xk, yk) in zip(axes[i], (("FID", "IS"), ("recall", "precision"))):
            for label in labels:
                pts = sorted((t for t in records if t["run"] == label and t["extractor"] == ext
                              and _finite(t.get(xk)) and _finite(t.get(yk))), key=lambda t: _psi_order(t["psi"]))
                if not pts:
                    continue
                ax.plot([t[xk] for t in pts], [t[yk] for t in pts], "o-", color=colors[label], ms=5, label=label)
                for t in pts:
                    ax.annotate("off" if t["psi"] is None else f"{t['psi']:g}", (t[xk], t[yk]),
                                textcoords="offset points", xytext=(5, 4), fontsize=7, color=colors[label])
            ax.margins(0.1)
            _no_offset(ax)
            ax.set_xlabel(xk + (" (lower is better)" if xk == "FID" else ""))
            ax.set_ylabel(yk)
            ax.grid(True, alpha=0.3)
            ax.set_title(f"{yk} vs {xk} by truncation psi  [extractor: {ext}]", fontsize=9)
            if xk == "recall":
                ax.set_xlim(-0.02, 1.05)
                ax.set_ylim(-0.02, 1.07)
        _legend(axes[i][0], len(labels))
    w.figure("truncation.png", fig)
    return "truncation.png", None


def ablation_rows(runs: list[Run], rows: list[dict], keys: list[str]) -> tuple[list[dict], str | None]:
    """One row per run with its swept values, the headline number, the collapse step and img/s.
    Headline: the best evaluation (same metric and extractor for all runs) where every evaluated run
    has one, else the final loss/D."""
    bests = [(row["best_metric"], row["best_extractor"]) for row in rows if row["best_value"] is not None]
    headline = Counter(bests).most_common(1)[0][0] if bests else None  # ties: the first seen
    out = []
    for r, row in zip(runs, rows):
        if headline and (row["best_metric"], row["best_extractor"]) == headline:
            value = row["best_value"]
        else:
            value = None if headline else row["loss_D"]
        out.append({"run": r.label, **{k: r.swept.get(k) for k in keys}, "status": r.status,
                    "metric": (f"best {headline[0]} [{headline[1]}]" if headline else "final loss/D"),
                    "value": value, "collapse_step": row["collapse_step"], "img_per_s": row["img_per_s"]})
    metric = (headline[0] if headline else "loss/D")
    return out, metric


def plot_ablation(abl: list[dict], keys: list[str], metric: str, w: Writer) -> tuple[str | None, str | None]:
    """A heatmap of the headline metric, one cell per run, each annotated with metric, collapse step and
    img/s. Two or more swept keys: rows = all but the last key, columns = the last key."""
    if len(abl) < 2:
        return None, "one run: no ablation to show"
    import numpy as np
    from matplotlib import colormaps

    abl = [{**a, **{k: ("(unset)" if a.get(k) in ("", None) else a[k]) for k in keys}} for a in abl]
    if keys:
        row_keys, col_keys = _matrix_axes(abl, keys)
        col_key = " x ".join(col_keys)

        short = _short_keys(col_keys)

        def clabel(a):
            return str(a[col_keys[0]]) if len(col_keys) == 1 else " ".join(f"{short[k]}={a[k]}" for k in col_keys)

        def rlabel(a):
            return " ".join(f"{k}={a[k]}" for k in row_keys)

        rlabels = list(dict.fromkeys(rlabel(a) for a in abl))
        clabels = sorted(dict.fromkeys(clabel(a) for a in abl), key=_natural)
        if len(rlabels) > 1:
            rlabels = sorted(rlabels, key=_natural)
        cells = {}
        for a in abl:
            cells.setdefault((rlabel(a), clabel(a)), []).append(a)
        if any(len(v) > 1 for v in cells.values()):  # repeated points: fall back to one cell per run
            keys = []
    if not keys:
        rlabels, clabels, col_key = [""], [a["run"] for a in abl], "run"
        cells = {("", a["run"]): [a] for a in abl}
    grid = np.full((len(rlabels), len(clabels)), np.nan)
    for (rl, cl), (a, *_) in cells.items():
        if _finite(a["value"]):
            grid[rlabels.index(rl), clabels.index(cl)] = a["value"]
    lower = metric in LOWER_IS_BETTER
    reverse = lower  # better = brighter; a loss says nothing about quality: plain viridis
    cmap = colormaps["viridis_r" if reverse else "viridis"].with_extremes(bad="#dddddd")
    cw = max(1.9, max(len(str(c)) for c in clabels) * 0.075)
    fig = _figure(min(2.2 + cw * len(clabels), 40), 1.4 + 1.25 * len(rlabels))
    ax = fig.subplots()
    im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, aspect="auto")
    finite = grid[np.isfinite(grid)]
    mid = (finite.min() + finite.max()) / 2 if finite.size else 0
    for (rl, cl), (a, *_) in cells.items():
        i, j = rlabels.index(rl), clabels.index(cl)
        lines = [f"{metric.split('/')[-1]} {fmt(a['value'])}",
                 f"collapse {fmt(a['collapse_step'])}",
                 f"{fmt(a['img_per_s'], 3)} img/s"]
        if a["status"] != "completed":
            lines.append(f"[{a['status']}]")
        v = grid[i, j]
        dark = bool(np.isfinite(v)) and ((v > mid) if reverse else (v < mid))
        ax.text(j, i, "\n".join(lines), ha="center", va="center", fontsize=8,
                color="white" if dark else "black")
    for i in range(len(rlabels)):
        for j in range(len(clabels)):
            if (rlabels[i], clabels[j]) not in cells:
                ax.text(j, i, "no run", ha="center", va="center", fontsize=8, color="grey")
    tilt = sum(len(str(c)) for c in clabels) > 12 * len(clabels)
    ax.set_xticks(range(len(clabels)), [str(c) for c in clabels], rotation=20 if tilt else 0,
                  ha="right" if tilt else "center", fontsize=8)
    ax.set_yticks(range(len(rlabels)), rlabels, fontsize=8)
    ax.set_xlabel(col_key)
    if finite.size:
        better = "" if metric.startswith("loss/") else f" ({'lower' if lower else 'higher'} is better)"
        fig.colorbar(im, ax=ax, label=metric + better, shrink=0.9)
    title = abl[0]["metric"]
    ax.set_title(f"Ablation: {title}, collapse step, throughput", fontsize=10)
    w.figure("ablation.png", fig)
    return "ablation.png", None


def _matrix_axes(abl: list[dict], keys: list[str]) -> tuple[list[str], list[str]]:
    """Which swept keys make the rows and which the columns of the ablation matrix. Up to two keys:
    rows = the first, columns = the last. More: the split (keys in their order on each axis) whose grid is
    closest to square in inches (a cell is ~1.5x wider than tall), at most 12 columns; a 3 x 2 x 4 x 2 x 2
    grid becomes 12 rows x 8 columns instead of 48 x 2."""
    import itertools

    if len(keys) <= 2:
        return keys[:-1], keys[-1:]
    size = {k: len({str(a[k]) for a in abl}) for k in keys}
    best = None
    for n in range(1, len(keys)):
        for cols in itertools.combinations(keys, n):
            nc = math.prod(size[k] for k in cols)
            nr = math.prod(size[k] for k in keys if k not in cols)
            if nc > 12:
                continue
            score = (abs(math.log(1.5 * nc / nr)), -keys.index(cols[-1]), n)
            if best is None or score < best[0]:
                best = (score, [k for k in keys if k not in cols], list(cols))
    return (best[1], best[2]) if best else (keys[:-1], keys[-1:])


def _natural(s):
    s = str(s)
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, _layer_key(s))


# ---- the report -----------------------------------------------------------------------------------

RUN_TABLE = [("run", "run"), ("status", "status"), ("steps", "steps"), ("eff. batch", "effective_batch"),
             ("world", "world_size"), ("img/s", "img_per_s"), ("ms/step", "step_ms"), ("peak GB", "peak_mem_gb"),
             ("loss/D", "loss_D"), ("loss/G", "loss_G"), ("best", "best_metric"), ("value", "best_value"),
             ("@step", "best_step"), ("collapse", "collapse_step")]


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
    w = Writer(out)
    skipped: dict[str, str] = {}      # plot -> why it was not written

    def plot(name: str, fn, *a) -> list[str]:
        """One plot function: its file names, or [] with the reason recorded in `skipped`."""
        try:
            files, why = fn(*a)
        except Exception as exc:  # a plot that fails on odd data must not cost the rest of the report
            print(f"warning: {name} not written: {exc.__class__.__name__}: {exc}", file=sys.stderr)
            skipped[name] = f"failed: {exc.__class__.__name__}: {exc}"
            return []
        if not files:
            skipped[name] = why
        return [files] if isinstance(files, str) else list(files or [])

    w.csv("runs.csv", rows)
    pts = [r for r in rows if _finite(r["img_per_s"]) and _finite(r["effective_batch"])]
    scaling = scaling_table(pts) if pts else []
    if scaling:
        w.csv("scaling.csv", scaling)
    plot("throughput.png", plot_throughput, scaling, w)
    plot("losses.png", plot_losses, runs, w)
    sigma_files = plot("sigma.png", plot_sigma, runs, w)
    records = eval_records(runs)
    if records:
        w.csv("evals.csv", records)
    plot("evals.png", plot_evals, runs, records, w)
    trunc = truncation_records(runs)
    if trunc:
        w.csv("truncation.csv", trunc)
    plot("truncation.png", plot_truncation, trunc, w)
    abl, metric = ablation_rows(runs, rows, keys)
    if len(abl) >= 2:
        w.csv("ablation.csv", abl)
    plot("ablation.png", plot_ablation, abl, keys, metric, w)
    written_names = {p.name for p in w.written} | {"report.md"}
    md = render_markdown(root, runs, rows, keys, key_source, scaling, records, trunc, abl,
                         written_names, sigma_files, skipped)
    w.text("report.md", md)
    _remove_stale(out, {p.name for p in w.written})
    return {"runs": runs, "rows": rows, "written": w.written, "skipped": skipped, "keys": keys}


def _remove_stale(out: Path, written: set[str]) -> None:
    """Outputs of an earlier report that this one did not write (e.g. a plot that now has no data)."""
    for p in out.iterdir():
        if p.is_file() and OUR_FILES.match(p.name) and p.name not in written:
            try:
                p.unlink()
            except OSError:
                pass


def _md_runs(rows: list[dict]) -> str:
    return md_table([h for h, _ in RUN_TABLE],
                    [[_status_cell(r[k]) if k == "status" else r[k] for _, k in RUN_TABLE] for r in rows])


def render_markdown(root, runs, rows, keys, key_source, scaling, records, trunc, abl, written,
                    sigma_files, skipped) -> str:
    n_fin = sum(r.finished for r in runs)
    L = [f"# gan-bench report: `{root.resolve()}`", "",
         f"{len(runs)} run(s): {n_fin} finished, {len(runs) - n_fin} not "
         f"(generated {time.strftime('%Y-%m-%d %H:%M:%S')} by `bench report`; all numbers read from the run "
         "directories).", ""]
    if keys:
        L += [f"Swept ({key_source}): " + ", ".join(f"`{k}`" for k in keys), ""]
    unfinished = [r for r in runs if not r.finished]
    if unfinished:
        L += ["**Not finished** (numbers are what their files hold so far): "
              + "; ".join(f"{r.label} ({r.status})" for r in unfinished), ""]
        if any(r.status == "stalled" for r in unfinished):
            L += [f"`stalled`: marked running, but nothing written for over {STALLED_AFTER_S // 60} minutes (or "
                  "10 ticks): its job most likely died without a signal (killed with its node). Running "
                  "the same command with the same `run.dir` resumes it from its last checkpoint.", ""]
    partial = [r for r in runs if r.skipped_lines]
    if partial:
        L += ["Skipped unreadable JSONL lines (a half-written last line of a running job): "
              + "; ".join(f"{r.label}: {r.skipped_lines}" for r in partial), ""]
    errors = [(row["run"], row["error"]) for row in rows if row.get("error")]
    L += ["## Runs", "", _md_runs(rows), "",
          "img/s and ms/step: median over ticks, first tick dropped (steady training throughput; "
          "`img_per_s_overall` in `runs.csv` is summary.json's images / wall seconds, evaluations and "
          "checkpoints included). best: the best evaluation (summary.json, else evals.jsonl). "
          "All columns: `runs.csv`.", ""]
    if errors:
        L += ["Errors:", ""] + [f"- {name}: `{err}`" for name, err in errors] + [""]

    L += ["## Throughput scaling", ""]
    if scaling:
        L += [md_table(["run", "status", "eff. batch", "world", "batch/dev", "accum", "img/s", "img/s/dev",
                        "ideal img/s", "efficiency", "ms/step", "MFU", "peak GB"],
                       [[s["run"], _status_cell(s["status"]), s["effective_batch"], s["world_size"], s["batch_size"],
                         s["accumulate"], s["img_per_s"], s["img_per_s_per_device"], s["ideal_img_per_s"],
                         s["efficiency"], s["step_ms"], s["mfu"], s["peak_mem_gb"]] for s in scaling]), "",
              "ideal = world size / smallest world size x img/s of the same per-device batch and accumulation on "
              "the smallest world size (linear scaling in devices); efficiency = actual / ideal. `scaling.csv`.", ""]
    L += _img(written, "throughput.png", skipped)
    timing = [r for r in rows if r["step_ms"] is not None]
    if timing:
        L += ["Step time split (median ms per tick):", "",
              md_table(["run", "step", "data", "D", "G", "reg", "telemetry"],
                       [[r["run"], r["step_ms"], r["data_ms"], r["D_ms"], r["G_ms"], r["reg_ms"], r["telemetry_ms"]]
                        for r in timing]), ""]

    L += ["## Losses", ""] + _img(written, "losses.png", skipped)
    L += ["## Spectral norms (sigma0 of every G and D layer)", ""]
    if sigma_files:
        L += [f"![{f}]({f})" for f in sigma_files] + [""]
        L += ["Dashed red line: collapse step (summary.json, else the first flagged tick); red triangles: ticks "
              "with `stability/collapse` = 1.", ""]
    else:
        L += _img(written, "sigma.png", skipped)
    collapsed = [r for r in rows if r["collapse_step"] is not None]
    if collapsed:
        L += [md_table(["run", "collapse step", "reason", "flagged ticks"],
                       [[r["run"], r["collapse_step"], r["collapse_reason"], r["collapse_ticks"]] for r in collapsed]),
              ""]

    L += ["## Evaluations", ""]
    if records:
        best_rows = []
        for r in runs:
            for ext in sorted({e.get("extractor") or "?" for e in r.evals}):
                recs = [e for e in records if e["dir"] == str(r.path) and e["extractor"] == ext
                        and e["truncation"] is None and _finite(e.get("eval/FID"))]
                if recs:
                    b = min(recs, key=lambda e: e["eval/FID"])
                    best_rows.append([r.label, ext, b["num_samples"], b["step"], len(recs)]
                                     + [b.get(k) for k in EVAL_METRICS])
        if best_rows:
            L += ["Lowest-FID evaluation per run and feature extractor (numbers from different extractors are "
                  "not comparable):", "",
                  md_table(["run", "extractor", "samples", "step", "evals"] + [k.split("/")[1] for k in EVAL_METRICS],
                           best_rows), "", "Every record: `evals.csv`.", ""]
    L += _img(written, "evals.png", skipped)

    L += ["## Truncation trade-off", ""]
    if trunc:
        L += [md_table(["run", "extractor", "psi", *TRUNC_COLUMNS, "samples", "step"],
                       [[t["run"], t["extractor"], "off" if t["psi"] is None else t["psi"],
                         *[t[k] for k in TRUNC_COLUMNS], t["num_samples"], t["step"]]
                        for t in sorted(trunc, key=lambda t: (t["run"], t["extractor"], _psi_order(t["psi"])))]),
              "", "`truncation.csv`.", ""]
    L += _img(written, "truncation.png", skipped)

    L += ["## Ablation matrix", ""]
    if len(abl) >= 2:
        L += [md_table(["run", *keys, "status", abl[0]["metric"], "collapse step", "img/s"],
                       [[a["run"], *[a[k] for k in keys], _status_cell(a["status"]), a["value"], a["collapse_step"],
                         a["img_per_s"]] for a in abl]), "", "`ablation.csv`.", ""]
        if len(keys) == 2 and len({(a[keys[0]], a[keys[1]]) for a in abl}) == len(abl):  # one run per cell
            L += _pivot(abl, keys)
    L += _img(written, "ablation.png", skipped)

    if skipped:
        L += ["## Plots not written", ""] + [f"- `{k}`: {v}" for k, v in skipped.items()] + [""]
    L += ["## Files", ""] + [f"- `{n}`" for n in sorted(written)] + [""]
    return "\n".join(L)


def _pivot(abl: list[dict], keys: list[str]) -> list[str]:
    rk, ck = keys
    rvals = sorted(dict.fromkeys(a[rk] for a in abl), key=_natural)
    cvals = sorted(dict.fromkeys(a[ck] for a in abl), key=_natural)
    cell = {(a[rk], a[ck]): a for a in abl}
    body = []
    for rv in rvals:
        line = [f"{rk}={rv}"]
        for cv in cvals:
            a = cell.get((rv, cv))
            line.append("" if a is None else f"{fmt(a['value'])} / {fmt(a['collapse_step'])} / {fmt(a['img_per_s'], 3)}")
        body.append(line)
    return [f"{abl[0]['metric']} / collapse step / img/s:", "",
            md_table([f"{rk} \\ {ck}"] + [f"{ck}={c}" for c in cvals], body), ""]


def _img(written: set[str], name: str, skipped: dict) -> list[str]:
    if name in written:
        return [f"![{name}]({name})", ""]
    return [f"_{name} not written: {skipped.get(name, 'no data')}._", ""]


# ---- command line ---------------------------------------------------------------------------------

USAGE = "usage: bench report DIR [out=DIR]   (DIR: a run directory, a sweep directory, or a folder of runs)"


def parse_args(args: list[str]) -> tuple[Path, Path]:
    root, out = None, None
    for a in args:
        if a.startswith("out="):
            out = a.split("=", 1)[1]
            if not out:
                raise ReportError("out= needs a folder, e.g. out=/tmp/report")
        elif "=" in a and not Path(a).exists():
            raise ReportError(f"unknown argument {a!r}; {USAGE[7:]}")
        elif root is None:
            root = a
        else:
            raise ReportError(f"one DIR only (got {root!r} and {a!r}); {USAGE[7:]}")
    if root is None:
        raise ReportError(f"missing DIR; {USAGE[7:]}")
    root_p = Path(root).expanduser()
    if not root_p.exists():
        raise ReportError(f"{root_p} does not exist; expected a run directory (run.json, metrics.jsonl) "
                          "or a sweep directory (sweep.json, index/)")
    if not root_p.is_dir():
        raise ReportError(f"{root_p} is not a directory; expected a run directory (run.json, metrics.jsonl) "
                          "or a sweep directory (sweep.json, index/)")
    return root_p, Path(out).expanduser() if out else root_p / "report"


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
    except OSError as exc:  # e.g. the output folder is read-only
        print(f"error: report: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
