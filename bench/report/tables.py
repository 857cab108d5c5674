"""The report's numbers: labels from the swept keys, one row per run, the derived tables (scaling,
evaluations, truncation, ablation), their text / Markdown / CSV forms, and the writer of the outputs
(every file through `rundir.atomic_write`). Metric names and directions come from
bench/metrics_registry.py, the best evaluation from `rundir.best_eval` (docs/architecture.md)."""
from __future__ import annotations

import csv
import io
import math
import re
import statistics
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

from bench import metrics_registry as registry
from bench import rundir
from bench.report.collect import TRUNC_COLUMNS, Run, finite, natural_key

DEFAULT_BEST_METRIC = registry.DEFAULT_BEST_METRIC
# The report's metric columns and panels: the registry's headline metrics, eval.best_metric's default
# first (what most runs are ranked by); evals.csv then adds every other metric, in the registry's order.
REPORT_METRICS = tuple(sorted(registry.HEADLINE, key=lambda m: m != DEFAULT_BEST_METRIC))
EVAL_COLUMNS = REPORT_METRICS + tuple(m for m in registry.EVAL_METRICS if m not in REPORT_METRICS)


# ---- labels: which keys were swept ----------------------------------------------------------------

PREFERRED_KEYS = ("model", "model.family", "loss", "loss.name", "data", "data.name")


def _override_pairs(overrides) -> dict:
    out = {}
    for o in overrides or []:
        if "=" in o:
            k, v = o.split("=", 1)
            out[k.lstrip("+~")] = re.sub(r"\\(.)", r"\1", v)  # Hydra escapes ':' etc. in recorded overrides
    return out


def short(v) -> str:
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, (list, tuple)):
        return "[" + ",".join(short(x) for x in v) + "]"
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
        values = [{k: short(v) for k, v in r.config.items()} for r in with_data]
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
    shorts = short_keys(keys)
    for r in runs:
        if keys and r.swept:
            r.label = " ".join(f"{shorts[k]}={r.swept[k]}" for k in keys if r.swept[k] != "")
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


