"""`bench <command> [key=value ...]`: dispatch. Each command reads its arguments through bench/args.py (one grammar:
its own keys from a table, config keys passed through as Hydra overrides) and hands them to the module that owns
the work. Bad input ends with one line on stderr naming the key and the valid choices, and exit code 2.
"""
from __future__ import annotations

import atexit
import json
import os
import sys
import traceback
from pathlib import Path

from bench import rundir
from bench.args import ANY, FLAG, PSI_LIST, TEXT, WHICH, choice, integer, parse_kv
from bench.config import compose
from bench.data.format import MAX_RESOLUTION, MIN_RESOLUTION
from bench.errors import UsageError, failed_in_process, is_user_error, process_failed

USAGE = """usage: bench <command> [key=value ...]

commands:
  train [overrides]                 train (no overrides: a small BigGAN on the built-in shapes data)
  train -m [sweep overrides]        Hydra multirun sweep (hydra/launcher=submitit_local|submitit_slurm)
  data make-shards source=shapes|folder|npz|cifar|hdf5|lmdb|torchvision out=DIR [folder=DIR] [file=F]
                    [split=train|test|all] [dataset=NAME root=DIR] [data.resolution=N] [data.num_samples=N]
                                    a WebDataset shard set (+ manifest.json) from the built-in data, an image
                                    folder, an npz / HDF5 file, CIFAR's pickles, an LMDB or a torchvision dataset
  inspect [overrides]               parameter counts and GFLOP per image of a D step and a G step (JSON)
  throughput [overrides]            img/s, step-time split, TFLOP/s, MFU, memory (JSON); -m sweeps
  eval train-classifier [data.shards=DIR]   train the offline domain feature extractor beside the shards
  eval run=DIR [which=best|last|STEP] [data.shards=DIR] [eval.*]   IS / FID / KID / precision-recall / density-coverage of a run's EMA G
  eval stats data.shards=DIR out=ref.npz [n=N] [eval.extractor=...]   mu / sigma of the real side's FID features
                                    (for eval.ref_stats=FILE)
  eval watch run=DIR [poll=10] [once=true] [timeout=S] [data.shards=DIR] [eval.*]
                                    evaluate each new checkpoint of a (running) run as it appears: evals.jsonl,
                                    checkpoints/best.pt; eval.async=true in bench train submits it as a job
  truncation run=DIR psi=[...] [eval.*]     truncation trade-off: metrics per psi, CSV + PNG plots
  report DIR [out=DIR]              Markdown/CSV tables and PNG plots for a run or a sweep directory
  sample run=DIR n=N out=FILE.npz|DIR [psi=] [class=] [which=best|last] [seed=] [eval.*]
                                    images of a run's EMA G (npz: x, z, y; or PNG files + labels.csv)
  import biggan-pytorch weights=G_ema.pth [g=G.pth] [d=D.pth] model=biggan_128|biggan_deep_128|biggan_deep_256
         out=RUN_DIR [model.*=...]  BigGAN-PyTorch's weights as a run directory (bench eval / sample read it)

examples:
  bench train
  bench train model=sagan train.steps=20 train.batch_size=8 run.dir=/tmp/r1
  bench inspect model=biggan_128
  bench data make-shards source=shapes out=/tmp/s data.resolution=32
  bench data make-shards source=cifar folder=~/data/cifar-10-batches-py out=/tmp/cifar10
"""


MULTIRUN = ("-m", "--multirun")
RUN_REQUIRED = {"run": "DIR (a run directory written by bench train)"}
RUN_PASSTHROUGH = ("data.shards", "eval.*")  # a run's evaluation settings, and its real data when not its own
EVAL_ARGS = {"run": TEXT, "which": WHICH}
TRUNCATION_ARGS = {"run": TEXT, "psi": PSI_LIST, "which": WHICH}
SHARDS_SOURCES = ("shapes", "folder", "npz", "cifar", "hdf5", "lmdb", "torchvision")  # bench/data/importers.py
SHARDS_ARGS = {"source": choice(*SHARDS_SOURCES), "out": TEXT, "folder": TEXT, "file": TEXT, "split": TEXT,
               "dataset": TEXT, "root": TEXT, "data.resolution": integer(MIN_RESOLUTION, MAX_RESOLUTION),
               "data.num_samples": integer(1), "data.samples_per_shard": integer(1), "seed": integer(0),
               "overwrite": FLAG}
