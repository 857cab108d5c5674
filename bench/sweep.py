"""`bench train -m`: the multirun driver (Hydra + submitit: one job array per cluster shape), the sweep index
(<sweep dir>/index/<job>.json, merged into sweep.json) and the submitter's job monitor (docs/architecture.md,
"Sweeps and clusters")."""
from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import subprocess
import threading
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import rundir
from bench.config import (CONFIG_DIR, SEARCHPATH, ConfigError, check_group_choices, compose, resolve_final,
                          with_search_path)
from bench.errors import process_failed
from bench.overrides import check_grid, grid, is_sweep_value, sweep_values

INDEX = "index"
SWEEP_JSON = "sweep.json"
HYDRA_TASK_NAME = "cli"  # Hydra's job name (its per-job .log file), as when hydra.main ran in bench/cli.py
OK_STATES = (rundir.COMPLETED, rundir.COLLAPSED)
CANCELLED = "cancelled"   # a job stopped by scancel (or another signal) that Slurm will not run again
REQUEUED = "requeued"     # a job put back in the queue; its next run records itself again
LIVE_STATES = (rundir.RUNNING, REQUEUED)


def _value(override: str) -> str:
    return override.split("=", 1)[-1]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def requested_launcher(args: list[str]) -> str | None:
    """The `hydra/launcher=` choice among the overrides, if any."""
    for a in args:
        if a.startswith("hydra/launcher="):
            return a.split("=", 1)[1]
    return None


# ---- the driver ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class JobContext:
    """What every job of one Hydra multirun needs besides its config (pickled with the job by submitit)."""
    sweep_dir: str
    offset: int                         # job numbers of this group start here (earlier groups before)
    train: Callable[..., int]           # train(cfg, run_dir) -> exit code, e.g. bench.cli.run_training


def multirun(args: list[str], train: Callable[..., int]) -> int:
    """Run the sweep `args` (overrides, sweep values included) with `train(cfg, run_dir)` per job.
    Exit code 0 when every job completed (or collapsed), else 1."""
    from bench import launch

    check_group_choices([a for a in args if not is_sweep_value(_value(a))])
    fixed = [a for a in args if (not a.startswith("hydra") or a.startswith(SEARCHPATH)) and not is_sweep_value(_value(a))]
    base = compose(fixed)  # fails fast, on this machine, on anything but the swept values
    check_grid(fixed, grid(args, sweeper_params(fixed)))  # and then on every swept value, before any job
    sweep_dir = next((_value(a) for a in args if a.startswith("hydra.sweep.dir=")), None)
    sweep_dir = str(Path(sweep_dir or Path(base.run.root) / f"sweep-{time.strftime('%Y%m%d-%H%M%S')}").resolve())
    args = [a for a in args if not a.startswith("hydra.sweep.dir=")]
    launcher = requested_launcher(args)
    groups = cluster_groups(args, fixed, launcher)
    swept = {_key(a) for a in args if is_sweep_value(_value(a))} | set(sweeper_params(fixed))
    if not swept & {"data", "data.shards"}:  # a swept data set: each job finds or makes its own
        prepare_shared_files(base)  # default shards and the domain classifier, once, before jobs start
    offset = 0
    for gi, group in enumerate(groups):
        extra = [f"hydra.sweep.dir={sweep_dir}"]
        if len(groups) > 1:
            extra.append(f"hydra.sweep.subdir=g{gi}-${{hydra.job.num}}")
            print(f"gan-bench sweep: group {gi + 1}/{len(groups)}: {' '.join(group)}", flush=True)
        cluster = compose(fixed + group).cluster if launcher else None
        if launcher:
            extra += launch.launcher_overrides(cluster, launcher, sweep_dir)
        job = functools.partial(run_job, ctx=JobContext(sweep_dir, offset, train))
        spec = MonitorSpec(Path(sweep_dir), offset, tuple(fixed + group), slurm=launcher == "submitit_slurm",
                           tasks=int(cluster.nodes) * int(cluster.tasks_per_node) if cluster else 1)
        _watched(spec, lambda: _hydra_multirun(job, args + group + extra))
        # Later groups number their jobs after the earlier ones.
        offset = 1 + max(_job_numbers(Path(sweep_dir)), default=offset - 1)
    rows = collect_index(Path(sweep_dir))
    print_sweep(rows, Path(sweep_dir))
    return 0 if rows and all(r.get("state") in OK_STATES for r in rows) else 1


