"""Report scalars by name from anywhere; aggregate once per tick (docs/architecture.md, "Telemetry").
`report(name, value)` accumulates tensors on their device without a host sync; `Collector.tick()` does ONE
all-reduce across ranks and returns a flat dict of means. Also here: the step-time stopwatch, FLOP counting and
MFU, and sigma telemetry; the collapse detector is bench/train/collapse.py."""
from __future__ import annotations

import sys
import time
from collections import defaultdict
from typing import Callable, Optional

import torch

from bench import device as bdevice

_active: Optional["Collector"] = None


def report(name: str, value) -> None:
    """Add one observation of `name` to the current tick (no-op when no collector is active)."""
    if _active is not None:
        _active.add(name, value)


class Collector:
    def __init__(self, device: torch.device, reduce_fn=None):
        self.device = device
        self.reduce_fn = reduce_fn  # callable(tensor) -> tensor summed over ranks, or None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = defaultdict(int)
        self._prev: Optional[Collector] = None

    def __enter__(self):
        global _active
        self._prev, _active = _active, self
        return self

    def __exit__(self, *exc):
        global _active
        _active = self._prev

    def add(self, name: str, value) -> None:
        v = value.detach().float().reshape(()) if torch.is_tensor(value) else torch.tensor(float(value))
        v = v.to(self.device)
        self._sums[name] = self._sums[name] + v if name in self._sums else v
        self._counts[name] += 1

    def tick(self) -> dict[str, float]:
        """Means over the tick, averaged over ranks. One collective; one host sync."""
        if not self._sums:
            return {}
        names = sorted(self._sums)
        sums = torch.stack([self._sums[n] for n in names])
        counts = torch.tensor([float(self._counts[n]) for n in names], device=sums.device)
        both = torch.cat([sums, counts])
        if self.reduce_fn is not None:
            both = self.reduce_fn(both)
        both = both.cpu().tolist()  # host sync: once per tick
        k = len(names)
        self._sums.clear()
        self._counts.clear()
        return {n: (both[i] / both[k + i] if both[k + i] else float("nan")) for i, n in enumerate(names)}


class Stopwatch:
    """Accumulates wall time per named section. On CUDA the section boundaries synchronise, so only
    time sections when the numbers will be reported (the loop times every step: GPU kernels are
    queued asynchronously, and a sync per phase costs well under 1% at realistic batch sizes)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.totals: dict[str, float] = defaultdict(float)
        self._t: Optional[float] = None
        self._name: Optional[str] = None

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()  # host sync: attribute queued GPU work to the right section
        return time.perf_counter()

    def start(self, name: str) -> None:
        now = self._now()
        if self._name is not None:
            self.totals[self._name] += now - self._t
        self._name, self._t = name, now

    def stop(self) -> None:
        if self._name is not None:
            self.totals[self._name] += self._now() - self._t
        self._name = None

    def take(self) -> dict[str, float]:
        out = dict(self.totals)
        self.totals.clear()
        return out


class TickClock:
    """Wall time of the current tick and of the whole run. Time set aside (checkpoints, sample grids,
    evaluations, a peak re-measurement) is kept out of the tick; it still counts in the run's wall time."""

    def __init__(self, run_seconds: float = 0.0):
        now = time.perf_counter()
        self.t0, self.steps, self.run_t0 = now, 0, now - run_seconds
        self.busy_cpu = self.busy_wall = 0.0  # process CPU / wall seconds of the training steps since the last tick

    def lap(self) -> tuple[float, int, float]:
        """(seconds of this tick, its G steps, the run's wall seconds); the next tick starts now."""
        now = time.perf_counter()
        out = (now - self.t0, self.steps, now - self.run_t0)
        self.t0, self.steps = now, 0
        return out

    def set_aside(self, seconds: float) -> None:
        self.t0 += seconds

    def count_step(self, cpu_s: float, wall_s: float) -> None:
        """One training step's process CPU and wall seconds (checkpoints, grids, evaluations and the diversity
        probe run outside the steps, so they never count)."""
        self.busy_cpu += cpu_s
        self.busy_wall += wall_s

    def cpu_utilisation(self, threads: int) -> float:
        """This process's CPU time in the training steps since the last call over their wall time x its torch
        threads: about 1 when training has the cores to itself, about 0.5 when a second CPU-bound process shares
        them (the OS splits the cores); a step waiting on its data lowers it too. nan without a counted step."""
        util = self.busy_cpu / (self.busy_wall * max(threads, 1)) if self.busy_wall > 0 else float("nan")
        self.busy_cpu = self.busy_wall = 0.0
        return util

    def wall(self) -> float:
        return time.perf_counter() - self.run_t0


TIMED_SECTIONS = ("data", "D", "G", "reg", "telemetry")  # the step-time split, in time/<name>_ms


def grad_norm(params) -> torch.Tensor:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))


