"""`bench eval watch` and `eval.async=true` (bench/eval/watch.py; its job, bench/jobs.py): evaluation beside
training. Real processes (the CLI, submitit's local executor), a tiny run; about two minutes on 2 CPUs."""
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import rundir
from bench.eval.watch import PINS, SOURCE_WATCH, WATCH_LOCK
from bench.faults import FAULT_ENV
from bench.jobs import JOBS
from conftest import ROOT, TINY, classified_shards, wait_until_gone

EVAL = ["eval.num_samples=40", "eval.batch_size=20"]
TRAIN = [*TINY, "train.steps=6", "train.batch_size=4", "train.ckpt_every=2", "train.ckpt_keep=10",
         "train.sample_every=0", "telemetry.mfu=false", "telemetry.sigma_every=0", *EVAL]
# one math thread: on a 2-core machine shared with other work, busy-waiting threads slow tiny runs a lot
ENV = {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def bench(*args, timeout=600, check=True, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "bench.cli", *map(str, args)], cwd=ROOT,
                          env={**os.environ, **ENV, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return proc


def start_watcher(run: Path, *args, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bench.cli", "eval", "watch", f"run={run}", *args], cwd=ROOT,
                            env={**os.environ, **ENV, **(env or {})}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def evals(run: Path) -> list:
    return rundir.read_jsonl(run / rundir.EVALS).rows


def best_pt(run: Path) -> dict:
    return torch.load(run / rundir.CHECKPOINTS / rundir.BEST_CKPT, weights_only=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Shards with a quickly trained domain classifier, and a 6-step run that evaluated itself every 2 steps
    in training (the reference the watcher's records are compared with)."""
    root = tmp_path_factory.mktemp("watch")
    shards = classified_shards(root, num_samples=240, per_shard=60)
    run = root / "sync"
    bench("train", f"data.shards={shards}", f"run.dir={run}", *TRAIN, "eval.every=2")
    assert [r["step"] for r in evals(run)] == [2, 4, 6]
    return run, shards


def unevaluated_copy(run: Path, dest: Path) -> Path:
    """The run as if it had trained with eval.every=2 but evaluated nothing: no evals.jsonl, no best.pt, no
    best in summary.json."""
    shutil.copytree(run, dest)
    (dest / rundir.EVALS).unlink()
    (dest / rundir.CHECKPOINTS / rundir.BEST_CKPT).unlink()
    summary = rundir.read_json(dest / rundir.SUMMARY)
    rundir.write_json(dest / rundir.SUMMARY, {**summary, "best": {}})
    return dest


def assert_evaluated_once_with_best(run: Path, steps=(2, 4, 6)) -> list:
    rows = evals(run)
    assert sorted(r["step"] for r in rows) == list(steps)  # each step once
    assert all(r["source"] == SOURCE_WATCH and r["checkpoint"] == f"checkpoints/{rundir.ckpt_name(r['step'])}"
               for r in rows)
    best = min(rows, key=lambda r: r["eval/FID"])  # eval/FID is the default eval.best_metric: lower is better
    kept = best_pt(run)
    assert kept["step"] == best["step"] and kept["best"]["value"] == best["eval/FID"]
    assert kept["best"]["metric"] == "eval/FID" and kept["best"]["extractor"] == "domain"
    own = torch.load(run / rundir.CHECKPOINTS / rundir.ckpt_name(best["step"]), weights_only=False)
    assert all(torch.equal(kept["G_ema"][k], v) for k, v in own["G_ema"].items())  # the best step's own weights
    summary_best = rundir.read_json(run / rundir.SUMMARY)["best"]
    assert summary_best == {"metric": "eval/FID", "value": best["eval/FID"], "step": best["step"],
                            "extractor": "domain"}
    assert rundir.best_eval(rundir.read_json(run / rundir.SUMMARY), rows, "eval/FID", "domain")["step"] == best["step"]
    assert not (run / rundir.CHECKPOINTS / PINS).exists()  # pins go once their step is evaluated
    return rows


def test_watcher_evaluates_each_checkpoint_once_like_training(trained, tmp_path):
    """The watcher's records are training's own (same settings, same checkpoints: the same numbers), best.pt
    and summary.json's best follow the one best rule, and a second pass evaluates nothing."""
    ref, _ = trained
    run = unevaluated_copy(ref, tmp_path / "run")
    out = bench("eval", "watch", f"run={run}", "poll=0.2").stdout
    rows = assert_evaluated_once_with_best(run)
    for mine, theirs in zip(sorted(rows, key=lambda r: r["step"]), evals(ref)):
        assert "source" not in theirs and mine["step"] == theirs["step"]
        for key in ("eval/FID", "eval/KID", "eval/IS", "eval/precision", "eval/recall", "eval/coverage"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-6), key
    assert "evaluated 3 checkpoint(s) [2, 4, 6]" in out and "training ended (completed at step 6)" in out

    before = (run / rundir.EVALS).read_text()
    again = bench("eval", "watch", f"run={run}", "poll=0.2").stdout
    assert "evaluated 0 checkpoint(s)" in again and (run / rundir.EVALS).read_text() == before

    # killed between its record and best.pt: the next watcher rewrites best.pt from the best step's checkpoint
    (run / rundir.CHECKPOINTS / rundir.BEST_CKPT).unlink()
    proc = bench("eval", "watch", f"run={run}", "once=true")
    assert "rewritten from its checkpoint" in proc.stderr
    assert_evaluated_once_with_best(run)


def test_a_killed_watcher_restarts_without_evaluating_a_step_twice(trained, tmp_path):
    ref, _ = trained
    run = unevaluated_copy(ref, tmp_path / "run")
    # the fault hook stalls the watcher inside step 4's evaluation, so the kill lands there on any machine
    proc = start_watcher(run, "poll=0.2", env={FAULT_ENV: "0:4:watchstall"})
    deadline = time.monotonic() + 300
    while not evals(run) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(1.0)  # into step 4's evaluation, where it stays
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    first = [r["step"] for r in evals(run)]
    assert first == [2], first  # killed mid-way: one step done, the others not
    assert (run / rundir.CHECKPOINTS / PINS).is_dir()  # its pins outlive it

    out = bench("eval", "watch", f"run={run}", "poll=0.2").stdout
    assert "evaluated 2 checkpoint(s) [4, 6]" in out
    assert_evaluated_once_with_best(run)


def test_a_second_watcher_is_refused_and_the_first_follows_training(trained, tmp_path):
    """While training holds the run lock the watcher keeps following; a second watcher exits 2 with one line;
    when the lock is free (training ended), the first evaluates what is left and stops."""
    ref, _ = trained
    run = unevaluated_copy(ref, tmp_path / "run")
    training = rundir.RunLock(run).acquire()  # the run's training, as far as the watcher can tell
    first = start_watcher(run, "poll=0.2")
    try:
        deadline = time.monotonic() + 300
        while len(evals(run)) < 3 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert [r["step"] for r in evals(run)] == [2, 4, 6]
        time.sleep(1.0)
        assert first.poll() is None  # training still "runs": it keeps watching

        second = bench("eval", "watch", f"run={run}", check=False)
        assert second.returncode == 2
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1 and "already has an evaluation watcher" in lines[0] and f"pid {first.pid}" in lines[0]
        assert (run / WATCH_LOCK).exists()
    finally:
        training.release()
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-3000:]
    assert "training ended (completed at step 6)" in out
    assert_evaluated_once_with_best(run)


def test_bench_train_with_eval_async_evaluates_in_its_own_job(trained, tmp_path):
    """eval.async=true: training never evaluates; the submitit job beside it (local executor) evaluates every
    checkpoint of an eval.every step, keeps best.pt, and is recorded in eval-watch.json."""
    _, shards = trained
    run = tmp_path / "async"
    # two training threads asked for: on a 2-core machine training keeps one and the evaluation job gets the other
    proc = bench("train", f"data.shards={shards}", f"run.dir={run}", *TRAIN, "eval.every=2", "eval.async=true",
                 env={"OMP_NUM_THREADS": "2"})
    assert "evaluation runs beside training in local job" in proc.stdout
    assert rundir.read_json(run / rundir.SUMMARY)["status"] == rundir.COMPLETED
    assert_evaluated_once_with_best(run)
    job = rundir.read_json(run / JOBS)["jobs"][-1]
    assert job["executor"] == "local" and job["job_id"].isdigit()
    log = Path(job["stdout"]).read_text()
    assert "eval watch: training ended (completed at step 6); evaluated 3 checkpoint(s) [2, 4, 6]" in log
    assert not any("%" in p.name for p in (run / "eval-watch").rglob("*"))  # no literal %j folder
    # the two share the cores by their threads: a quarter (at least one) for the evaluation, training at most
    # the rest; the job says so in its log, training in run.json (on a GPU machine the evaluation uses a GPU)
    if torch.cuda.is_available():
        return
    cores = len(os.sched_getaffinity(0))
    evaluation = max(1, cores // 4)
    training = min(2, max(1, cores - evaluation))
    assert job["threads"] == {"training": training, "evaluation": evaluation}, job
    assert f"evaluation job: {evaluation} torch thread(s)" in log
    assert rundir.read_json(run / rundir.RUN_JSON)["torch_threads"] == training
    assert f"{evaluation} thread(s) for it, {training} per training rank" in proc.stdout


@pytest.mark.slurm
def test_eval_async_inside_a_slurm_job_submits_the_watcher_to_slurm(slurm_cluster, trained, tmp_path):
    """On the real local cluster: the training job submits the watcher as a Slurm job of its own, which evaluates
    every due checkpoint and writes best.pt and summary.json's best once training has ended."""
    _, shards = trained
    run, sweep = tmp_path / "run", tmp_path / "sweep"
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "train", "hydra/launcher=submitit_slurm", "cluster=local",
                           f"data.shards={shards}", f"run.dir={run}", f"hydra.sweep.dir={sweep}", *TRAIN, "eval.every=2",
                           "eval.async=true"], cwd=tmp_path, env={**os.environ, **ENV}, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    job = rundir.read_json(run / JOBS)["jobs"][-1]
    assert job["executor"] == "slurm" and job["job_id"].isdigit()
    assert not wait_until_gone([job["job_id"]], timeout=600)  # the watcher follows training, then leaves
    assert_evaluated_once_with_best(run)
    assert "evaluated 3 checkpoint(s) [2, 4, 6]" in Path(job["stdout"]).read_text()


@pytest.mark.parametrize("args, needle", [
    ([], "needs run=DIR"),
    (["run=/nonexistent/run"], "not a gan-bench run directory"),
    (["run=/tmp", "poll=0"], "poll='0' is not valid; use a number of seconds > 0"),
    (["run=/tmp", "timeout=soon"], "timeout='soon' is not valid"),
    (["run=/tmp", "once=maybe"], "once='maybe' is not valid; use true or false"),
    (["run=/tmp", "which=best"], "'which=best' is not a valid argument; valid keys: run, poll, once, timeout"),
    (["run=/tmp", "eval.nope=1"], "not a gan-bench run directory"),
])
def test_bad_watch_arguments_are_one_line_and_exit_2(args, needle, capsys):
    from bench.cli import main

    assert main(["eval", "watch", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err


def test_a_bad_eval_override_is_refused_before_anything_is_read(trained, capsys):
    from bench.cli import main

    run, _ = trained
    before = (run / rundir.EVALS).read_text()
    assert main(["eval", "watch", f"run={run}", "eval.extractor=clip"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "eval.extractor" in err[0] and "clip" in err[0], err
    assert (run / rundir.EVALS).read_text() == before and not (run / WATCH_LOCK).exists()


def test_pins_keep_seen_checkpoints_through_rotation_and_a_removed_one_is_skipped(trained, tmp_path, capsys):
    """A due checkpoint the watcher has seen is pinned: training's rotation (train.ckpt_keep) does not take it
    before its turn. One removed before the watcher could read it is skipped with one line."""
    from bench.eval.watch import Watcher, WatchSettings
    from bench.train.state import Checkpoints

    ref, _ = trained
    run = unevaluated_copy(ref, tmp_path / "run")
    ckpts = run / rundir.CHECKPOINTS
    watcher = Watcher(run, [], WatchSettings(poll_s=0.2), keeper=Checkpoints(run, keep=1, is_main=True))
    assert [s for s, _ in watcher.pending(None)] == [2, 4, 6]
    # training goes on: step 8 is saved and rotation keeps only it (keep=1), as Checkpoints.save does
    last = torch.load(ckpts / rundir.ckpt_name(6), weights_only=False)
    Checkpoints(run, keep=1, is_main=True).save(8, lambda: {**last, "step": 8})
    assert [s for s, _ in rundir.list_checkpoints(ckpts)] == [8]
    (ckpts / PINS / rundir.ckpt_name(2)).unlink()  # gone before its turn (as if never pinned)
    capsys.readouterr()
    watcher.evaluate(2, ckpts / PINS / rundir.ckpt_name(2), left=2)
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("eval watch:")]
    assert err == ["eval watch: step 2: its checkpoint was removed (train.ckpt_keep) before it was evaluated; skipped"]
    assert watcher.run() == 0  # the lock is free: training has ended; 4 and 6 from their pins, then 8
    assert [r["step"] for r in evals(run)] == [4, 6, 8] and watcher.skipped == [2]
    assert not (ckpts / PINS).exists()


def test_an_unexpected_error_on_one_checkpoint_is_reported_and_the_others_are_evaluated(trained, tmp_path):
    """Not only the evaluation's own errors: a checkpoint whose generator does not fit the run's config (here a
    weight of the wrong shape) fails with its traceback and type, and the watcher goes on to the next one."""
    ref, _ = trained
    run = unevaluated_copy(ref, tmp_path / "run")
    path = run / rundir.CHECKPOINTS / rundir.ckpt_name(4)
    state = torch.load(path, weights_only=False)
    name = next(k for k, v in state["G_ema"].items() if v.dim() == 4)
    state["G_ema"][name] = torch.zeros(1, 1, 1, 1)
    torch.save(state, path)
    proc = bench("eval", "watch", f"run={run}", "poll=0.2", check=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "error: step 4: RuntimeError:" in proc.stderr and "Traceback" in proc.stderr, proc.stderr[-3000:]
    assert sorted(r["step"] for r in evals(run)) == [2, 6]
    assert "evaluated 2 checkpoint(s) [2, 6]" in proc.stdout and "failed [4]" in proc.stdout


@pytest.mark.parametrize("same", [True, False], ids=["same-error", "different-errors"])
def test_the_same_error_on_three_checkpoints_in_a_row_stops_the_watcher(trained, tmp_path, same):
    """While training runs the watcher waits for more checkpoints. When three in a row fail with the same error
    (here each carries the same wrong-shaped weight, as a wrong override would make every one fail) it stops with
    one line naming the steps and the error, and exits 3. Errors that differ (per-checkpoint faults) do not stop
    it: it goes on watching until its idle timeout."""
    ref, _ = trained
    run = unevaluated_copy(ref, tmp_path / "run")
    for i, step in enumerate((2, 4, 6)):
        path = run / rundir.CHECKPOINTS / rundir.ckpt_name(step)
        state = torch.load(path, weights_only=False)
        name = next(k for k, v in state["G_ema"].items() if v.dim() == 4)
        state["G_ema"][name] = torch.zeros(1, 1, 1, 1 if same else i + 1)
        torch.save(state, path)
    training = rundir.RunLock(run).acquire()  # training still "runs": the watcher would keep waiting
    try:
        proc = bench("eval", "watch", f"run={run}", "poll=0.2", "timeout=5", check=False, timeout=300)
    finally:
        training.release()
    assert proc.returncode == 3, proc.stderr[-3000:]
    stops = [line for line in proc.stderr.splitlines() if "checkpoints in a row" in line]
    assert not evals(run) and "failed [2, 4, 6]" in proc.stdout
    if same:
        assert len(stops) == 1 and "the same error on 3 checkpoints in a row (steps [2, 4, 6]): RuntimeError:" \
            in stops[0], proc.stderr[-3000:]
        assert "stopped after the same error on 3 checkpoints in a row" in proc.stdout
        assert "(timeout)" not in proc.stderr
    else:
        assert not stops and "(timeout)" in proc.stderr, proc.stderr[-3000:]
