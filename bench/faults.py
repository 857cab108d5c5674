"""The fault tests' hook (docs/architecture.md, "Faults"). GAN_BENCH_FAULT=<rank>:<step>[:<kind>[:<seconds>]]
makes that rank, at that (1-based) step:
- raise (kind step, the default; checkpoint; or eval: during its part of that step's evaluation, its share of
  the samples with several ranks);
- hang in the step (hang), as a rank that stops answering: its peers wait dist.timeout_s;
- stall inside that step's checkpoint write, its bytes in the temp file (stall), or, as the evaluation
  watcher, inside its evaluation of that step (watchstall; rank 0), so a test can kill it there;
- take longer over that step's evaluation (slow: 8 s, or the seconds given).
Nothing sets it outside the tests. A module of its own: training and the evaluation watcher both call it, and
bench.eval never imports bench.train.
"""
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
