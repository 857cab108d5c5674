"""A training tick records the process's CPU utilisation (perf/cpu_util), and a run that shares its cores with
another CPU-bound process says so once on the terminal (docs/architecture.md, "Telemetry")."""
import json
import os
import subprocess
import sys
import time

from bench.cli import main
from bench.train.telemetry import CONTENDED, CPU_UTIL, TickClock
from conftest import TINY


def test_utilisation_is_cpu_time_over_wall_time_and_threads():
    clock = TickClock()
    time.sleep(0.3)  # no CPU used: whatever the machine's load, the utilisation is near 0
    assert clock.cpu_utilisation(1) < 0.3
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:  # CPU-bound on one thread: some utilisation (its level depends on the load)
        pass
    busy = clock.cpu_utilisation(1)
    assert 0.0 < busy <= 1.1  # process time may run a hair ahead of the wall clock


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
    assert out.count("another CPU-bound process is probably sharing the cores") == 1
