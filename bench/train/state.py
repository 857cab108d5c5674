"""Training state on disk and its recovery (docs/architecture.md, "Checkpoints"): `Checkpoints` (rank 0 saves,
the newest `keep` stay, the best checkpoint, load the newest that reads), `NonfiniteGuard` (skipped updates,
then rollbacks to the newest checkpoint, at most `max_rollbacks`), the EMA update and the RNG state a
checkpoint carries. File names and the atomic writer are bench.rundir's."""
from __future__ import annotations

import random
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from bench import rundir
from bench.config import ConfigError
from bench.faults import injected_fault


# Keys whose change makes a checkpoint meaningless for the config: parameter shapes (every model.* key,
# data.resolution), the objective (loss.name) and the optimiser state's layout (train.optimizer).
INCOMPATIBLE = ("model.", "data.resolution", "loss.name", "train.optimizer")
# Keys that say where and how a run is launched, not what it trains: never recorded as changes.
NOT_CHANGES = ("run.",)


def _flatten(d, prefix: str = "") -> dict:
    out = {}
    for k, v in (d or {}).items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def config_changes(old: Optional[dict], new: dict) -> dict:
    """{dotted key: [old, new]} for every setting a resume changes (run.* aside). An incompatible change
    (INCOMPATIBLE) is a ConfigError naming every such key, old -> new, in one line. A checkpoint without
    a config (none written so far lacks one) has no changes."""
    if not old:
        return {}
    a, b = _flatten(old), _flatten(new)
    changes = {k: [a.get(k), b.get(k)] for k in sorted(set(a) | set(b))
               if a.get(k) != b.get(k) and not k.startswith(NOT_CHANGES)}
    bad = [k for k in changes if k.startswith(INCOMPATIBLE)]
    if bad:
        what = ", ".join(f"{k}: {changes[k][0]!r} -> {changes[k][1]!r}" for k in bad)
        raise ConfigError(f"cannot resume: the run's checkpoint was trained with another config ({what}); "
                          "use the run's settings or another run.dir")
    return changes


