"""Submitting jobs and following them from the submitter (what runs inside a job: bench/launch.py). A sweep's
Slurm jobs: their own records (index/<n>.json), one line per state change, submitit's failing sacct polls said
once, a job that left the queue without reporting recorded; and eval.async's `bench eval watch` job beside
training (docs/architecture.md, "Sweeps and clusters" and "Evaluation")."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable, Optional

from bench import rundir
from bench.eval.watch import say, started_since

INDEX = "index"           # <sweep dir>/index/<job>.json: each job's own record, merged into sweep.json (bench/sweep.py)
CANCELLED = "cancelled"   # a job stopped by scancel (or another signal) that Slurm will not run again
REQUEUED = "requeued"     # a job put back in the queue; its next run records itself again
LIVE_STATES = (rundir.RUNNING, REQUEUED)


# ---- each job's own record ----------------------------------------------------------------------------
def write_index_entry(sweep_dir: Path, job_num: int, entry: dict) -> None:
    entry = dict(entry, job_num=job_num, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    rundir.write_json(Path(sweep_dir) / INDEX / f"{job_num}.json", entry)


# ---- a sweep's jobs, followed from the submitter --------------------------------------------------------
SACCT_MARK = "Bypassing sacct error"
GONE_GRACE_S = 20.0  # a Slurm job gone from squeue this long without a result was killed before it could report


def monitored(spec: "MonitorSpec", run: Callable[[], None]) -> None:
    """run() with the submitter's monitor printing job state changes, and submitit's repeated sacct
    warning said once."""
    sacct = SacctOnce()
    submitit_log = logging.getLogger("submitit")
    submitit_log.addFilter(sacct)
    monitor = SweepMonitor(spec)
    monitor.start()
    try:
        with _quiet_sacct() if spec.slurm else contextlib.nullcontext():
            run()
    finally:
        monitor.stop()
        submitit_log.removeFilter(sacct)


class SacctOnce(logging.Filter):
    """submitit polls sacct for job states; on a cluster without job accounting every poll fails, and
    submitit warns again (through each of its handlers and Hydra's) while sacct prints its own error.
    This filter on submitit's logger drops those warnings and says once, in one line, what they mean."""

    def __init__(self):
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if SACCT_MARK not in str(record.msg):
            return True
        if not self.said:
            self.said = True
            print(f"gan-bench sweep: submitit cannot read job states from sacct ({_sacct_problem()}). "
                  "Jobs are followed through their own records (index/) and squeue instead; a job that "
                  "ends without reporting is found when it leaves the queue. (Said once.)", flush=True)
        return False


def _sacct_problem() -> str:
    try:
        out = subprocess.run(["sacct", "-n", "-X", "-j", "1", "-o", "JobID"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"{exc.__class__.__name__}: {exc}"
    return (out.stderr.strip() or out.stdout.strip() or f"exit {out.returncode}").splitlines()[0]


@contextlib.contextmanager
def _quiet_sacct():
    """While the submitter waits: sacct's own error output (one line per poll, straight to the
    terminal) is dropped; the failure itself still reaches SacctOnce through submitit's warning."""
    from submitit.slurm.slurm import SlurmInfoWatcher

    make = SlurmInfoWatcher._make_command

    def quiet(self):
        command = make(self)
        return None if command is None else ["sh", "-c", 'exec "$@" 2>/dev/null', "sacct", *command]
    SlurmInfoWatcher._make_command = quiet
    try:
        yield
    finally:
        SlurmInfoWatcher._make_command = make


def _squeue_states(job_ids: list[str]) -> dict[str, str] | None:
    """{job id: Slurm state} of the jobs still known to slurmctld (array tasks as '<array>_<task>');
    None when squeue does not answer."""
    bases = sorted({j.split("_")[0] for j in job_ids})
    if not bases:
        return {}
    try:
        out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(bases), "-o", "%i %T"],
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0 and "Invalid job id" not in out.stderr:
        return None
    return dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)


@dataclass(frozen=True)
class MonitorSpec:
    """What the submitter's monitor of one group of jobs (one Hydra multirun) needs."""
    sweep_dir: Path
    offset: int                 # job number of the group's first job
    fixed: tuple[str, ...]      # overrides every job shares (left out of the job labels)
    slurm: bool                 # jobs are Slurm jobs: follow squeue and reap jobs killed before reporting
    tasks: int = 1              # Slurm tasks (ranks) per job


class SweepMonitor(threading.Thread):
    """Prints one line per job state change ("job 12_3 (train.batch_size=16): RUNNING -> COMPLETED")
    while the submitter waits. A Slurm job that left the queue without reporting (killed: scancel
    while pending, or SIGKILL before it wrote its result) is recorded as such in the index, and its
    result is written for submitit, so the submitter always returns."""

    def __init__(self, spec: MonitorSpec, poll_s: float = 2.0):
        super().__init__(name="gan-bench-sweep-monitor", daemon=True)
        self.spec, self.poll_s = spec, poll_s
        self.shown: dict[str, str] = {}
        self.gone_since: dict[str, float] = {}
        self.labels: dict[str, list[str]] = {}
        self._halt = threading.Event()
        self.earlier: set[str] = set()  # _submitted() reads it
        if spec.slurm:  # a later group of one sweep: the earlier groups' jobs are already in .submitit/
            self.earlier = set(self._submitted())

    def run(self) -> None:
        while not self._halt.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001 - the monitor never takes the submitter down
                print(f"gan-bench sweep: monitor: {exc.__class__.__name__}: {exc}", flush=True)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)
        self.poll(reap=False)

    def _submitted(self) -> dict[str, int]:
        """{Slurm job id: job number} of the jobs submitted since this monitor started (submitit's job
        folders; earlier groups' jobs are not this group's)."""
        out = {}
        for p in (self.spec.sweep_dir / ".submitit").glob("*/*_submitted.pkl"):
            job_id = p.name[: -len("_submitted.pkl")]
            task = job_id.split("_")[1] if "_" in job_id else "0"
            if task.isdigit() and job_id not in self.earlier:
                out[job_id] = self.spec.offset + int(task)
        return out

    def poll(self, reap: bool = True) -> None:
        entries = {e.get("job_num"): e for e in map(rundir.read_json, (self.spec.sweep_dir / INDEX).glob("*.json"))
                   if e}
        jobs = self._submitted() if self.spec.slurm else {}
        for e in entries.values():
            if isinstance(e.get("job_num"), int) and e["job_num"] >= self.spec.offset:
                jobs.setdefault(e.get("slurm_job_id") or str(e["job_num"]), e["job_num"])
        queue = _squeue_states(list(jobs)) if self.spec.slurm else {}
        for job_id, num in sorted(jobs.items(), key=lambda kv: kv[1]):
            entry = entries.get(num) if (entries.get(num) or {}).get("slurm_job_id") in (None, job_id) else None
            state = self._state(entry, (queue or {}).get(job_id))
            if reap and queue is not None and self.spec.slurm:
                state = self._reap(job_id, num, entry, job_id in queue) or state
            if state != self.shown.get(job_id, "PENDING" if self.spec.slurm else None):
                # Hydra hands a job `eval.final=False` for the command line's `eval.final=false`: compare caselessly
                fixed = {o.lower() for o in self.spec.fixed}
                label = " ".join(o for o in self._overrides(job_id, entry) if o.lower() not in fixed)
                print(f"job {job_id}{f' ({label})' if label else ''}: {self.shown.get(job_id, 'PENDING')} -> "
                      f"{state}", flush=True)
            self.shown[job_id] = state

    def _overrides(self, job_id: str, entry: dict | None) -> list[str]:
        """The job's overrides: from its index entry, else from the job submitit pickled (before it starts)."""
        if entry and entry.get("overrides"):
            return list(entry["overrides"])
        if job_id not in self.labels and self.spec.slurm:
            from submitit.core.utils import JobPaths, pickle_load

            path = JobPaths(self.spec.sweep_dir / ".submitit" / "%j", job_id=job_id).submitted_pickle
            try:
                self.labels[job_id] = [str(o) for o in pickle_load(path).args[0]]
            except Exception:  # noqa: BLE001 - a label is a nicety; the job id is enough
                self.labels[job_id] = []
        return self.labels.get(job_id, [])

    @staticmethod
    def _state(entry: dict | None, queued: str | None) -> str:
        recorded = (entry or {}).get("state")
        if recorded and recorded not in LIVE_STATES:
            return recorded.upper()  # final: the job's own word
        if recorded == REQUEUED and queued in (None, "PENDING", "COMPLETING", "REQUEUED"):
            return f"REQUEUED ({entry.get('requeues', '?')})"
        if queued == "COMPLETING" and recorded == rundir.RUNNING:
            return "RUNNING"  # ending: the job's own record says how, in a moment
        return queued or (recorded or "pending").upper()

    def _reap(self, job_id: str, num: int, entry: dict | None, queued: bool) -> str | None:
        """Record a job that left the queue without a result and hand submitit a result for it."""
        from submitit.core.utils import JobPaths

        folder = self.spec.sweep_dir / ".submitit" / "%j"
        results = [JobPaths(folder, job_id=job_id, task_id=t).result_pickle for t in range(self.spec.tasks)]
        if queued or all(r.exists() for r in results):
            self.gone_since.pop(job_id, None)
            return None
        first = self.gone_since.setdefault(job_id, time.monotonic())
        if time.monotonic() - first < GONE_GRACE_S:
            return None
        state = (entry or {}).get("state")
        if state in LIVE_STATES or state is None:  # it never reported how it ended: ask Slurm, then its log
            state, why = _ended_how(job_id, JobPaths(folder, job_id=job_id, task_id=0).stderr)
            entry = dict(entry or {"overrides": self._overrides(job_id, None), "slurm_job_id": job_id,
                                   "run_dir": None})
            entry.update(state=state, error=f"the job ended without reporting: {why}")
            write_index_entry(self.spec.sweep_dir, num, entry)
        _write_results(results, state)
        return state.upper()


