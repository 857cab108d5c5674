"""kill -9 of a training run, at random points and in the middle of a checkpoint write, then resumes
(docs/architecture.md, "Faults"). Real processes, real SIGKILL to the whole process group (the decode
worker included); what survives on disk is checked after each kill."""
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY

pytestmark = pytest.mark.faults

TICK, CKPT = 2, 4  # train.tick_every, train.ckpt_every
ARGS = [*TINY, f"train.tick_every={TICK}", f"train.ckpt_every={CKPT}", "train.ckpt_keep=2", "train.sample_every=0",
        "train.precision=fp32", "train.batch_size=4", "eval.every=0", "eval.final=false", "telemetry.mfu=false",
        "data.num_workers=1"]
RESUMED = re.compile(r"resuming from (\S+) at step (\d+)")


def _start(run_dir: Path, shards: Path, steps: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "train", *ARGS, f"data.shards={shards}", f"run.dir={run_dir}",
         f"train.steps={steps}", *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _steps(run_dir: Path) -> list[int]:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.endswith("}")]


def _kill_group(proc: subprocess.Popen) -> str:
    os.killpg(proc.pid, signal.SIGKILL)
    out, _ = proc.communicate(timeout=60)
    return out


def _wait_for_step(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(s >= step for s in _steps(run_dir)):
            return
        assert proc.poll() is None, f"the run ended before step {step}:\n{proc.communicate()[0][-3000:]}"
        time.sleep(0.05)
    pytest.fail(f"no tick at step >= {step} within {timeout}s")


def test_kill_9_at_five_random_points_then_resume(tmp_path, tiny_shards):
    """Each start is killed at a random step past everything written before (so it resumed and trained),
    with a random delay: a kill lands anywhere in the steps that follow, a checkpoint save included. The
    runs aim at a far train.steps so no start finishes early on a fast machine; the last start finishes
    the run at a nearer one (a compatible change)."""
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    run_dir = tmp_path / "run"
    last, lasts, resumed_from = 0, [], []
    for kill in range(5):
        proc = _start(run_dir, tiny_shards, 10_000)
        _wait_for_step(proc, run_dir, last + rng.randint(1, 5))
        time.sleep(rng.uniform(0, 0.3))
        out = _kill_group(proc)
        if kill:  # a start before any checkpoint starts afresh (step 0)
            m = RESUMED.search(out)
            resumed_from.append(int(m.group(2)) if m else 0)
        assert len(_steps(run_dir)) == len(set(_steps(run_dir))), (seed, _steps(run_dir))
        last = max(_steps(run_dir))
        lasts.append(last)
    steps = last + 3 * CKPT
    proc = _start(run_dir, tiny_shards, steps)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, (seed, out[-3000:])
    m = RESUMED.search(out)
    resumed_from.append(int(m.group(2)) if m else 0)
    # each resume starts from a checkpoint at most one interval older than the last record before the kill
    # (a kill during the save at step L leaves the one of L - CKPT)
    for last, resumed in zip(lasts, resumed_from):
        assert last - CKPT <= resumed <= last and resumed % CKPT == 0, (seed, lasts, resumed_from)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == steps, (seed, summary)
    # exactly one metrics line per tick, in order, no duplicates and no gaps
    assert _steps(run_dir) == list(range(TICK, steps + 1, TICK)), (seed, _steps(run_dir))
    assert not list((run_dir / "checkpoints").glob(".*.tmp-*"))


def test_kill_9_during_a_checkpoint_write(tmp_path, tiny_shards):
    """GAN_BENCH_FAULT=0:8:stall holds the save of step 8 after its bytes are in the temp file; the run is
    killed there. The checkpoint of step 4 stays the newest complete one; the resumed run removes the
    cut-off file, resumes from step 4 and finishes."""
    run_dir, steps = tmp_path / "run", 12
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench.cli", "train", *ARGS, f"data.shards={tiny_shards}", f"run.dir={run_dir}",
         f"train.steps={steps}"], env=dict(os.environ, GAN_BENCH_FAULT="0:8:stall"),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.monotonic() + 600
    temps = []
    while not temps:
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        temps = list((run_dir / "checkpoints").glob(".ckpt-0000008.pt.tmp-*")) if (run_dir / "checkpoints").exists() else []
        time.sleep(0.05)
    sizes = [-1]
    while not (sizes[-1] > 0 and sizes[-1] == sizes[0]):  # the bytes are in and no more come: the stall
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
        sizes = [temps[0].stat().st_size]
        time.sleep(0.3)
        sizes.append(temps[0].stat().st_size)
    _kill_group(proc)
    cut = temps[0]
    assert cut.exists() and cut.stat().st_size > 0  # a large, half-published file is left behind
    assert sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("ckpt-*.pt")) == [4]
    proc = _start(run_dir, tiny_shards, steps)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert f"removed {cut.name}" in out and RESUMED.search(out).group(2) == "4", out[-2000:]
    assert not cut.exists() and not list((run_dir / "checkpoints").glob(".*.tmp-*"))
    assert _steps(run_dir) == list(range(TICK, steps + 1, TICK))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