class Diverged(RuntimeError):
    """Non-finite steps persisted through every allowed rollback."""


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net for parameters; buffers are copied."""
    ep, np_ = list(ema.parameters()), list(net.parameters())
    if decay <= 0.0:
        torch._foreach_copy_(ep, np_)
    else:
        torch._foreach_lerp_(ep, np_, 1.0 - decay)
    for be, bn in zip(ema.buffers(), net.buffers()):
        be.copy_(bn)


def rng_state(zgen: torch.Generator) -> dict:
    """Every RNG a step draws from, as tensors and plain numbers only, so a checkpoint loads with
    torch.load(weights_only=True): torch's states are ByteTensors already; NumPy's MT19937 key and
    Python's Mersenne Twister words become int64 tensors beside their scalar fields."""
    _, np_key, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    py_version, py_words, py_gauss = random.getstate()
    return {"torch": torch.get_rng_state(), "zgen": zgen.get_state(),
            "numpy": {"key": torch.from_numpy(np_key.astype(np.int64)), "pos": int(np_pos),
                      "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_gauss)},
            "python": {"version": int(py_version), "words": torch.tensor(py_words, dtype=torch.int64),
                       "gauss_next": py_gauss},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}


def set_rng_state(rng: dict, zgen: torch.Generator) -> None:
    torch.set_rng_state(rng["torch"])
    n, p = rng["numpy"], rng["python"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    random.setstate((p["version"], tuple(int(w) for w in p["words"].tolist()), p["gauss_next"]))
    zgen.set_state(rng["zgen"])
    if rng.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def param_checksum(*nets: torch.nn.Module) -> str:
    """A digest of every parameter's bytes: equal on every rank when training is in sync."""
    import hashlib

    h = hashlib.sha1()
    for net in nets:
        for p in net.parameters():
            h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def all_finite(*nets: torch.nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for net in nets for p in net.parameters())


@dataclass
class TrainState:
    """Everything a checkpoint restores, saved and loaded as one object: the nets and their EMA, the
    optimisers (and fp16 scalers), the latent RNG, the objective's running state (ADA's p, LeCam's anchors),
    the collapse detector, the non-finite guard, the historical averages, and the progress counters."""
    G: torch.nn.Module
    D: torch.nn.Module
    G_ema: torch.nn.Module
    opt: dict  # "G", "D" -> optimiser
    scaler: Optional[dict]  # "G", "D" -> GradScaler (fp16 only)
    zgen: torch.Generator  # latents and labels (this rank's)
    objective: object  # objectives.GANObjective (its state_dict is {} with every stabiliser off)
    collapse: object  # collapse.CollapseDetector
    guard: "NonfiniteGuard"
    hist_avg: Optional[dict] = None  # "G", "D" -> HistoricalAverage (reg.hist_avg only)
    step: int = 0  # G steps done
    images_seen: int = 0  # over all ranks
    train_seconds: float = 0.0  # training wall time so far (checkpoints, grids and evaluations excluded)
    data_skipped: int = 0  # unreadable samples the data stream skipped
    best: Optional[dict] = None  # {"metric", "value", "step", "extractor"} of the best evaluation

    @property
    def nets(self) -> dict:
        return {"G": self.G, "D": self.D}

    def state_dict(self) -> dict:
        """The checkpoint's keys (those of every checkpoint written so far; the run adds "config")."""
        objective = self.objective.state_dict() if self.objective is not None else {}
        return {"step": self.step, "images_seen": self.images_seen, "train_seconds": self.train_seconds,
                "data_skipped": self.data_skipped, "best": self.best,
                "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
                **{f"opt_{k}": opt.state_dict() for k, opt in self.opt.items()},
                "scaler": {k: s.state_dict() for k, s in self.scaler.items()} if self.scaler else None,
                "rng": rng_state(self.zgen), "collapse": self.collapse.state_dict(),
                "hist_avg": {k: h.state_dict() for k, h in self.hist_avg.items()} if self.hist_avg else None,
                **self.guard.state_dict(), **({"objective": objective} if objective else {})}

    def load_state_dict(self, s: dict) -> None:
        for k in ("G", "D", "G_ema"):
            getattr(self, k).load_state_dict(s[k])
        for k, opt in self.opt.items():
            kernels = [{key: g.get(key) for key in ("foreach", "fused")} for g in opt.param_groups]
            opt.load_state_dict(s[f"opt_{k}"])  # this restores the saved run's kernel choice with its state:
            for group, own in zip(opt.param_groups, kernels):  # keep this run's train.fused_optim instead
                group.update(own)
                if group.get("fused"):  # a fused step wants each `step` on its parameter's device as float32; a
                    for p in group["params"]:  # checkpoint of the loop or foreach left them on the CPU
                        st = opt.state.get(p, {})
                        if torch.is_tensor(st.get("step")):
                            st["step"] = st["step"].to(device=p.device, dtype=torch.float32)
        if self.scaler and s.get("scaler"):
            for k, sd in s["scaler"].items():
                self.scaler[k].load_state_dict(sd)
        set_rng_state(s["rng"], self.zgen)
        if s.get("collapse"):
            self.collapse.load_state_dict(s["collapse"])
        if self.hist_avg and s.get("hist_avg"):
            for k, h in self.hist_avg.items():
                h.load_state_dict(s["hist_avg"][k])
        self.guard.load_state_dict(s)
        if self.objective is not None:  # a checkpoint without it (older, or stabilisers off): ADA p = 0, ...
            self.objective.load_state_dict(s.get("objective") or {})
        self.step = int(s["step"])
        self.images_seen = int(s["images_seen"])
        self.train_seconds = float(s["train_seconds"])
        self.data_skipped = int(s.get("data_skipped", 0))
        self.best = s.get("best")

    def roll_back(self, saved: dict, seed: int) -> None:
        """Load the nets, EMA, optimisers and objective of checkpoint `saved` but keep counting forward: the
        counters, the guard's totals, the best evaluation and a collapse already flagged stay (a rollback
        recovers, it does not undo history); the latents then follow `seed`, a different random path."""
        keep = (self.step, self.images_seen, self.train_seconds, self.data_skipped, self.guard.state_dict(),
                self.best, self.collapse.collapse_step, self.collapse.reason, list(self.collapse.fired))
        self.load_state_dict(saved)
        (self.step, self.images_seen, self.train_seconds, self.data_skipped, guard,
         self.best, self.collapse.collapse_step, self.collapse.reason, self.collapse.fired) = keep
        self.guard.load_state_dict(guard)
        self.zgen.manual_seed(seed)


class Checkpoints:
    """<run>/checkpoints/: ckpt-<step>.pt (the newest `keep` kept) and best.pt. Rank 0 writes; the
    trainer calls `save` through ranks.Ranks.rank0, whose agreement keeps the ranks together."""

    def __init__(self, run_dir: Path, keep: int, is_main: bool):
        self.dir = Path(run_dir) / rundir.CHECKPOINTS
        self.keep = keep
        self.is_main = is_main

    def save(self, step: int, state: Callable[[], dict]) -> Optional[Path]:
        """Write `state()` as the checkpoint of `step`, then drop all but the newest `keep`."""
        path = None
        if self.is_main:
            path = self.dir / rundir.ckpt_name(step)
            obj = state()

            def write(f) -> None:
                torch.save(obj, f)
                injected_fault(0, step, "checkpoint_write")  # the fault tests' hook (bench.faults)

            rundir.atomic_write(path, write=write)
            # the new checkpoint's rename is durable before any older one goes (atomic_write fsyncs the
            # directory too; this keeps the order explicit here, where the pruning is)
            rundir.fsync_dir(self.dir)
            for _, old in rundir.list_checkpoints(self.dir)[: -self.keep]:
                old.unlink(missing_ok=True)
        return path

    @staticmethod
    def best_of(evals: list, eval_cfg) -> Optional[dict]:
        """{metric, value, step, extractor} of the best of the run's training evaluations `evals` by THE
        rule (rundir.best_eval, by eval.best_metric and eval.extractor), or None."""
        best = rundir.best_eval(None, evals, eval_cfg.best_metric, eval_cfg.extractor)
        return {k: best[k] for k in ("metric", "value", "step", "extractor")} if best else None

    def keep_if_best(self, step: int, evals: list, eval_cfg, state: Callable[[dict], dict]) -> Optional[dict]:
        """After the evaluation of `step`: when it is the run's best, write checkpoints/best.pt from
        `state(best)` (so the file knows its own evaluation) and return the best; otherwise None."""
        best = self.best_of(evals, eval_cfg)
        if best is None or best["step"] != step:
            return None
        obj = state(best)
        rundir.atomic_write(self.dir / rundir.BEST_CKPT, write=lambda f: torch.save(obj, f))
        return best

    def reconcile_best(self, evals: list, eval_cfg, resume_step: int) -> Optional[dict]:
        """At a resume, after evals.jsonl lost the evaluations past `resume_step`: the run's best is
        recomputed from what is kept, and best.pt must be that evaluation's checkpoint. A best.pt from a
        dropped step, from another eval.best_metric or extractor, or unreadable, goes; the best step's own
        checkpoint takes its place (carrying that evaluation as its `best`) while it is still there, also
        when best.pt is missing. Returns the best (rank 0 calls this)."""
        from bench.eval.safeload import load_weights

        best, path = self.best_of(evals, eval_cfg), self.dir / rundir.BEST_CKPT
        kept = "missing"
        if path.exists():
            try:
                state = load_weights(path)
                step, kb = int(state["step"]), state.get("best") or {}
                kept = f"step {step}"
                if best is not None and step == best["step"] and all(
                        kb.get(k, best[k]) == best[k] for k in ("metric", "extractor")):
                    return best
            except Exception:  # unreadable: replaced like a stale one
                kept = "unreadable"
        source = self.dir / rundir.ckpt_name(best["step"]) if best else None
        if source is not None and source.exists():
            state = {**load_weights(source), "best": best}
            rundir.atomic_write(path, write=lambda f: torch.save(state, f))
            what = f"replaced by the checkpoint of step {best['step']}"
        elif path.exists():
            path.unlink()
            what = "removed until a new best"
        else:
            return best
        print(f"note: {rundir.CHECKPOINTS}/{rundir.BEST_CKPT} ({kept}) is not the best evaluation kept at the resume "
              f"from step {resume_step}; {what}", file=sys.stderr)
        return best

    def load_newest(self) -> tuple[Optional[dict], Optional[Path]]:
        """The newest checkpoint that loads; a corrupt one is reported and skipped. Checkpoints are read
        with torch.load(weights_only=True) (bench.eval.safeload): a file that would run code when
        unpickled is refused like a truncated one, and nothing in it runs."""
        from bench.eval.safeload import first_line, load_weights

        for _, path in reversed(rundir.list_checkpoints(self.dir)):
            try:
                return load_weights(path), path
            except Exception as exc:  # truncated, corrupt or hostile file: fall back to the previous one
                print(f"warning: checkpoint {path} is unreadable ({first_line(exc, 120)}); trying an older one",
                      file=sys.stderr)
        return None, None

    def for_resume(self) -> tuple[Optional[dict], Optional[Path]]:
        """load_newest, after removing what a killed save left (rank 0, holding the run lock)."""
        for p in rundir.remove_temps(self.dir):
            print(f"note: removed {p.name}, left by a checkpoint save that was cut off", file=sys.stderr)
        return self.load_newest()

    def for_rollback(self) -> tuple[dict, Path]:
        state, path = self.load_newest()
        if state is None:
            raise Diverged("training diverged before the first checkpoint (non-finite steps); nothing to roll "
                           "back to: lower the learning rates or set train.ckpt_every lower")
        return state, path


class StopRequest:
    """Whether the run stops before train.steps, and why. SIGTERM (preemption, scancel, scontrol
    requeue), SIGINT (Ctrl-C), SIGUSR1, and SIGUSR2 (Slurm's warning before the time limit) make the
    run checkpoint at the end of the current step and stop, without samples or an evaluation for that
    step; after SIGUSR2 the job also requeues itself. A second Ctrl-C stops at once (KeyboardInterrupt;
    the checkpoint of the step may then be missing, the previous one stays complete). The collapse
    detector stops the run too, with telemetry.stop_on_collapse."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)

    def __init__(self):
        self.asked = False  # a signal reached this process
        self.requested = False  # every rank agreed to stop (agree)
        self.signal: Optional[int] = None
        self.on_collapse = False
        self._old_handlers: dict = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.signal == signal.SIGINT:
            raise KeyboardInterrupt
        self.asked = True
        self.signal = signum

    def status(self) -> str:
        """The run's status when its loop ends."""
        if self.on_collapse:
            return rundir.COLLAPSED
        return rundir.INTERRUPTED if self.requested else rundir.COMPLETED

    def message(self, step: int, trained: bool = True) -> Optional[str]:
        """The one line saying that a signal stopped the run (None when none did). `trained`: whether
        this process trained a step (a signal during set-up or resume stops before the first)."""
        if self.signal is None or not self.requested:  # a signal not yet agreed stopped nothing
            return None
        name = signal.Signals(self.signal).name
        if not trained:
            again = "resume" if step else "start it again"
            return f"stopped by {name} during set-up, before training step {step + 1}; run the same command to {again}"
        return f"stopped by {name} at step {step}: checkpoint written; run the same command to resume"

    @property
    def installed(self) -> bool:
        return bool(self._old_handlers)

    def install(self) -> None:
        """Handle the signals from now on (the CLI does this before set-up and resume; a second call
        is a no-op)."""
        if self.installed:
            return
        for sig in self.SIGNALS:
            if signal.getsignal(sig) is signal.SIG_IGN:  # ignored by whoever started us (a background job's
                continue                                  # SIGINT, nohup): keep it so
            try:
                self._old_handlers[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass

    def restore(self) -> None:
        for sig, handler in self._old_handlers.items():
            signal.signal(sig, handler)
        self._old_handlers = {}

    def collapse(self) -> None:
        self.requested = self.on_collapse = True

    def agree(self, any_rank: Callable[[bool], bool]) -> None:
        """Every rank must stop at the same step: agree on the flag with ranks.Ranks.any (a collective;
        call it on every rank; train_step's gradient all-reduce carries the flag too). Once agreed, it stays."""
        agreed = any_rank(self.asked)  # on every rank, every time: it is a collective
        self.requested = self.requested or agreed


class NonfiniteGuard:
    """Counts updates skipped for a non-finite loss or gradient. `rollback_after` G steps in a row
    with a skipped update ask for a rollback (0 = never); more than `max_rollbacks` is Diverged."""

    def __init__(self, rollback_after: int, max_rollbacks: int):
        self.rollback_after, self.max_rollbacks = rollback_after, max_rollbacks
        self.total = 0  # updates skipped over the run
        self.first_step: Optional[int] = None  # the step of the first one: a diverged run's collapse step
        self.rollbacks = 0
        self.consecutive = 0  # G steps in a row with a skipped update
        self.step_had_nonfinite = False

    def skipped(self, step: int) -> None:
        """An update of G step `step` (1-based) was skipped."""
        self.total += 1
        self.step_had_nonfinite = True
        if self.first_step is None:
            self.first_step = step

    def end_of_step(self) -> bool:
        """Called after every G step: True when it is time to roll back."""
        if not self.step_had_nonfinite:
            self.consecutive = 0
            return False
        self.step_had_nonfinite = False
        self.consecutive += 1
        return bool(self.rollback_after) and self.consecutive >= self.rollback_after

    def start_rollback(self) -> int:
        """Count a rollback; raises Diverged past max_rollbacks. Returns the rollback's number."""
        self.rollbacks += 1
        self.consecutive = 0
        if self.rollbacks > self.max_rollbacks:
            raise Diverged(f"training diverged: non-finite steps persisted after {self.max_rollbacks} "
                           "rollbacks (train.max_rollbacks); lower the learning rates or add regularisation")
        return self.rollbacks

    def state_dict(self) -> dict:
        return {"nonfinite_total": self.total, "rollbacks": self.rollbacks}

    def load_state_dict(self, s: dict) -> None:
        self.total = int(s.get("nonfinite_total", 0))
        self.rollbacks = int(s.get("rollbacks", 0))


def agreed_load(ranks, what: str, pick: Callable[[], tuple]) -> tuple[Optional[dict], Optional[Path]]:
    """Rank 0 picks a checkpoint (`pick()` -> (state, path), e.g. Checkpoints.for_resume) and names it to
    the others (broadcast), who read that file: every rank loads the same step. A rank that cannot read it
    fails the load on every rank (ranks.Ranks.all_ok). (None, None) when there is none."""
    from bench.eval.safeload import load_weights

    state, path = ranks.rank0(what, pick) or (None, None)
    path = ranks.broadcast(str(path) if path is not None else None)
    if path is None:
        return None, None
    error = None
    if not ranks.is_main:
        try:
            state = load_weights(Path(path))
        except Exception as exc:  # handed to every rank by all_ok
            error = exc
    ranks.all_ok(error, f"reading {path}")
    return state, Path(path)
