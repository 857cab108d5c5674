"""One rank per Slurm task on the real local cluster (gloo on CPU), sweeps as job arrays, requeue and
resume, and submitit_local. No mocks: these submit real jobs (see slurm/local-cluster.sh)."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY

BENCH = [sys.executable, "-m", "bench.cli"]
TIMEOUT = 600
COMMON = [*TINY, "train.tick_every=2", "train.sample_every=0"]


def bench(args, cwd, timeout=TIMEOUT, check=True):
    proc = subprocess.run(BENCH + args, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if check:
        assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_jsonl(p):
    return [json.loads(l) for l in Path(p).read_text().splitlines()]


def check_distributed_run(run_dir, world, steps, batch, nodes):
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed"
    assert run["world_size"] == world and run["num_nodes"] == nodes, run
    assert run["effective_batch"] == batch * world
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(2, steps + 1, 2))
    assert all(r["batch/effective"] == batch * world and r["dist/world_size"] == world for r in rows)
    # gradient communication per G step (bench/train/gradsync.py): D's and G's gradients, overlapped
    assert all(r["time/allreduce_ms"] > 0 and r["comm/bytes_per_step"] > 0 and 0 <= r["comm/hidden_frac"] <= 1
               and r["time/allreduce_exposed_ms"] >= 0 for r in rows)
    assert len({r["comm/bytes_per_step"] for r in rows}) == 1  # the same gradients every step
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == steps
    # G and D parameters identical on every rank after the run
    assert len(summary["param_checksums"]) == world and len(set(summary["param_checksums"])) == 1
    return run


@pytest.mark.slurm
def test_two_nodes_one_task_each(slurm_cluster, tmp_path, tiny_shards):
    run_dir = tmp_path / "d1"
    bench(["train", "hydra/launcher=submitit_slurm", "cluster=local", "cluster.nodes=2", "cluster.tasks_per_node=1",
           "train.steps=6", "train.batch_size=4", f"run.dir={run_dir}", f"run.root={tmp_path}",
           f"data.shards={tiny_shards}", *COMMON], cwd=tmp_path)
    run = check_distributed_run(run_dir, world=2, steps=6, batch=4, nodes=2)
    assert sorted(run["hosts"]) == ["n1", "n2"]


@pytest.mark.slurm
def test_one_node_two_tasks(slurm_cluster, tmp_path, tiny_shards):
    run_dir = tmp_path / "d12"
    bench(["train", "hydra/launcher=submitit_slurm", "cluster=local", "cluster.nodes=1", "cluster.tasks_per_node=2",
           "train.steps=4", "train.batch_size=4", f"run.dir={run_dir}", f"run.root={tmp_path}",
           f"data.shards={tiny_shards}", *COMMON], cwd=tmp_path)
    check_distributed_run(run_dir, world=2, steps=4, batch=4, nodes=1)


def test_submitit_local_two_tasks(tmp_path, tiny_shards):
    run_dir = tmp_path / "d2"
    bench(["train", "hydra/launcher=submitit_local", "cluster.tasks_per_node=2", "train.steps=4",
           "train.batch_size=4", f"run.dir={run_dir}", f"run.root={tmp_path}", f"data.shards={tiny_shards}",
           *COMMON], cwd=tmp_path)
    check_distributed_run(run_dir, world=2, steps=4, batch=4, nodes=1)


def test_accelerate_launch_two_cpu_processes(tmp_path, tiny_shards):
    """`accelerate launch --multi_gpu --num_processes 2 -m bench.cli train ...` is a launcher for users with no
    Slurm: on a CPU-only machine it starts two torchrun ranks (gloo) that train as one run."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run_dir = tmp_path / "acc"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           "--num_cpu_threads_per_process", "1", "--main_process_port", str(port), "-m", "bench.cli", "train",
           "train.steps=4", "train.batch_size=4", f"run.dir={run_dir}", f"data.shards={tiny_shards}", *COMMON]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    check_distributed_run(run_dir, world=2, steps=4, batch=4, nodes=1)