SHARDS_ALIASES = {"samples_per_shard": "data.samples_per_shard"}
SHARDS_USAGE = ("usage: bench data make-shards source=shapes|folder|npz|cifar|hdf5|lmdb|torchvision out=DIR "
                "[folder=DIR] [file=F] [split=train|test|all] [dataset=NAME root=DIR] [data.resolution=N "
                "(default: 32 for shapes and folder, an import's own size)] [data.num_samples=N] "
                "[data.samples_per_shard=500] [seed=0] [overwrite=false]")


def _world_size() -> int:
    """WORLD_SIZE from the environment (1 when unset); anything but a positive integer is a ConfigError."""
    import os

    from bench.config import ConfigError

    value = os.environ.get("WORLD_SIZE", "1")
    if not value.strip().isdigit() or int(value) < 1:
        raise ConfigError(f"WORLD_SIZE={value!r} in the environment is not valid; use a positive integer "
                          f"(the number of processes) or unset it")
    return int(value)


def cmd_train(args: list[str]) -> int:
    from bench import sweep

    flags, overrides = parse_kv(args, {}, "train", passthrough=ANY, flags=MULTIRUN)
    if flags or sweep.requested_launcher(overrides):
        return sweep.multirun(overrides, train=run_training)
    from bench.config import prepare, run_dir_for

    cfg = prepare(compose(overrides), world_size=_world_size())
    return run_training(cfg, run_dir_for(cfg, overrides))


def run_training(cfg, run_dir: Path) -> int:
    """One training (bench train, and each job of a sweep): set-up, its eval.async watcher job
    (bench/jobs.py), the training loop, the summary, then eval.psi_sweep."""
    import torch
    from omegaconf import OmegaConf

    from bench.train.records import print_summary
    from bench.train.state import StopRequest
    from bench.train.loop import setup, train

    if cfg.run.dry_run:
        print(OmegaConf.to_yaml(cfg))
        print(f"run directory: {run_dir}")
        return 0
    stop = StopRequest()
    stop.install()  # before set-up and resume: a signal then stops the run before its first step
    watcher = threads = None
    own_threads, own_omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    try:
        if cfg.eval.get("async"):  # on a CPU, training's share of the cores is set before set-up measures anything
            from bench import jobs

            threads = jobs.share_cores()
        run, state = setup(cfg, run_dir, stop=stop)
        if cfg.eval.get("async"):  # evaluation in its own job (bench eval watch), submitted by rank 0
            try:
                watcher = jobs.BesideTraining.submit(cfg, run_dir, watch_job, run.ranks, world=run.world,
                                                     threads=threads)
            except jobs.SubmitFailed as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)
                return 3
        try:
            summary = train(run, state)
        finally:
            if watcher is not None:
                watcher.cancel_unless_started(run_dir)
    finally:
        stop.restore()
        if threads is not None:  # share_cores lowered them for this training only (a sweep's next job is whole)
            torch.set_num_threads(own_threads)
            if own_omp is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = own_omp
    if run.is_main:
        print_summary(summary, run_dir)
        if watcher is not None and watcher.wait():
            summary = rundir.read_json(run_dir / rundir.SUMMARY) or summary  # with the watcher's best
        if cfg.eval.psi_sweep and summary.get("status") in (rundir.COMPLETED, rundir.COLLAPSED):
            from bench.eval.runs import truncation_sweep

            truncation_sweep(run_dir, list(cfg.eval.psi_sweep), which="best" if summary.get("best") else "last")
    if summary.get("error"):
        print(f"error: {summary['error']}", file=sys.stderr)
    return 0 if summary.get("status") in (rundir.COMPLETED, rundir.COLLAPSED, rundir.INTERRUPTED, None) else 3


