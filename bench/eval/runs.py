"""Evaluating a run directory: `bench eval run=DIR` (eval_run) and `bench truncation run=DIR psi=[...]`
(truncation_sweep), and the checkpoint they pick: `which=best` is checkpoints/best.pt when the run kept one,
else the step of rundir.best_eval, the one best-evaluation rule (docs/architecture.md, "Evaluation")."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Sequence

import torch
from omegaconf import DictConfig, OmegaConf

from bench import models
from bench import metrics_registry as registry
from bench import rundir
from bench.data.shards import DEFAULT_NUM_SAMPLES, dataset_info, default_shards
from bench.device import channels_last, eval_precision
from bench.eval.errors import EvalError
from bench.eval.safeload import first_line, load_weights
from bench.eval.metrics import EvalSettings, evaluate_generator
from bench.eval.evalrecords import append_eval, format_table
from bench.eval.protocols import protocol_values
from bench.eval.sampling import check_psi, save_grid, to_uint8, truncated_normal, write_sheets

DEFAULT_BEST_METRIC = registry.DEFAULT_BEST_METRIC
# truncation.csv's metric columns: the registry's headline metrics (IS, FID, KID, precision, recall, density,
# coverage, class_acc), as bench/report/collect.py reads them back
SWEEP_COLUMNS = tuple(registry.BY_NAME[m].short for m in registry.HEADLINE)


def merge_overrides(cfg, overrides):
    """cfg merged with `overrides`: a mapping, a DictConfig, or a list of dotted "key=value" strings."""
    if overrides is None:
        return cfg
    if isinstance(overrides, DictConfig):
        extra = overrides
    elif isinstance(overrides, Mapping):
        extra = OmegaConf.create(dict(overrides))
    else:  # a list of dotted overrides: ["eval.extractor=domain", ...]
        extra = OmegaConf.from_dotlist([str(o) for o in overrides])
    return OmegaConf.merge(cfg, extra)


# ---------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------

def _pick_best(run_dir: Path, by_step: dict, metric: str, extractor: str | None):
    """(checkpoint, how) of the run's best evaluation (rundir.best_eval) that still has a checkpoint, or
    None. When the best one's checkpoint was rotated away, the best of those with a checkpoint."""
    summary = rundir.read_json(run_dir / rundir.SUMMARY)
    evals = rundir.read_jsonl(run_dir / rundir.EVALS).rows
    best = rundir.best_eval(summary, evals, metric, extractor)
    if best is not None and best["step"] not in by_step:
        best = rundir.best_eval(None, [r for r in evals if r.get("step") in by_step], metric, extractor)
    if best is None:
        return None
    step = best["step"]
    if best["from"] == rundir.SUMMARY:
        return by_step[step], f"best (summary.json, step {step})"
    return by_step[step], f"best by {metric} in evals.jsonl (step {step})"


def _checkpoint_file(ckpt_dir: Path, which: str) -> Path:
    """which= as a file: it must resolve to a file inside the run's own checkpoints/ directory (a path
    relative to the working directory, or to checkpoints/)."""
    p = Path(os.path.expanduser(str(which)))
    if not p.is_absolute() and not p.exists() and (ckpt_dir / p).exists():
        p = ckpt_dir / p
    inside = ckpt_dir.resolve()
    resolved = p.resolve()
    if not resolved.is_relative_to(inside):
        raise EvalError(f"which={str(which)!r} is not allowed; use best, last, a checkpoint step or a file "
                        f"inside {ckpt_dir}")
    if not resolved.is_file():
        raise EvalError(f"which={str(which)!r}: no such checkpoint file in {ckpt_dir}; use best, last, a "
                        f"checkpoint step or a file inside {ckpt_dir}")
    return resolved


def _kept_best_metric(run_dir: Path) -> str:
    """The metric the run's training kept checkpoints/best.pt by (its config's eval.best_metric)."""
    cfg = OmegaConf.load(run_dir / rundir.CONFIG) if (run_dir / rundir.CONFIG).is_file() else None
    return str((OmegaConf.select(cfg, "eval.best_metric", default=None) if cfg is not None else None)
               or DEFAULT_BEST_METRIC)


