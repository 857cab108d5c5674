"""The fault tests' hook: GAN_BENCH_FAULT=<rank>:<step>[:<kind>[:<seconds>]] makes that rank fail, hang, stall or
slow down at that (1-based) step (docs/architecture.md, "Faults"). Nothing sets it outside the tests. A module
of its own: training and the evaluation watcher both call it, and bench.eval never imports bench.train."""
from __future__ import annotations

import os
import time

FAULT_ENV = "GAN_BENCH_FAULT"
STALLS = {("hang", "step"), ("stall", "checkpoint_write"), ("watchstall", "watch")}


def injected_fault(rank: int, step: int, where: str = "step") -> None:
    """Raise, stall or slow down when GAN_BENCH_FAULT names this rank, this step and this place."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    parts = spec.split(":")
    kind = parts[2] if len(parts) > 2 else "step"
    if int(parts[0]) != rank or int(parts[1]) != step:
        return
    if (kind, where) in STALLS:
        time.sleep(10**6)
    if (kind, where) == ("slow", "eval"):
        time.sleep(float(parts[3]) if len(parts) > 3 else 8)
    if kind == where:
        raise RuntimeError(f"injected fault ({FAULT_ENV}={spec}) on rank {rank} at step {step} during {where}")
