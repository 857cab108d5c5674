"""A training tick records the process's CPU utilisation (perf/cpu_util), and a run that shares its cores with
another CPU-bound process says so once on the terminal (docs/architecture.md, "Telemetry")."""
import json
import os
import subprocess
import sys
import time

from bench.cli import main
from bench.metrics_registry import CONTENDED, CPU_UTIL
from bench.train.telemetry import TickClock
from conftest import TINY


def _counted(clock: TickClock, work) -> None:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    work()
    clock.count_step(time.process_time() - cpu0, time.perf_counter() - wall0)


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_utilisation_is_the_steps_cpu_time_over_their_wall_time_and_threads():
    clock = TickClock()
    _counted(clock, lambda: time.sleep(0.3))  # a step that used no CPU: near 0 whatever the machine's load
    assert clock.cpu_utilisation(1) < 0.3
    _counted(clock, lambda: _spin(0.3))  # CPU-bound on one thread: some utilisation (its level depends on the load)
    time.sleep(0.3)  # outside the counted steps (a checkpoint, an evaluation): not in the utilisation
    busy = clock.cpu_utilisation(1)
    assert 0.0 < busy <= 1.1  # process time may run a hair ahead of the wall clock
    _counted(clock, lambda: _spin(0.2))
    assert abs(clock.cpu_utilisation(4) * 4 - busy) < 0.6  # the same work over 4 threads: a quarter as busy
    assert clock.cpu_utilisation(1) != clock.cpu_utilisation(1)  # no counted step since: nan


def test_a_run_beside_cpu_bound_neighbours_is_marked(tmp_path, capfd):
    """Two spinning processes per core leave the training a fraction of its threads' time: its ticks record a
    utilisation below CONTENDED and one warning line says so."""
    cores = len(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * cores)]
    try:
        run = tmp_path / "run"
        assert main(["train", f"run.dir={run}", *TINY, "model=dcgan", "data.num_samples=64",
                     "data.samples_per_shard=16", "train.steps=6", "train.batch_size=8", "train.precision=fp32"]) == 0
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    utils = [r[CPU_UTIL] for r in rows]
    assert len(utils) == 6 and min(utils) < CONTENDED, utils
    out = capfd.readouterr().out
    assert out.count("another CPU-bound process, or its own data workers, probably shares the cores") == 1


def test_bench_throughput_marks_windows_taken_beside_cpu_bound_neighbours(capsys):
    """`bench throughput` records each timed window's CPU utilisation; beside two spinning processes per core a
    window falls below CONTENDED, the JSON says "contended": true and one warning line says why."""
    from conftest import TINY as tiny

    args = ["throughput", *[a for a in tiny if not a.startswith("train.tick_every")], "model=dcgan",
            "train.batch_size=8", "throughput.warmup=1", "throughput.steps=4", "throughput.repeats=2",
            "train.precision=fp32"]
    cores = len(os.sched_getaffinity(0))
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2 * cores)]
    try:
        assert main(args) == 0
    finally:
        for p in spinners:
            p.kill()
            p.wait()
    cap = capsys.readouterr()
    out = json.loads(cap.out)
    assert len(out["cpu_util_windows"]) == 2 and all(0.0 < u <= 1.1 for u in out["cpu_util_windows"])
    assert out["contended"] is True and min(out["cpu_util_windows"]) < CONTENDED, out["cpu_util_windows"]
    assert cap.err.count("another CPU-bound process probably shares the cores") == 1
    assert out["cpu_util"] in out["cpu_util_windows"] or round(out["cpu_util"], 3) in out["cpu_util_windows"]