@pytest.mark.slurm
def test_sweep_is_one_job_array(slurm_cluster, tmp_path, tiny_shards):
    sweep = tmp_path / "sweep"
    proc = bench(["train", "-m", "hydra/launcher=submitit_slurm", "cluster=local", "train.batch_size=2,4,6",
                  "train.steps=2", f"hydra.sweep.dir={sweep}", f"data.shards={tiny_shards}", *COMMON], cwd=tmp_path)
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert len(jobs) == 3 and all(j["state"] == "completed" for j in jobs), jobs
    array_ids = {j["slurm_job_id"].split("_")[0] for j in jobs}
    assert len(array_ids) == 1  # one array
    assert sorted(j["slurm_job_id"].split("_")[1] for j in jobs) == ["0", "1", "2"]
    dirs = [Path(j["run_dir"]) for j in jobs]
    assert len(set(dirs)) == 3 and all(d.parent == sweep.resolve() for d in dirs)
    for j, d in zip(jobs, dirs):
        b = [o for o in j["overrides"] if o.startswith("train.batch_size=")][0].split("=")[1]
        assert d.name.startswith(f"biggan-shapes32-hinge-b{b}-")  # readable name + hash of the override delta
        assert json.loads((d / "summary.json").read_text())["steps"] == 2
    assert "3 job(s)" in proc.stdout


@pytest.mark.slurm
def test_a_node_sweep_is_one_array_per_shape_and_every_group_finishes(slurm_cluster, tmp_path, tiny_shards):
    """cluster.nodes=1,2 (the batch_scaling study's grid): two arrays in turn, the second monitored apart
    from the first, both recorded in one sweep.json."""
    sweep = tmp_path / "sweep"
    bench(["train", "-m", "hydra/launcher=submitit_slurm", "cluster=local", "cluster.nodes=1,2", "train.batch_size=2",
           "train.steps=2", f"hydra.sweep.dir={sweep}", f"data.shards={tiny_shards}", *COMMON], cwd=tmp_path)
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert len(jobs) == 2 and all(j["state"] == "completed" for j in jobs), jobs
    assert sorted(j["world_size"] for j in jobs) == [1, 2]
    assert len({j["slurm_job_id"].split("_")[0] for j in jobs}) == 2  # one array per resource shape


def test_failed_sweep_job_is_reported_and_others_finish(tmp_path, tiny_shards):
    """A job that fails while it runs (its shards are not there: nothing a config check can see) is
    recorded with its error; the other job completes."""
    sweep, missing = tmp_path / "sweep", tmp_path / "no-shards"
    proc = bench(["train", "-m", "hydra/launcher=submitit_local", f"data.shards={tiny_shards},{missing}",
                  "train.steps=2", "train.batch_size=4", f"hydra.sweep.dir={sweep}", *COMMON],
                 cwd=tmp_path, check=False)
    assert proc.returncode == 1
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    states = {tuple(j["overrides"])[0]: j for j in jobs}
    assert states[f"data.shards={tiny_shards}"]["state"] == "completed"
    failed = states[f"data.shards={missing}"]
    assert failed["state"] == "failed" and "no-shards" in failed["error"], failed
    assert "error: " in proc.stdout


def test_a_bad_swept_value_is_refused_before_any_job(tmp_path, tiny_shards):
    sweep = tmp_path / "sweep"
    proc = bench(["train", "-m", "hydra/launcher=submitit_local", "model.attn=[8],[48]", "train.steps=2",
                  "train.batch_size=4", f"hydra.sweep.dir={sweep}", f"data.shards={tiny_shards}", *COMMON],
                 cwd=tmp_path, check=False)
    assert proc.returncode == 2 and not sweep.exists()
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "model.attn" in err[0] and "48" in err[0], proc.stderr


@pytest.mark.slurm
def test_requeue_resumes_with_identical_records(slurm_cluster, tmp_path, tiny_shards):
    run_dir = tmp_path / "rq"
    sweep = tmp_path / "sw"
    args = ["train", "hydra/launcher=submitit_slurm", "cluster=local", "train.steps=120", "train.batch_size=4",
            "train.ckpt_every=10", f"run.dir={run_dir}", f"hydra.sweep.dir={sweep}", f"data.shards={tiny_shards}",
            *COMMON]
    proc = subprocess.Popen(BENCH + args, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline:  # wait until the job is well into training
            m = run_dir / "metrics.jsonl"
            if m.exists() and len(m.read_text().splitlines()) >= 10:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        job_id = json.loads((sweep / "index" / "0.json").read_text())["slurm_job_id"]
        subprocess.run(["scontrol", "requeue", job_id], check=True, capture_output=True, timeout=60)
        out, _ = proc.communicate(timeout=TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, out[-3000:]
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and len(run["resumes"]) >= 1, run
    steps = [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")]
    assert steps == list(range(2, 121, 2))  # one line per tick: none lost, none duplicated
    assert json.loads((run_dir / "summary.json").read_text())["steps"] == 120
