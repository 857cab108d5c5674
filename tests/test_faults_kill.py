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
    seed = random.randrange(10**6)
    rng = random.Random(seed)
    steps, run_dir = 40, tmp_path / "run"
    last, lasts, resumed_from = 0, [], []
    for kill in range(5):
        proc = _start(run_dir, tiny_shards, steps)
        # a tick past everything written before: this start has resumed and trained
        _wait_for_step(proc, run_dir, last + rng.randint(1, 5))
        time.sleep(rng.uniform(0, 0.3))  # anywhere in the steps that follow, a checkpoint save included
        out = _kill_group(proc)
        if kill:  # a start before any checkpoint starts afresh (step 0)
            m = RESUMED.search(out)
            resumed_from.append(int(m.group(2)) if m else 0)
        assert len(_steps(run_dir)) == len(set(_steps(run_dir))), (seed, _steps(run_dir))
        last = max(_steps(run_dir))
        assert last < steps, (seed, "the run finished before it was killed; lower the delays")
        lasts.append(last)
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
    """Wider nets make checkpoints large enough to catch the write: the run is killed the moment a
    temp file appears in checkpoints/. The previous checkpoint stays the newest complete one, the
    resumed run removes the cut-off file and finishes."""
    run_dir, steps = tmp_path / "run", 12
    wide = ["model.ch=64", "model.d_ch=64"]
    caught = None
    for attempt in range(5):
        proc = _start(run_dir, tiny_shards, steps, *wide)
        ckpt_dir = run_dir / "checkpoints"
        while proc.poll() is None:
            temps = list(ckpt_dir.glob(".ckpt-*.tmp-*")) if ckpt_dir.exists() else []
            if temps:
                os.killpg(proc.pid, signal.SIGKILL)
                caught = temps[0]
                break
            time.sleep(0.001)
        proc.communicate(timeout=60)
        if caught is not None and caught.exists():
            break
        caught = None
    if caught is None:
        pytest.skip("no checkpoint write was caught in 5 tries on this machine (the disk writes too fast)")
    cut_step = int(re.search(r"ckpt-(\d+)", caught.name).group(1))
    complete = sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("ckpt-*.pt"))
    assert cut_step not in complete and all(s < cut_step for s in complete)
    proc = _start(run_dir, tiny_shards, steps, *wide)
    out, _ = proc.communicate(timeout=900)
    assert proc.returncode == 0, out[-3000:]
    assert f"removed {caught.name}" in out
    m = RESUMED.search(out)
    expected = max(complete) if complete else None
    assert (int(m.group(2)) if m else None) == expected, out[-2000:]
    assert not caught.exists() and not list((run_dir / "checkpoints").glob(".*.tmp-*"))
    assert _steps(run_dir) == list(range(TICK, steps + 1, TICK))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