def watch_job(args: list[str]) -> int:
    """The submitit job of eval.async=true: `bench eval watch` with `args` (run=, wait=, since=)."""
    return main(["eval", "watch", *args])


def cmd_throughput(args: list[str]) -> int:
    from bench.config import validate

    flags, overrides = parse_kv(args, {}, "throughput", passthrough=ANY, flags=MULTIRUN)
    world = _world_size()  # bad input is one line before torch is imported or anything is built
    from bench.overrides import is_sweep_value

    if not flags and not any(is_sweep_value(o.split("=", 1)[-1]) for o in overrides):  # a sweep: each
        validate(compose(overrides), world_size=world)  # combination is checked by bench.train.throughput
    from bench.train.throughput import cmd_throughput as throughput

    return throughput(args)


def _existing_run(known: dict) -> Path:
    run_dir = Path(known["run"])
    if not (run_dir / rundir.CONFIG).exists():
        raise UsageError(f"run={run_dir}: not a gan-bench run directory (no config.yaml)")
    return run_dir


def _check_eval_overrides(run_dir: Path, overrides: list[str], command: str) -> None:
    """Each override is data.shards or an eval.* key of the schema, and the run's config.yaml with them passes the
    schema and every eval.* rule (bench.config.validate_eval), before a checkpoint is read."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from bench.config import ConfigError, check_schema, validate_eval
    from bench.schema import EvalCfg

    names = [k.rstrip("_") for k in EvalCfg.__dataclass_fields__]  # async_ is the user's eval.async
    for o in overrides:
        key = o.split("=", 1)[0]
        if key != "data.shards" and not (key.startswith("eval.") and key[5:] in names):
            raise UsageError(f"bench {command}: {o!r} is not an eval.* override; valid keys: data.shards, "
                             + ", ".join(f"eval.{k}" for k in names))
    try:
        merged = OmegaConf.merge(OmegaConf.load(run_dir / rundir.CONFIG), OmegaConf.from_dotlist(list(overrides)))
    except (OmegaConfBaseException, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"run={run_dir}: config.yaml with {' '.join(overrides) or 'no overrides'}: {first}") from None
    validate_eval(check_schema(merged))


def _run_args(args: list[str], table: dict, command: str, required=RUN_REQUIRED) -> tuple[dict, Path, list[str]]:
    """A command on an existing run: (its own values, the run directory, the checked eval.* / data.shards overrides)."""
    known, overrides = parse_kv(args, table, command, passthrough=RUN_PASSTHROUGH, required=required)
    run_dir = _existing_run(known)
    _check_eval_overrides(run_dir, overrides, command)
    return known, run_dir, overrides


def cmd_eval(args: list[str]) -> int:
    """`bench eval run=DIR [which=best|last|STEP] [eval.*=...]`, and the subcommands train-classifier, watch, stats."""
    sub = {"train-classifier": cmd_eval_classifier, "watch": cmd_eval_watch, "stats": cmd_eval_stats}
    if args and args[0] in sub:
        return sub[args[0]](args[1:])
    known, run_dir, overrides = _run_args(args, EVAL_ARGS, "eval")
    from bench.eval.runs import eval_run

    eval_run(run_dir, overrides, which=known.get("which", "best"))
    return 0


def cmd_eval_classifier(args: list[str]) -> int:
    """`bench eval train-classifier [data.shards=DIR]`: the domain feature extractor, saved beside the shards."""
    _, overrides = parse_kv(args, {}, "eval train-classifier", passthrough=("data", "data.*"))
    from bench.config import check_data

    cfg = compose(overrides)
    check_data(cfg)
    from bench.data.shards import configured_shards
    from bench.eval.classifier import train_classifier

    info = train_classifier(configured_shards(cfg.data), resolution=cfg.data.resolution)
    print(json.dumps({k: v for k, v in info.items() if not isinstance(v, (list, dict)) or k == "class_names"},
                     indent=2, default=str))
    return 0


def cmd_eval_stats(args: list[str]) -> int:
    """`bench eval stats data.shards=DIR out=ref.npz [n=N] [data.*] [eval.*]` (bench/eval/realstats.py)."""
    from bench.eval import realstats

    known, overrides = parse_kv(args, realstats.STATS_ARGS, "eval stats", passthrough=realstats.STATS_PASSTHROUGH,
                                required=realstats.STATS_REQUIRED)
    print(json.dumps(realstats.stats_command(known, overrides), indent=2))
    return 0


def cmd_eval_watch(args: list[str]) -> int:
    """`bench eval watch run=DIR [poll=S] [once=true] [timeout=S] [data.shards=DIR] [eval.*=...]`
    (bench/eval/watch.py). Exit 0; 2 for bad input or a second watcher; 3 when an evaluation failed."""
    from bench.eval import watch

    known, overrides = parse_kv(args, watch.WATCH_ARGS, "eval watch", passthrough=watch.WATCH_PASSTHROUGH,
                                required=watch.WATCH_REQUIRED)
    settings = watch.settings_of(known)
    if settings.since is not None and not watch.wait_for_start(Path(known["run"]), settings):
        return 3
    run_dir = _existing_run(known)
    _check_eval_overrides(run_dir, overrides, "eval watch")
    from bench.train.state import Checkpoints  # best.pt by training's own rule (bench.eval never imports it)

    return watch.watch(run_dir, overrides, settings, keeper=Checkpoints(run_dir, keep=1, is_main=True))


def cmd_truncation(args: list[str]) -> int:
    """`bench truncation run=DIR psi=[0.25,0.5,1.0] [which=] [eval.*=...]`: metrics per psi, CSV and plots."""
    known, run_dir, overrides = _run_args(args, TRUNCATION_ARGS, "truncation")
    from bench.eval.runs import truncation_sweep

    truncation_sweep(run_dir, known.get("psi", [0.25, 0.5, 0.75, 1.0, 1.5]), overrides_cfg=overrides,
                     which=known.get("which", "best"))
    return 0


def cmd_sample(args: list[str]) -> int:
    """`bench sample run=DIR n=N out=FILE.npz|DIR [psi=] [class=] [which=best|last] [seed=] [eval.*]`
    (bench/eval/export.py): images of a run's EMA G with the latents and labels that made them."""
    from bench.eval import export

    known, run_dir, overrides = _run_args(args, export.SAMPLE_ARGS, "sample", required=export.SAMPLE_REQUIRED)
    print(json.dumps(export.sample_run(run_dir, known["n"], known["out"], psi=known.get("psi"),
                                       label=known.get("class"), which=known.get("which", "best"),
                                       seed=known.get("seed"), overrides=overrides), indent=2))
    return 0


