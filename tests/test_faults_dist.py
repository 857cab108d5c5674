"""One failing rank must not hang the others (docs/architecture.md, "Faults"): two real `bench train`
processes joined by torch.distributed (gloo), and a two-rank job on the real local Slurm cluster. A
rank is made to fail through GAN_BENCH_FAULT (bench/faults.py), the fault tests' only hook.
"""
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, submitted_jobs, wait_until_gone

pytestmark = pytest.mark.faults

COMMON = [*TINY, "train.tick_every=2", "train.sample_every=0", "train.precision=fp32", "train.batch_size=4",
          "eval.every=0", "eval.final=false"]
TIMEOUT_S = 60  # dist.timeout_s of these runs


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(run_dir: Path, shards: Path, fault: str, *extra: str) -> list[subprocess.Popen]:
    """Two ranks of one run, started as a launcher (torchrun, srun) would: RANK, WORLD_SIZE, MASTER_*."""
    port, procs = _free_port(), []
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", OMP_NUM_THREADS="1", GAN_BENCH_FAULT=fault)
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bench.cli", "train", *COMMON, f"data.shards={shards}", f"run.dir={run_dir}",
             f"dist.timeout_s={TIMEOUT_S}", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


def _finish(procs: list[subprocess.Popen], timeout: float = 600) -> list[tuple[int, str]]:
    out = []
    for p in procs:
        try:
            _, err = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank did not exit")
        out.append((p.returncode, err))
    return out


def _error_time(run_dir: Path, rank: int) -> float:
    return json.loads((run_dir / "errors" / f"rank-{rank}.json").read_text())["time"]


def _end_time(run_dir: Path) -> float:
    from datetime import datetime

    return datetime.fromisoformat(json.loads((run_dir / "run.json").read_text())["end_time"]).timestamp()


def test_a_rank_raising_mid_run_ends_every_rank_with_the_error_in_the_summary(tmp_path, tiny_shards):
    run_dir = tmp_path / "r"
    (rc0, err0), (rc1, err1) = _finish(_two_ranks(run_dir, tiny_shards, "1:5", "train.steps=20"))
    assert rc0 == 3 and rc1 == 3, (err0[-2000:], err1[-2000:])
    assert "injected fault" in err1 and "Traceback" in err1  # the failing rank keeps its traceback
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed"
    assert summary["error"].startswith("rank 1 (") and "injected fault" in summary["error"], summary["error"]
    assert "Traceback" not in err0 and summary["error"] in err0  # rank 0 names the first error in one line
    assert json.loads((run_dir / "run.json").read_text())["status"] == "failed"
    # rank 0 noticed at once (the peer's exit closed the connection), far within dist.timeout_s
    assert _end_time(run_dir) - _error_time(run_dir, 1) < TIMEOUT_S
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]  # the ticks before the failing step, none after


def test_rank_zero_failing_its_checkpoint_stops_every_rank_at_once(tmp_path, tiny_shards):
    run_dir = tmp_path / "r"
    (rc0, err0), (rc1, err1) = _finish(_two_ranks(run_dir, tiny_shards, "0:4:checkpoint", "train.steps=20",
                                                  "train.ckpt_every=2"))
    assert rc0 == 3 and rc1 == 3, (err0[-2000:], err1[-2000:])
    # every rank learns rank 0's error from the agreement after the save, not from a broken connection
    assert "rank 0 failed while saving the checkpoint of step 4" in err1 and "injected fault" in err1, err1[-2000:]
    assert "Traceback" not in err1
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 4
    assert summary["error"].startswith("rank 0: RuntimeError: injected fault"), summary["error"]
    assert [p.name for p in sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))] == ["ckpt-0000002.pt"]


