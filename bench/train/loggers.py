"""Where rank 0's records are mirrored for viewing (docs/architecture.md, "Logging"): one small interface,
`RunLogger` (scalars, image, text, close), its backends tb (TensorBoard), mlflow (a file store under the run
directory) and wandb (an offline run under the run directory), chosen by log.backends, and `RunLoggers`, which
fans out to them and drops one that fails (one warning). metrics.jsonl / evals.jsonl stay the contract.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
import hashlib
import html
import importlib.util
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from bench import rundir
from bench.config import ConfigError

# backend -> (the module it imports, how to install it: TensorBoard is a gan-bench dependency, the others are extras)
PACKAGES = {"tb": ("tensorboard", "pip install 'tensorboard>=2.14'"),
            "mlflow": ("mlflow", "pip install 'gan-bench[mlflow]'"),
            "wandb": ("wandb", "pip install 'gan-bench[wandb]'")}
MLFLOW_DIR = "mlruns"   # RUN/mlruns: the MLflow file store (log.mlflow_uri=null)
WANDB_DIR = "wandb"     # RUN/wandb: W&B's offline runs (wandb makes it under the dir it is given)
MLFLOW_BATCH = 1000     # MLflow's limit of metrics per log_batch call
MLFLOW_PARAMS = 100     # ... and of params
RUN_TAG = "gan_bench.run_key"  # MLflow tag: a hash of the run directory, how a resumed run finds its MLflow run
FAILED_STATUSES = (rundir.FAILED, rundir.DIVERGED)


def check_backends(backends) -> None:
    """A chosen backend whose package is not installed: one ConfigError line naming the extra, before training."""
    for name in backends:
        module, install = PACKAGES[name]
        if importlib.util.find_spec(module) is None:
            raise ConfigError(f"log.backends={list(backends)}: the {name} backend needs the {module} package, "
                              f"which is not installed; {install} (or drop {name} from log.backends)")


@dataclass(frozen=True)
class LogSettings:
    """The log.* keys and what the backends say about the run (its name, its resolved config)."""
    backends: tuple = ("tb",)
    project: str = "gan-bench"
    mlflow_uri: Optional[str] = None
    run_name: str = ""
    config: dict = field(default_factory=dict)

    @classmethod
    def from_cfg(cls, cfg, run_dir: Path) -> "LogSettings":
        from omegaconf import OmegaConf

        log = cfg.get("log") or {}
        return cls(backends=tuple(log.get("backends", ["tb"])), project=str(log.get("project") or "gan-bench"),
                   mlflow_uri=log.get("mlflow_uri") or None, run_name=Path(run_dir).name,
                   config=OmegaConf.to_container(cfg, resolve=True))


class RunLogger(ABC):
    """One backend. `image` takes uint8 (H, W, 3); `close(status)` gets the run's final status (rundir's
    statuses) or None. A method that raises makes RunLoggers drop the backend."""

    name = "?"

    @abstractmethod
    def scalars(self, step: int, values: dict) -> None:
        """Each backend's own (TensorBoardLogger, MlflowLogger, WandbLogger)."""

    @abstractmethod
    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        """Each backend's own (TensorBoardLogger, MlflowLogger, WandbLogger)."""

    @abstractmethod
    def text(self, step: int, tag: str, text: str) -> None:
        """Each backend's own (TensorBoardLogger, MlflowLogger, WandbLogger)."""

    @abstractmethod
    def close(self, status: Optional[str] = None) -> None:
        """Each backend's own (TensorBoardLogger, MlflowLogger, WandbLogger)."""


class TensorBoardLogger(RunLogger):
    """RUN/tb. A resumed run purges the events after its checkpoint's step, so no step is shown twice."""

    name = "tb"

    def __init__(self, run_dir: Path, resume_step: int, settings: LogSettings):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(Path(run_dir) / rundir.TB), flush_secs=10,
                                    purge_step=resume_step + 1 if resume_step else None)

    def scalars(self, step, values):
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def image(self, step, tag, image):
        self.writer.add_image(tag, image, step, dataformats="HWC")
        self.writer.flush()

    def text(self, step, tag, text):
        self.writer.add_text(tag, text, step)
        self.writer.flush()

    def close(self, status=None):
        self.writer.close()


