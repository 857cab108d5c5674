"""The sample-count rule of intra-class FID (eval.intra_fid) and `UNLABELLED_SKIP`, torch- and numpy-free so that
config validation (bench.config.validate_eval, a ConfigError) and evaluation (bench.eval.intra, an EvalError)
state it the same way (docs/architecture.md, "Evaluation")."""
from __future__ import annotations

from typing import Optional

from bench.schema import EvalCfg

DEFAULT_MIN_PER_CLASS = EvalCfg.intra_min_per_class  # the schema's default
MIN_PER_CLASS = 2           # the smallest value eval.intra_min_per_class may take (a covariance needs 2 samples)
INTRA_METRIC = "eval/intra_FID"
# THE line an evaluation of one-class (unlabelled) data prints once (bench.eval.metrics.eval_setup).
UNLABELLED_SKIP = "gan-bench eval: 1 class (unlabelled data): class_acc and intra-FID skipped"


def class_based(n_classes) -> bool:
    """Whether an evaluation over n_classes classes has class-based metrics (class_acc, intra-FID): the nets'
    own rule (models.checks.is_conditional; repeated here, since this module imports neither torch nor models)."""
    return int(n_classes) > 1


def min_per_class_problem(value) -> Optional[str]:
    """A one-line message when eval.intra_min_per_class is not an integer >= MIN_PER_CLASS, else None."""
    if isinstance(value, bool) or not isinstance(value, int) or value < MIN_PER_CLASS:
        return (f"eval.intra_min_per_class={value!r}: use an integer >= {MIN_PER_CLASS} (samples per class that "
                f"intra-class FID needs on each side; default {DEFAULT_MIN_PER_CLASS})")
    return None


def samples_problem(num_samples, num_real, n_classes: int, min_per_class: int, source: str = "") -> Optional[str]:
    """A one-line message naming both keys when eval.num_samples (or the real side's count) cannot give each
    of n_classes classes min_per_class samples; None when they can. num_real None: the real side uses
    num_samples. `source` says where n_classes came from (e.g. "the shards' manifest")."""
    where = f" ({source})" if source else ""
    need = int(min_per_class) * int(n_classes)
    for key, value in (("eval.num_samples", num_samples), ("eval.num_real", num_real)):
        if value is None or int(value) >= need:
            continue
        return (f"{key}={value} is too few for eval.intra_fid=true: eval.intra_min_per_class={min_per_class} x "
                f"n_classes={n_classes}{where} needs {key} >= {need}; raise {key}, lower "
                f"eval.intra_min_per_class (>= {MIN_PER_CLASS}) or set eval.intra_fid=false")
    return None


def class_count(cfg) -> Optional[tuple[int, str]]:
    """(classes an evaluation of this config samples, where that count comes from), or None when only the run
    can tell (bench.eval.intra checks again then): the manifest of local shards (data.shards), else the
    built-in shapes data's classes (data.name=shapes), else model.n_classes."""
    from pathlib import Path

    from omegaconf import OmegaConf

    shards = OmegaConf.select(cfg, "data.shards", default=None)
    if shards and Path(str(shards)).is_dir():
        try:
            from bench.data.shards import dataset_info

            names = dataset_info(shards)[0]
        except Exception:  # noqa: BLE001 - an unreadable manifest is reported where the data is read
            names = None
        if names:
            return len(names), f"the manifest of {shards}"
    if OmegaConf.select(cfg, "data.name", default=None) == "shapes" and not shards:
        from bench.data.shapes import SHAPES_CLASSES

        return len(SHAPES_CLASSES), "the built-in shapes data"
    n = OmegaConf.select(cfg, "model.n_classes", default=None)
    return (int(n), "model.n_classes") if isinstance(n, int) and not isinstance(n, bool) and n > 0 else None


def config_problem(cfg) -> Optional[str]:
    """The eval.intra_* rules of a config (bench.config.validate_eval raises it as a ConfigError): the minimum
    per class, eval.best_metric=eval/intra_FID only with eval.intra_fid=true, and the sample counts when the
    class count is known before the run."""
    from omegaconf import OmegaConf

    on = OmegaConf.select(cfg, "eval.intra_fid", default=False)
    if OmegaConf.select(cfg, "eval.best_metric", default=None) == INTRA_METRIC and not on:
        return f"eval.best_metric={INTRA_METRIC} needs eval.intra_fid=true (records have no {INTRA_METRIC} without it)"
    if not on:
        return None
    min_per_class = OmegaConf.select(cfg, "eval.intra_min_per_class", default=DEFAULT_MIN_PER_CLASS)
    problem = min_per_class_problem(min_per_class)
    known = class_count(cfg) if problem is None else None
    if known is not None and class_based(known[0]):  # one class: skipped at evaluation (UNLABELLED_SKIP)
        num_samples = OmegaConf.select(cfg, "eval.num_samples", default=None)
        problem = samples_problem(num_samples, OmegaConf.select(cfg, "eval.num_real", default=None), known[0],
                                  min_per_class, known[1])
    return problem