def short_keys(keys: list[str]) -> dict[str, str]:
    """train.batch_size -> batch_size, unless two keys would end the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


# ---- numbers per run ------------------------------------------------------------------------------

def steady_values(rows: list[dict], key: str) -> list[float]:
    """The key's finite values over ticks, without the first tick (warm-up: compilation, cudnn
    autotuning, loader start) when there are at least three."""
    vals = [r[key] for r in rows if finite(r.get(key))]
    return vals[1:] if len(vals) >= 3 else vals


def steady_median(rows: list[dict], key: str):
    vals = steady_values(rows, key)
    return statistics.median(vals) if vals else None


def contention(rows: list[dict]) -> dict:
    """Which ticks were taken under contention (perf/cpu_util < registry.CONTENDED), leaving out the first tick
    after each start or resume (registry.START_TICK; in older records the first tick, as steady_values does):
    `contended` (any), `util_ticks` (the ticks counted), `contended_ticks` and their share, the lowest utilisation,
    and `img_per_s_clean`, the median img/s of the uncontended ticks (None when none is clean or none recorded it)."""
    ticks = [r for r in rows if finite(r.get(registry.CPU_UTIL))]
    if not any(registry.START_TICK in r for r in ticks):
        ticks = ticks[1:] if len(ticks) >= 3 else ticks
    ticks = [r for r in ticks if registry.START_TICK not in r]
    hit = [r for r in ticks if r[registry.CPU_UTIL] < registry.CONTENDED]
    clean = [r["throughput/img_per_s"] for r in ticks
             if r[registry.CPU_UTIL] >= registry.CONTENDED and finite(r.get("throughput/img_per_s"))]
    return {"contended": bool(hit), "util_ticks": len(ticks), "contended_ticks": len(hit),
            "contended_share": len(hit) / len(ticks) if ticks else None,
            "cpu_util_lowest": min(r[registry.CPU_UTIL] for r in ticks) if ticks else None,
            "img_per_s_clean": statistics.median(clean) if clean else None}


def _last(rows: list[dict], key: str):
    for r in reversed(rows):
        if key in r:
            return r[key]
    return None


def _first_not_none(*vals):
    return next((v for v in vals if v is not None), None)


def collapse_info(r: Run) -> tuple[int | None, str | None, list]:
    """(collapse step, reason, steps where the tick's stability/collapse flag was set)."""
    flagged = [m["step"] for m in r.metrics if finite(m.get("stability/collapse")) and m["stability/collapse"] >= 1]
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


def best_metric(r: Run) -> str:
    """The run's eval.best_metric: config.yaml's, else the one its summary's best was chosen by."""
    recorded = ((r.summary or {}).get("best") or {}).get("metric")
    return r.config.get("eval.best_metric") or recorded or DEFAULT_BEST_METRIC


def best_eval(r: Run) -> dict:
    """{metric, value, step, extractor, from} by the run's eval.best_metric and primary extractor:
    `rundir.best_eval`, the rule training's checkpoints/best.pt follows. {} when there is none."""
    return rundir.best_eval(r.summary, r.evals, best_metric(r), primary_extractor(r)) or {}


def _effective_batch(batch, accum, world):
    """For a run that did not record its effective batch: bench.config.effective_batch of its parts."""
    if None in (batch, accum, world):
        return None
    from bench.config import effective_batch  # omegaconf, never torch; only for such runs

    try:
        return effective_batch(SimpleNamespace(batch_size=batch, accumulate=accum), world)
    except (TypeError, ValueError):
        return None


def run_row(r: Run) -> dict:
    """One runs.csv row. Where each number comes from (the tests re-derive them from the files):
    img_per_s          steady training throughput: median of the ticks' throughput/img_per_s, first tick
                       dropped (see steady_values); a tick after an evaluation is slow, the median ignores it
    img_per_s_overall  summary.json's images seen / training seconds (evaluations, checkpoints and sample
                       grids included); empty until the run finishes
    step_ms, *_ms      medians over ticks the same way; mfu the mean; peak_mem_gb the maximum
    loss_D, loss_G     the last tick's values
    best_*             the best evaluation (see best_eval)
    collapse_step      summary.json's collapse_step, else the first tick with stability/collapse = 1"""
    s, info, cfg, m = r.summary or {}, r.info, r.config, r.metrics
    world = _first_not_none(s.get("world_size"), info.get("world_size"), _last(m, "dist/world_size"),
                            (r.job or {}).get("world_size"))
    batch = _first_not_none(info.get("batch_size"), _last(m, "batch/per_device"), cfg.get("train.batch_size"))
    accum = _first_not_none(info.get("accumulate"), cfg.get("train.accumulate"))
    eff = _first_not_none(s.get("effective_batch"), info.get("effective_batch"), _last(m, "batch/effective"))
    if eff is None:
        eff = _effective_batch(batch, accum, world)
    overall = s.get("img_per_s") if finite(s.get("img_per_s")) else None
    ips = _first_not_none(steady_median(m, "throughput/img_per_s"), overall)
    c_step, c_reason, flagged = collapse_info(r)
    best = best_eval(r)
    mfu = steady_values(m, "perf/mfu")
    util = steady_median(m, registry.CPU_UTIL)
    shared = contention(m)
    mem = [x["mem/peak_gb"] for x in m if finite(x.get("mem/peak_gb"))]
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
        "img_per_s_per_device": ips / world if finite(ips) and world else None,
        "step_ms": steady_median(m, "time/step_ms"), "data_ms": steady_median(m, "time/data_ms"),
        "D_ms": steady_median(m, "time/D_ms"), "G_ms": steady_median(m, "time/G_ms"),
        "reg_ms": steady_median(m, "time/reg_ms"), "telemetry_ms": steady_median(m, "time/telemetry_ms"),
        "mfu": statistics.mean(mfu) if mfu else None, "peak_mem_gb": max(mem) if mem else None,
        # the steps' CPU utilisation (CPU runs): below registry.CONTENDED the img/s were taken beside another process
        "cpu_util": util, **shared,
        "loss_D": _last(m, "loss/D"), "loss_G": _last(m, "loss/G"),
        "best_metric": best.get("metric"), "best_value": best.get("value"), "best_step": best.get("step"),
        "best_extractor": best.get("extractor"), "evals": len(r.evals),
        "collapse_step": c_step, "collapse_reason": c_reason, "collapse_ticks": len(flagged),
        "skipped_lines": r.skipped_lines, "error": (r.summary or {}).get("error") or (r.job or {}).get("error"),
    }
    for k, v in r.swept.items():
        row[f"swept:{k}"] = v
    return row


# ---- derived tables --------------------------------------------------------------------------------

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


def eval_records(runs: list[Run]) -> list[dict]:
    rows = []
    for r in runs:
        for e in sorted(r.evals, key=lambda e: e["step"]):
            row = {"run": r.label, "dir": str(r.path), "step": e["step"], "extractor": e.get("extractor") or "?",
                   "num_samples": e.get("num_samples"), "truncation": e.get("truncation"),
                   "source": e.get("source") or "training", "checkpoint": e.get("checkpoint")}
            row.update({k: e.get(k) for k in EVAL_COLUMNS + registry.DIAGNOSTIC_FIELDS})
            for k in EVAL_COLUMNS:  # eval.repeats > 1: the 95% interval over the sample sets, and K
                ci = e.get(f"{k}{registry.CI_SUFFIX}")
                if isinstance(ci, list) and len(ci) == 2:
                    row[f"{k}_ci_lo"], row[f"{k}_ci_hi"], row["repeats"] = ci[0], ci[1], e.get("repeats")
            rows.append(row)
    return rows