def _ended_how(job_id: str, log: Path) -> tuple[str, str]:
    """(state, why) of a Slurm job that ended without a result: slurmctld's record while it keeps it
    (MinJobAge), else slurmstepd's line in the job's log."""
    from bench import launch

    fields = launch.slurm_job_fields(job_id)
    slurm_state = fields.get("JobState", "")
    if slurm_state:
        why = f"Slurm says {slurm_state} (reason {fields.get('Reason', '?')}, exit code {fields.get('ExitCode', '?')})"
        return (CANCELLED if slurm_state == "CANCELLED" else rundir.FAILED), f"{why}; log: {log}"
    if not log.exists():  # it never started: only a cancel takes a pending job out of the queue
        return CANCELLED, "it left the queue before it started (cancelled while pending)"
    text = log.read_text(errors="replace")
    line = next((ln.strip() for ln in text.splitlines() if "***" in ln and "CANCELLED AT" in ln), "")
    state = CANCELLED if line and "DUE TO" not in line else rundir.FAILED
    return state, f"{line or 'killed, with no message'}; log: {log}"


def _write_results(paths: list[Path], state: str) -> None:
    """The result submitit waits for, as the job would have written it (hydra-submitit-launcher's
    JobReturn carrying run_job's return value)."""
    from hydra.core.utils import JobReturn, JobStatus
    from submitit.core.utils import cloudpickle_dump

    for p in paths:
        if not p.exists():
            cloudpickle_dump(("success", JobReturn(status=JobStatus.COMPLETED, _return_value=state)), p)


