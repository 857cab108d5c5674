"""Evaluation records: evals.jsonl's lines (append_eval) and `bench eval`'s table of one (format_table)
(docs/architecture.md, "Evaluation")."""
from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from pathlib import Path

from bench import metrics_registry as registry
from bench import rundir

RECORD_KEYS = ("fid_imag_residue", "extractor", "num_samples", "num_real", "truncation", "trunc_mode",
               "standing_stats", "eval_ranks", "step", "checkpoint", *registry.COST_FIELDS, "seconds")  # the table's rows after the metrics


def append_eval(run_dir, step: int, metrics: Mapping, **extra) -> dict:
    """Append one record to run_dir/evals.jsonl: step, the metric values, extractor, num_samples,
    seconds (from `metrics`), then `extra` (e.g. source="bench eval", checkpoint=...) and the time.
    Returns the record. Empty `metrics` (a rank other than 0) writes nothing."""
    if not metrics:
        return {}
    rec = {"step": int(step)}
    rec.update({k: rundir.json_value(v) for k, v in metrics.items()})
    rec.update({k: rundir.json_value(v) for k, v in extra.items()})
    rec["time"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    rundir.append_jsonl(Path(run_dir) / rundir.EVALS, rec)
    return rec


def format_table(rec: Mapping, title: str | None = None) -> str:
    """A plain-text table of an evaluation record: its metrics (names, order and formats from
    bench.metrics_registry), then RECORD_KEYS."""
    rows = [(name, registry.format_value(name, rec[name]) + _ci_text(name, rec)) for name in registry.EVAL_METRICS
            if rec.get(name) is not None]
    rows += [(key, str(rec[key])) for key in RECORD_KEYS + ("repeats",) if rec.get(key) not in (None, "")]
    w = max(len(k) for k, _ in rows) if rows else 10
    lines = [title] if title else []
    lines.append("-" * (w + 16))
    lines += [f"{k:<{w}}  {v}" for k, v in rows]
    lines.append("-" * (w + 16))
    return "\n".join(lines)


def _ci_text(name: str, rec: Mapping) -> str:
    """'  [lo, hi] 95% CI' when the record has the metric's interval (eval.repeats > 1), else ''."""
    ci = rec.get(f"{name}{registry.CI_SUFFIX}")
    if not (isinstance(ci, (list, tuple)) and len(ci) == 2):
        return ""
    return f"  [{registry.format_value(name, ci[0])}, {registry.format_value(name, ci[1])}] 95% CI"
