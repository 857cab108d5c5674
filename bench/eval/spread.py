"""Training's evaluation spread over the ranks of a multi-rank run: `evaluate_on_ranks` is training's one entry
(one rank: `evaluate_generator` on rank 0). Rank 0 sets up and broadcasts the plan, every rank samples and
extracts features for its share, rank 0 gathers them and computes the metrics (docs/architecture.md,
"Evaluation")."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from bench.eval.classifier import load_classifier
from bench.eval.errors import EvalError
from bench.eval.features import ProgressLine, Sampler, extractor_settings, feature_extractor, features_of, register_sampler
from bench.eval.metrics import (EvalSettings, MetricSettings, eval_copy, eval_setup, evaluate_generator, fidelity_kwargs,
                                finish_record, metrics_from_features)
from bench.device import autocast, eval_precision
from bench.eval.sampling import eval_latents


@dataclass(frozen=True)
class EvalJob:
    """What evaluate_generator takes: the generator (not modified), its settings and the real data."""
    G: nn.Module
    settings: EvalSettings
    shards_spec: Any
    n_classes: Optional[int] = None
    device: Any = None  # None: G's
    progress: bool = True


@dataclass(frozen=True)
class _Tools:
    """What a rank samples and extracts with: the extractor's weights, the class_acc judge, autocast, device."""
    weights_path: Optional[str]
    clf: Optional[nn.Module]
    amp: object
    device: torch.device


