"""Rank 0's records in the run directory: metrics.jsonl (one line per tick), run.json, summary.json and the
config history, mirrored with the evaluations, sample grids and collapse flags to the log.backends
(bench.train.loggers). Files go through bench.rundir only (docs/architecture.md, "Run directory")."""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from datetime import datetime, timezone
from pathlib import Path
from typing import Optional

import torch

from bench import device as bdevice
from bench import rundir
from bench.eval.sampling import class_grid, save_grid, sheet_rows
from bench.train.loggers import LogSettings, RunLoggers
from bench.train.telemetry import format_eta

COLLAPSE_TEXT = "stability/collapse_reason"  # the loggers' text tag of the collapse detector's flags
SIGMA0 = "sigma0/"  # sigma0/<net>/<layer>: each layer's s0 (sigma/<net>/<layer>/s0 in metrics.jsonl), one chart group


def git_sha() -> Optional[str]:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def now() -> str:
    return datetime.now(timezone.utc).isoformat()


def gather_hosts(world: int) -> list:
    """Every rank's host name (Slurm's node name where there is one). A collective: every rank calls it."""
    host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    hosts = [host]
    if world > 1:
        hosts = [None] * world
        torch.distributed.all_gather_object(hosts, host)
    return hosts


def versions() -> dict:
    import accelerate
    import hydra
    import webdataset

    return {"python": platform.python_version(), "torch": torch.__version__,
            "accelerate": accelerate.__version__, "hydra": hydra.__version__,
            "webdataset": getattr(webdataset, "__version__", "?")}


def math_switches(cfg, device: torch.device, opt) -> dict:
    """The kernels and math modes of a run (train.fused_optim, train.tf32, train.cudnn_benchmark) as they took
    effect, from its config, device and G's optimiser `opt`: run.json and `bench throughput` record them."""
    cuda = device.type == "cuda"
    return {"optimizer_impl": bdevice.impl_name(opt.defaults),
            "tf32": bool(cfg.train.tf32) and cuda,
            "cudnn_benchmark": bool(torch.backends.cudnn.benchmark) and cuda}