def _watched(spec: "MonitorSpec", run: Callable[[], None]) -> None:
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


def _hydra_multirun(task_function, overrides: list[str]) -> None:
    """One Hydra multirun of configs/config.yaml with these overrides. `hydra.main` would read them
    from sys.argv (its argparse); here they are handed to Hydra's app object directly, with the
    search path and run mode that `hydra.main(config_path=CONFIG_DIR)` would give it."""
    from hydra._internal.hydra import Hydra
    from hydra._internal.utils import create_config_search_path, run_and_report
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    app = run_and_report(lambda: Hydra.create_main_hydra2(
        task_name=HYDRA_TASK_NAME, config_search_path=create_config_search_path(str(CONFIG_DIR))))
    try:
        run_and_report(lambda: app.multirun(config_name="config", task_function=task_function,
                                            overrides=[*with_search_path(overrides), "hydra.mode=MULTIRUN"]))
    finally:
        GlobalHydra.instance().clear()


def run_job(cfg, ctx: JobContext) -> str:
    """One job of the sweep (Hydra's task function): validate, record in the index, train, record the
    outcome. Errors are recorded, not raised: the other jobs of the sweep still finish."""
    from hydra.core.hydra_config import HydraConfig

    from bench import launch
    from bench.config import check_schema, run_dir_for, validate

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    job_num = ctx.offset + hc.job.num
    rank, world = launch.setup_distributed(cfg.cluster)
    entry = {"overrides": overrides, "slurm_job_id": launch.slurm_job_id(), "state": rundir.RUNNING,
             "run_dir": None, "world_size": world, "requeues": launch.restart_count()}
    try:
        cfg = validate(check_schema(cfg), world_size=world)
        if not cfg.run.dir:
            cfg.run.root = ctx.sweep_dir
        run_dir = run_dir_for(cfg, overrides).resolve()
        entry["run_dir"] = str(run_dir)
        if rank == 0:
            write_index_entry(Path(ctx.sweep_dir), job_num, entry)
        rc = ctx.train(cfg, run_dir)
        summary = rundir.read_json(run_dir / rundir.SUMMARY) or {}
        entry["state"] = summary.get("status", rundir.COMPLETED if rc == 0 else rundir.FAILED)
        if summary.get("error"):
            entry["error"] = summary["error"]
    except Exception as exc:  # recorded, not raised
        process_failed()  # and this process leaves its process groups to the exit (bench.errors)
        entry["state"] = rundir.FAILED
        entry["error"] = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
        traceback.print_exc()
    if entry["state"] == rundir.INTERRUPTED and launch.slurm_job_id():
        _interrupted_outcome(entry)
    if rank == 0:
        write_index_entry(Path(ctx.sweep_dir), job_num, entry)
    if entry["state"] == REQUEUED:
        # Slurm runs this job again (scontrol requeue, preemption, requeue_self after SIGUSR2): leave
        # without a result, so submitit keeps waiting for the requeued run, which resumes and reports.
        raise SystemExit(0)
    return entry["state"]


def _interrupted_outcome(entry: dict) -> None:
    """A Slurm job stopped by a signal: requeued (Slurm runs it again), interrupted with the reason its
    requeue did not happen (requeues ran out, scontrol requeue failed), or cancelled. Only a requeued
    job leaves without a result; every other one returns, so the submitter never waits forever."""
    from bench import launch

    if launch.requeue_pending():
        entry["state"] = REQUEUED
        entry["requeues"] = launch.restart_count() + 1
    elif launch.requeue_problem():
        entry["error"] = launch.requeue_problem()
    else:
        entry["state"] = CANCELLED