def pick_checkpoint(run_dir: Path, which, metric: str, extractor: str | None) -> tuple[Path, str]:
    """(checkpoint file, how it was chosen). which: best | last | a step number | a file inside the
    run's checkpoints/ directory.

    best: checkpoints/best.pt when the run kept one by this `metric` (its own eval.best_metric), else
    the checkpoint of the run's best evaluation by `metric` among those made with `extractor`
    (rundir.best_eval), else the last checkpoint."""
    ckpt_dir = run_dir / rundir.CHECKPOINTS
    ckpts = rundir.list_checkpoints(ckpt_dir)
    by_step = dict(ckpts)
    if which not in ("best", "last"):
        if str(which).isdigit():
            if int(which) in by_step:
                return by_step[int(which)], f"step {int(which)}"
            raise EvalError(f"which={which}: no checkpoint of that step in {ckpt_dir} (have: {sorted(by_step)[-5:]})")
        p = _checkpoint_file(ckpt_dir, which)
        return p, p.name
    if which == "best":
        if (ckpt_dir / rundir.BEST_CKPT).is_file() and metric == _kept_best_metric(run_dir):
            return ckpt_dir / rundir.BEST_CKPT, f"best ({rundir.CHECKPOINTS}/{rundir.BEST_CKPT})"
        best = _pick_best(run_dir, by_step, metric, extractor)
        if best is not None:
            return best
        if ckpts:
            print(f"note: {run_dir} records no best checkpoint; evaluating the last one", file=sys.stderr)
    if not ckpts:
        raise EvalError(f"run={run_dir}: no checkpoints in {ckpt_dir} ({rundir.CKPT_PREFIX}XXXXXXX.pt); "
                        f"is it a gan-bench run directory, and did it save a checkpoint?")
    return ckpts[-1][1], f"last (step {ckpts[-1][0]})"


def read_checkpoint(path: Path) -> dict:
    """The checkpoint's tensors and plain values, unpickled with weights_only=True (a checkpoint file is
    untrusted input: no code runs). An unreadable file is an EvalError naming it."""
    try:
        state = load_weights(path)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged or hostile file
        raise EvalError(f"checkpoint {path} is unreadable ({first_line(exc)})") from None
    if not isinstance(state, dict) or "G_ema" not in state:
        raise EvalError(f"checkpoint {path} has no G_ema weights; is it a gan-bench checkpoint?")
    return state


def load_checkpoint(run_dir: Path, which, metric: str, extractor: str | None) -> tuple[Path, str, dict]:
    """(file, how chosen, state) of pick_checkpoint. For which=best / last, a corrupt file falls back to
    the previous complete checkpoint (newest first), named on stderr."""
    path, chosen = pick_checkpoint(run_dir, which, metric, extractor)
    try:
        return path, chosen, read_checkpoint(path)
    except EvalError as exc:
        if which not in ("best", "last"):
            raise
        first_error = exc
    for step, other in reversed(rundir.list_checkpoints(run_dir / rundir.CHECKPOINTS)):
        if other == path:
            continue
        try:
            state = read_checkpoint(other)
        except EvalError as exc:
            print(f"warning: {exc}; trying an older one", file=sys.stderr, flush=True)
            continue
        print(f"warning: {first_error}; evaluating the previous complete checkpoint {other} (step {step})",
              file=sys.stderr, flush=True)
        return other, f"fallback (step {step}, {path.name} unreadable)", state
    raise first_error


URL_SCHEME = re.compile(r"^\s*[A-Za-z][A-Za-z0-9+.-]+:")  # pipe:, http:, https:, s3:, gs:, ... (not C:)