def run_facts(run, state) -> dict:
    """What run.json says about a run's set-up (world size, device, batch, parameter counts): `run` a
    loop.Run, `state` its TrainState."""
    from bench import models
    from bench.data.shards import data_facts
    from bench.workers import resolve_workers

    t = run.cfg.train
    dev = run.device
    return {"world_size": run.world,
            "device": str(dev) if dev.type != "cuda" else torch.cuda.get_device_name(dev),
            "precision": t.precision, "channels_last": run.channels_last,
            "torch_threads": torch.get_num_threads(),  # per rank (eval.async on a CPU leaves training a share)
            **math_switches(run.cfg, dev, state.opt["G"]),
            "compile": str(t.compile).lower(), "compile_backend": t.compile_backend,
            "batch_size": t.batch_size, "accumulate": t.accumulate, "effective_batch": run.eff_batch,
            "shards": run.shards_spec, "n_classes": run.n_classes,
            # data.num_workers as resolved here (auto follows the cores): the readers per rank set the data order
            "data_workers": resolve_workers(run.cfg.data.num_workers),
            **data_facts(run.shards_spec, run.cfg.data.mirror),  # count, data.mirror's effective size, labels
            "G_params": models.param_count(state.G), "D_params": models.param_count(state.D),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID")}


def summary_of(run, state, status: str, checksums: list) -> dict:
    """summary.json of a run as it ends (checksums: every rank's param_checksum)."""
    summary = {
        "status": status, "steps": state.step, "target_steps": run.cfg.train.steps,
        "images_seen": state.images_seen, "kimg": state.images_seen / 1000.0,
        "train_seconds": state.train_seconds,
        "img_per_s": state.images_seen / state.train_seconds if state.train_seconds else None,
        "effective_batch": run.eff_batch, "world_size": run.world,
        "final": {k: v for k, v in run.last_row.items() if k.startswith(("loss/", "D/"))},
        "best": state.best or {},
        "quality": quality_of(run.last_eval, state.step, run.n_data_classes),
        "collapse_step": state.collapse.collapse_step, "collapse_reason": state.collapse.reason,
        "nonfinite_skipped": state.guard.total, "rollbacks": state.guard.rollbacks,
        "data_skipped": state.data_skipped, "param_checksums": checksums, "run_dir": str(run.run_dir),
    }
    if run.error:  # a diverged or failed run's first error
        summary["error"] = run.error
    return summary


def quality_of(last_eval: dict, step: int, n_classes: int) -> dict:
    """summary.json's `quality`: the final step's evaluation (eval.final, or eval.every's at the last step), its
    FID and class accuracy beside chance; {} when the run did not evaluate its final step."""
    if not last_eval or last_eval.get("step") != step:
        return {}
    out = {"step": step, "num_samples": last_eval.get("num_samples"), "extractor": last_eval.get("extractor")}
    for key, name in (("eval/FID", "FID"), ("eval/class_acc", "class_acc")):
        if isinstance(last_eval.get(key), (int, float)):
            out[name] = last_eval[key]
    if "class_acc" in out and n_classes:
        out["chance"] = 1.0 / n_classes
    return out


def quality_line(quality: dict) -> str:
    """The summary's quality row: 'class accuracy 0.712 (chance 0.100), FID 14.2 (domain features, 5000 samples of
    the EMA G at step 1500)'."""
    parts = []
    if "class_acc" in quality:
        parts.append(f"class accuracy {quality['class_acc']:.3f}" +
                     (f" (chance {quality['chance']:.3f})" if "chance" in quality else ""))
    if "FID" in quality:
        parts.append(f"FID {quality['FID']:.1f}")
    return (", ".join(parts) + f" ({quality.get('extractor')} features, {quality.get('num_samples')} samples of the EMA "
            f"G at step {quality.get('step')})")


def save_samples(run_dir: Path, step: int, G_ema, fixed_z: torch.Tensor, class_names: list,
                 n_classes: int) -> Path:
    """samples/step-<step>.png and samples/latest.png: one row per class (evenly spaced ones when
    there are many; unlabelled data: rows of other samples), one column per fixed latent."""
    rows = sheet_rows(n_classes)
    imgs = class_grid(G_ema, fixed_z.to(next(G_ema.parameters()).device), rows)
    labels = [class_names[r] if r < len(class_names) else str(r) for r in rows]
    path = save_grid(imgs, Path(run_dir) / rundir.SAMPLES / f"step-{int(step):07d}.png", labels)
    save_grid(imgs, Path(run_dir) / rundir.SAMPLES / "latest.png", labels)
    return path


def logged_scalars(row: dict) -> dict:
    """What the loggers get of a tick's row: its numbers (not `step`), and each sigma/<net>/<layer>/s0 again as
    sigma0/<net>/<layer>."""
    out = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
    for k, v in row.items():
        if k.startswith("sigma/") and k.endswith("/s0") and isinstance(v, (int, float)):
            out[SIGMA0 + k[len("sigma/"):-len("/s0")]] = v
    return out


def flag_text(step: int, rule: str, reason: str, first: bool) -> str:
    """The loggers' text for one rule of the collapse detector firing (markdown)."""
    what = "collapse flagged" if first else "another collapse rule fired"
    return f"**{what}** at step {step} by rule `{rule}`: {reason}"


class Records:
    """metrics.jsonl, run.json and summary.json of a run, and its loggers (log.backends); a no-op on ranks
    other than 0. `facts` is what run.json says about the set-up (world size, device, batch, parameter counts)."""

    def __init__(self, run_dir: Path, enabled: bool, facts: Optional[dict] = None,
                 log: Optional[LogSettings] = None):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.facts = dict(facts or {})
        self.metrics_path = self.dir / rundir.METRICS
        self.log_settings = log or LogSettings()
        self.log = RunLoggers([])

    def open(self, resume_step: int) -> None:
        if not self.enabled:
            return
        for sub in (rundir.CHECKPOINTS, rundir.SAMPLES):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.metrics_path.touch()
        # Lines after the resumed step go, so a resumed run never duplicates a record.
        rundir.truncate_jsonl_after(self.metrics_path, resume_step)
        # a summary from before a resume no longer describes the run (a report would show it finished
        # while it trains again); the run writes a new one when it ends
        (self.dir / rundir.SUMMARY).unlink(missing_ok=True)
        # evaluations made during training after the checkpoint are redone; `bench eval` records stay
        rundir.truncate_jsonl_after(self.dir / rundir.EVALS, resume_step,
                                    keep=lambda r: r.get("source") == rundir.SOURCE_BENCH_EVAL)
        # a backend that cannot start is one warning: the JSONL records are the contract
        self.log = RunLoggers.open(self.dir, resume_step, self.log_settings)

    def read_json(self, name: str) -> dict:
        return rundir.read_json(self.dir / name) or {}

    def write_json(self, name: str, obj: dict) -> None:
        if self.enabled:
            rundir.write_json(self.dir / name, obj)

    def write_config(self, yaml_text: str, step: int = 0, changes: Optional[dict] = None) -> None:
        """config.yaml; with `changes` (a resume at `step` under a changed config) the previous one is
        kept first as config-<step>.yaml (docs/architecture.md, "Checkpoints")."""
        if not self.enabled:
            return
        current = self.dir / rundir.CONFIG
        if changes and current.exists():
            rundir.atomic_write(self.dir / f"config-{int(step):07d}.yaml", current.read_bytes())
        rundir.atomic_write(current, yaml_text)

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        rundir.append_jsonl(self.metrics_path, row)
        self.log.scalars(row["step"], logged_scalars(row))

    def evaluation(self, step: int, metrics: dict) -> None:
        """An evaluation's eval/* numbers to the loggers (evals.jsonl is written by bench.eval.evalrecords)."""
        if self.enabled:
            self.log.scalars(step, {k: v for k, v in metrics.items() if k.startswith("eval/")})

    def samples(self, step: int, path: Path) -> None:
        """The sample grid written to samples/ (the PNG itself, read back) to the loggers as image `samples`."""
        if self.enabled and self.log.active:
            import numpy as np
            from PIL import Image

            with Image.open(path) as im:
                self.log.image(step, "samples", np.asarray(im.convert("RGB")))

    def flags(self, step: int, flags: list) -> None:
        """The collapse detector's new flags [(step, rule, reason, first)] as text, logged at `step`."""
        if self.enabled:
            for at, rule, reason, first in flags:
                self.log.text(step, COLLAPSE_TEXT, flag_text(at, rule, reason, first))

    def training_evals(self) -> list:
        """This run's evaluations made during training (not `bench eval`'s), oldest first."""
        rows = rundir.read_jsonl(self.dir / rundir.EVALS).rows
        return [r for r in rows if r.get("source") != rundir.SOURCE_BENCH_EVAL]

    def run_info(self, status: str, hosts: list, extra: Optional[dict] = None) -> dict:
        """run.json as it now stands: the previous content updated with the status and the set-up."""
        info = self.read_json(rundir.RUN_JSON)
        info.update({"status": status, "versions": versions(), "git_sha": git_sha(),
                     "hosts": hosts, "num_nodes": len(set(hosts))})
        info.update(self.facts)
        info.setdefault("start_time", now())
        info["updated_time"] = now()
        if extra:
            info.update(extra)
        return info

    def write_run(self, status: str, hosts: list, extra: Optional[dict] = None) -> None:
        if self.enabled:
            self.write_json(rundir.RUN_JSON, self.run_info(status, hosts, extra))

    def start(self, resume_step: int, hosts: list, changes: Optional[dict] = None) -> None:
        """run.json at the start of a run (or a resumed one: its resume is listed, and its config
        changes, {key: [old, new]}, under "config_changes")."""
        info = self.read_json(rundir.RUN_JSON)
        resumes = info.get("resumes", [])
        extra = {"resumes": resumes}
        if resume_step:
            resumes.append({"step": resume_step, "time": now()})
        if changes:
            extra["config_changes"] = info.get("config_changes", []) + [{"step": resume_step, "changes": changes}]
        self.write_run(rundir.RUNNING, hosts, extra)

    def close(self, status: Optional[str] = None) -> None:
        self.log.close(status)


def print_summary(summary: dict, run_dir: Path) -> None:
    rows = [
        ("status", summary.get("status")),
        ("steps", f"{summary.get('steps')}/{summary.get('target_steps')}"),
        ("images seen", summary.get("images_seen")),
        ("throughput", f"{summary['img_per_s']:.1f} img/s" if summary.get("img_per_s") else "-"),
        ("train time", format_eta(summary.get("train_seconds") or 0)),
        ("effective batch", summary.get("effective_batch")),
    ]
    rows += [(k, f"{v:.4f}") for k, v in summary.get("final", {}).items()]
    if summary.get("quality"):
        rows.append(("quality", quality_line(summary["quality"])))
    if summary.get("data_skipped"):
        rows.append(("corrupt samples skipped", summary["data_skipped"]))
    w = max(len(k) for k, _ in rows)
    print("\n" + "-" * (w + 24))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("-" * (w + 24))
    print(f"run directory : {run_dir}")
    for name, what in ((rundir.CONFIG, "resolved config"), (rundir.METRICS, "one line per tick"),
                       (rundir.SUMMARY, "final summary"), ("samples/latest.png", "EMA samples (one row per class)"),
                       ("checkpoints/", "resumable state"), *logger_places(run_dir)):
        print(f"  {name:<20} {what}")


def logger_places(run_dir: Path) -> list:
    """[(folder, how to view it)] of the loggers' folders the run has (bench.train.loggers)."""
    from bench.train.loggers import MLFLOW_DIR, WANDB_DIR

    run_dir = Path(run_dir)
    places = [(rundir.TB, f"TensorBoard: tensorboard --logdir {run_dir / rundir.TB}"),
              (MLFLOW_DIR, f"MLflow: MLFLOW_ALLOW_FILE_STORE=true mlflow ui --backend-store-uri {run_dir / MLFLOW_DIR}"),
              (WANDB_DIR, f"W&B (offline): wandb sync {run_dir / WANDB_DIR}/offline-run-*")]
    return [(f"{name}/", what) for name, what in places if (run_dir / name).is_dir()]
