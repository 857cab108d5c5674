"""`bench <command> [hydra overrides]`.

Bad input ends with one line on stderr naming the key and the valid choices, and exit code 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from bench import rundir
from bench.config import compose
from bench.errors import UsageError, is_user_error, process_failed

USAGE = """usage: bench <command> [key=value ...]

commands:
  train [overrides]                 train (no overrides: a small BigGAN on the built-in shapes data)
  train -m [sweep overrides]        Hydra multirun sweep (hydra/launcher=submitit_local|submitit_slurm)
  data make-shards source=shapes|folder out=DIR [folder=DIR] [data.resolution=32] [data.num_samples=N]
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
"""


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

    if "-m" in args or "--multirun" in args or sweep.requested_launcher(args):
        return sweep.multirun([a for a in args if a not in ("-m", "--multirun")], train=run_training)
    from bench.config import run_dir_for, validate

    cfg = compose(args)
    cfg = validate(cfg, world_size=_world_size())
    run_dir = run_dir_for(cfg, args)
    return run_training(cfg, run_dir)


def run_training(cfg, run_dir: Path) -> int:
    from omegaconf import OmegaConf

    from bench.train.records import print_summary
    from bench.train.state import StopRequest
    from bench.train.trainer import Trainer

    if cfg.run.dry_run:
        print(OmegaConf.to_yaml(cfg))
        print(f"run directory: {run_dir}")
        return 0
    stop = StopRequest()
    stop.install()  # before set-up and resume: a signal then stops the run before its first step
    watcher = None
    try:
        trainer = Trainer(cfg, run_dir, stop=stop)
        if cfg.eval.get("async"):  # evaluation in its own job (bench eval watch), submitted by rank 0
            from bench.eval import watch

            try:  # every rank learns whether it worked: none is left waiting for a rank 0 that returned
                watcher = trainer.ranks.rank0("submitting the evaluation job", lambda: watch.submit(
                    cfg, run_dir, watch_job, world=trainer.world))
            except Exception as exc:  # noqa: BLE001 - sbatch refused it, submitit missing, ...: before any step
                text = str(exc).strip().splitlines()
                print(f"error: eval.async=true: the evaluation job could not be submitted ({type(exc).__name__}: "
                      f"{text[-1][:200] if text else ''}); nothing was trained", file=sys.stderr, flush=True)
                return 3
        try:
            summary = trainer.run()
        finally:
            if watcher is not None and not watch.started_since(run_dir, watcher["since"]):
                watcher["job"].cancel()  # the training never started: the watcher would wait for it forever
                watcher = None
    finally:
        stop.restore()
    if trainer.is_main:
        print_summary(summary, run_dir)
        if watcher is not None and watcher["record"]["executor"] == "local":
            _wait_for_watcher(watcher)
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


def _wait_for_watcher(watcher: dict) -> None:
    """A local training waits for its evaluation job to finish the checkpoints left (Ctrl-C leaves it running)."""
    job, rec = watcher["job"], watcher["record"]
    print(f"evaluation: waiting for job {rec['job_id']} to evaluate the remaining checkpoints (log {rec['stdout']}; "
          f"Ctrl-C leaves it running)", flush=True)
    try:
        rc = job.result()
    except KeyboardInterrupt:
        print(f"evaluation job {rec['job_id']} left running; its log: {rec['stdout']}", file=sys.stderr, flush=True)
        return
    except Exception as exc:  # noqa: BLE001 - the job's own log says why
        rc = f"failed ({str(exc).strip().splitlines()[-1][:160] if str(exc).strip() else type(exc).__name__})"
    if rc != 0:
        print(f"warning: evaluation job {rec['job_id']} ended with {rc}; see {rec['stderr']}", file=sys.stderr,
              flush=True)


def cmd_throughput(args: list[str]) -> int:
    from bench.config import validate

    world = _world_size()  # bad input is one line before torch is imported or anything is built
    from bench.overrides import is_sweep_value

    if not any(a in ("-m", "--multirun") or is_sweep_value(a.split("=", 1)[-1]) for a in args):  # a sweep: each
        validate(compose(args), world_size=world)  # combination is checked by bench.train.throughput
    from bench.train.throughput import cmd_throughput as throughput

    return throughput(args)


def _split_run_args(args: list[str], extra_keys: tuple[str, ...]) -> tuple[dict, list[str]]:
    special, rest = {}, []
    for a in args:
        key = a.split("=", 1)[0]
        if key in extra_keys and "=" in a:
            special[key] = a.split("=", 1)[1]
        else:
            rest.append(a)
    return special, rest


def _existing_run(special: dict, command: str) -> Path:
    if "run" not in special:
        raise UsageError(f"bench {command} needs run=DIR (a run directory written by bench train)")
    run_dir = Path(special["run"])
    if not (run_dir / rundir.CONFIG).exists():
        raise UsageError(f"run={run_dir}: not a gan-bench run directory (no config.yaml)")
    return run_dir


def cmd_eval(args: list[str]) -> int:
    """`bench eval train-classifier data.shards=...` or `bench eval run=DIR [which=best|last] [eval.*=...]`."""
    if args and args[0] == "train-classifier":
        from bench.config import check_data

        cfg = compose(args[1:])
        check_data(cfg)
        from bench.data.shards import configured_shards
        from bench.eval.classifier import train_classifier

        info = train_classifier(configured_shards(cfg.data), resolution=cfg.data.resolution)
        print(json.dumps({k: v for k, v in info.items() if not isinstance(v, (list, dict)) or k == "class_names"},
                         indent=2, default=str))
        return 0
    if args and args[0] == "watch":
        return cmd_eval_watch(args[1:])
    if args and args[0] == "stats":
        return cmd_eval_stats(args[1:])
    special, rest = _split_run_args(args, ("run", "which"))
    run_dir = _existing_run(special, "eval")
    _check_overrides_are_eval(rest, "eval")
    _check_run_eval_cfg(run_dir, rest)
    _check_which(special.get("which", "best"))
    from bench.eval.runs import eval_run

    eval_run(run_dir, rest, which=special.get("which", "best"))
    return 0


def cmd_eval_stats(args: list[str]) -> int:
    """`bench eval stats data.shards=DIR out=ref.npz [n=N] [data.*] [eval.*]` (bench/eval/realstats.py): mu and sigma
    of the real images' FID features, for eval.ref_stats=FILE."""
    special, rest = _split_run_args(args, ("out", "n"))
    _only_keys(rest, "eval stats", ("out", "n"), ("data.", "eval."))
    from bench.eval.realstats import stats_command

    print(json.dumps(stats_command(special, rest), indent=2))
    return 0