def share_rows(n: int, batch_size: int, world: int, rank: int) -> tuple[int, int]:
    """[lo, hi): the samples of `rank`'s share of n. Whole batches of batch_size (as torch-fidelity draws them on
    one rank), dealt out contiguously and as evenly as they go (shares differ by at most one batch), so every
    batch holds the samples it holds on one rank and the shares in rank order are the samples in index order."""
    batches = -(-int(n) // int(batch_size))
    per, extra = divmod(batches, int(world))
    first = rank * per + min(rank, extra)
    count = per + (1 if rank < extra else 0)
    return min(n, first * batch_size), min(n, (first + count) * batch_size)


def param_digest(G: nn.Module) -> str:
    """A digest of G's parameters' bytes (every rank's EMA G has rank 0's parameters in a run in step)."""
    h = hashlib.sha1()
    for p in G.parameters():
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def evaluate_on_ranks(job: EvalJob, ranks, what: str, then: Callable[[dict], Any],
                      before: Optional[Callable[[], None]] = None):
    """`then(metrics)` on rank 0 with job's metrics (evaluate_generator's record; with several ranks also
    eval_ranks), returning its result there and None elsewhere; every rank agrees that it worked (an error on
    any rank raises on every rank). `before()` runs first on every rank (the fault tests' hook): with one rank
    inside rank 0's work, with several at the start of each rank's share."""
    before = before or (lambda: None)
    if ranks.world == 1:
        def whole():
            before()
            return then(evaluate_generator(job.G, job.settings, shards_spec=job.shards_spec, n_classes=job.n_classes,
                                           device=job.device, progress=job.progress))

        return ranks.rank0(what, whole)
    t0 = time.time()
    was_training = job.G.training
    try:
        local, gathered = gather_shares(job, ranks, what, before)
        return ranks.rank0(what, lambda: then(_metrics(gathered, local, job.progress, t0)))
    finally:
        job.G.train(was_training)


def gather_shares(job: EvalJob, ranks, what: str, before: Optional[Callable[[], None]] = None) -> tuple:
    """Steps 1 and 2 and the gather (several ranks; every rank calls it): on rank 0 ((its EvalSetup, its generator),
    [each rank's list of sample-set shares, in rank order]), elsewhere (None, None). Leaves G in eval mode."""
    local, plan = _prepare(job, ranks, what)
    mine = _share(job, plan, local, ranks, f"{what} (sampling and features)", before or (lambda: None))
    gathered = [None] * ranks.world if ranks.rank == 0 else None
    torch.distributed.gather_object(mine, gathered, dst=0, group=ranks.group)
    return local, gathered


def _prepare(job: EvalJob, ranks, what: str) -> tuple[Optional[tuple], dict]:
    """(rank 0: (its EvalSetup, its generator); elsewhere None, the plan every rank gets)."""
    def setup():
        e = eval_setup(job.G, job.settings, job.shards_spec, job.n_classes, job.device, job.progress)
        Gs = eval_copy(job.G, e)
        plan = {"settings": e.s, "n_classes": e.n_classes, "weights_path": e.side.weights_path,
                "classifier": str(e.clf_file) if e.clf_file is not None else None,
                "extractor_id": e.ident["extractor_id"], "num_real": e.side.count, "params": param_digest(Gs),
                "precision": eval_precision(e.s.precision, e.side.device),  # "auto" as rank 0 resolved it
                "buffers": {name: b.detach().cpu() for name, b in Gs.named_buffers()}}
        return (e, Gs), plan

    out = ranks.rank0(f"{what} (setting up)", setup)
    local, plan = out if out is not None else (None, None)
    return local, ranks.broadcast(plan)


def _rank0_generator(job: EvalJob, plan: dict, rank: int) -> tuple[nn.Module, _Tools]:
    """A rank other than 0: a copy of its G with rank 0's buffers (its parameters must be rank 0's), and the
    extractor, judge and autocast of the plan (the files must be the ones rank 0 read: a shared file system)."""
    s = plan["settings"]
    device = torch.device(job.device) if job.device is not None else next(job.G.parameters()).device
    for path in (plan["weights_path"], plan["classifier"]):
        if path and not Path(path).is_file():
            raise EvalError(f"rank {rank}: {path} (read by rank 0) is not here; every rank must see the evaluation's "
                            f"extractor and domain classifier files (a shared file system)")
    _, _, _, fe_id = extractor_settings(s.extractor, plan["weights_path"])
    if fe_id != plan["extractor_id"]:
        raise EvalError(f"rank {rank}: the feature extractor {plan['weights_path']} differs from rank 0's "
                        f"({fe_id} != {plan['extractor_id']}); every rank must read the same file")
    Gs = copy.deepcopy(job.G).to(device).eval()
    if param_digest(Gs) != plan["params"]:
        raise EvalError(f"rank {rank}: the evaluated generator's parameters differ from rank 0's (ranks out of step)")
    buffers = dict(Gs.named_buffers())
    if set(buffers) != set(plan["buffers"]):
        raise EvalError(f"rank {rank}: the evaluated generator's buffers differ from rank 0's")
    with torch.no_grad():
        for name, value in plan["buffers"].items():
            buffers[name].copy_(value)
    clf = load_classifier(plan["classifier"], device)[0] if plan["classifier"] else None
    return Gs, _Tools(plan["weights_path"], clf, autocast(plan["precision"], device), device)


def _share(job: EvalJob, plan: dict, local, ranks, what: str, before: Callable[[], None]) -> Optional[list]:
    """This rank's share of every sample set (None when it failed), once every rank said its share worked."""
    out, error = None, None
    try:
        before()
        s = plan["settings"]
        if local is not None:
            e, Gs = local
            tools = _Tools(e.side.weights_path, e.side.clf, e.side.amp, e.side.device)
        else:
            Gs, tools = _rank0_generator(job, plan, ranks.rank)
        rows = share_rows(int(s.num_samples), int(s.batch_size), ranks.world, ranks.rank)
        progress = job.progress and ranks.rank == 0
        out = [share_of_set(Gs, replace(s, seed=int(s.seed) + i), plan, tools, rows, progress)
               for i in range(int(s.repeats))]
    except Exception as exc:  # handed to every rank by all_ok
        error = exc
    ranks.all_ok(error, what)
    return out


def share_of_set(Gs: nn.Module, s: EvalSettings, plan: dict, tools: _Tools, rows: tuple[int, int],
                 progress: bool = False) -> dict:
    """Samples rows = [lo, hi) of the sample set of s.seed (every latent and label drawn first) and their features:
    {rows, features {layer: (hi - lo, D)} (None for an empty share), labels (all n), correct, count (class_acc),
    sample_s, features_s}."""
    lo, hi = rows
    z, y = eval_latents(int(s.num_samples), Gs.z_dim, int(plan["n_classes"]), truncation=s.truncation,
                        trunc_mode=s.trunc_mode, seed=int(s.seed))
    out = {"rows": (lo, hi), "features": None, "labels": y, "correct": 0, "count": 0, "sample_s": 0.0,
           "features_s": 0.0}
    if hi <= lo:
        return out
    register_sampler()
    sampler = Sampler(Gs, z[lo:hi], y[lo:hi], autocast=tools.amp, classifier=tools.clf)
    if progress and not s.verbose:
        sampler.progress = ProgressLine(f"gan-bench eval: sampling + features (this rank's {hi - lo}, seed {s.seed})",
                                        hi - lo)
    ms = MetricSettings(extractor=s.extractor, weights_path=tools.weights_path, batch_size=int(s.batch_size),
                        num_samples=hi - lo, num_real=int(plan["num_real"]), seed=int(s.seed), verbose=s.verbose)
    kw, _, used = fidelity_kwargs(sampler, None, ms, tools.device)
    cuda = tools.device.type == "cuda"
    with torch.cuda.device(tools.device) if cuda else contextlib.nullcontext():
        features, seconds = features_of(1, feature_extractor(kw, used), kw)
    if sampler.cursor != hi - lo:
        raise EvalError(f"sampler: torch-fidelity drew {sampler.cursor} of this rank's {hi - lo} samples")
    out.update(features={k: v.cpu() for k, v in features.items()}, correct=int(sampler.correct),
               count=sampler.count, sample_s=sampler.seconds, features_s=seconds - sampler.seconds)
    return out


def joined(shares: list[dict], n: int) -> dict:
    """The features of one sample set's shares (in rank order) as one featuresdict in sample order."""
    parts = [p for p in shares if p["features"] is not None]
    rows = [p["rows"] for p in parts]
    if [r[0] for r in rows] != [0] + [r[1] for r in rows[:-1]] or rows[-1][1] != n:
        raise EvalError(f"spread evaluation: the ranks' shares {rows} do not cover samples 0..{n}")
    return {k: torch.cat([p["features"][k] for p in parts]) for k in parts[0]["features"]}


def _metrics(gathered: list, local: tuple, progress: bool, t0: float) -> dict:
    """Rank 0: every metric of each gathered sample set against the real side (as compute_metrics computes them),
    as evaluate_generator's record, plus eval_ranks."""
    e, _ = local
    s, side = e.s, e.side
    n = int(s.num_samples)
    ms = MetricSettings(extractor=s.extractor, weights_path=side.weights_path, batch_size=int(s.batch_size),
                        num_samples=n, num_real=side.count, cache_dir=side.cache_dir,
                        input2_cache_name=side.cache_name, verbose=s.verbose)
    kw, layers, used = fidelity_kwargs(None, side.images, ms, side.device)
    if progress and not s.verbose:
        side.images.progress = ProgressLine("gan-bench eval: real features (cached afterwards)", side.count)
    with torch.cuda.device(side.device) if side.device.type == "cuda" else contextlib.nullcontext():
        real, real_s = features_of(2, feature_extractor(kw, used), kw)
    per_repeat = []
    for i, shares in enumerate(zip(*gathered)):
        t1 = time.perf_counter()
        fake = joined(list(shares), n)
        kw_i, _, _ = fidelity_kwargs(None, side.images, replace(ms, seed=int(s.seed) + i), side.device)
        out = metrics_from_features(fake, real, layers, tuple(ms.metrics), kw_i)
        if side.intra is not None:
            out.update(side.intra.bind(shares[0]["labels"])(fake[layers["fid"]], real[layers["fid"]]))
        count = sum(p["count"] for p in shares)
        if count:
            out["eval/class_acc"] = sum(p["correct"] for p in shares) / count
        out.update({"cost/sample_s_per_1k": round(1000.0 * max(p["sample_s"] for p in shares) / n, 4),
                    "cost/features_s_per_1k": round(1000.0 * max(p["features_s"] for p in shares) / n, 4),
                    "cost/real_features_s": round(real_s if i == 0 else 0.0, 3),
                    "cost/metrics_s": round(time.perf_counter() - t1, 3)})
        per_repeat.append(out)
    out = finish_record(per_repeat, e, t0)
    out["eval_ranks"] = len(gathered)
    if progress:
        print(f"gan-bench eval: {n} samples shared by {len(gathered)} ranks", file=sys.stderr, flush=True)
    return out