# ---- what the jobs share ------------------------------------------------------------------------------
def sweeper_params(fixed: list[str]) -> dict:
    """hydra.sweeper.params of the composed config (an experiment's grid), as {key: "a,b,c"}."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=with_search_path([a for a in fixed if not a.startswith("hydra")
                                                                  or a.startswith(SEARCHPATH)]),
                            return_hydra_config=True)
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    GlobalHydra.instance().clear()
    return {str(k): str(v) for k, v in params.items()}


def cluster_groups(args: list[str], fixed: list[str], launcher: str | None) -> list[list[str]]:
    """Swept cluster.* keys (from the command line or an experiment's hydra.sweeper.params) become
    one group of fixed overrides per combination; everything else is swept inside each group.
    The swept cluster.* overrides are removed from `args`."""
    swept: dict[str, list[str]] = {}
    for k, v in sweeper_params(fixed).items():
        if k.startswith("cluster.") and is_sweep_value(v):
            swept[k] = [x.split("=", 1)[1] for x in sweep_values(f"{k}={v}")]
    given = {a.split("=", 1)[0] for a in args if "=" in a}
    for k in list(swept):
        if k in given and not is_sweep_value(_value(next(a for a in args if a.startswith(k + "=")))):
            del swept[k]  # fixed on the command line: the command line wins, as in Hydra
    for a in args:
        k, _, v = a.partition("=")
        if k.startswith("cluster.") and is_sweep_value(v):
            swept[k] = [x.split("=", 1)[1] for x in sweep_values(a)]
    if not swept:
        return [[]]
    if launcher != "submitit_slurm" and any(k == "cluster.nodes" and any(x.strip() != "1" for x in v)
                                            for k, v in swept.items()):
        raise ConfigError(f"cluster.nodes={','.join(swept['cluster.nodes'])}: several nodes need "
                          "hydra/launcher=submitit_slurm; add cluster.nodes=1 to run the rest of the grid here")
    for a in list(args):
        if a.split("=", 1)[0] in swept:
            args.remove(a)
    keys = list(swept)
    return [[f"{k}={v.strip()}" for k, v in zip(keys, combo)] for combo in itertools.product(*swept.values())]


def prepare_shared_files(cfg) -> None:
    """Make what every job of a sweep would otherwise build at once: the built-in dataset's shards and,
    when jobs evaluate with the domain extractor, its classifier."""
    from bench.data.shards import configured_shards

    # a swept data.shards is not in cfg: then each job finds its own
    shards = configured_shards(cfg.data) if cfg.data.shards or cfg.data.name == "shapes" else None
    if shards and (cfg.eval.every or resolve_final(cfg)) and cfg.eval.extractor == "domain" \
            and not cfg.eval.classifier_path:
        from bench.eval.metrics import ensure_classifier

        ensure_classifier(shards, cfg.data.resolution)


# ---- the sweep index ----------------------------------------------------------------------------------
def write_index_entry(sweep_dir: Path, job_num: int, entry: dict) -> None:
    entry = dict(entry, job_num=job_num, updated=time.strftime("%Y-%m-%dT%H:%M:%S"))
    rundir.write_json(Path(sweep_dir) / INDEX / f"{job_num}.json", entry)


def _job_numbers(sweep_dir: Path) -> list[int]:
    return sorted(int(p.stem) for p in (Path(sweep_dir) / INDEX).glob("*.json") if p.stem.isdigit())


def collect_index(sweep_dir: Path) -> list[dict]:
    """Merge index/<n>.json into sweep.json (one row per job) and return the rows."""
    paths = [Path(sweep_dir) / INDEX / f"{n}.json" for n in _job_numbers(sweep_dir)]
    rows = [row for row in map(rundir.read_json, paths) if row is not None]
    rundir.write_json(Path(sweep_dir) / SWEEP_JSON, {"sweep_dir": str(sweep_dir), "jobs": rows})
    return rows


def print_sweep(rows: list[dict], sweep_dir: Path) -> None:
    print(f"\nsweep {sweep_dir}: {len(rows)} job(s)")
    for r in rows:
        line = f"  [{r.get('job_num')}] {r.get('state', '?'):<11} job {r.get('slurm_job_id') or '-':<10} " \
               f"{' '.join(r.get('overrides', []))}  ->  {r.get('run_dir')}"
        print(line)
        if r.get("error"):
            print(f"      error: {r['error']}")
    print(f"index: {Path(sweep_dir) / SWEEP_JSON}")


# ---- the submitter's view of its jobs -----------------------------------------------------------------
SACCT_MARK = "Bypassing sacct error"
GONE_GRACE_S = 20.0  # a Slurm job gone from squeue this long without a result was killed before it could report


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