def format_eta(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def tick_line(row: dict, steps: int, eta_s: float) -> str:
    """The terminal's line for one tick of metrics.jsonl."""
    losses = " ".join(f"{k.split('/')[1]} {row[k]:.3f}" for k in ("loss/D", "loss/G", "loss/R1", "loss/GP") if k in row)
    return (f"step {row['step']:>6d}/{steps} | {row['throughput/img_per_s']:7.1f} img/s | "
            f"{row['time/step_ms']:7.1f} ms/step | {losses} | ETA {format_eta(eta_s)}")


def eval_line(step: int, metrics: dict, seconds: float) -> str:
    """The terminal's line for one evaluation during training."""
    shown = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items()
                     if k.startswith("eval/") and isinstance(v, float))
    return (f"eval at step {step} ({metrics.get('extractor')}, {metrics.get('num_samples')} samples, "
            f"{seconds:.0f} s): {shown}")


def step_flops(G, D, batch: int, n_classes: int, device: torch.device) -> dict[str, float]:
    """FLOPs per image of one D step and one G step, counted with torch.utils.flop_counter
    (multiply-add = 2 FLOP). D step: G forward under no_grad, D forward/backward on real and fake.
    G step: G forward, D forward, backward through D into G. Regularisers are not included."""
    from torch.utils.flop_counter import FlopCounterMode

    # a net compiled in place (train.compile) is counted through its eager forward: the counter sees the same ops
    g, d = (net.forward if getattr(net, "_compiled_call_impl", None) is not None else net for net in (G, D))
    res = G.resolution
    z = torch.randn(batch, G.z_dim, device=device)
    y = torch.randint(0, n_classes, (batch,), device=device)
    real = torch.randn(batch, 3, res, res, device=device)
    was_training = (G.training, D.training)
    G.train()
    D.train()
    with FlopCounterMode(display=False) as fc_d:
        with torch.no_grad():
            fake = g(z, y)
        (d(real, y).sum() + d(fake, y).sum()).backward()
    with FlopCounterMode(display=False) as fc_g:
        D.requires_grad_(False)
        d(g(z, y), y).sum().backward()
        D.requires_grad_(True)
    for net in (G, D):
        net.zero_grad(set_to_none=True)
    G.train(was_training[0])
    D.train(was_training[1])
    return {"D_step": fc_d.get_total_flops() / batch, "G_step": fc_g.get_total_flops() / batch}


class Mfu:
    """perf/tflops and perf/mfu of a tick: FLOP per step (`count`, called once) over the device's peak
    TFLOP/s (bench.device.peak_tflops, looked up once). `count=None` (telemetry.mfu=false) or a model
    the FLOP counter cannot trace: no perf/* keys."""

    def __init__(self, device: torch.device, precision: str, count: Optional[Callable[[], float]]):
        self.device, self.precision, self.count = device, precision, count
        self.flops: Optional[float] = None
        self.peak: Optional[float] = None  # None until budget() ran; nan = no MFU
        self.rechecked = False

    def budget(self) -> tuple[Optional[float], float]:
        """(FLOP per step, peak TFLOP/s), worked out on the first call; (None, nan) when off."""
        if self.peak is None:
            self.peak = float("nan")
            if self.count is not None:
                try:
                    self.flops = self.count()
                    self.peak, _ = bdevice.peak_tflops(self.device, self.precision)
                except Exception as exc:  # MFU is telemetry: a model the counter cannot trace still trains
                    print(f"warning: FLOP count failed ({exc.__class__.__name__}: {exc}); no perf/mfu",
                          file=sys.stderr)
        return (self.flops if self.peak == self.peak else None), self.peak

    def add_to(self, row: dict, steps: int, tick_s: float) -> float:
        """Add perf/tflops (per process) and perf/mfu to a tick's row. Returns the seconds spent
        re-measuring the peak, which the caller keeps out of the next tick's timing."""
        flop_per_step, peak = self.budget()
        if not flop_per_step:
            return 0.0
        aside = 0.0
        row["perf/tflops"] = flop_per_step * steps / tick_s / 1e12
        if row["perf/tflops"] > peak and not self.rechecked:
            # above the cached peak: that figure was measured on a busy machine; measure again
            self.rechecked = True
            t0 = time.perf_counter()
            peak, _ = bdevice.peak_tflops(self.device, self.precision, remeasure=True)
            aside = time.perf_counter() - t0
            self.peak = peak
        row["perf/mfu"] = row["perf/tflops"] / peak if peak == peak and peak > 0 else float("nan")
        return aside


def report_sigmas(net_name: str, net, k: int = 3) -> None:
    """sigma/<net>/<layer>/{s0,s1,s2,s0_over_s1,fro} for every weight layer (raw weights, before any
    spectral normalisation), found by module type. 0-d tensors: no host sync here."""
    from bench.models.spectral import sigma_stats

    for layer, stats in sigma_stats(net, k=k).items():
        for stat, value in stats.items():
            report(f"sigma/{net_name}/{layer}/{stat}", value)
