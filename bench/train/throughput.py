"""`bench throughput`: burn-in, then timed steps of the real training step; img/s, the step-time split,
TFLOP/s, MFU and memory as JSON (docs/architecture.md, "The rooms"). `-m key=a,b,c` runs one
measurement per combination. Nothing is written to a run directory: no records, no checkpoints.
"""
from __future__ import annotations

import itertools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench import device as bdevice
from bench import rundir
from bench.config import compose, prepare, validate
from bench.overrides import is_sweep_value, sweep_values
from bench.train.records import math_switches
from bench.metrics_registry import CONTENDED
from bench.train.telemetry import TIMED_SECTIONS, Collector, Stopwatch
from bench.train.loop import DataStream, Run, TrainState, compile_facts, compiled, flop_per_step, setup, train_step


def cmd_throughput(args: list[str]) -> int:
    args = [a for a in args if a not in ("-m", "--multirun")]
    swept = [sweep_values(a) for a in args if is_sweep_value(a.split("=", 1)[-1])]
    fixed = [a for a in args if not is_sweep_value(a.split("=", 1)[-1])]
    results = []
    combos = list(itertools.product(*swept)) if swept else [()]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    for combo in combos:  # every combination is checked before the first is measured
        validate(compose(fixed + list(combo)), world_size=world)
    for i, combo in enumerate(combos):
        overrides = fixed + list(combo)
        if swept:  # one profile folder per measurement
            overrides = [f"{a}/{i}" if a.startswith("throughput.profile=") and a.split("=", 1)[1] not in ("", "null")
                         else a for a in overrides]
        # The trainer writes nothing here: benchmark() keeps no records and no checkpoints.
        results.append(_throughput_one(overrides, str(Path(tempfile.gettempdir()) / "gan-bench-throughput")))
    print(json.dumps(results if swept else results[0], indent=2))
    return 0


class FakeBatches:
    """One fixed random batch already on the device (no data reading, no decode)."""

    def __init__(self, run: Run):
        t, res, device = run.cfg.train, run.cfg.data.resolution, run.device
        gen = torch.Generator(device=device).manual_seed(0)
        real = torch.rand(t.batch_size, 3, res, res, device=device, generator=gen).mul_(2).sub_(1)
        self.real = real.to(memory_format=run.fmt)
        self.labels = torch.randint(0, run.n_data_classes, (t.batch_size,), device=device, generator=gen)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.real, self.labels

    def close(self) -> None:
        pass


def benchmark(run: Run, state: TrainState, warmup: int, steps: int, fake_data: bool = True) -> dict:
    """Burn in, then time `steps` G steps of the real training step (loop.train_step), fed by FakeBatches or
    the shard stream (no records, no checkpoints)."""
    device = run.device
    watch = Stopwatch(device)
    if fake_data:
        data = FakeBatches(run)
    else:
        data = DataStream(run)
        data.restart(state)
    collector = Collector(device)
    first_step_s = None
    with collector:
        for i in range(warmup):
            t0 = time.perf_counter()
            train_step(run, state, data, watch)
            if i == 0:  # with train.compile: the compile, apart from the timed windows
                if device.type == "cuda":
                    torch.cuda.synchronize()
                first_step_s = time.perf_counter() - t0
        collector.tick()
        watch.take()
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(device)
        t0, cpu0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            train_step(run, state, data, watch)
        if device.type == "cuda":
            torch.cuda.synchronize()
        elapsed, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        times = watch.take()
        collector.tick()
    data.close()
    return {"steps": steps, "seconds": elapsed, "img_per_s": steps * run.eff_batch / elapsed,
            "first_step_s": first_step_s,
            "step_ms": 1000 * elapsed / steps,
            **{f"{k}_ms": 1000 * times.get(k, 0.0) / steps for k in TIMED_SECTIONS},
            "peak_mem_gb": bdevice.peak_memory_gb(device),
            # the steps' process CPU time over their wall time x torch threads (CPU only; TickClock's perf/cpu_util)
            "cpu_util": cpu / (elapsed * torch.get_num_threads()) if device.type == "cpu" else None}


def steps_only(cfg):
    """The config for timing training steps only (this command, scripts/compare_biggan_pytorch.py): no evaluation
    and no diversity probe, so set-up trains no domain classifier (on the built-in set's first use that would take
    minutes before the first timed step)."""
    cfg.eval.final, cfg.eval.every, cfg.telemetry.diversity_every = False, 0, 0
    return cfg


