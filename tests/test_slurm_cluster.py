"""Our cluster code: the local test cluster (slurm/local-cluster.sh), the translation of a cluster profile
into launcher settings (bench/launch.py, through the sweep driver bench/sweep.py), the per-rank core
count, and our requeue path (launch.requeue_self). No mocks: the jobs are real submitit_local jobs and,
for the tests marked `slurm`, real Slurm jobs on the local cluster.

Start the cluster first (as root):

    slurm/local-cluster.sh install && slurm/local-cluster.sh start

Without a running cluster the `slurm` tests are skipped, unless GAN_BENCH_REQUIRE_SLURM=1 (CI sets it):
then they fail and say why. Training itself on the cluster is tested in tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import launch, sweep
from bench.config import ConfigError, compose
from conftest import NODES, PARTITION, ROOT, SlurmCluster  # noqa: F401  (the slurm_cluster fixture lives there)

JOB_TIMEOUT_S = 300  # generous bound on any one job; they normally take seconds
SCRIPT = ROOT / "slurm" / "local-cluster.sh"


def _run(cmd: list[str], timeout: float = JOB_TIMEOUT_S, **kw) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    assert out.returncode == 0, f"{cmd} exited {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr}"
    return out


def _wait_for(predicate, what: str, timeout: float = JOB_TIMEOUT_S, poll: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(poll)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


# ------------------------------------------------------------ functions run in jobs


def probe_train(cfg, run_dir) -> int:
    """Stands in for bench.cli.run_training in a sweep job: records what this rank's process sees
    after the sweep driver set it up (rank, world size, torch threads, OMP_NUM_THREADS, node)."""
    import socket

    import torch

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    rank = int(os.environ.get("RANK", 0))
    probe = {"rank": rank, "world_size": int(os.environ.get("WORLD_SIZE", 1)),
             "threads": torch.get_num_threads(), "omp": os.environ.get("OMP_NUM_THREADS"),
             "slurm_cpus": os.environ.get("SLURM_CPUS_PER_TASK"),
             "node": os.environ.get("SLURMD_NODENAME") or socket.gethostname()}
    (run_dir / f"probe-{rank}.json").write_text(json.dumps(probe))
    return 0


def requeue_once(marker: str) -> dict:
    """First run: requeue this job through launch.requeue_self (allowed once), then wait to be stopped.
    The requeued run reports its restart count and that a second requeue is refused."""
    from bench import launch as job_launch

    restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
    if restarts == 0:
        Path(marker).write_text("first run")
        if not job_launch.requeue_self(max_requeue=1):
            return {"restarts": restarts, "requeued": False}
        for _ in range(2 * JOB_TIMEOUT_S):  # short sleeps: the requeue's SIGTERM / SIGKILL ends this run
            time.sleep(0.5)
    return {"restarts": restarts, "again": job_launch.requeue_self(max_requeue=1)}


def _ship_by_value() -> None:
    """The jobs' python cannot import this test module: send its functions by value."""
    import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _probes(sweep_dir: Path) -> list[dict]:
    jobs = json.loads((sweep_dir / "sweep.json").read_text())["jobs"]
    assert jobs and all(j["state"] == "completed" for j in jobs), jobs
    return [json.loads(p.read_text()) for j in jobs for p in sorted(Path(j["run_dir"]).glob("probe-*.json"))]


# ------------------------------------------------------------ launcher translation