class MlflowLogger(RunLogger):
    """An MLflow run in log.mlflow_uri, by default a file store in RUN/mlruns (`mlflow ui --backend-store-uri
    RUN/mlruns`). A resumed run continues its MLflow run (found by the RUN_TAG tag); its metric history keeps
    the steps logged after the checkpoint twice (MLflow has no purge). The config is logged as params on
    creation and as config.yaml."""

    name = "mlflow"
    STATUS = {rundir.COMPLETED: "FINISHED", rundir.COLLAPSED: "FINISHED", rundir.INTERRUPTED: "KILLED"}

    def __init__(self, run_dir: Path, resume_step: int, settings: LogSettings):
        uri = settings.mlflow_uri
        if uri is None:
            # MLflow 3 refuses its file store unless told: it is plain files beside the run, readable on a
            # shared file system where SQLite's locking is not safe
            os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
            uri = (Path(run_dir) / MLFLOW_DIR).resolve().as_uri()
        from mlflow.tracking import MlflowClient

        self.client = client = MlflowClient(tracking_uri=uri)
        exp = client.get_experiment_by_name(settings.project)
        exp_id = exp.experiment_id if exp is not None else client.create_experiment(settings.project)
        key = hashlib.sha1(str(Path(run_dir).resolve()).encode()).hexdigest()[:16]
        found = client.search_runs([exp_id], filter_string=f"tags.`{RUN_TAG}` = '{key}'", max_results=1)
        if found:
            self.run_id = found[0].info.run_id
            client.update_run(self.run_id, status="RUNNING")
        else:
            run = client.create_run(exp_id, run_name=settings.run_name,
                                    tags={RUN_TAG: key, "gan_bench.run_dir": str(Path(run_dir).resolve())})
            self.run_id = run.info.run_id
            self._params(settings.config)
        if settings.config:
            from omegaconf import OmegaConf

            client.log_text(self.run_id, OmegaConf.to_yaml(OmegaConf.create(settings.config)),
                            f"config-{int(resume_step):07d}.yaml" if resume_step else "config.yaml")

    def _params(self, config: dict) -> None:
        from mlflow.entities import Param

        flat = _flatten(config)
        params = [Param(k, str(v)[:500]) for k, v in flat.items()]
        for i in range(0, len(params), MLFLOW_PARAMS):
            self.client.log_batch(self.run_id, params=params[i:i + MLFLOW_PARAMS])

    def scalars(self, step, values):
        from mlflow.entities import Metric

        ms = int(time.time() * 1000)
        metrics = [Metric(k, v, ms, int(step)) for k, v in values.items()]
        for i in range(0, len(metrics), MLFLOW_BATCH):
            self.client.log_batch(self.run_id, metrics=metrics[i:i + MLFLOW_BATCH])

    def image(self, step, tag, image):
        try:
            self.client.log_image(self.run_id, image, key=tag, step=int(step))
        except TypeError:  # an MLflow from before images by key and step (2.15): one file per step
            self.client.log_image(self.run_id, image, f"images/{tag}/step-{int(step):07d}.png")

    def text(self, step, tag, text):
        self.client.log_text(self.run_id, text, f"text/{tag}/step-{int(step):07d}.md")

    def close(self, status=None):
        self.client.set_terminated(self.run_id, status=self.STATUS.get(status, "FAILED" if status else "FINISHED"))


class WandbLogger(RunLogger):
    """A W&B run, offline unless WANDB_MODE says otherwise, under RUN/wandb (`wandb sync RUN/wandb/offline-run-*`
    uploads it). Each start of training (a resume too) is a new W&B run of the same name."""

    name = "wandb"

    def __init__(self, run_dir: Path, resume_step: int, settings: LogSettings):
        import wandb

        self.wandb = wandb
        self.step = 0
        self.run = wandb.init(mode=os.environ.get("WANDB_MODE") or "offline", dir=str(run_dir),
                              project=settings.project, name=settings.run_name, config=settings.config,
                              reinit="create_new", settings=wandb.Settings(silent=True, console="off"))

    def _log(self, step: int, data: dict) -> None:
        # W&B drops a step below one already logged (a flag found for an earlier step): keep the steps rising
        self.step = max(self.step, int(step))
        self.run.log(data, step=self.step)

    def scalars(self, step, values):
        self._log(step, dict(values))

    def image(self, step, tag, image):
        self._log(step, {tag: self.wandb.Image(image)})

    def text(self, step, tag, text):
        self._log(step, {tag: self.wandb.Html(f"<pre>{html.escape(text)}</pre>")})

    def close(self, status=None):
        if status:
            self.run.summary["status"] = status
        self.run.finish(exit_code=1 if status in FAILED_STATUSES else 0)


BACKENDS = {"tb": TensorBoardLogger, "mlflow": MlflowLogger, "wandb": WandbLogger}  # in LOG_BACKENDS' order


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _warn(name: str, what: str, exc: BaseException) -> None:
    first = (str(exc).strip().splitlines() or [""])[0][:200]
    print(f"warning: the {name} logger failed {what} ({exc.__class__.__name__}: {first}); it is off for the rest "
          f"of this run (metrics.jsonl and evals.jsonl are unaffected)", file=sys.stderr, flush=True)


class RunLoggers:
    """The chosen backends as one RunLogger. A backend that raises is closed and dropped with one warning;
    the others and training go on."""

    def __init__(self, loggers: list):
        self.active = list(loggers)

    @classmethod
    def open(cls, run_dir: Path, resume_step: int, settings: LogSettings) -> "RunLoggers":
        loggers = []
        for name in settings.backends:
            try:
                loggers.append(BACKENDS[name](Path(run_dir), int(resume_step), settings))
            except Exception as exc:  # noqa: BLE001 - a viewer's failure never stops training
                _warn(name, "to start", exc)
        return cls(loggers)

    @property
    def names(self) -> list:
        return [lg.name for lg in self.active]

    def _each(self, what: str, call) -> None:
        for lg in list(self.active):
            try:
                call(lg)
            except Exception as exc:  # noqa: BLE001 - see the class doc
                self.active.remove(lg)
                _warn(lg.name, what, exc)
                try:
                    lg.close(rundir.FAILED)
                except Exception:  # noqa: BLE001 - already dropped
                    pass

    def scalars(self, step: int, values: dict) -> None:
        clean = {k: float(v) for k, v in values.items() if isinstance(v, (int, float))}
        if clean:
            self._each(f"logging the scalars of step {step}", lambda lg: lg.scalars(int(step), clean))

    def image(self, step: int, tag: str, image: np.ndarray) -> None:
        image = np.ascontiguousarray(image)
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"RunLoggers.image: {tag} must be uint8 (H, W, 3); got {image.dtype} {image.shape}")
        self._each(f"logging the image {tag} of step {step}", lambda lg: lg.image(int(step), tag, image))

    def text(self, step: int, tag: str, text: str) -> None:
        self._each(f"logging the text {tag} of step {step}", lambda lg: lg.text(int(step), tag, str(text)))

    def close(self, status: Optional[str] = None) -> None:
        for lg in self.active:
            try:
                lg.close(status)
            except Exception as exc:  # noqa: BLE001 - the run is over; say so and go on
                _warn(lg.name, "to close", exc)
        self.active = []