def _safe_recorded_shards(spec, source: str):
    """A shard spec read from a run's files (run.json / config.yaml) is untrusted: a `pipe:` command or a
    remote URL is refused (give data.shards= explicitly to evaluate against such data)."""
    if spec and URL_SCHEME.match(str(spec)):
        raise EvalError(f"{source} names shards {str(spec)!r}: a pipe: command or remote URL from a run's files "
                        f"is not used; pass data.shards=DIR (local shards) to evaluate this run")
    return spec


# ---------------------------------------------------------------------------------------------
# Loading a run
# ---------------------------------------------------------------------------------------------

def _run_shards(cfg, info: dict, overrides, resolution: int) -> str | None:
    """The real data: an explicit override, else what the run trained on (run.json), else its config,
    else the built-in shards."""
    shards = OmegaConf.select(merge_overrides(OmegaConf.create(), overrides), "data.shards", default=None)
    shards = shards or _safe_recorded_shards(info.get("shards"), rundir.RUN_JSON) or _safe_recorded_shards(
        OmegaConf.select(cfg, "data.shards", default=None), rundir.CONFIG)
    if not shards and (OmegaConf.select(cfg, "eval.ref_stats", default=None) or info.get("imported_from")):
        return None  # FID's real side is a file, or an imported run: no built-in data is made for it
    if not shards:
        shards = default_shards(resolution, num_samples=int(OmegaConf.select(
            cfg, "data.num_samples", default=DEFAULT_NUM_SAMPLES)))
    return str(shards)


def load_run(run_dir, overrides=None, which="best", device=None) -> dict:
    """A finished run's EMA generator and what evaluating it needs.

    Reads run_dir/config.yaml (+ `overrides`: a mapping or a list of "key=value"), run.json, and the
    chosen checkpoint (see pick_checkpoint: `which=best` ranks by eval.best_metric, among evaluations
    made with the run's own eval.extractor); rebuilds G with models.build and loads its G_ema weights.
    Returns a dict: G (eval mode, on `device`), cfg, shards, n_classes (classes to sample: the
    dataset's), class_names, step, checkpoint (path), chosen (how), device, resolution.
    """
    run_dir = Path(run_dir)
    if not (run_dir / rundir.CONFIG).is_file():
        raise EvalError(f"run={str(run_dir)!r}: no config.yaml there; point run= at a run directory "
                        f"(runs/<name>) written by `bench train`")
    run_cfg = OmegaConf.load(run_dir / rundir.CONFIG)
    cfg = merge_overrides(run_cfg, overrides)
    protocol = OmegaConf.select(cfg, "eval.protocol", default=None)
    if protocol_values(protocol):  # run config < the protocol's values < the command line's (bench.eval.protocols)
        cfg = merge_overrides(merge_overrides(run_cfg, {"eval": protocol_values(protocol)}), overrides)
    best_metric = str(OmegaConf.select(cfg, "eval.best_metric", default=None) or DEFAULT_BEST_METRIC)
    path, chosen, state = load_checkpoint(run_dir, which, best_metric, EvalSettings.from_cfg(run_cfg).extractor)
    scfg = state.get("config") or {}
    model_cfg = dict(scfg.get("model") or OmegaConf.to_container(cfg.model, resolve=True))
    resolution = int((scfg.get("data") or {}).get("resolution") or cfg.data.resolution)
    info = rundir.read_json(run_dir / rundir.RUN_JSON) or {}

    shards = _run_shards(cfg, info, overrides, resolution)
    class_names = dataset_info(shards)[0] if shards else None
    n_model = int(info.get("n_classes") or model_cfg.get("n_classes") or len(class_names or []) or 0)
    if n_model <= 0:
        raise EvalError(f"run={run_dir}: cannot tell the class count (no run.json n_classes, model.n_classes "
                        f"or manifest); pass model.n_classes=...")
    n_data = len(class_names) if class_names else n_model
    class_names = list(class_names or [str(i) for i in range(n_model)])

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    G, _ = models.build(model_cfg, resolution, n_model)
    G.load_state_dict(state["G_ema"])
    precision = eval_precision(str(OmegaConf.select(cfg, "eval.precision", default="auto")), device)
    fmt = torch.channels_last if channels_last("auto", precision, device) else torch.contiguous_format
    G = G.to(device, memory_format=fmt).eval().requires_grad_(False)
    return {"G": G, "cfg": cfg, "shards": shards, "n_classes": n_data, "class_names": class_names,
            "step": int(state.get("step", 0)), "checkpoint": path, "chosen": chosen, "device": device,
            "resolution": resolution}