# ---- the job beside training (eval.async=true) ---------------------------------------------------------
JOBS = "eval-watch.json"  # <run>/eval-watch.json: the watcher jobs `bench train` submitted
LOCAL_TIMEOUT_MIN = 7 * 24 * 60  # a local watcher follows its training however long it runs
GPUS_ENV = "GAN_BENCH_WATCH_GPUS"  # local jobs: the GPU indices the watcher may use ("" = CPU only)


def _local_gpus(world: int) -> tuple[int, ...]:
    """The local watcher's GPU: GAN_BENCH_WATCH_GPUS when set; else, on a GPU machine, the first one training
    does not use (ranks take 0 .. world-1), or GPU 0 shared with rank 0 when there is none."""
    if os.environ.get(GPUS_ENV) is not None:
        return tuple(int(g) for g in os.environ[GPUS_ENV].replace(" ", "").split(",") if g.isdigit())
    import torch

    if not torch.cuda.is_available():
        return ()
    visible = [v for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip().isdigit()]
    ids = [int(v) for v in visible] or list(range(torch.cuda.device_count()))
    free = ids[world:] if len(ids) > world else ids[:1]
    if len(ids) <= world:
        say(f"note: the evaluation job shares GPU {free[0]} with training (no free GPU; set {GPUS_ENV})", err=True)
    return tuple(free[:1])


