"""Every evaluation metric gan-bench records, in one table (torch-free).

Config validation (`eval.best_metric`), evaluation (torch-fidelity key -> record key), the terminal
table, the report and the collapse detector all read this module; nothing else lists metric names.
See docs/architecture.md, "Add a metric".
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from bench.schema import EvalCfg


@dataclass(frozen=True)
class Metric:
    name: str                       # the key in evals.jsonl, e.g. "eval/FID"
    lower_is_better: Optional[bool]  # None: not a quality score (a spread, a count)
    fmt: str = "{:.4f}"             # how terminals and reports print it
    best_metric: bool = False       # may be `eval.best_metric` (chooses checkpoints/best.pt)
    fidelity_key: Optional[str] = None  # torch-fidelity's result key for this quantity
    headline: bool = False          # a column of the report's evaluation tables

    @property
    def short(self) -> str:
        return self.name.split("/", 1)[1]


DEFAULT_BEST_METRIC = EvalCfg.best_metric  # the schema's default
FID = "eval/FID"                  # fed to the collapse detector as well

METRICS: tuple[Metric, ...] = (
    Metric("eval/IS", False, best_metric=True, fidelity_key="inception_score_mean", headline=True),
    Metric("eval/IS_std", None, fidelity_key="inception_score_std"),
    # FID: computed in float64 by bench.eval.stats (torch-fidelity's key names the same quantity)
    Metric("eval/FID", True, "{:.3f}", best_metric=True, fidelity_key="frechet_inception_distance", headline=True),
    # intra-class FID (eval.intra_fid, bench.eval.intra): the mean over classes of each class's FID against that
    # class's real images, from FID's features; per-class values and counts in INTRA_FIELDS
    Metric("eval/intra_FID", True, "{:.3f}", best_metric=True),
    Metric("eval/KID", True, "{:.5f}", best_metric=True, fidelity_key="kernel_inception_distance_mean",
           headline=True),
    Metric("eval/KID_std", None, "{:.5f}", fidelity_key="kernel_inception_distance_std"),
    Metric("eval/precision", False, best_metric=True, fidelity_key="precision", headline=True),
    Metric("eval/recall", False, best_metric=True, fidelity_key="recall", headline=True),
    Metric("eval/f_score", False, fidelity_key="f_score"),
    # Naeem et al. 2020, k = 5, on precision / recall's features (bench.eval.stats); density may exceed 1
    Metric("eval/density", False, best_metric=True, headline=True),
    Metric("eval/coverage", False, best_metric=True, headline=True),
    Metric("eval/class_acc", False, best_metric=True, headline=True),
)
BY_NAME = {m.name: m for m in METRICS}

EVAL_METRICS = tuple(m.name for m in METRICS)                       # every record key, in table order
HEADLINE = tuple(m.name for m in METRICS if m.headline)             # report columns
BEST_METRICS = tuple(m.name for m in METRICS if m.best_metric)      # allowed eval.best_metric values
LOWER_IS_BETTER = frozenset(m.name for m in METRICS if m.lower_is_better)
FIDELITY_KEYS = {m.fidelity_key: m.name for m in METRICS if m.fidelity_key}  # torch-fidelity -> record key

# An evaluation record's diagnostics beside the metrics (bench/eval/metrics.py writes them; the terminal table
# and the report's evals.csv show them): FID's imaginary residue, then its cost (seconds per 1k generated
# images for sampling and for the generated side's features; seconds for the real features, 0 when cached, and
# for every metric from the features).
COST_FIELDS = ("cost/sample_s_per_1k", "cost/features_s_per_1k", "cost/real_features_s", "cost/metrics_s")
DIAGNOSTIC_FIELDS = ("fid_imag_residue",) + COST_FIELDS

# eval.repeats > 1 (bench/eval/metrics.py summarise_repeats): eval/<metric> is the mean over the K sample sets,
# eval/<metric>_ci95 its Student-t 95% interval [lo, hi] (bench.eval.stats.t_interval), and these keys hold the rest
CI_SUFFIX = "_ci95"
REPEAT_FIELDS = ("repeats", "repeat_seeds", "repeat_values")

# eval.intra_fid (bench/eval/intra.py): {class name: FID}, {class name: [generated, real]} and the largest
# imaginary residue of the per-class square roots, beside eval/intra_FID
INTRA_FIELDS = ("intra_fid_per_class", "intra_fid_counts", "intra_fid_imag_residue")

EXTRACTORS = ("domain", "inception")        # eval.extractor
TRUNC_MODES = ("resample", "clip", "scale")  # eval.trunc_mode


def lower_is_better(name: str) -> bool:
    return name in LOWER_IS_BETTER


def is_better(name: str, value: float, than: Optional[float]) -> bool:
    """Whether `value` of metric `name` beats `than` (None: nothing to beat). Ties are not better, so
    the earliest of equal values stays best."""
    if than is None:
        return True
    return value < than if lower_is_better(name) else value > than


def format_value(name: str, value) -> str:
    if value is None:
        return ""
    metric = BY_NAME.get(name)
    try:
        return (metric.fmt if metric else "{:.4f}").format(value)
    except (TypeError, ValueError):
        return str(value)


# perf/cpu_util (a CPU tick's, and `bench throughput`'s windows'): the training steps' process CPU time over their
# wall time x torch threads. Below CONTENDED the figure was taken beside another CPU-bound process (or the run's own
# data workers): its img/s are not clean. bench/train/telemetry.py records it; the report marks such runs.
CPU_UTIL = "perf/cpu_util"
# 1 on the first tick after a start or resume (absent otherwise): that tick also waits for the first batches, so
# its perf/cpu_util says nothing about a neighbour (neither the run's warning nor bench report counts it)
START_TICK = "perf/start_tick"
CONTENDED = 0.7