def cmd_import(args: list[str]) -> int:
    """`bench import biggan-pytorch weights= model= out= ...` (bench/importer.py)."""
    from bench import importer

    if not args or args[0] not in importer.SOURCES:
        raise UsageError(importer.IMPORT_USAGE)
    known, overrides = parse_kv(args[1:], importer.IMPORT_ARGS, f"import {args[0]}",
                                passthrough=importer.IMPORT_PASSTHROUGH, required=importer.IMPORT_REQUIRED)
    print(json.dumps(importer.import_biggan_pytorch(known["weights"], known["out"], known["model"],
                                                    g=known.get("g") or None, d=known.get("d") or None,
                                                    overrides=overrides), indent=2))
    return 0


def cmd_inspect(args: list[str]) -> int:
    _, overrides = parse_kv(args, {}, "inspect", passthrough=ANY)
    from bench.inspection import inspect_command  # parameter counts, GFLOP per image, scaling (JSON)

    return inspect_command(overrides)


def cmd_data(args: list[str]) -> int:
    """`bench data make-shards ...` (bench/data/shards.py)."""
    if not args or args[0] != "make-shards":
        raise UsageError(SHARDS_USAGE)
    kv, _ = parse_kv(args[1:], SHARDS_ARGS, "data make-shards", aliases=SHARDS_ALIASES,
                     required={"out": "DIR (where the shards and manifest.json go)"})
    from bench.data.shards import ShardSetSpec, make_shards

    ints = {k.split(".")[-1]: v for k, v in kv.items() if k.startswith("data.") or k == "seed"}
    paths = {k: kv.get(k) for k in ("folder", "file", "split", "dataset", "root")}
    # make_shards checks the source's keys (bench.data.importers.SOURCE_KEYS) before it writes anything
    manifest = make_shards(kv["out"], ShardSetSpec(source=kv.get("source", "shapes"), **paths, **ints),
                           overwrite=kv.get("overwrite", False))
    print(json.dumps({k: manifest[k] for k in ("num_samples", "resolution", "class_names", "labelled")} |
                     {"skipped": manifest.get("skipped", 0), "shards": len(manifest["shards"]),
                      "out": str(kv["out"])}, indent=2))
    return 0