def share_cores() -> Optional[tuple[int, int]]:
    """eval.async beside a CPU training on this machine (no Slurm job, no GPU): the evaluation job gets a quarter
    of the cores (at least one) and each local training rank keeps at most an equal share of the rest, so one
    training and its evaluation do not oversubscribe the cores (busy-waiting OpenMP threads slow both several
    times over). Lowers this process's torch threads when needed (the caller restores them); returns (training
    threads, evaluation threads), or None off a CPU."""
    import torch

    if os.environ.get("SLURM_JOB_ID") or torch.cuda.is_available():
        return None  # Slurm gives the job its own CPUs; on a GPU the evaluation runs on a GPU
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    # the ranks on this machine (torchrun and bench's launcher set LOCAL_WORLD_SIZE; else assume all are here)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("WORLD_SIZE") or "1"))
    evaluation = max(1, cores // 4)
    training = min(torch.get_num_threads(), max(1, (cores - evaluation) // local_ranks))
    if training < torch.get_num_threads():
        torch.set_num_threads(training)
        os.environ["OMP_NUM_THREADS"] = str(training)  # accelerate's CPU set-up would otherwise reset it
    return training, evaluation


def _in_threads(threads: int, job: Callable[[list], int], args: list) -> int:
    """The local evaluation job, held to its share of the cores (share_cores)."""
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)  # for anything it starts
    torch.set_num_threads(threads)
    say(f"evaluation job: {threads} torch thread(s) (eval.async shares this machine's cores with training)")
    return job(args)


def submit_eval_job(cfg, run_dir: Path, job: Callable[[list], int], world: int = 1,
                    threads: Optional[tuple[int, int]] = None) -> dict:
    """Submit `job(["run=DIR", "wait=true", "since=T"])` (the CLI's `bench eval watch`) as its own submitit job:
    Slurm's executor when training runs in a Slurm job (one rank's share of the cluster profile: 1 task,
    cluster.cpus_per_task, cluster.mem / tasks_per_node, one GPU when the profile has GPUs, cluster.time,
    partition / account / qos / setup), else submitit's local executor, held to `threads` (share_cores's
    (training, evaluation) threads) on a CPU. The job is recorded in <run>/eval-watch.json (job id, executor,
    log files, threads). Returns {"job", "since", "record"}."""
    import submitit

    from bench import launch

    run_dir = Path(run_dir).resolve()
    since = time.time()
    args = [f"run={run_dir}", "wait=true", f"since={since:.6f}"]
    folder = run_dir / "eval-watch"  # <job id>_* files; a %j pattern would leave a literal "%j" folder (submitit)
    if os.environ.get("SLURM_JOB_ID"):
        c = cfg.cluster
        ex = submitit.SlurmExecutor(folder)
        params = dict(job_name="gan-bench-eval", partition=c.partition, time=launch.parse_time_min(c.time), nodes=1,
                      ntasks_per_node=1, cpus_per_task=int(c.cpus_per_task), signal_delay_s=int(c.signal_delay_s),
                      mem=max(1, launch.parse_mem_gb(c.mem) // max(1, int(c.tasks_per_node))))
        params.update({k: v for k, v in (("gpus_per_node", 1 if c.gpus_per_node else None), ("account", c.account),
                                         ("qos", c.qos), ("setup", list(c.setup or []) or None)) if v})
        executor = "slurm"
    else:
        ex = submitit.LocalExecutor(folder)
        gpus = _local_gpus(world)
        params = dict(timeout_min=LOCAL_TIMEOUT_MIN, tasks_per_node=1, nodes=1, gpus_per_node=len(gpus),
                      visible_gpus=gpus)
        executor = "local"
        if threads is not None and not gpus:
            job = functools.partial(_in_threads, threads[1], job)
    ex.update_parameters(**params)
    handle = ex.submit(job, args)
    record = {"job_id": str(handle.job_id), "executor": executor, "submitted": datetime.now().astimezone().isoformat(),
              "command": "bench eval watch " + " ".join(args), "stdout": str(handle.paths.stdout),
              "stderr": str(handle.paths.stderr)}
    shared = executor == "local" and threads is not None and not params.get("gpus_per_node")
    if shared:
        record["threads"] = {"training": threads[0], "evaluation": threads[1]}
    jobs = (rundir.read_json(run_dir / JOBS) or {}).get("jobs", [])
    rundir.write_json(run_dir / JOBS, {"jobs": [*jobs, record]})
    split = (f"; {threads[1]} thread(s) for it, {threads[0]} per training rank, sharing this machine's cores"
             if shared else "")
    say(f"evaluation runs beside training in {executor} job {handle.job_id} (log {handle.paths.stdout}; "
        f"recorded in {run_dir / JOBS}{split})")
    return {"job": handle, "since": since, "record": record}


class SubmitFailed(Exception):
    """eval.async=true: the evaluation job could not be submitted (one line; bench train exits 3, nothing trained)."""


class BesideTraining:
    """The eval.async=true watcher of one training (bench train): submitted by rank 0 before any step (every rank
    learns whether it worked), cancelled when the training never started (it would wait for it forever), and
    waited for by a local training once it has ended."""

    def __init__(self, handle: Optional[dict]):
        self.handle = handle  # submit_eval_job()'s {"job", "since", "record"}; None on ranks other than 0

    @classmethod
    def submit(cls, cfg, run_dir: Path, job: Callable[[list], int], ranks, world: int = 1,
               threads: Optional[tuple[int, int]] = None) -> "BesideTraining":
        """ranks: the training's bench.train.ranks.Ranks (rank0(what, fn) runs fn on rank 0 and shares its failure);
        threads: share_cores()'s split, made before set-up."""
        try:
            return cls(ranks.rank0("submitting the evaluation job",
                                   lambda: submit_eval_job(cfg, run_dir, job, world=world, threads=threads)))
        except Exception as exc:  # noqa: BLE001 - sbatch refused it, submitit missing, ...: before any step
            text = str(exc).strip().splitlines()
            raise SubmitFailed(f"eval.async=true: the evaluation job could not be submitted ({type(exc).__name__}: "
                               f"{text[-1][:200] if text else ''}); nothing was trained") from None

    def cancel_unless_started(self, run_dir: Path) -> None:
        """After training returned: a watcher whose training never started (bench train failed in set-up) is
        cancelled, since it would wait for that start forever."""
        if self.handle is not None and not started_since(run_dir, self.handle["since"]):
            self.handle["job"].cancel()
            self.handle = None

    def wait(self) -> bool:
        """A local training waits for its evaluation job to finish the checkpoints left (Ctrl-C leaves it running).
        True when there was a local job to wait for (Slurm jobs go on by themselves)."""
        if self.handle is None or self.handle["record"]["executor"] != "local":
            return False
        job, rec = self.handle["job"], self.handle["record"]
        say(f"waiting for job {rec['job_id']} to evaluate the remaining checkpoints (log {rec['stdout']}; Ctrl-C "
            f"leaves it running)")
        try:
            rc = job.result()
        except KeyboardInterrupt:
            say(f"job {rec['job_id']} left running; its log: {rec['stdout']}", err=True)
            return True
        except Exception as exc:  # noqa: BLE001 - the job's own log says why
            rc = f"failed ({str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__})"
        if rc != 0:
            say(f"warning: job {rec['job_id']} ended with {rc}; see {rec['stderr']}", err=True)
        return True