def test_launcher_overrides_translate_the_profile_and_leave_the_environment_alone(tmp_path):
    cluster = compose(["cluster=local", "cluster.cpus_per_task=2", "cluster.mem=1500M", "cluster.time=1:30:00",
                       "cluster.setup=[echo hi]"]).cluster
    before = dict(os.environ)
    local = launch.launcher_overrides(cluster, "submitit_local", str(tmp_path))
    slurm = launch.launcher_overrides(cluster, "submitit_slurm", str(tmp_path))
    assert dict(os.environ) == before  # the submitting process's environment is not a side channel
    local_kv = dict(o.split("=", 1) for o in local)
    assert local_kv["hydra.launcher.cpus_per_task"] == "2" and local_kv["hydra.launcher.tasks_per_node"] == "1"
    assert local_kv["hydra.launcher.mem_gb"] == "1" and local_kv["hydra.launcher.timeout_min"] == "90"
    assert local_kv["hydra.sweeper.max_batch_size"] == str(max(1, (os.cpu_count() or 1) // 2))
    assert "hydra.launcher.partition" not in local_kv and not any("setup" in k for k in local_kv)
    slurm_kv = dict(o.split("=", 1) for o in slurm)
    assert slurm_kv["hydra.launcher.partition"] == "'debug'"
    assert slurm_kv["hydra.launcher.max_num_timeout"] == str(cluster.max_requeue)
    assert slurm_kv["hydra.launcher.setup"] == "['echo hi']"
    assert slurm_kv["hydra.launcher.submitit_folder"] == f"'{tmp_path}/.submitit/%j'"


@pytest.mark.parametrize("over, needle", [
    (["cluster.gpus_per_node=2", "cluster.tasks_per_node=1"], "one rank per GPU"),
    (["cluster.nodes=2"], "submitit_local runs on one machine"),
    (["cluster.mem=lots"], "cluster.mem='lots'"),
    (["cluster.time=soon"], "cluster.time='soon'"),
])
def test_launcher_overrides_reject_what_cannot_run(tmp_path, over, needle):
    with pytest.raises(ConfigError, match=re.escape(needle)):
        launch.launcher_overrides(compose(["cluster=local", *over]).cluster, "submitit_local", str(tmp_path))


def test_submitit_local_rank_gets_the_profile_cores(tmp_path, tiny_shards, monkeypatch):
    """The core count reaches a submitit_local job through its own config (cluster.cpus_per_task):
    the rank runs that many torch threads and OMP_NUM_THREADS says so too (for accelerate)."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)  # else the job would inherit the test's
    monkeypatch.chdir(tmp_path)
    _ship_by_value()
    cores = 1 if (os.cpu_count() or 1) > 1 else 2  # differs from the machine-wide fallback
    rc = sweep.multirun(["hydra/launcher=submitit_local", f"cluster.cpus_per_task={cores}",
                         f"data.shards={tiny_shards}", f"hydra.sweep.dir={tmp_path / 'sw'}"], train=probe_train)
    assert rc == 0
    assert "OMP_NUM_THREADS" not in os.environ  # the driver set nothing in this process
    (probe,) = _probes(tmp_path / "sw")
    assert probe["threads"] == cores and probe["omp"] == str(cores), probe


# ------------------------------------------------------------ the local cluster (slurm/local-cluster.sh)


@pytest.mark.slurm
def test_local_cluster_has_the_promised_shape(slurm_cluster):
    """What the tests rely on: two nodes in `debug`, each with SLURM_LOCAL_CPUS CPUs (so 1 node x 2
    tasks fits), requeue on, and a short credential expiry (requeued jobs restart within seconds)."""
    nodes = dict(line.split() for line in _run(["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %c"])
                 .stdout.splitlines())
    cpus = os.environ.get("SLURM_LOCAL_CPUS", "2")
    assert nodes == {n: cpus for n in NODES}, nodes
    config = _run(["scontrol", "show", "config"]).stdout
    assert re.search(r"JobRequeue\s*=\s*1", config) and re.search(r"AuthInfo\s*=.*cred_expire=10", config)


@pytest.mark.slurm
def test_local_cluster_status(slurm_cluster):
    conf = _run(["bash", str(SCRIPT), "env"]).stdout.strip().split("=", 1)[1]
    running = re.search(r"SLURM_CONF\s*=\s*(\S+)", _run(["scontrol", "show", "config"]).stdout)
    if running and running.group(1) != conf:
        pytest.skip(f"the running cluster uses {running.group(1)}, not this script's {conf} "
                    "(started by another version of slurm/local-cluster.sh)")
    out = _run(["bash", str(SCRIPT), "status"], timeout=60).stdout
    assert all(re.search(rf"^{n}\s", out, re.M) for n in NODES), out


# ------------------------------------------------------------ our launcher on the cluster


@pytest.mark.slurm
def test_slurm_ranks_get_the_translated_resources(slurm_cluster, tmp_path, tiny_shards, monkeypatch):
    """cluster.nodes / tasks_per_node / cpus_per_task go through launcher_overrides to Slurm; each rank's
    setup_distributed then sees its rank, the world size and its cores."""
    monkeypatch.chdir(tmp_path)
    _ship_by_value()
    rc = sweep.multirun(["hydra/launcher=submitit_slurm", "cluster=local", "cluster.nodes=2",
                         "cluster.tasks_per_node=1", "cluster.cpus_per_task=2", f"data.shards={tiny_shards}",
                         f"hydra.sweep.dir={tmp_path / 'sw'}"], train=probe_train)
    assert rc == 0
    probes = sorted(_probes(tmp_path / "sw"), key=lambda p: p["rank"])
    assert [p["rank"] for p in probes] == [0, 1] and all(p["world_size"] == 2 for p in probes), probes
    assert sorted(p["node"] for p in probes) == sorted(NODES), probes
    assert all(p["slurm_cpus"] == "2" and p["threads"] == 2 for p in probes), probes


@pytest.mark.slurm
def test_requeue_self_puts_the_job_back_once(slurm_cluster, tmp_path):
    submitit = pytest.importorskip("submitit")
    _ship_by_value()
    ex = submitit.AutoExecutor(folder=tmp_path / "%j", cluster="slurm")
    ex.update_parameters(slurm_partition=slurm_cluster.partition, nodes=1, tasks_per_node=1, timeout_min=60)
    marker = tmp_path / "first"
    job = ex.submit(requeue_once, str(marker))
    try:
        _wait_for(marker.exists, f"job {job.job_id} to start")
        _wait_for(job.done, f"requeued job {job.job_id} to finish")
        try:
            result = job.result()
        except Exception as exc:  # noqa: BLE001 - shown with the logs
            pytest.fail(f"job {job.job_id} failed: {exc}\nstdout:\n{job.stdout()}\nstderr:\n{job.stderr()}")
    finally:
        subprocess.run(["scancel", str(job.job_id)], capture_output=True, timeout=30)
    assert result == {"restarts": 1, "again": False}, result
    assert "Restarts=1" in _run(["scontrol", "show", "job", str(job.job_id)]).stdout


# ------------------------------------------------------------ the submitter's terminal


def test_sacct_warning_is_said_once_with_what_it_means(capsys):
    """submitit warns at every poll when sacct fails (a cluster without accounting): SacctOnce on its
    logger turns that into one line that says what it means, and lets everything else through."""
    import logging

    from bench.jobs import SacctOnce

    log = logging.getLogger("gan-bench-test-submitit")
    sacct = SacctOnce()
    log.addFilter(sacct)
    try:
        seen = []
        handler = logging.Handler()
        handler.emit = seen.append
        log.addHandler(handler)
        for call in range(1, 4):
            log.warning(f"Call #{call} - Bypassing sacct error Command 'sacct' returned 1, status may be inaccurate.")
        log.warning("something else")
    finally:
        log.removeFilter(sacct)
        log.removeHandler(handler)
    out = capsys.readouterr().out
    assert out.count("cannot read job states from sacct") == 1 and "Said once" in out, out
    assert [r.getMessage() for r in seen] == ["something else"]