def _only_keys(rest: list[str], command: str, keys, prefixes=("eval.",), exact=("data.shards",)) -> None:
    """Every argument left is key=value with one of these prefixes (or an exact key): else one UsageError line."""
    for o in rest:
        key = o.split("=", 1)[0]
        if "=" not in o or not (key in exact or key.startswith(tuple(prefixes))):
            raise UsageError(f"bench {command}: {o!r} is not a valid argument; valid keys: {', '.join(keys)}, "
                             f"{', '.join(exact)}, {', '.join(p + '*' for p in prefixes)}")


def cmd_eval_watch(args: list[str]) -> int:
    """`bench eval watch run=DIR [poll=S] [once=true] [timeout=S] [data.shards=DIR] [eval.*=...]`
    (bench/eval/watch.py). Exit 0; 2 for bad input or a second watcher; 3 when an evaluation failed."""
    from bench.eval import watch

    special, rest = _split_run_args(args, watch.WATCH_KEYS)
    _only_keys(rest, "eval watch", watch.WATCH_KEYS)
    settings = watch.settings_from_args(special)
    if "run" not in special:
        raise UsageError("bench eval watch needs run=DIR (a run directory written by bench train)")
    if settings.since is not None and not watch.wait_for_start(Path(special["run"]), settings):
        return 3
    run_dir = _existing_run(special, "eval watch")
    _check_overrides_are_eval(rest, "eval watch")
    _check_run_eval_cfg(run_dir, rest)
    from bench.train.state import Checkpoints  # best.pt by training's own rule (bench.eval never imports it)

    return watch.watch(run_dir, rest, settings, keeper=Checkpoints(run_dir, keep=1, is_main=True))


