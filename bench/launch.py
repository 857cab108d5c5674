"""Local / submitit / Slurm launching: a cluster profile as hydra-submitit-launcher settings (ONE function,
`launcher_overrides`), and what runs inside a job: a rank's distributed environment and threads
(`setup_distributed`), requeue. Nothing here changes the environment of the submitting process; submitting jobs
and following them from the submitter is bench/jobs.py (docs/architecture.md, "Sweeps and clusters")."""
from __future__ import annotations

import os
import re
import subprocess
import sys

from bench.config import MEM_RE, ConfigError

LAUNCHERS = ("submitit_local", "submitit_slurm")


def parse_mem_gb(mem) -> int:
    """'500M' / '4G' / '1T' / 4 -> whole GB (at least 1)."""
    m = re.fullmatch(MEM_RE, str(mem), re.I)
    if not m:
        raise ConfigError(f"cluster.mem={mem!r} is not a memory size; use e.g. 500M, 4G, 1T")
    value, unit = float(m.group(1)), m.group(2).upper() or "G"
    return max(1, int(round(value * {"M": 1 / 1024, "G": 1, "T": 1024}[unit])))


def parse_time_min(t) -> int:
    """60 / '90' / '1:30:00' / '2-00:00:00' -> minutes."""
    s = str(t).strip()
    m = re.fullmatch(r"(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)", s)
    if s.isdigit():
        return int(s)
    if not m:
        raise ConfigError(f"cluster.time={t!r} is not a time limit; use minutes (60) or HH:MM:SS or D-HH:MM:SS")
    days, hours, minutes, seconds = (int(x) if x else 0 for x in m.groups())
    if m.group(2) is None:  # MM:SS
        hours, minutes, seconds = 0, int(m.group(3)), int(m.group(4))
    return max(1, days * 1440 + hours * 60 + minutes + (1 if seconds else 0))


def launcher_overrides(cluster, launcher: str, sweep_dir: str) -> list[str]:
    """The cluster profile as hydra.launcher.* overrides for hydra-submitit-launcher."""
    if launcher not in LAUNCHERS:
        raise ConfigError(f"hydra/launcher={launcher!r} is not supported; choose one of: {', '.join(LAUNCHERS)}")
    tasks = cluster.tasks_per_node
    if cluster.gpus_per_node and tasks != cluster.gpus_per_node:
        raise ConfigError(f"cluster.tasks_per_node={tasks} must equal cluster.gpus_per_node="
                          f"{cluster.gpus_per_node}: one rank per GPU")
    if launcher == "submitit_local" and cluster.nodes != 1:
        raise ConfigError(f"cluster.nodes={cluster.nodes}: hydra/launcher=submitit_local runs on one machine; "
                          "use hydra/launcher=submitit_slurm for several nodes")
    o = {
        "submitit_folder": f"{sweep_dir}/.submitit/%j",
        "nodes": cluster.nodes,
        "tasks_per_node": tasks,
        "cpus_per_task": cluster.cpus_per_task,
        "gpus_per_node": cluster.gpus_per_node,
        "mem_gb": parse_mem_gb(cluster.mem),
        "timeout_min": parse_time_min(cluster.time),
        "name": "gan-bench",
    }
    if launcher == "submitit_slurm":
        o.update({
            "partition": cluster.partition,
            "signal_delay_s": cluster.signal_delay_s,
            "max_num_timeout": cluster.max_requeue,
            "array_parallelism": cluster.array_parallelism,
        })
        if cluster.account:
            o["account"] = cluster.account
        if cluster.qos:
            o["qos"] = cluster.qos
    out = [f"hydra.launcher.{k}={_hydra_value(v)}" for k, v in o.items()]
    if launcher == "submitit_local":
        # submitit's local executor starts every job at once; hand it as many as the cores hold
        # (each rank gets cluster.cpus_per_task threads, see setup_distributed).
        out.append(f"hydra.sweeper.max_batch_size={max(1, (os.cpu_count() or 1) // (tasks * cluster.cpus_per_task))}")
    if launcher == "submitit_slurm" and cluster.setup:
        out.append("hydra.launcher.setup=[" + ",".join(_hydra_value(str(s)) for s in cluster.setup) + "]")
    return out


def _hydra_value(v) -> str:
    if isinstance(v, str):
        return "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'"
    return str(v)


def in_submitit_job() -> bool:
    return "SUBMITIT_FOLDER" in os.environ or "SUBMITIT_EXECUTOR" in os.environ


