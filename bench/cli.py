"""`bench <command> [hydra overrides]`.

Bad input ends with one line on stderr naming the key and the valid choices, and exit code 2.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

USAGE = """usage: bench <command> [key=value ...]

commands:
  train [overrides]                 train (no overrides: a small BigGAN on the built-in shapes data)
  train -m [sweep overrides]        Hydra multirun sweep (hydra/launcher=submitit_local|submitit_slurm)
  data make-shards source=shapes|folder out=DIR [folder=DIR] [data.resolution=32] [data.num_samples=N]
  inspect [overrides]               parameter counts and GFLOP per image of a D step and a G step (JSON)
  throughput [overrides]            img/s, step-time split, TFLOP/s, MFU, memory (JSON); -m sweeps
  eval train-classifier [data.shards=DIR]   train the offline domain feature extractor beside the shards
  eval run=DIR [which=best|last] [eval.*]   IS / FID / KID / precision-recall of a run's EMA generator
  truncation run=DIR psi=[...] [eval.*]     truncation trade-off: metrics per psi, CSV + PNG plots
  report DIR [out=DIR]              Markdown/CSV tables and PNG plots for a run or a sweep directory

examples:
  bench train
  bench train model=sagan train.steps=20 train.batch_size=8 run.dir=/tmp/r1
  bench inspect model=biggan_128
  bench data make-shards source=shapes out=/tmp/s data.resolution=32