def _check_overrides_are_eval(rest: list[str], command: str) -> None:
    from bench.config import EvalCfg

    for o in rest:
        key = o.split("=", 1)[0]
        if key == "data.shards" and "=" in o:  # the real data, when not the run's own
            continue
        if "=" not in o or not key.startswith("eval.") or key[5:] not in EvalCfg.__dataclass_fields__:
            raise UsageError(f"bench {command}: {o!r} is not an eval.* override; valid keys: data.shards, "
                             + ", ".join(f"eval.{k}" for k in EvalCfg.__dataclass_fields__))


def _check_run_eval_cfg(run_dir: Path, rest: list[str]) -> None:
    """The run's config.yaml with the eval.* overrides, checked against the schema and every eval.* rule
    (bench.config.validate_eval) before a checkpoint is read."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from bench.config import ConfigError, check_schema, validate_eval

    try:
        run_cfg = OmegaConf.load(run_dir / rundir.CONFIG)
        merged = OmegaConf.merge(run_cfg, OmegaConf.from_dotlist(list(rest)))
    except (OmegaConfBaseException, ValueError, OSError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"run={run_dir}: config.yaml with {' '.join(rest) or 'no overrides'}: {first}") from None
    validate_eval(check_schema(merged))


def _check_which(which: str) -> None:
    """which=: best, last, a step number, or a file (bench.eval.runs checks it lies in checkpoints/)."""
    if not which or not which.strip():
        raise UsageError("which='': use best, last, a checkpoint step or a file in the run's checkpoints/")
    if which.lstrip("-").isdigit() and int(which) < 0:
        raise UsageError(f"which={which!r}: a checkpoint step is >= 0; use best, last, a step or a file in the "
                         f"run's checkpoints/")


def _parse_psis(text: str) -> list:
    """psi=[0.25,0.5,off] -> [0.25, 0.5, None]; each a positive finite number, or off/null/none."""
    import math

    out = []
    for p in text.strip().strip("[]").split(","):
        p = p.strip()
        if not p:
            continue
        if p.lower() in ("off", "null", "none"):
            out.append(None)
            continue
        try:
            value = float(p)
        except ValueError:
            value = math.nan
        if not (value > 0 and math.isfinite(value)):
            raise UsageError(f"psi={text!r}: {p!r} is not valid; give positive numbers (or off), "
                             f"e.g. 'psi=[0.25,0.5,1.0]'")
        out.append(value)
    if not out:
        raise UsageError(f"psi={text!r}: give the truncation values to sweep, e.g. 'psi=[0.25,0.5,1.0]'")
    return out


def cmd_truncation(args: list[str]) -> int:
    """`bench truncation run=DIR psi=[0.25,0.5,1.0] [eval.*=...]`: metrics per psi, CSV and plots."""
    special, rest = _split_run_args(args, ("run", "psi", "which"))
    run_dir = _existing_run(special, "truncation")
    _check_overrides_are_eval(rest, "truncation")
    psis = _parse_psis(special.get("psi", "[0.25,0.5,0.75,1.0,1.5]"))
    _check_run_eval_cfg(run_dir, rest)
    _check_which(special.get("which", "best"))
    from bench.eval.runs import truncation_sweep

    truncation_sweep(run_dir, psis, overrides_cfg=rest, which=special.get("which", "best"))
    return 0


SAMPLE_KEYS = ("run", "n", "psi", "class", "which", "seed", "out")


def cmd_sample(args: list[str]) -> int:
    """`bench sample run=DIR n=N out=FILE.npz|DIR [psi=] [class=] [which=best|last] [seed=] [eval.*]`
    (bench/eval/export.py): images of a run's EMA G with the latents and labels that made them."""
    from bench.eval import export

    special, rest = _split_run_args(args, export.SAMPLE_KEYS)
    _only_keys(rest, "sample", export.SAMPLE_KEYS)
    run_dir = _existing_run(special, "sample")
    _check_overrides_are_eval(rest, "sample")
    kw = export.sample_args(special)  # bad input is one line before anything is loaded
    _check_run_eval_cfg(run_dir, rest)
    _check_which(kw["which"])
    print(json.dumps(export.sample_run(run_dir, overrides=rest, **kw), indent=2))
    return 0