def _throughput_one(overrides: list[str], scratch: str) -> dict:
    cfg = steps_only(prepare(compose(overrides), world_size=int(os.environ.get("WORLD_SIZE", "1"))))
    run, state = setup(cfg, Path(scratch), quiet=True)
    t = cfg.train
    flops = flop_per_step(run, state)
    fake = cfg.throughput.data == "fake"
    windows = [benchmark(run, state, cfg.throughput.warmup if i == 0 else 0, cfg.throughput.steps, fake_data=fake)
               for i in range(cfg.throughput.repeats)]
    first_step_s = windows[0]["first_step_s"] or 0.0  # the first burn-in step: with train.compile, the compile
    for w in windows:
        w.pop("first_step_s")
    r = sorted(windows, key=lambda w: w["img_per_s"])[len(windows) // 2]  # the median window
    r["img_per_s_windows"] = [round(w["img_per_s"], 3) for w in windows]
    utils = [w["cpu_util"] for w in windows if w["cpu_util"] is not None]
    r["cpu_util_windows"] = [round(u, 3) for u in utils]
    r["contended"] = bool(utils) and min(utils) < CONTENDED  # a window beside another CPU-bound process
    if cfg.throughput.profile:
        r["profile"] = _profile_window(run, state, cfg, Path(cfg.throughput.profile), fake)
    peak, source = bdevice.peak_tflops(run.device, t.precision, remeasure=True)
    tflops = flops * r["steps"] / r["seconds"] / 1e12  # per process
    out = {"overrides": overrides, "model": cfg.model.family, "resolution": cfg.data.resolution,
           "batch_size": t.batch_size, "accumulate": t.accumulate, "d_steps": t.d_steps, "precision": t.precision,
           "channels_last": run.channels_last, **math_switches(cfg, run.device, state.opt["G"]), "device": str(run.device),
           "compile": str(t.compile).lower(), "compile_backend": t.compile_backend,
           **(compile_facts(first_step_s) if compiled(cfg) else {}),
           "data": cfg.throughput.data,
           **{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()},
           "GFLOP_per_step": flops / 1e9, "tflops": tflops, "peak_tflops": peak, "peak_source": source,
           "mfu": tflops / peak if peak == peak else None}
    split = " ".join(f"{k[:-3]} {out[k]:.0f}" for k in (f"{s}_ms" for s in TIMED_SECTIONS))
    print(f"{cfg.model.family} {cfg.data.resolution}px batch {t.batch_size} {t.precision}"
          f"{' channels_last' if run.channels_last else ''}: {out['img_per_s']:.1f} img/s | "
          f"{out['step_ms']:.0f} ms/step ({split}) | {tflops:.3f} TFLOP/s = {100 * (out['mfu'] or 0):.1f}% of "
          f"{peak:.2f} ({source}) | peak mem {out['peak_mem_gb']:.2f} GB"
          + (f" | compile={out['compile']} ({t.compile_backend}): first step {out['compile_s']:.1f} s, "
             f"{out['compile_graphs']} graphs, {out['compile_graph_breaks']} breaks" if compiled(cfg) else ""),
          file=sys.stderr, flush=True)
    if out["contended"]:
        print(f"warning: a timed window's steps got {min(utils):.0%} of the CPU time of {torch.get_num_threads()} "
              f"thread(s) (cpu_util_windows {r['cpu_util_windows']}): another CPU-bound process probably shares the "
              f"cores, so these img/s are not clean figures (\"contended\": true)", file=sys.stderr, flush=True)
    return out


def _profile_window(run: Run, state: TrainState, cfg, out_dir: Path, fake: bool) -> dict:
    """One extra window of `throughput.steps` steps under torch.profiler, after the timed windows (the
    profiler's overhead never reaches the reported img/s). Writes ops.txt (self time by op, then by op and
    input shape) and trace.json (chrome://tracing, Perfetto) and prints the top ops."""
    from torch.profiler import ProfilerActivity, profile

    out_dir.mkdir(parents=True, exist_ok=True)
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if run.device.type == "cuda" else [])
    with profile(activities=acts, record_shapes=True) as prof:
        benchmark(run, state, 0, cfg.throughput.steps, fake_data=fake)
    sort = "self_device_time_total" if run.device.type == "cuda" else "self_cpu_time_total"
    by_op = prof.key_averages()
    by_shape = prof.key_averages(group_by_input_shape=True)
    rundir.atomic_write(out_dir / "ops.txt",
                        f"# {cfg.throughput.steps} steps, self time by op\n{by_op.table(sort_by=sort, row_limit=40)}\n"
                        f"# by op and input shapes\n{by_shape.table(sort_by=sort, row_limit=40)}\n")
    prof.export_chrome_trace(str(out_dir / "trace.json"))
    share = {e.key: getattr(e, sort) for e in by_op}
    total = sum(share.values()) or 1.0
    conv = sum(v for k, v in share.items() if "convolution" in k) / total
    top = {k: v / total for k, v in sorted(share.items(), key=lambda kv: kv[1], reverse=True)[:10]}
    print(f"profile ({cfg.throughput.steps} steps) -> {out_dir}/ops.txt, trace.json; convolutions "
          f"{100 * conv:.0f}% of self time; top ops: " + ", ".join(f"{k} {100 * v:.1f}%" for k, v in top.items()),
          file=sys.stderr, flush=True)
    return {"dir": str(out_dir), "conv_share": conv, "top_ops": top}