"""


class UsageError(ValueError):
    pass


def _user_errors() -> tuple[type, ...]:
    from bench.config import ConfigError
    from bench.data import DataError
    from bench.evaluate import EvalError
    from models import ModelConfigError

    return (ConfigError, DataError, ModelConfigError, UsageError, EvalError)


def _check_group_choices(overrides: list[str]) -> None:
    """`model=foo` with no configs/model/foo.yaml -> one line listing the valid choices."""
    from bench.config import CONFIG_DIR, ConfigError

    for o in overrides:
        if "=" not in o:
            raise UsageError(f"argument {o!r} is not a key=value override; see `bench --help`")
        key, value = o.split("=", 1)
        key = key.lstrip("+~")
        group_dir = CONFIG_DIR / key
        if "." in key or not group_dir.is_dir() or "," in value:
            continue
        if not (group_dir / f"{value}.yaml").exists():
            choices = sorted(p.stem for p in group_dir.glob("*.yaml"))
            raise ConfigError(f"{key}={value!r} is not available; choose one of: {', '.join(choices)}")


def compose(overrides: list[str]):
    """Compose configs/ with the overrides, check it against the schema and validate it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from bench.config import CONFIG_DIR, ConfigError, check_schema

    _check_group_choices(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [l.strip() for l in str(exc).splitlines() if l.strip()]
        raise ConfigError(" ".join(lines[:3])) from None
    return check_schema(cfg)


def _world_size() -> int:
    import os

    return int(os.environ.get("WORLD_SIZE", "1"))


def _launcher(args: list[str]) -> str | None:
    for a in args:
        if a.startswith("hydra/launcher="):
            return a.split("=", 1)[1]
    return None


def cmd_train(args: list[str]) -> int:
    if "-m" in args or "--multirun" in args or _launcher(args):
        return _multirun([a for a in args if a not in ("-m", "--multirun")])
    from bench.config import run_dir_for, validate

    cfg = compose(args)
    cfg = validate(cfg, world_size=_world_size())
    run_dir = run_dir_for(cfg, args)
    return run_training(cfg, run_dir)


def run_training(cfg, run_dir: Path) -> int:
    from omegaconf import OmegaConf

    from bench.loop import Trainer, print_summary

    if cfg.run.dry_run:
        print(OmegaConf.to_yaml(cfg))
        print(f"run directory: {run_dir}")
        return 0
    trainer = Trainer(cfg, run_dir)
    summary = trainer.run()
    if trainer.is_main:
        print_summary(summary, run_dir)
        if cfg.eval.psi_sweep and summary.get("status") in ("completed", "collapsed"):
            from bench.evaluate import truncation_sweep

            truncation_sweep(run_dir, list(cfg.eval.psi_sweep), which="best" if summary.get("best") else "last")
    if summary.get("error"):
        print(f"error: {summary['error']}", file=sys.stderr)
    return 0 if summary.get("status") in ("completed", "collapsed", "interrupted", None) else 3


def _is_sweep_value(value: str) -> bool:
    depth = 0
    for ch in value:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            return True
    return value.startswith(("range(", "choice(", "glob(", "interval("))


def _multirun(args: list[str]) -> int:
    """Sweeps and cluster runs go through Hydra's multirun: `hydra/launcher=submitit_slurm` submits one
    Slurm job array (one job per override combination), `submitit_local` runs them on this machine.
    Each job trains like `bench train`, records itself in <sweep dir>/index/, and never raises, so one
    failed job does not hide the others."""
    import time as _time

    import hydra
    from hydra.core.hydra_config import HydraConfig

    from bench import launch
    from bench.config import CONFIG_DIR, check_schema, run_dir_for, validate

    _check_group_choices([a for a in args if not _is_sweep_value(a.split("=", 1)[-1])])
    fixed = [a for a in args if not a.startswith("hydra") and not _is_sweep_value(a.split("=", 1)[-1])]
    base = compose(fixed)  # fails fast, on this machine, on anything but the swept values
    sweep_dir = next((a.split("=", 1)[1] for a in args if a.startswith("hydra.sweep.dir=")), None)
    sweep_dir = str(Path(sweep_dir or Path(base.run.root) / f"sweep-{_time.strftime('%Y%m%d-%H%M%S')}").resolve())
    args = [a for a in args if not a.startswith("hydra.sweep.dir=")]
    launcher = _launcher(args)
    groups = _cluster_groups(args, fixed, launcher)
    _prepare_shared_files(base)  # default shards and the domain classifier, once, before jobs start

    def job_fn(cfg, offset: int):
        import traceback

        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
        job_num = offset + hc.job.num
        rank, world = launch.setup_distributed()
        entry = {"overrides": overrides, "slurm_job_id": launch.slurm_job_id(), "state": "running",
                 "run_dir": None, "world_size": world}
        try:
            cfg = validate(check_schema(cfg), world_size=world)
            if not cfg.run.dir:
                cfg.run.root = sweep_dir
            run_dir = run_dir_for(cfg, overrides).resolve()
            entry["run_dir"] = str(run_dir)
            if rank == 0:
                launch.write_index_entry(Path(sweep_dir), job_num, entry)
            rc = run_training(cfg, run_dir)
            summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() \
                else {}
            entry["state"] = summary.get("status", "completed" if rc == 0 else "failed")
            if summary.get("error"):
                entry["error"] = summary["error"]
        except Exception as exc:  # recorded, not raised: the other jobs of the sweep still finish
            entry["state"] = "failed"
            entry["error"] = f"{exc.__class__.__name__}: {exc}".splitlines()[0]
            traceback.print_exc()
        if rank == 0:
            launch.write_index_entry(Path(sweep_dir), job_num, entry)
        if entry["state"] == "interrupted" and launch.slurm_job_id():
            # Checkpointed after a signal: leave without a result, so submitit keeps waiting for the
            # requeued job (Slurm requeues on preemption / scontrol requeue; SIGUSR2 requeued itself).
            raise SystemExit(0)
        return entry["state"]

    from hydra.core.global_hydra import GlobalHydra

    offset = 0
    for gi, group in enumerate(groups):
        # One Hydra multirun (one Slurm job array) per combination of swept cluster.* values: an
        # array has one resource shape. Later groups number their jobs after the earlier ones.
        group_args = args + group
        extra = [f"hydra.sweep.dir={sweep_dir}"]
        if len(groups) > 1:
            extra.append(f"hydra.sweep.subdir=g{gi}-${{hydra.job.num}}")
            print(f"gan-bench sweep: group {gi + 1}/{len(groups)}: {' '.join(group)}", flush=True)
        if launcher:
            extra += launch.launcher_overrides(compose(fixed + group).cluster, launcher, sweep_dir)

        def job(cfg, _offset=offset):
            return job_fn(cfg, _offset)

        GlobalHydra.instance().clear()
        sys.argv = ["bench", "-m"] + group_args + extra
        hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")(job)()
        offset = 1 + max((int(p.stem) for p in (Path(sweep_dir) / "index").glob("*.json")), default=offset - 1)
    rows = launch.collect_index(Path(sweep_dir))
    launch.print_sweep(rows, Path(sweep_dir))
    return 0 if rows and all(r.get("state") in ("completed", "collapsed") for r in rows) else 1


def _sweeper_params(fixed: list[str]) -> dict:
    """hydra.sweeper.params of the composed config (an experiment's grid), as {key: "a,b,c"}."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    from bench.config import CONFIG_DIR

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = hydra_compose("config", overrides=[a for a in fixed if not a.startswith("hydra")],
                            return_hydra_config=True)
    params = OmegaConf.select(cfg, "hydra.sweeper.params") or {}
    GlobalHydra.instance().clear()
    return {str(k): str(v) for k, v in params.items()}


def _cluster_groups(args: list[str], fixed: list[str], launcher: str | None) -> list[list[str]]:
    """Swept cluster.* keys (from the command line or an experiment's hydra.sweeper.params) become
    one group of fixed overrides per combination; everything else is swept inside each group."""
    import itertools

    swept: dict[str, list[str]] = {}
    for k, v in _sweeper_params(fixed).items():
        if k.startswith("cluster.") and _is_sweep_value(v):
            swept[k] = v.split(",")
    given = {a.split("=", 1)[0] for a in args if "=" in a}
    for k in list(swept):
        if k in given and not _is_sweep_value(next(a for a in args if a.startswith(k + "=")).split("=", 1)[1]):
            del swept[k]  # fixed on the command line: the command line wins, as in Hydra
    for a in args:
        k, _, v = a.partition("=")
        if k.startswith("cluster.") and _is_sweep_value(v):
            swept[k] = v.split(",")
    if not swept:
        return [[]]
    if launcher != "submitit_slurm" and any(k == "cluster.nodes" and any(x.strip() != "1" for x in v)
                                            for k, v in swept.items()):
        raise UsageError(f"cluster.nodes={','.join(swept['cluster.nodes'])}: several nodes need "
                         "hydra/launcher=submitit_slurm; add cluster.nodes=1 to run the rest of the grid here")
    for a in list(args):
        if a.split("=", 1)[0] in swept:
            args.remove(a)
    keys = list(swept)
    return [[f"{k}={v.strip()}" for k, v in zip(keys, combo)] for combo in itertools.product(*swept.values())]


def _prepare_shared_files(cfg) -> None:
    """Make what every job of a sweep would otherwise build at once: the built-in dataset's shards and,
    when jobs evaluate with the domain extractor, its classifier."""
    from bench import data as bdata

    # a swept data.shards is not in cfg: then each job finds its own
    shards = bdata.configured_shards(cfg.data) if cfg.data.shards or cfg.data.name == "shapes" else None
    if shards and (cfg.eval.every or cfg.eval.final) and cfg.eval.extractor == "domain" \
            and not cfg.eval.classifier_path:
        from bench.evaluate import ensure_classifier

        ensure_classifier(shards, cfg.data.resolution)


def cmd_throughput(args: list[str]) -> int:
    """Burn-in, then timed steps of the real training step; img/s, time split, TFLOP/s, MFU, memory.
    `-m key=a,b,c` runs one measurement per combination."""
    import itertools
    import tempfile

    args = [a for a in args if a not in ("-m", "--multirun")]
    swept = [(a.split("=", 1)[0], a.split("=", 1)[1].split(",")) for a in args if _is_sweep_value(a.split("=", 1)[-1])]
    fixed = [a for a in args if not _is_sweep_value(a.split("=", 1)[-1])]
    results = []
    combos = list(itertools.product(*[[f"{k}={v}" for v in vals] for k, vals in swept])) if swept else [()]
    for i, combo in enumerate(combos):
        overrides = fixed + list(combo)
        if swept:  # one profile folder per measurement
            overrides = [f"{a}/{i}" if a.startswith("throughput.profile=") and a.split("=", 1)[1] not in ("", "null")
                         else a for a in overrides]
        # The trainer writes nothing here: benchmark() keeps no records and no checkpoints.
        results.append(_throughput_one(overrides, str(Path(tempfile.gettempdir()) / "gan-bench-throughput")))
    print(json.dumps(results if swept else results[0], indent=2))
    return 0


def _throughput_one(overrides: list[str], scratch: str) -> dict:
    from bench import telemetry
    from bench.config import validate
    from bench.loop import Trainer

    cfg = validate(compose(overrides), world_size=_world_size())
    trainer = Trainer(cfg, Path(scratch), quiet=True)
    t = cfg.train
    flop_per_step = trainer.flop_per_step()
    fake = cfg.throughput.data == "fake"
    windows = [trainer.benchmark(cfg.throughput.warmup if i == 0 else 0, cfg.throughput.steps, fake_data=fake)
               for i in range(cfg.throughput.repeats)]
    r = sorted(windows, key=lambda w: w["img_per_s"])[len(windows) // 2]  # the median window
    r["img_per_s_windows"] = [round(w["img_per_s"], 3) for w in windows]
    if cfg.throughput.profile:
        r["profile"] = _profile_window(trainer, cfg, Path(cfg.throughput.profile), fake)
    peak, source = telemetry.peak_tflops(trainer.device, t.precision, remeasure=True)
    tflops = flop_per_step * r["steps"] / r["seconds"] / 1e12  # per process
    out = {"overrides": overrides, "model": cfg.model.family, "resolution": cfg.data.resolution,
           "batch_size": t.batch_size, "accumulate": t.accumulate, "d_steps": t.d_steps, "precision": t.precision,
           "channels_last": trainer.channels_last, "device": str(trainer.device), "data": cfg.throughput.data,
           **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
           "GFLOP_per_step": flop_per_step / 1e9, "tflops": tflops, "peak_tflops": peak, "peak_source": source,
           "mfu": tflops / peak if peak == peak else None}
    split = " ".join(f"{k[:-3]} {out[k]:.0f}" for k in ("data_ms", "D_ms", "G_ms", "reg_ms", "telemetry_ms"))
    print(f"{cfg.model.family} {cfg.data.resolution}px batch {t.batch_size} {t.precision}"
          f"{' channels_last' if trainer.channels_last else ''}: {out['img_per_s']:.1f} img/s | "
          f"{out['step_ms']:.0f} ms/step ({split}) | {tflops:.3f} TFLOP/s = {100 * (out['mfu'] or 0):.1f}% of "
          f"{peak:.2f} ({source}) | peak mem {out['peak_mem_gb']:.2f} GB", file=sys.stderr, flush=True)
    return out


def _profile_window(trainer, cfg, out_dir: Path, fake: bool) -> dict:
    """One extra window of `throughput.steps` steps under torch.profiler, after the timed windows (the
    profiler's overhead never reaches the reported img/s). Writes ops.txt (self time by op, then by op and
    input shape) and trace.json (chrome://tracing, Perfetto) and prints the top ops."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if trainer.device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        trainer.benchmark(0, cfg.throughput.steps, fake_data=fake)
    sort = "self_device_time_total" if trainer.device.type == "cuda" else "self_cpu_time_total"
    by_op = prof.key_averages()
    by_shape = prof.key_averages(group_by_input_shape=True)
    tmp = out_dir / "ops.txt.tmp"
    tmp.write_text(f"# {cfg.throughput.steps} steps, self time by op\n{by_op.table(sort_by=sort, row_limit=40)}\n"
                   f"# by op and input shapes\n{by_shape.table(sort_by=sort, row_limit=40)}\n")
    tmp.replace(out_dir / "ops.txt")
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    share = {e.key: getattr(e, sort) for e in by_op}
    total = sum(share.values()) or 1.0
    conv = sum(v for k, v in share.items() if "convolution" in k) / total
    top = {k: v / total for k, v in sorted(share.items(), key=lambda kv: kv[1], reverse=True)[:10]}
    print(f"profile ({cfg.throughput.steps} steps) -> {out_dir}/ops.txt, trace.json; convolutions "
          f"{100 * conv:.0f}% of self time; top ops: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in top.items()),
          file=sys.stderr, flush=True)
    return {"dir": str(out_dir), "conv_share": conv, "top_ops": top}


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
    if not (run_dir / "config.yaml").exists():
        raise UsageError(f"run={run_dir}: not a gan-bench run directory (no config.yaml)")
    return run_dir


def cmd_eval(args: list[str]) -> int:
    """`bench eval train-classifier data.shards=...` or `bench eval run=DIR [which=best|last] [eval.*=...]`."""
    if args and args[0] == "train-classifier":
        from bench.classifier import train_classifier

        from bench.data import configured_shards

        cfg = compose(args[1:])
        info = train_classifier(configured_shards(cfg.data), resolution=cfg.data.resolution)
        print(json.dumps({k: v for k, v in info.items() if not isinstance(v, (list, dict)) or k == "class_names"},
                         indent=2, default=str))
        return 0
    from bench.evaluate import eval_run

    special, rest = _split_run_args(args, ("run", "which"))
    run_dir = _existing_run(special, "eval")
    _check_overrides_are_eval(rest, "eval")
    eval_run(run_dir, rest, which=special.get("which", "best"))
    return 0


def _check_overrides_are_eval(rest: list[str], command: str) -> None:
    from bench.config import EvalCfg

    for o in rest:
        key = o.split("=", 1)[0]
        if "=" not in o or not key.startswith("eval.") or key[5:] not in EvalCfg.__dataclass_fields__:
            raise UsageError(f"bench {command}: {o!r} is not an eval.* override; valid keys: "
                             + ", ".join(f"eval.{k}" for k in EvalCfg.__dataclass_fields__))


def cmd_truncation(args: list[str]) -> int:
    """`bench truncation run=DIR psi=[0.25,0.5,1.0] [eval.*=...]`: metrics per psi, CSV and plots."""
    from bench.evaluate import truncation_sweep

    special, rest = _split_run_args(args, ("run", "psi", "which"))
    run_dir = _existing_run(special, "truncation")
    _check_overrides_are_eval(rest, "truncation")
    try:
        psis = [float(p) for p in special.get("psi", "[0.25,0.5,0.75,1.0,1.5]").strip("[]").split(",") if p.strip()]
    except ValueError:
        raise UsageError(f"psi={special['psi']!r}: give a list of numbers, e.g. 'psi=[0.25,0.5,1.0]'") from None
    truncation_sweep(run_dir, psis, overrides_cfg=rest, which=special.get("which", "best"))
    return 0


def cmd_inspect(args: list[str]) -> int:
    import torch
    from omegaconf import OmegaConf

    import models
    from bench.config import validate
    from bench.telemetry import step_flops

    cfg = validate(compose(args))
    n_classes = cfg.model.n_classes or _dataset_classes(cfg)
    G, D = models.build(OmegaConf.to_container(cfg.model, resolve=True), cfg.data.resolution, n_classes)
    flops = step_flops(G, D, batch=2, n_classes=n_classes, device=torch.device("cpu"))
    out = {
        "model": cfg.model.family,
        "resolution": cfg.data.resolution,
        "n_classes": n_classes,
        "G_params": models.param_count(G),
        "D_params": models.param_count(D),
        "GFLOP_per_image": {"D_step": flops["D_step"] / 1e9, "G_step": flops["G_step"] / 1e9,
                            "total": (flops["D_step"] * cfg.train.d_steps + flops["G_step"]) / 1e9},
        "d_steps": cfg.train.d_steps,
        "flop_convention": "torch.utils.flop_counter, multiply-add = 2; D step = G forward (no_grad) + D "
                           "forward/backward on real and fake; G step = G and D forward, backward into G with "
                           "D frozen (no D weight gradients); regularisers excluded",
        "arch": OmegaConf.to_container(cfg.model, resolve=True),
    }
    print(json.dumps(out, indent=2))
    return 0


def _dataset_classes(cfg) -> int:
    from bench import data as bdata

    if cfg.data.shards:
        _, manifest = bdata.resolve_shards(cfg.data.shards)
        if manifest:
            return len(manifest["class_names"])
        raise UsageError(f"data.shards={cfg.data.shards!r} has no manifest.json; set model.n_classes")
    return len(bdata.SHAPES_CLASSES)


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
    from bench import data as bdata

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
    try:
        ints = {k: int(kv[k]) for k in ("resolution", "num_samples", "samples_per_shard", "seed") if k in kv}
    except ValueError as exc:
        raise UsageError(f"bad number: {exc}") from None
    kwargs = dict(out=kv["out"], source=source, folder=kv.get("folder"), **ints)
    if "overwrite" in kv:
        kwargs["overwrite"] = kv["overwrite"].lower() in ("1", "true", "yes")
    manifest = bdata.make_shards(**kwargs)
    print(json.dumps({k: manifest[k] for k in ("num_samples", "resolution", "class_names")} |
                     {"shards": len(manifest["shards"]), "out": str(kv["out"])}, indent=2))
    return 0


def cmd_report(args: list[str]) -> int:
    from bench import report  # reads run directories only: no torch import

    return report.main(args)


COMMANDS = {"train": cmd_train, "inspect": cmd_inspect, "data": cmd_data, "throughput": cmd_throughput,
            "eval": cmd_eval, "truncation": cmd_truncation, "report": cmd_report}


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
    except _user_errors() as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
