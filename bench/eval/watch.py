"""`bench eval watch run=DIR`: evaluation beside training (`eval.async`). The loop that evaluates a run's
checkpoints as they become due (the due rule, pins, evals.jsonl as the record of what was done, the end of
training from the run lock) and its lock. The job `bench train` submits to run it: bench/jobs.py
(docs/architecture.md, "Evaluation")."""
from __future__ import annotations

import fcntl
import os
import sys
import time
import traceback
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional, Protocol

from bench import metrics_registry as registry
from bench import rundir
from bench.args import FLAG, TEXT, seconds
from bench.faults import injected_fault

SOURCE_WATCH = "bench eval watch"     # evals.jsonl records written by the watcher (they count for best)
WATCH_LOCK = ".eval-watch.lock"        # <run>/.eval-watch.lock: one watcher per run
PINS = ".eval-watch"                  # <run>/checkpoints/.eval-watch/: hard links to due checkpoints
SAME_ERROR_STOP = 3  # this many checkpoints in a row failing with one error (a broken device, a missing file): stop
FINAL_STATUSES = (rundir.COMPLETED, rundir.COLLAPSED)  # the statuses after which training evaluates its last step


@dataclass(frozen=True)
class WatchSettings:
    poll_s: float = 10.0             # seconds between looks at checkpoints/
    once: bool = False               # evaluate what is due now, then stop
    timeout_s: float = 0.0           # stop after this long with nothing to evaluate; 0 = never
    since: Optional[float] = None    # bench train: its training started at or after this time (epoch s)
    wait_lock: bool = False          # bench train: wait for another watcher of the run instead of refusing


# `bench eval watch`'s own keys, read by bench/args.py: poll= seconds > 0, once= / wait= true|false, timeout= seconds
# >= 0 (0 = never), since= a time (bench train sets wait= and since=); data.shards / eval.* pass through to the run's
# config
WATCH_ARGS = {"run": TEXT, "poll": seconds(strict=True), "once": FLAG, "timeout": seconds(), "wait": FLAG,
              "since": seconds()}
WATCH_REQUIRED = {"run": "DIR (a run directory written by bench train)"}
WATCH_PASSTHROUGH = ("data.shards", "eval.*")


def settings_of(known: dict) -> WatchSettings:
    """WatchSettings from the values bench/args.py read with WATCH_ARGS."""
    names = {"poll": "poll_s", "timeout": "timeout_s", "since": "since", "once": "once", "wait": "wait_lock"}
    return WatchSettings(**{names[k]: v for k, v in known.items() if k in names})


class BestKeeper(Protocol):
    """bench.train.state.Checkpoints (passed in by the CLI: bench.eval never imports training)."""

    def keep_if_best(self, step: int, evals: list, eval_cfg, state: Callable[[dict], dict]) -> Optional[dict]: ...


def say(text: str, err: bool = False) -> None:
    print(f"eval watch: {text}", file=sys.stderr if err else sys.stdout, flush=True)


# ---- the run's state, from its files ------------------------------------------------------------------
def training_running(run_dir: Path) -> bool:
    """Whether a training process holds the run lock (<run>/.lock): a shared flock is refused while it does.
    The probe holds the lock for microseconds only."""
    path = Path(run_dir) / rundir.LOCK
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def started_since(run_dir: Path, since: Optional[float]) -> bool:
    """Whether the training that launched the watcher (at time `since`) has started: config.yaml exists and
    run.json was written at or after `since` (both times are the training host's clock)."""
    if since is None:
        return True
    if not (Path(run_dir) / rundir.CONFIG).is_file():
        return False
    updated = (rundir.read_json(Path(run_dir) / rundir.RUN_JSON) or {}).get("updated_time")
    try:
        return datetime.fromisoformat(str(updated)).timestamp() >= since
    except ValueError:
        return False


def wait_for_start(run_dir: Path, s: WatchSettings) -> bool:
    """Wait until started_since (bench train launched the watcher before its records exist). False when
    `timeout` passed first."""
    t0, said = time.monotonic(), False
    while not started_since(run_dir, s.since):
        if s.timeout_s and time.monotonic() - t0 > s.timeout_s:
            say(f"the training of {run_dir} did not start within timeout={s.timeout_s:g} s; stopping", err=True)
            return False
        if not said:
            say(f"waiting for the training of {run_dir} to start")
            said = True
        time.sleep(min(s.poll_s, 2.0))
    return True


def due_rule(every: int, final: bool) -> Callable[[int, Optional[int]], bool]:
    """due(step, final_step): whether a checkpoint's step is evaluated (docs/architecture.md, "Evaluation").
    final_step: the last step of a run that completed or collapsed, else None."""
    if every > 0:
        return lambda step, last: step % every == 0 or step == last
    if final:
        return lambda step, last: step == last
    return lambda step, last: True