def _with_real_side(run: dict) -> EvalSettings:
    """The run's evaluation settings, once it is known there is a real side: shards, or eval.ref_stats."""
    settings = EvalSettings.from_cfg(run["cfg"])
    if run["shards"] is None and not settings.ref_stats:
        raise EvalError("this run records no training data (an imported run): give data.shards=DIR (its training "
                        "set's shards) or eval.ref_stats=FILE (the real side's mu / sigma, `bench eval stats`)")
    return settings


# ---------------------------------------------------------------------------------------------
# bench eval
# ---------------------------------------------------------------------------------------------

def eval_run(run_dir, overrides_cfg=None, which="best", *, device=None, progress: bool = True,
             sheets: bool = True, show: bool = True) -> dict:
    """`bench eval run=DIR`: evaluate a run's best (or last) checkpoint's EMA generator with the
    run's eval.* settings plus `overrides_cfg`; append the record to run_dir/evals.jsonl with
    "source": "bench eval", write sample sheets to run_dir/samples/ (sheets=True) and print a table.
    Returns the record."""
    run_dir = Path(run_dir)
    run = load_run(run_dir, overrides_cfg, which, device)
    settings = _with_real_side(run)
    metrics = evaluate_generator(run["G"], settings, shards_spec=run["shards"], n_classes=run["n_classes"],
                                 device=run["device"], progress=progress)
    ckpt = Path(run["checkpoint"])
    rec = append_eval(run_dir, run["step"], metrics, source=rundir.SOURCE_BENCH_EVAL,
                      checkpoint=str(ckpt.relative_to(run_dir) if ckpt.is_relative_to(run_dir) else ckpt))
    if sheets:
        write_sheets(run, run_dir / rundir.SAMPLES, truncation=settings.truncation, trunc_mode=settings.trunc_mode)
    if show:
        print(format_table(rec, title=f"{run_dir} | {run['chosen']}"), flush=True)
    return rec


# ---------------------------------------------------------------------------------------------
# bench truncation
# ---------------------------------------------------------------------------------------------

def _psi_label(psi) -> str:
    return "off" if psi is None else f"{psi:g}"


def _sweep_point(run: dict, settings: EvalSettings, out: Path, progress: bool) -> tuple[dict, dict]:
    """(CSV row, sweep.json record) of one truncation value (settings.truncation), and its sample strip."""
    G, n, psi = run["G"], run["n_classes"], settings.truncation
    m = evaluate_generator(G, settings, shards_spec=run["shards"], n_classes=n, device=run["device"],
                           progress=progress)
    record = {"step": run["step"], **{k: rundir.json_value(v) for k, v in m.items()}}
    row = {"psi": psi, **{c: m.get(f"eval/{c}") for c in SWEEP_COLUMNS}, "extractor": m["extractor"],
           "num_samples": m["num_samples"], "step": run["step"]}
    if m.get("repeats"):  # eval.repeats > 1: the mean above, and each metric's 95% bootstrap interval
        row["repeats"] = m["repeats"]
        for c in SWEEP_COLUMNS:
            lo, hi = m.get(f"eval/{c}{registry.CI_SUFFIX}") or (None, None)
            row.update({f"{c}_ci_lo": lo, f"{c}_ci_hi": hi})
    # Sample strip: the same base seed for every psi, classes 0..cols-1.
    cols = min(n, 10)
    z = truncated_normal((cols, G.z_dim), psi, settings.trunc_mode, torch.Generator().manual_seed(777))
    with torch.no_grad():
        imgs = to_uint8(G(z.to(run["device"]), torch.arange(cols, device=run["device"])))
    save_grid(imgs[None], out / f"samples-psi{_psi_label(psi)}.png", [f"psi={_psi_label(psi)}"])
    if progress:
        print(f"truncation psi={_psi_label(psi)}: " + ", ".join(
            f"{k} {v:.4g}" for k, v in row.items() if k in SWEEP_COLUMNS and v is not None),
              file=sys.stderr, flush=True)
    return row, record