def best_eval_rows(runs: list[Run], records: list[dict]) -> list[list]:
    """Per run and feature extractor: [run, extractor, by, samples, step, evals, *headline metrics] of the
    best evaluation by the run's eval.best_metric (`rundir.best_eval`; summary.json's best counts for the
    run's own extractor only); `evals`: how many evaluations competed."""
    out = []
    for r in runs:
        metric, primary = best_metric(r), primary_extractor(r)
        mine = [e for e in records if e["dir"] == str(r.path)]
        for ext in sorted({e["extractor"] for e in mine}):
            recs = [e for e in mine if e["extractor"] == ext and rundir.counts_for_best(e, metric, ext)]
            if not recs:
                continue
            best = rundir.best_eval(r.summary if ext == primary else None, recs, metric, ext)
            pick = _record_of(recs, best) or _record_of(recs, rundir.best_eval(None, recs, metric, ext))
            out.append([r.label, ext, registry.BY_NAME[metric].short if metric in registry.BY_NAME else metric,
                        pick["num_samples"], pick["step"], len(recs)] + [pick.get(k) for k in REPORT_METRICS])
    return out


def _record_of(recs: list[dict], best: dict | None) -> dict | None:
    """The evaluation record that `best` (from rundir.best_eval) names."""
    if best is None:
        return None
    return next((e for e in recs if e["step"] == best["step"] and e.get(best["metric"]) == best["value"]), None)


def truncation_records(runs: list[Run]) -> list[dict]:
    out = []
    for r in runs:
        for t in r.truncation:
            out.append({"run": r.label, "dir": str(r.path), **{k: t.get(k) for k in
                        ("psi",) + TRUNC_COLUMNS + ("extractor", "num_samples", "step")},
                        **{k: v for k, v in t.items() if k == "repeats" or k.endswith(("_ci_lo", "_ci_hi"))}})
    return out


def psi_order(psi):
    return math.inf if psi is None else psi


def ablation_rows(runs: list[Run], rows: list[dict], keys: list[str]) -> tuple[list[dict], str]:
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


def natural(s):
    """Sort key: numbers by value first, then other text with digit runs as numbers."""
    s = str(s)
    try:
        return (0, float(s), "")
    except ValueError:
        return (1, 0.0, natural_key(s))


# ---- text forms ------------------------------------------------------------------------------------

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


def status_cell(status: str) -> str:
    return status if status == rundir.COMPLETED else f"**{status}**"


# ---- the outputs -----------------------------------------------------------------------------------

LEDGER = ".gan-bench-report.json"  # in the output folder: the files `bench report` wrote there


class ForeignFile(Exception):
    """An output's name is taken by a file `bench report` did not write (the ledger does not list it)."""

    def __init__(self, path: Path):
        super().__init__(str(path))
        self.path = path


class Ledger:
    """The output folder's list of the files `bench report` wrote there (LEDGER, written atomically).
    Only a file it lists is ever replaced or removed: an out= folder may hold the user's own files."""

    def __init__(self, out: Path):
        self.path = out / LEDGER
        data = rundir.read_json(self.path) if self.path.is_file() else None
        names = data.get("written") if isinstance(data, dict) else None
        self.previous: set[str] = {n for n in names if isinstance(n, str) and "/" not in n and n not in ("", ".", "..")
                                   } if isinstance(names, list) else set()
        self.claimed: set[str] = set(self.previous)

    def check(self, name: str) -> None:
        """ForeignFile if writing `name` would replace a file we did not write."""
        path = self.path.parent / name
        if name not in self.claimed and (path.exists() or path.is_symlink()):
            raise ForeignFile(path)

    def claim(self, name: str) -> None:
        """Record `name` BEFORE writing it, so a killed report still knows the file is ours."""
        self.check(name)
        if name not in self.claimed:
            self.claimed.add(name)
            self._save(self.claimed)

    def finish(self, written: set[str]) -> None:
        """Remove what an earlier report wrote and this one did not (e.g. a plot that now has no data);
        then the ledger lists exactly this report's files."""
        for name in sorted(self.claimed - written):
            p = self.path.parent / name
            try:
                if p.is_file() and not p.is_symlink():
                    p.unlink()
            except OSError:
                pass
        self.claimed = set(written)
        self._save(self.claimed)

    def _save(self, names: set[str]) -> None:
        rundir.write_json(self.path, {"written": sorted(names)})


class Writer:
    """Writes each output through rundir.atomic_write: never a half-written file, and never over a
    file the ledger does not list as ours."""

    def __init__(self, out: Path, ledger: Ledger | None = None):
        self.out = out
        self.ledger = ledger
        self.written: list[Path] = []

    def _commit(self, name: str, data=None, write=None) -> Path:
        if self.ledger is not None:
            self.ledger.claim(name)
        path = rundir.atomic_write(self.out / name, data, write=write)
        self.written.append(path)
        return path

    def text(self, name: str, text: str) -> Path:
        return self._commit(name, text)

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
        return self._commit(name, write=lambda f: fig.savefig(f, format="png", dpi=110, bbox_inches="tight"))


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
