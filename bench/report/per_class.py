"""The report's intra-class FID (eval.intra_fid): every per-class value in intra_fid.csv, and in report.md one
table per run and feature extractor, class -> FID and sample counts, of its latest evaluation that has them
(docs/architecture.md, "Evaluation"; the record fields: bench.metrics_registry.INTRA_FIELDS). Torch-free."""
from __future__ import annotations

from bench import metrics_registry as registry
from bench.report.collect import Run
from bench.report.tables import md_table

INTRA_CSV = "intra_fid.csv"
METRIC = "eval/intra_FID"
PER_CLASS, COUNTS, RESIDUE = registry.INTRA_FIELDS


def _has_per_class(e: dict) -> bool:
    return isinstance(e.get(PER_CLASS), dict) and bool(e[PER_CLASS])


def _count(counts: dict, name: str, side: int):
    c = counts.get(name)
    return c[side] if isinstance(c, (list, tuple)) and len(c) == 2 else None


def records(runs: list[Run]) -> list[dict]:
    """intra_fid.csv: one row per run, evaluation and class: run, dir, step, extractor, source, repeats,
    class, intra_fid, n_generated, n_real (with eval.repeats > 1 the mean over the sample sets)."""
    rows = []
    for r in runs:
        for e in r.evals:
            if not _has_per_class(e):
                continue
            counts = e.get(COUNTS) if isinstance(e.get(COUNTS), dict) else {}
            for name, value in e[PER_CLASS].items():
                rows.append({"run": r.label, "dir": str(r.path), "step": e["step"],
                             "extractor": e.get("extractor") or "?", "source": e.get("source") or "training",
                             "repeats": e.get("repeats") or 1, "class": name, "intra_fid": value,
                             "n_generated": _count(counts, name, 0), "n_real": _count(counts, name, 1)})
    return rows


def latest(r: Run) -> list[dict]:
    """Per feature extractor, the run's latest evaluation (last in evals.jsonl) with per-class values."""
    last = {}
    for e in r.evals:
        if _has_per_class(e):
            last[e.get("extractor") or "?"] = e
    return [last[k] for k in sorted(last)]


def table(e: dict) -> str:
    """class | intra-FID | generated | real, then the mean over classes (eval/intra_FID) and the totals."""
    counts = e.get(COUNTS) if isinstance(e.get(COUNTS), dict) else {}
    body = [[name, value, _count(counts, name, 0), _count(counts, name, 1)] for name, value in e[PER_CLASS].items()]
    totals = [sum(v for v in col if isinstance(v, (int, float))) for col in
              ([row[2] for row in body], [row[3] for row in body])]
    body.append(["**mean**", e.get(METRIC), totals[0], totals[1]])
    return md_table(["class", "intra-FID", "generated", "real"], body)


def md_section(runs: list[Run], written: set[str]) -> list[str]:
    """report.md's "Intra-class FID" section; [] when no evaluation has per-class values."""
    parts = []
    for r in runs:
        for e in latest(r):
            k = e.get("repeats") or 1
            sets = f", mean of {k} sample sets" if k > 1 else ""
            parts += [f"**{r.label}** ({e.get('extractor') or '?'}, step {e['step']}, "
                      f"{e.get('source') or 'training'}{sets}):", "", table(e), ""]
    if not parts:
        return []
    head = ["## Intra-class FID", "",
            "Each class's generated samples against that class's real images (eval.intra_fid; the same features "
            "as FID), per run and extractor, its latest evaluation with per-class values; `mean` is "
            "eval/intra_FID. Values depend on the samples per class (few samples bias FID upward): compare runs "
            "only at equal counts and extractor.", ""]
    tail = [f"Every evaluation's per-class values: `{INTRA_CSV}`.", ""] if INTRA_CSV in written else []
    return head + parts + tail