def cmd_import(args: list[str]) -> int:
    from bench.importer import import_command  # BigGAN-PyTorch's state dicts as a run directory

    print(json.dumps(import_command(args), indent=2))
    return 0


def cmd_inspect(args: list[str]) -> int:
    from bench.inspection import inspect_command  # parameter counts, GFLOP per image, scaling (JSON)

    return inspect_command(args)


def _parse_kv(args: list[str], allowed: dict[str, str]) -> dict[str, str]:
    out = {}
    for a in args:
        if "=" not in a:
            raise UsageError(f"argument {a!r} is not key=value; valid keys: {', '.join(sorted(allowed))}")
        k, v = a.split("=", 1)
        k = allowed.get(k)
        if k is None:
            raise UsageError(f"unknown key {a.split('=')[0]!r}; valid keys: {', '.join(sorted(allowed))}")
        out[k] = v
    return out


def cmd_data(args: list[str]) -> int:
    if not args or args[0] != "make-shards":
        raise UsageError("usage: bench data make-shards source=shapes|folder out=DIR [folder=DIR] "
                         "[data.resolution=32] [data.num_samples=10000] [data.samples_per_shard=500] [seed=0]")
    keys = {"source": "source", "out": "out", "folder": "folder", "seed": "seed", "overwrite": "overwrite",
            "data.resolution": "resolution", "resolution": "resolution", "data.num_samples": "num_samples",
            "num_samples": "num_samples", "data.samples_per_shard": "samples_per_shard",
            "samples_per_shard": "samples_per_shard"}
    kv = _parse_kv(args[1:], keys)
    if "out" not in kv:
        raise UsageError("bench data make-shards needs out=DIR (where the shards and manifest.json go)")
    source = kv.get("source", "shapes")
    if source not in ("shapes", "folder"):
        raise UsageError(f"source={source!r} is not valid; choose one of: shapes, folder")
    if source == "folder" and not kv.get("folder"):
        raise UsageError("source=folder needs folder=DIR (an ImageFolder tree: one subfolder per class)")
    ints = _shard_ints(kv)
    from bench.data.shards import ShardSetSpec, make_shards

    spec = ShardSetSpec(source=source, folder=kv.get("folder"), **ints)
    overwrite = kv.get("overwrite", "false").lower()
    if overwrite not in ("1", "true", "yes", "0", "false", "no"):
        raise UsageError(f"overwrite={kv['overwrite']!r} is not valid; use true or false")
    overwrite = overwrite in ("1", "true", "yes")
    manifest = make_shards(kv["out"], spec, overwrite=overwrite)
    print(json.dumps({k: manifest[k] for k in ("num_samples", "resolution", "class_names")} |
                     {"shards": len(manifest["shards"]), "out": str(kv["out"])}, indent=2))
    return 0


SHARD_INT_RULES = {"resolution": (16, 256), "num_samples": (1, None), "samples_per_shard": (1, None),
                   "seed": (0, None)}


def _shard_ints(kv: dict) -> dict:
    """make-shards' integer keys, each an integer in its range (a UsageError naming the key)."""
    out = {}
    for k, (lo, hi) in SHARD_INT_RULES.items():
        if k not in kv:
            continue
        v = kv[k].strip()
        ok = v.lstrip("-").isdigit() and int(v) >= lo and (hi is None or int(v) <= hi)
        if not ok:
            allowed = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
            raise UsageError(f"data.{k}={kv[k]!r} is not valid; use {allowed}" if k != "seed"
                             else f"seed={kv[k]!r} is not valid; use {allowed}")
        out[k] = int(v)
    return out


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


if __name__ == "__main__":
    sys.exit(main())
