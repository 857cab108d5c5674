"""`bench train -m`: the multirun driver (Hydra + submitit: one job array per cluster shape), each job's run and
its outcome, and the sweep index (the jobs' index/<job>.json merged into sweep.json). The submitter follows its
jobs with bench/jobs.py (docs/architecture.md, "Sweeps and clusters")."""
from __future__ import annotations

import functools
import itertools
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from bench import jobs, rundir
from bench.config import (CONFIG_DIR, SEARCHPATH, ConfigError, check_group_choices, compose, resolve_final,
                          with_search_path)
from bench.errors import process_failed
from bench.overrides import check_grid, grid, is_sweep_value, sweep_values

SWEEP_JSON = "sweep.json"
HYDRA_TASK_NAME = "cli"  # Hydra's job name (its per-job .log file), as when hydra.main ran in bench/cli.py
OK_STATES = (rundir.COMPLETED, rundir.COLLAPSED)


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
        spec = jobs.MonitorSpec(Path(sweep_dir), offset, tuple(fixed + group), slurm=launcher == "submitit_slurm",
                                tasks=int(cluster.nodes) * int(cluster.tasks_per_node) if cluster else 1)
        jobs.monitored(spec, lambda: _hydra_multirun(job, args + group + extra))
        # Later groups number their jobs after the earlier ones.
        offset = 1 + max(_job_numbers(Path(sweep_dir)), default=offset - 1)
    rows = collect_index(Path(sweep_dir))
    print_sweep(rows, Path(sweep_dir))
    return 0 if rows and all(r.get("state") in OK_STATES for r in rows) else 1


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
    """One job of the sweep (Hydra's task function): validate and resolve, record in the index, train, record the
    outcome. Errors are recorded, not raised: the other jobs of the sweep still finish."""
    from hydra.core.hydra_config import HydraConfig

    from bench import launch
    from bench.config import check_schema, prepare, run_dir_for

    hc = HydraConfig.get()
    overrides = list(hc.overrides.task)
    job_num = ctx.offset + hc.job.num
    rank, world = launch.setup_distributed(cfg.cluster)
    entry = {"overrides": overrides, "slurm_job_id": launch.slurm_job_id(), "state": rundir.RUNNING,
             "run_dir": None, "world_size": world, "requeues": launch.restart_count()}
    try:
        cfg = prepare(check_schema(cfg), world_size=world)
        if not cfg.run.dir:
            cfg.run.root = ctx.sweep_dir
        run_dir = run_dir_for(cfg, overrides).resolve()
        entry["run_dir"] = str(run_dir)
        if rank == 0:
            jobs.write_index_entry(Path(ctx.sweep_dir), job_num, entry)
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
        jobs.write_index_entry(Path(ctx.sweep_dir), job_num, entry)
    if entry["state"] == jobs.REQUEUED:
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
        entry["state"] = jobs.REQUEUED
        entry["requeues"] = launch.restart_count() + 1
    elif launch.requeue_problem():
        entry["error"] = launch.requeue_problem()
    else:
        entry["state"] = jobs.CANCELLED


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
def _job_numbers(sweep_dir: Path) -> list[int]:
    return sorted(int(p.stem) for p in (Path(sweep_dir) / jobs.INDEX).glob("*.json") if p.stem.isdigit())


def collect_index(sweep_dir: Path) -> list[dict]:
    """Merge index/<n>.json into sweep.json (one row per job) and return the rows."""
    paths = [Path(sweep_dir) / jobs.INDEX / f"{n}.json" for n in _job_numbers(sweep_dir)]
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