def test_a_hung_rank_fails_its_peer_within_the_timeout(tmp_path, tiny_shards):
    run_dir = tmp_path / "r"
    procs = _two_ranks(run_dir, tiny_shards, "1:3:hang", "train.steps=20", "dist.timeout_s=10")
    try:
        t0 = time.monotonic()
        _, err0 = procs[0].communicate(timeout=600)
        waited = time.monotonic() - t0
    finally:
        procs[1].kill()  # the hung rank is ours: it never returns by itself
        procs[1].communicate()
    assert procs[0].returncode == 3, err0[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    # gloo gave up after dist.timeout_s: a blocking collective says "Timed out waiting 10000ms", a bucket's
    # asynchronous all-reduce (dist.grad_sync=overlap) "Application timeout caused pair closure"
    assert summary["status"] == "failed", summary
    assert "Timed out waiting 10000ms" in summary["error"] or "timeout caused pair closure" in summary["error"]
    assert "no other rank recorded an error" in summary["error"]
    assert waited >= 10


def test_a_locked_run_directory_is_refused_on_every_rank(tmp_path, tiny_shards):
    from bench import rundir

    run_dir = tmp_path / "r"
    run_dir.mkdir()
    holder = rundir.RunLock(run_dir).acquire()
    try:
        (rc0, err0), (rc1, err1) = _finish(_two_ranks(run_dir, tiny_shards, "", "train.steps=4"), timeout=300)
    finally:
        holder.release()
    assert (rc0, rc1) == (2, 2), (err0, err1)
    for err in (err0, err1):
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "in use" in lines[0], err
        assert "Traceback" not in err


def _nonfinite_worker(rank: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    from bench.train.loop import train_step
    from bench.train.phases import Phase
    from bench.train.ranks import Ranks
    from bench.train.telemetry import Stopwatch
    from conftest import one_phase

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ranks = Ranks(2, rank, torch.device("cpu"), Path(out_dir))

    def step(mb, backward):
        loss = net(torch.ones(2, 3)).sum()
        if rank == 0:
            loss = loss + float("inf")  # only rank 0's loss is non-finite; its gradient, and so the mean, are finite
        backward(loss)
        return loss.detach()

    run, state = one_phase(Phase("D", net, opt, None, step, reads_data=False), ranks=ranks, world=2)
    train_step(run, state, None, Stopwatch(torch.device("cpu")))
    torch.save({"skipped": state.guard.total, "weight": net.weight.detach().clone()}, f"{out_dir}/{rank}.pt")
    dist.barrier()
    os._exit(0)  # skip gloo's teardown, which can abort when the peer exits first


def test_the_nonfinite_skip_is_agreed_by_every_rank(tmp_path):
    """One rank's non-finite loss skips the update on both, so their weights stay equal (the loss's count travels
    in the gradient all-reduce: bench/train/gradsync.py, Agreed)."""
    import torch.multiprocessing as mp

    mp.start_processes(_nonfinite_worker, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    a, b = (torch.load(tmp_path / f"{r}.pt") for r in (0, 1))
    assert a["skipped"] == 1 and b["skipped"] == 1
    assert torch.equal(a["weight"], b["weight"])
    torch.manual_seed(0)
    assert torch.equal(a["weight"], torch.nn.Linear(3, 1).weight)  # not stepped


@pytest.mark.slurm
def test_a_rank_raising_in_a_two_rank_slurm_job(slurm_cluster, tmp_path, tiny_shards):
    """The issue's case on the real local cluster: rank 1 of a 2-rank job raises at step 5."""
    run_dir, sweep = tmp_path / "run", tmp_path / "sweep"
    env = dict(os.environ, GAN_BENCH_FAULT="1:5")
    proc = subprocess.run(
        [sys.executable, "-m", "bench.cli", "train", "hydra/launcher=submitit_slurm", "cluster=local",
         "cluster.nodes=2", "cluster.tasks_per_node=1", "train.steps=30", f"run.dir={run_dir}",
         f"data.shards={tiny_shards}", f"dist.timeout_s={TIMEOUT_S}", f"hydra.sweep.dir={sweep}", *COMMON],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and summary["steps"] == 4, summary
    assert summary["error"].startswith("rank 1 (n2)") and "injected fault" in summary["error"], summary["error"]
    job = json.loads((sweep / "sweep.json").read_text())["jobs"][0]
    assert job["state"] == "failed" and "injected fault" in job["error"], job
    assert _end_time(run_dir) - _error_time(run_dir, 1) < TIMEOUT_S
    assert not wait_until_gone(submitted_jobs(sweep))  # both ranks' job is gone from Slurm


def test_rank_zero_work_longer_than_the_timeout_does_not_fail_a_healthy_run(tmp_path, tiny_shards):
    """dist.timeout_s bounds the training collectives; rank 0's own work (here its first evaluation, which
    made 25 s longer by the fault hook) is waited for under dist.rank0_timeout_s. The timeout leaves room for
    the ranks' set-up to drift apart on a busy machine."""
    run_dir = tmp_path / "r"
    (rc0, err0), (rc1, err1) = _finish(_two_ranks(run_dir, tiny_shards, "0:2:slow:25", "train.steps=2", "dist.timeout_s=15",
                                                  "eval.final=true", "eval.num_samples=40", "eval.batch_size=20",
                                                  f"eval.cache_dir={tmp_path / 'cache'}"))
    assert rc0 == 0 and rc1 == 0, (err0[-2000:], err1[-2000:])
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"
    assert [json.loads(line)["step"] for line in (run_dir / "evals.jsonl").read_text().splitlines()] == [2]


_EXIT_SCRIPT = """
import datetime, sys, torch
from bench.train.ranks import Ranks
torch.distributed.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
ranks = Ranks(2, torch.distributed.get_rank(), torch.device("cpu"), sys.argv[1], rank0_timeout_s=60)
ranks.rank0("a rank-0 task", lambda: None)
out = [None, None]
torch.distributed.all_gather_object(out, ranks.rank)
"""


def test_ranks_whose_work_succeeded_exit_with_status_zero(tmp_path):
    """A healthy multi-rank process leaves without an abort: its gloo groups are destroyed at exit (Ranks.leave),
    not by interpreter teardown, which aborted about a third of these pairs ("terminate called without an active
    exception")."""
    failures = []
    for attempt in range(10):
        port, procs = _free_port(), []
        for rank in (0, 1):
            env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                       OMP_NUM_THREADS="1")
            procs.append(subprocess.Popen([sys.executable, "-c", _EXIT_SCRIPT, str(tmp_path)], env=env,
                                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        failures += [(attempt, rc, err[-300:]) for rc, err in _finish(procs, timeout=120) if rc != 0]
    assert not failures, failures


def test_a_failed_command_leaves_its_process_groups_alone_at_exit(tmp_path, monkeypatch):
    """After a command that failed (exit code not 0), the exit hook must not destroy process groups: a failure
    outside the training loop sets no `broken`, and a hung peer's pending collective would be waited for."""
    from bench import cli, errors
    from bench.train.ranks import Ranks

    monkeypatch.setattr(errors, "_FAILED", False)
    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        monkeypatch.setitem(cli.COMMANDS, "inspect", lambda args: 3)  # a command that ends with its own code,
        assert cli.main(["inspect"]) == 3 and not errors.failed_in_process()  # as a diverged run does: not a failure
        assert cli.main(["train", "train.steps=-3"]) == 2  # refused by the validator: a failed command
        Ranks.leave()
        assert torch.distributed.is_initialized()  # left alone
        monkeypatch.setattr(errors, "_FAILED", False)
        Ranks.leave()  # the same hook after a healthy process destroys them
        assert not torch.distributed.is_initialized()
    finally:
        if torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