def setup_distributed(cluster=None) -> tuple[int, int]:
    """Inside a submitit job with several tasks: export RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT,
    LOCAL_RANK for the env:// init that the Accelerator does. On CPU, give each rank its cores:
    SLURM_CPUS_PER_TASK under Slurm, else `cluster.cpus_per_task` of the job's own config (the
    submitit_local case), else the machine's cores shared by the node's ranks. All of it is written
    into this job process's environment only. Returns (rank, world size)."""
    if not in_submitit_job():
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    import submitit

    import torch

    env = submitit.JobEnvironment()
    if env.num_tasks > 1:
        submitit.helpers.TorchDistributedEnvironment().export(
            set_cuda_visible_devices=torch.cuda.is_available(), overwrite=True)
    if not torch.cuda.is_available():
        # CPU ranks sharing a node: give each its own cores (oversubscribed OpenMP threads spin and crawl).
        per_node = max(1, env.num_tasks // max(1, env.num_nodes))
        cores = (int(os.environ.get("SLURM_CPUS_PER_TASK", 0))
                 or int(getattr(cluster, "cpus_per_task", 0) or 0)
                 or max(1, (os.cpu_count() or 1) // per_node))
        # accelerate (MULTI_CPU) reads OMP_NUM_THREADS when the Accelerator is built; without it, it
        # would set physical cores / local ranks threads per rank, counting each Slurm "node" on its
        # own even when nodes share a machine. This is the job process's own environment.
        os.environ.setdefault("OMP_NUM_THREADS", str(cores))
        torch.set_num_threads(cores)
    return env.global_rank, env.num_tasks


def slurm_job_id() -> str | None:
    """'<array job>_<task>' for array jobs, else the job id."""
    if os.environ.get("SLURM_ARRAY_JOB_ID"):
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ.get('SLURM_ARRAY_TASK_ID', '0')}"
    return os.environ.get("SLURM_JOB_ID")


# Why this process's last requeue_self did not requeue (None: it did, or it was not asked). Read by the
# sweep job (bench/sweep.py) to record why an interrupted job will not come back.
_requeue_problem: str | None = None


def requeue_problem() -> str | None:
    return _requeue_problem


def restart_count() -> int:
    """How many times Slurm has requeued this job before this run of it (SLURM_RESTART_COUNT)."""
    return int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def slurm_job_fields(job: str) -> dict[str, str]:
    """`scontrol show job -o <job>` as {field: value} (empty when Slurm does not answer)."""
    try:
        out = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return {}
    if out.returncode != 0:
        return {}
    return dict(f.split("=", 1) for f in out.stdout.split() if "=" in f)


def requeue_pending() -> bool:
    """Whether Slurm has put this job back in the queue while it runs (scontrol requeue, preemption,
    requeue_self): its restart count in slurmctld is then past this run's. A cancelled job's is not."""
    job = os.environ.get("SLURM_JOB_ID")
    if not job:
        return False
    restarts = slurm_job_fields(job).get("Restarts", "")
    return restarts.isdigit() and int(restarts) > restart_count()


def requeue_self(max_requeue: int) -> bool:
    """Put this Slurm job back in the queue (after a checkpoint), at most `max_requeue` times. When it
    does not, `requeue_problem()` says why."""
    global _requeue_problem
    job = slurm_job_id()
    if not job:
        return False
    restarts = restart_count()
    if restarts >= max_requeue:
        _requeue_problem = (f"not requeued: requeues ran out (requeued {restarts} times, "
                            f"cluster.max_requeue={max_requeue})")
        print(f"job {job}: {_requeue_problem}", file=sys.stderr, flush=True)
        return False
    import signal

    # The requeue SIGTERMs this job's processes; scontrol must not die before it gets its reply.
    try:
        out = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60,
                             preexec_fn=lambda: signal.signal(signal.SIGTERM, signal.SIG_IGN))
        failed = (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}") if out.returncode else None
    except (OSError, subprocess.SubprocessError) as exc:
        failed = f"{exc.__class__.__name__}: {exc}"
    if failed:
        _requeue_problem = f"not requeued: scontrol requeue {job} failed: {failed}"
        print(f"job {job}: {_requeue_problem}", file=sys.stderr, flush=True)
        return False
    _requeue_problem = None
    print(f"requeued Slurm job {job} (restart {restarts + 1}/{max_requeue})", flush=True)
    return True