def _write_csv(rows: list[dict], path: Path) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: ("off" if k == "psi" and v is None else ("" if v is None else v)) for k, v in r.items()})
    rundir.atomic_write(path, buf.getvalue())


def truncation_sweep(run_dir, psis: Sequence, overrides_cfg=None, which="best", *, device=None,
                     progress: bool = True, out_dir=None) -> list[dict]:
    """`bench truncation run=DIR psi=[...]`: metrics of a run's EMA G for each truncation psi
    (None / "off" = no truncation), written to run_dir/truncation/ (or out_dir):

        truncation.csv           psi, SWEEP_COLUMNS (IS, FID, KID, precision, recall, density, coverage,
                                 class_acc), extractor, num_samples, step; with eval.repeats > 1 also
                                 repeats and <column>_ci_lo / <column>_ci_hi (the 95% bootstrap interval)
        is_vs_fid.png            IS against FID, one labelled point per psi
        precision_recall.png     precision against recall, one labelled point per psi
        density_coverage.png     density against coverage, one labelled point per psi
        samples-psi<psi>.png     a sample strip per psi (same latents seed, one image per class)
        sweep.json               the full records

    Settings are the run's eval.* plus `overrides_cfg` (e.g. ["eval.extractor=domain",
    "eval.num_samples=1000", "eval.trunc_mode=clip"]); eval.truncation is replaced by each psi.
    Returns the rows (dicts with the CSV columns).
    """
    run_dir = Path(run_dir)
    run = load_run(run_dir, overrides_cfg, which, device)
    settings = _with_real_side(run)
    values = [check_psi(p) for p in psis]
    if not values:
        raise EvalError("psi=[]: give the truncation values to sweep, e.g. psi=[0.25,0.5,1.0,2.0]")
    out = Path(out_dir) if out_dir is not None else run_dir / rundir.TRUNCATION
    rows, records = [], []
    for psi in values:
        row, record = _sweep_point(run, dataclasses.replace(settings, truncation=psi), out, progress)
        rows.append(row)
        records.append(record)
    _write_csv(rows, out / "truncation.csv")
    rundir.atomic_write(out / "sweep.json", json.dumps(
        {"run": str(run_dir), "checkpoint": str(run["checkpoint"]), "step": run["step"],
         "trunc_mode": settings.trunc_mode, "records": records}, indent=2))
    _plot_pairs(rows, "FID", "IS", out / "is_vs_fid.png",
                f"IS vs FID by truncation ({rows[0]['extractor']}, {rows[0]['num_samples']} samples)")
    _plot_pairs(rows, "recall", "precision", out / "precision_recall.png",
                f"precision vs recall by truncation ({rows[0]['extractor']})")
    _plot_pairs(rows, "coverage", "density", out / "density_coverage.png",
                f"density vs coverage by truncation ({rows[0]['extractor']}, k=5)")
    return rows


def _plot_pairs(rows: list[dict], xkey: str, ykey: str, path: Path, title: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state

    pts = [(r[xkey], r[ykey], r["psi"]) for r in rows if r[xkey] is not None and r[ykey] is not None]
    fig = Figure(figsize=(5.5, 4.2))
    ax = fig.subplots()
    if pts:
        ordered = sorted(pts, key=lambda p: math.inf if p[2] is None else p[2])
        ax.plot([p[0] for p in ordered], [p[1] for p in ordered], "-o", color="tab:blue", ms=5)
        for x, y, psi in ordered:
            ax.annotate(f"psi={_psi_label(psi)}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlabel(xkey)
    ax.set_ylabel(ykey)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=120)
    rundir.atomic_write(path, buf.getvalue())