def describe_rule(every: int, final: bool) -> str:
    if every > 0:
        return f"steps that are multiples of eval.every={every}, and the final step"
    return "the final step (eval.final=true)" if final else "every checkpoint (eval.every=0)"


def final_step(run_dir: Path) -> Optional[int]:
    summary = rundir.read_json(Path(run_dir) / rundir.SUMMARY) or {}
    return int(summary["steps"]) if summary.get("status") in FINAL_STATUSES and summary.get("steps") else None


# ---- the watcher ------------------------------------------------------------------------------------------
class Watcher:
    def __init__(self, run_dir, overrides, settings: WatchSettings, keeper: BestKeeper, device=None):
        from omegaconf import OmegaConf

        from bench.eval.runs import merge_overrides

        self.run_dir, self.overrides, self.s, self.keeper = Path(run_dir), list(overrides or []), settings, keeper
        self.device = device
        self.cfg = merge_overrides(OmegaConf.load(self.run_dir / rundir.CONFIG), self.overrides)
        get = lambda key, default=None: OmegaConf.select(self.cfg, key, default=default)  # noqa: E731
        from bench.config import resolve_final

        every, final = int(get("eval.every") or 0), resolve_final(self.cfg)
        ckpt_every = int(get("train.ckpt_every") or 0)
        self.extractor = str(get("eval.extractor") or "domain")
        self.truncation = get("eval.truncation")
        self.due, self.rule = due_rule(every, final), describe_rule(every, final)
        self.ckpt_dir = self.run_dir / rundir.CHECKPOINTS
        self.pins = self.ckpt_dir / PINS
        self.links = True                      # hard links work here (else checkpoints are read in place)
        self.evaluated: list[int] = []
        self.skipped: list[int] = []
        self.failed: list[int] = []
        self.given_up: set[int] = set()
        # the last failure (its whole message, the checkpoint's name masked: a per-checkpoint fault differs,
        # a wrong override or a broken device does not) and the steps in a row that ended with it
        self.same_error: tuple[str, list[int]] = ("", [])
        if every > 0 and ckpt_every and every % ckpt_every:
            say(f"note: eval.every={every} is not a multiple of train.ckpt_every={ckpt_every}: only steps that "
                f"are multiples of both have a checkpoint to evaluate", err=True)

    # -- what is done, what is due
    def done_steps(self) -> set[int]:
        """Steps evals.jsonl already has an evaluation of that counts as this watcher's (not `bench eval`'s;
        the same extractor and truncation)."""
        return {int(r["step"]) for r in rundir.read_jsonl(self.run_dir / rundir.EVALS, warn=False).rows
                if r.get("source") != rundir.SOURCE_BENCH_EVAL and isinstance(r.get("step"), int)
                and r.get("extractor", self.extractor) == self.extractor and r.get("truncation") == self.truncation}

    def pending(self, last: Optional[int]) -> list[tuple[int, Path]]:
        """[(step, file)] to evaluate, oldest first: due checkpoints not done (each pinned now), and pins
        left by an earlier watcher. Pins of done steps are removed."""
        done = self.done_steps()
        out: dict[int, Path] = {}
        for p in sorted(self.pins.glob(f"{rundir.CKPT_PREFIX}*.pt")) if self.pins.is_dir() else []:
            step = int(p.stem[len(rundir.CKPT_PREFIX):]) if p.stem[len(rundir.CKPT_PREFIX):].isdigit() else None
            if step is None or step in done:
                p.unlink(missing_ok=True)
            elif step not in self.given_up:
                out[step] = p
        for step, path in rundir.list_checkpoints(self.ckpt_dir):
            if step in done or step in self.given_up or not self.due(step, last):
                continue
            pinned = self.pin(path, out.get(step))
            if pinned is None:
                self.skip(step, "its checkpoint was removed (train.ckpt_keep) before it was evaluated")
            else:
                out[step] = pinned
        return sorted(out.items())

    def pin(self, src: Path, pinned: Optional[Path]) -> Optional[Path]:
        """A hard link to `src` under checkpoints/.eval-watch/ (a pin of an older file of the same step, from
        before a resume, is replaced). None when `src` is gone; `src` itself where links do not work."""
        try:
            ino = src.stat().st_ino
        except FileNotFoundError:
            return pinned
        if not self.links:
            return src
        dst = self.pins / src.name
        if pinned is not None and pinned.stat().st_ino == ino:
            return pinned
        self.pins.mkdir(exist_ok=True)
        dst.unlink(missing_ok=True)  # a pin of the step's file from before a resume
        try:
            os.link(src, dst)  # one directory entry, made whole or not at all
        except FileNotFoundError:
            return None
        except OSError as exc:
            self.links = False
            say(f"note: cannot hard-link checkpoints here ({exc.strerror}); reading them in place, so one that "
                f"train.ckpt_keep rotates away before its turn is skipped", err=True)
            return src
        return dst

    def skip(self, step: int, why: str) -> None:
        if step not in self.given_up:
            self.given_up.add(step)
            self.skipped.append(step)
            say(f"step {step}: {why}; skipped", err=True)

    # -- one evaluation
    def evaluate(self, step: int, path: Path, left: int) -> None:
        from bench.eval.errors import EvalError
        from bench.eval.metrics import EvalSettings, evaluate_generator
        from bench.eval.evalrecords import append_eval
        from bench.eval.runs import load_run

        say(f"step {step}: evaluating {path.relative_to(self.run_dir) if path.is_relative_to(self.run_dir) else path}"
            + (f" ({left} more waiting)" if left else ""))
        t0 = time.perf_counter()
        injected_fault(0, step, "watch")  # the fault tests' hook; nothing unless asked
        try:
            run = load_run(self.run_dir, self.overrides, which=str(path), device=self.device)
            metrics = evaluate_generator(run["G"], EvalSettings.from_cfg(run["cfg"]), shards_spec=run["shards"],
                                         n_classes=run["n_classes"], device=run["device"], progress=True)
        except Exception as exc:  # noqa: BLE001 - one checkpoint failed (bad input, out of memory, a bug): the next goes on
            if not path.exists():
                return self.skip(step, "its checkpoint was removed (train.ckpt_keep) before it was evaluated")
            self.failed.append(step)
            self.given_up.add(step)
            if not isinstance(exc, EvalError):  # not a message written for the user: keep where it came from
                traceback.print_exc()
            kept = (f"; its pin {path.relative_to(self.run_dir)} stays, so a restarted watcher tries it again"
                    if path.parent == self.pins else "")
            line = f"{type(exc).__name__ + ': ' if not isinstance(exc, EvalError) else ''}" \
                   f"{(str(exc).strip().splitlines() or [''])[0]}"
            say(f"error: step {step}: {line}{kept}", err=True)
            last, steps = self.same_error
            key = f"{type(exc).__name__}: {exc}".replace(str(path), "<ckpt>").replace(path.name, "<ckpt>")
            self.same_error = (key, steps + [step] if key == last else [step])
            return
        self.same_error = ("", [])
        append_eval(self.run_dir, step, metrics, source=SOURCE_WATCH,
                    checkpoint=f"{rundir.CHECKPOINTS}/{rundir.ckpt_name(step)}")
        best = self.keep_best(step, path)
        self.evaluated.append(step)
        if path.parent == self.pins:
            path.unlink(missing_ok=True)
        shown = [m for m in (run["cfg"].eval.best_metric, *registry.HEADLINE) if metrics.get(m) is not None]
        text = " | ".join(f"{m.split('/')[-1]} {registry.format_value(m, metrics[m])}" for m in dict.fromkeys(shown))
        say(f"step {step}: {text} ({time.perf_counter() - t0:.1f} s)" + (" | new best" if best else ""))

    def training_evals(self) -> list:
        return [r for r in rundir.read_jsonl(self.run_dir / rundir.EVALS, warn=False).rows
                if r.get("source") != rundir.SOURCE_BENCH_EVAL]

    def keep_best(self, step: int, path: Path) -> Optional[dict]:
        from bench.eval.safeload import load_weights

        return self.keeper.keep_if_best(step, self.training_evals(), self.cfg.eval,
                                        lambda best: {**load_weights(path), "best": best})

    def reconcile_best(self) -> None:
        """At start: a watcher killed between its record and best.pt leaves best.pt behind the records; the best
        step's checkpoint (or pin) then becomes best.pt, through keep_if_best."""
        from bench.eval.safeload import load_weights

        evals = self.training_evals()
        if not any(r.get("source") == SOURCE_WATCH for r in evals):
            return
        best = rundir.best_eval(None, evals, self.cfg.eval.best_metric, self.extractor)
        if best is None:
            return
        kept = self.ckpt_dir / rundir.BEST_CKPT
        try:
            if kept.exists() and int(load_weights(kept).get("step", -1)) == best["step"]:
                return
        except Exception:  # noqa: BLE001 - unreadable: replaced below
            pass
        for src in (self.pins / rundir.ckpt_name(best["step"]), self.ckpt_dir / rundir.ckpt_name(best["step"])):
            if src.exists():
                self.keep_best(best["step"], src)
                say(f"note: {rundir.CHECKPOINTS}/{rundir.BEST_CKPT} did not hold the best evaluation (step "
                    f"{best['step']}); rewritten from its checkpoint", err=True)
                return

    # -- the loop
    def run(self) -> int:
        s = self.s
        say(f"{self.run_dir} | evaluating {self.rule} | {self.extractor} features, {self.cfg.eval.num_samples} "
            f"samples | polling every {s.poll_s:g} s" + (" | once" if s.once else ""))
        self.reconcile_best()
        idle_since, stopped = time.monotonic(), None
        while True:
            ended = not training_running(self.run_dir)  # read before listing: the final checkpoint comes first
            todo = self.pending(final_step(self.run_dir) if ended else None)
            if todo:
                self.evaluate(*todo[0], left=len(todo) - 1)
                idle_since = time.monotonic()
                error, steps = self.same_error
                if len(steps) >= SAME_ERROR_STOP:
                    say(f"error: the same error on {len(steps)} checkpoints in a row (steps {steps}): "
                        f"{error.splitlines()[0]}; stopping: mend it and run `bench eval watch run={self.run_dir}` "
                        "again: it tries the failed steps again", err=True)
                    stopped = f"stopped after the same error on {len(steps)} checkpoints in a row"
                    break
                continue
            if ended or s.once:
                break
            if s.timeout_s and time.monotonic() - idle_since > s.timeout_s:
                say(f"nothing to evaluate for {s.timeout_s:g} s (timeout) while training runs; stopping", err=True)
                break
            self.nap(s.poll_s)
        self.finish(ended, stopped)
        return 3 if self.failed else 0

    def nap(self, seconds: float) -> None:
        """Wait up to `seconds` between looks, waking within a second when training ends or a new checkpoint
        appears: a run's last evaluation then follows its end at once, not a poll later."""
        def newest():
            ckpts = rundir.list_checkpoints(self.ckpt_dir)
            return ckpts[-1][0] if ckpts else None

        before, end = newest(), time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            time.sleep(min(1.0, left))
            if not training_running(self.run_dir) or newest() != before:
                return

    def finish(self, ended: bool, stopped: Optional[str] = None) -> None:
        if self.pins.is_dir() and not any(self.pins.iterdir()):
            self.pins.rmdir()
        summary = rundir.read_json(self.run_dir / rundir.SUMMARY)
        best = rundir.best_eval(None, self.training_evals(), self.cfg.eval.best_metric, self.extractor)
        if ended and summary is not None and best is not None:
            self.update_summary(best)
        why = stopped or (f"training ended ({summary.get('status')} at step {summary.get('steps')})"
                          if ended and summary else
                          "training is not running and wrote no summary.json" if ended else "stopping")
        best_text = (f"; best {best['metric']} {registry.format_value(best['metric'], best['value'])} at step "
                     f"{best['step']}" if best else "")
        say(f"{why}; evaluated {len(self.evaluated)} checkpoint(s) {self.evaluated}, skipped {self.skipped}"
            + (f", failed {self.failed}" if self.failed else "") + best_text)

    def update_summary(self, best: dict) -> None:
        """summary.json's `best` (what rundir.best_eval reads first) from the records, when the training has
        ended: under the run lock, so a training that starts again meanwhile keeps its own."""
        try:
            lock = rundir.RunLock(self.run_dir).acquire()
        except rundir.RunLocked:
            return
        try:
            summary = rundir.read_json(self.run_dir / rundir.SUMMARY)
            new = {k: best[k] for k in ("metric", "value", "step", "extractor")}
            if summary is not None and summary.get("best") != new:
                rundir.write_json(self.run_dir / rundir.SUMMARY, {**summary, "best": new})
        finally:
            lock.release()


def watch(run_dir, overrides, settings: WatchSettings, keeper: BestKeeper, device=None) -> int:
    """`bench eval watch`: take the run's watch lock (refused, or waited for with settings.wait_lock), then
    run the Watcher. Returns the exit code: 0, or 3 when an evaluation failed."""
    lock = rundir.RunLock(run_dir)
    lock.path = Path(run_dir) / WATCH_LOCK
    said = False
    while True:
        try:
            lock.acquire()
            break
        except rundir.RunLocked:
            holder = lock.holder() or {}
            who = f"pid {holder.get('pid')} on {holder.get('host')}, started {holder.get('started')}"
            if not settings.wait_lock:
                raise rundir.RunLocked(f"run={run_dir} already has an evaluation watcher ({who}); one per run: "
                                       f"stop it first, or wait for it") from None
            if not said:
                say(f"waiting for the run's other watcher ({who}) to finish")
                said = True
            time.sleep(min(settings.poll_s, 5.0))
    try:
        return Watcher(run_dir, overrides, settings, keeper, device).run()
    finally:
        lock.release()