def cmd_report(args: list[str]) -> int:
    from bench.report.render import main as report_main  # reads run directories only: no torch import

    return report_main(args)


COMMANDS = {"train": cmd_train, "inspect": cmd_inspect, "data": cmd_data, "throughput": cmd_throughput,
            "eval": cmd_eval, "truncation": cmd_truncation, "report": cmd_report, "sample": cmd_sample,
            "import": cmd_import}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE)
        return 0
    cmd, args = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"error: unknown command {cmd!r}; choose one of: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[cmd](args)
    except SystemExit as exc:
        if exc.code not in (0, None):
            process_failed()
        raise
    except KeyboardInterrupt:  # a second Ctrl-C (the first stops training cleanly at the end of a step)
        process_failed()
        print(f"error: interrupted ({cmd}); a run keeps its newest complete checkpoint", file=sys.stderr)
        return 130
    except Exception as exc:
        process_failed()  # not a run that ended diverged or a sweep with a failed job: those return their code
        if is_user_error(exc):
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if _is_rank_failure(exc):  # another rank failed, or a peer died: one line, like the failing rank
            print(f"error: {exc}".splitlines()[0], file=sys.stderr)
            return 3
        raise


def _is_rank_failure(exc: BaseException) -> bool:
    ranks = sys.modules.get("bench.train.ranks")
    return ranks is not None and (isinstance(exc, ranks.RankFailed) or ranks.is_comm_error(exc))


def entry() -> None:
    """The `bench` command and `python -m bench.cli`: main(), then the exit. A process that joined a process group and
    failed skips the interpreter's teardown: its groups are left alone then (a hung peer's pending collective would
    be waited for, bench/train/ranks.py, Ranks.leave), and gloo's threads, torn down with the interpreter, can abort
    the process (SIGABRT, "terminate called without an active exception") after its one error line, which turned a
    refused run's exit code 2 into -6. The exit hooks still run (the loaders' workers), and the streams are flushed."""
    try:
        rc = main()
    except SystemExit as exc:
        rc = exc.code
    except BaseException:  # a bug: its traceback, as the interpreter would print it
        process_failed()
        traceback.print_exc()
        rc = 1
    if isinstance(rc, str):  # sys.exit("message")
        print(rc, file=sys.stderr)
        rc = 1
    rc = 0 if rc is None else int(rc)
    dist = sys.modules.get("torch.distributed")
    if failed_in_process() and dist is not None and dist.is_available() and dist.is_initialized():
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(rc)
    sys.exit(rc)


if __name__ == "__main__":
    entry()
