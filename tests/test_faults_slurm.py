"""Faults on the real local Slurm cluster (slurm/local-cluster.sh): a job cancelled while it trains, a
job whose requeues ran out. The submitter must always return, the other jobs must finish, and
sweep.json must say what happened to each job. No mocks: real Slurm jobs, real signals.

Slow (each test trains real, tiny jobs): `pytest -m faults`.
"""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY, submitted_jobs, wait_until_gone

BENCH = [sys.executable, "-m", "bench.cli"]
TIMEOUT = 600
COMMON = [*TINY, "train.tick_every=2", "train.sample_every=0", "train.precision=fp32", "train.batch_size=4",
          "hydra/launcher=submitit_slurm", "cluster=local"]

pytestmark = [pytest.mark.faults, pytest.mark.slurm]


class Submitter:
    """`bench train -m ...` running in the background, its output collected in a file."""

    def __init__(self, args, cwd: Path):
        self.log = cwd / "submitter.log"
        self.sweep = cwd / "sweep"
        self._out = self.log.open("w")
        self.proc = subprocess.Popen(BENCH + ["train", "-m", *args, f"hydra.sweep.dir={self.sweep}"], cwd=cwd,
                                     stdout=self._out, stderr=subprocess.STDOUT, text=True)

    def output(self) -> str:
        return self.log.read_text()

    def index(self) -> list[dict]:
        return [json.loads(p.read_text()) for p in sorted((self.sweep / "index").glob("*.json"))]

    def wait_for(self, predicate, what: str, timeout: float = TIMEOUT):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = predicate()
            if value:
                return value
            assert self.proc.poll() is None, f"the submitter exited while waiting for {what}:\n{self.output()}"
            time.sleep(0.5)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{self.output()[-3000:]}")

    def finish(self, timeout: float = TIMEOUT) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the submitter did not return within {timeout}s\n{self.output()[-3000:]}")

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=60)
        self._out.close()


@pytest.fixture
def submitter(slurm_cluster, tmp_path):
    started = []

    def start(args):
        s = Submitter(args, tmp_path)
        started.append(s)
        return s
    yield start
    for s in started:
        s.close()  # the jobs it left are cancelled by conftest's _cancel_leftover_slurm_jobs


def _job(rows: list[dict], override: str) -> dict:
    (row,) = [r for r in rows if override in r["overrides"]]
    return row


def _training(row_dir, lines: int = 2) -> bool:
    m = Path(row_dir) / "metrics.jsonl" if row_dir else None
    return bool(m and m.exists() and len(m.read_text().splitlines()) >= lines)


def test_cancelled_job_is_recorded_and_the_others_complete(submitter, tiny_shards):
    s = submitter(["train.steps=4,6,2000", "train.ckpt_every=0", f"data.shards={tiny_shards}", *COMMON])
    long = s.wait_for(lambda: next((r for r in s.index() if "train.steps=2000" in r["overrides"]
                                    and _training(r.get("run_dir"))), None), "the long job to train")
    job_id = long["slurm_job_id"]
    s.wait_for(lambda: f"job {job_id} (train.steps=2000): PENDING -> RUNNING" in s.output(),
               "the submitter to see the long job running")  # its poll must see RUNNING before the cancel
    subprocess.run(["scancel", job_id], check=True, capture_output=True, timeout=60)
    rc = s.finish()
    out = s.output()
    assert rc == 1, out[-3000:]  # not every job completed
    rows = json.loads((s.sweep / "sweep.json").read_text())["jobs"]
    assert len(rows) == 3, rows
    cancelled = _job(rows, "train.steps=2000")
    assert cancelled["state"] == "cancelled" and cancelled["slurm_job_id"] == job_id, cancelled
    assert _job(rows, "train.steps=4")["state"] == "completed" and _job(rows, "train.steps=6")["state"] == "completed"
    assert json.loads((Path(cancelled["run_dir"]) / "summary.json").read_text())["status"] == "interrupted"
    # the terminal: one progress line per state change, the sacct warning at most once
    assert f"job {job_id} (train.steps=2000): RUNNING -> CANCELLED" in out, out[-3000:]
    assert out.count("-> COMPLETED") == 2, out[-3000:]
    assert out.count("sacct") == 1 and "accounting storage is disabled" in out, out[-3000:]
    assert not wait_until_gone(submitted_jobs(s.sweep))  # no job left behind in Slurm


def test_requeues_ran_out_is_recorded_and_the_submitter_returns(submitter, tiny_shards):
    """SIGUSR2 (Slurm's warning before the time limit) with cluster.max_requeue=0: the job checkpoints,
    is not requeued, and says why."""
    s = submitter(["train.steps=2000", "train.ckpt_every=0", "cluster.max_requeue=0", f"data.shards={tiny_shards}",
                   *COMMON])
    row = s.wait_for(lambda: next((r for r in s.index() if _training(r.get("run_dir"))), None), "the job to train")
    subprocess.run(["scancel", "--signal=USR2", row["slurm_job_id"]], check=True, capture_output=True,
                   timeout=60)
    rc = s.finish()
    out = s.output()
    assert rc == 1, out[-3000:]
    (job,) = json.loads((s.sweep / "sweep.json").read_text())["jobs"]
    assert job["state"] == "interrupted" and "requeues ran out" in job["error"], job
    assert "-> INTERRUPTED" in out, out[-3000:]
    assert not wait_until_gone(submitted_jobs(s.sweep))


def test_job_cancelled_while_pending_is_recorded(submitter, tiny_shards):
    """A job cancelled before it starts never reports; the submitter finds it gone from the queue,
    records it, and returns once the other job completed."""
    s = submitter(["train.steps=4,6", "cluster.array_parallelism=1", f"data.shards={tiny_shards}", *COMMON])
    pending = s.wait_for(lambda: next((j for j in sorted(submitted_jobs(s.sweep)) if j.endswith("_1")), None),
                         "the sweep's second job to be submitted")
    subprocess.run(["scancel", pending], check=True, capture_output=True, timeout=60)
    rc = s.finish()
    out = s.output()
    assert rc == 1, out[-3000:]
    rows = json.loads((s.sweep / "sweep.json").read_text())["jobs"]
    assert _job(rows, "train.steps=4")["state"] == "completed", rows
    job = _job(rows, "train.steps=6")
    assert job["state"] == "cancelled" and "ended without reporting" in job["error"], job
    assert f"job {pending} (train.steps=6): PENDING -> CANCELLED" in out, out[-3000:]
    assert not wait_until_gone(submitted_jobs(s.sweep))
