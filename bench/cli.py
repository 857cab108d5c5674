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
    from models import ModelConfigError

    return (ConfigError, DataError, ModelConfigError, UsageError)


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
    extra = [f"hydra.sweep.dir={sweep_dir}"]
    launcher = _launcher(args)
    if launcher:
        extra += launch.launcher_overrides(base.cluster, launcher, sweep_dir)

    @hydra.main(config_path=str(CONFIG_DIR), config_name="config", version_base="1.3")
    def job(cfg):
        import traceback

        hc = HydraConfig.get()
        overrides = list(hc.overrides.task)
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
                launch.write_index_entry(Path(sweep_dir), hc.job.num, entry)
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
            launch.write_index_entry(Path(sweep_dir), hc.job.num, entry)
        if entry["state"] == "interrupted" and launch.slurm_job_id():
            # Checkpointed after a signal: leave without a result, so submitit keeps waiting for the
            # requeued job (Slurm requeues on preemption / scontrol requeue; SIGUSR2 requeued itself).
            raise SystemExit(0)
        return entry["state"]

    sys.argv = ["bench", "-m"] + args + extra
    job()
    rows = launch.collect_index(Path(sweep_dir))
    launch.print_sweep(rows, Path(sweep_dir))
    return 0 if rows and all(r.get("state") in ("completed", "collapsed") for r in rows) else 1


def cmd_throughput(args: list[str]) -> int:
    """Burn-in, then timed steps of the real training step; img/s, time split, TFLOP/s, MFU, memory.
    `-m key=a,b,c` runs one measurement per combination."""
    import itertools
    import tempfile

    args = [a for a in args if a not in ("-m", "--multirun")]
    swept = [(a.split("=", 1)[0], a.split("=", 1)[1].split(",")) for a in args if _is_sweep_value(a.split("=", 1)[-1])]
    fixed = [a for a in args if not _is_sweep_value(a.split("=", 1)[-1])]
    results = []
    for combo in itertools.product(*[[f"{k}={v}" for v in vals] for k, vals in swept]) if swept else [()]:
        # The trainer writes nothing here: benchmark() keeps no records and no checkpoints.
        results.append(_throughput_one(fixed + list(combo), str(Path(tempfile.gettempdir()) / "gan-bench-throughput")))
    print(json.dumps(results if swept else results[0], indent=2))
    return 0


def _throughput_one(overrides: list[str], scratch: str) -> dict:
    import copy

    from bench import telemetry
    from bench.config import validate
    from bench.loop import Trainer

    cfg = validate(compose(overrides), world_size=_world_size())
    trainer = Trainer(cfg, Path(scratch), quiet=True)
    t = cfg.train
    flops = telemetry.step_flops(copy.deepcopy(trainer.G), copy.deepcopy(trainer.D), batch=min(t.batch_size, 4),
                                 n_classes=trainer.n_data_classes, device=trainer.device)
    flop_per_step = (flops["D_step"] * t.d_steps + flops["G_step"]) * t.batch_size * t.accumulate
    r = trainer.benchmark(cfg.throughput.warmup, cfg.throughput.steps, fake_data=cfg.throughput.data == "fake")
    peak, source = telemetry.peak_tflops(trainer.device, t.precision)
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


COMMANDS = {"train": cmd_train, "inspect": cmd_inspect, "data": cmd_data, "throughput": cmd_throughput}


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
