"""Report scalars by name from anywhere; aggregate once per tick.

`report(name, value)` is cheap: tensors are accumulated on their device without a host sync.
`Collector.tick()` stacks everything, does ONE all-reduce across ranks, and returns a flat dict of
means. Names are `Group/sub/name` with units where they have them (see DESIGN.md).
"""
from __future__ import annotations

import os
import resource
import sys
import time
from collections import defaultdict
from typing import Optional

import torch

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
        self._t = None
        self._name = None

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


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return kb / (2**30 if sys.platform == "darwin" else 2**20)


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


def step_flops(G, D, batch: int, n_classes: int, device: torch.device) -> dict[str, float]:
    """FLOPs per image of one D step and one G step, counted with torch.utils.flop_counter
    (multiply-add = 2 FLOP). D step: G forward under no_grad, D forward/backward on real and fake.
    G step: G forward, D forward, backward through D into G. Regularisers are not included."""
    from torch.utils.flop_counter import FlopCounterMode

    res = G.resolution
    z = torch.randn(batch, G.z_dim, device=device)
    y = torch.randint(0, n_classes, (batch,), device=device)
    real = torch.randn(batch, 3, res, res, device=device)
    was_training = (G.training, D.training)
    G.train()
    D.train()
    with FlopCounterMode(display=False) as fc_d:
        with torch.no_grad():
            fake = G(z, y)
        (D(real, y).sum() + D(fake, y).sum()).backward()
    with FlopCounterMode(display=False) as fc_g:
        D.requires_grad_(False)
        D(G(z, y), y).sum().backward()
        D.requires_grad_(True)
    for net in (G, D):
        net.zero_grad(set_to_none=True)
    G.train(was_training[0])
    D.train(was_training[1])
    return {"D_step": fc_d.get_total_flops() / batch, "G_step": fc_g.get_total_flops() / batch}


def report_sigmas(net_name: str, net, k: int = 3) -> None:
    """sigma/<net>/<layer>/{s0,s1,s2,s0_over_s1,fro} for every weight layer (raw weights, before any
    spectral normalisation), found by module type. 0-d tensors: no host sync here."""
    from models.spectral import sigma_stats

    for layer, stats in sigma_stats(net, k=k).items():
        for stat, value in stats.items():
            report(f"sigma/{net_name}/{layer}/{stat}", value)


class CollapseDetector:
    """Flags training collapse from the per-tick records.

    Signals (any one fires; all but `nonfinite` are ignored during the first `warmup` steps, where
    the losses and weights move fast from their initial values):
      sigma:      D's largest sigma0 over layers exceeds `sigma_factor` x its minimum over the last
                  `window` steps (BigGAN: collapse comes with an explosion of D's top singular values);
      divergence: |loss/G - loss/D| exceeds `loss_gap` (the losses run apart: hinge and logistic
                  losses stay within a few units in healthy training; raise it for WGAN);
      nonfinite:  any loss or logit mean is NaN or inf;
      fid:        an evaluation's FID exceeds `fid_factor` x the best FID so far.
    """

    def __init__(self, sigma_factor: float = 2.0, window: int = 50, loss_gap: float = 50.0,
                 fid_factor: float = 1.5, warmup: int = 20):
        self.sigma_factor, self.window, self.loss_gap, self.fid_factor = sigma_factor, window, loss_gap, fid_factor
        self.warmup = warmup
        self.sigma_hist: list[tuple[int, float]] = []
        self.gap_hist: list[tuple[int, float]] = []
        self.best_fid = float("inf")
        self.collapse_step: Optional[int] = None
        self.reason: Optional[str] = None

    def _trim(self, hist, step):
        while hist and hist[0][0] < step - self.window:
            hist.pop(0)

    def flag(self, step: int, reason: str) -> str:
        """Record a collapse found outside the detector (a run that diverged); the earliest one is kept."""
        if self.collapse_step is None or step < self.collapse_step:
            self.collapse_step, self.reason = step, reason
        return reason

    def _flag(self, step: int, reason: str) -> str:
        if self.collapse_step is None:
            self.collapse_step, self.reason = step, reason
        return reason

    def update(self, row: dict) -> Optional[str]:
        """Feed one metrics row; returns the reason if a collapse signal fires at this tick."""
        import math

        step = int(row["step"])
        watched = [v for k, v in row.items() if k.startswith(("loss/", "D/")) and isinstance(v, float)]
        if any(not math.isfinite(v) for v in watched):
            return self._flag(step, "nonfinite")
        s0 = [v for k, v in row.items() if k.startswith("sigma/D/") and k.endswith("/s0")]
        fired = None
        warm = step > self.warmup
        if s0:
            top = max(s0)
            self.sigma_hist.append((step, top))
            self._trim(self.sigma_hist, step)
            lo = min(v for _, v in self.sigma_hist)
            if warm and lo > 0 and top > self.sigma_factor * lo:
                fired = self._flag(step, f"sigma: D sigma0 {top:.3g} > {self.sigma_factor} x {lo:.3g}")
        if warm and "loss/G" in row and "loss/D" in row:
            gap = abs(row["loss/G"] - row["loss/D"])
            if gap > self.loss_gap:
                fired = fired or self._flag(step, f"divergence: |loss/G - loss/D| = {gap:.3g} > {self.loss_gap}")
        return fired

    def update_fid(self, step: int, fid: float) -> Optional[str]:
        import math

        if not math.isfinite(fid):
            return self._flag(step, "nonfinite FID")
        if fid > self.fid_factor * self.best_fid:
            return self._flag(step, f"fid: {fid:.3g} > {self.fid_factor} x best {self.best_fid:.3g}")
        self.best_fid = min(self.best_fid, fid)
        return None

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("sigma_hist", "gap_hist", "best_fid", "collapse_step", "reason")}

    def load_state_dict(self, s: dict) -> None:
        for k, v in s.items():
            setattr(self, k, v)


# Dense peak TFLOP/s of known GPUs by dtype (vendor datasheets; SXM parts; fp32 = without TF32).
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "V100": {"bf16": 125.0, "fp16": 125.0, "fp32": 15.7},  # no bf16 tensor cores: fp16 figure
}


def _cache_dir():
    import os
    from pathlib import Path

    return Path(os.environ.get("GAN_BENCH_CACHE") or Path.home() / ".cache" / "gan-bench")


def _best_rate(fn, flop: float, seconds: float, trials: int = 3) -> float:
    """Best FLOP/s over `trials` timed windows of `fn` (a busy neighbour only ever slows a window down)."""
    fn()
    fn()
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / trials:
            fn()
            reps += 1
        best = max(best, flop * reps / (time.perf_counter() - t0))
    return best


def measure_cpu_peak(precision: str, seconds: float = 1.5) -> dict[str, float]:
    """Achieved TFLOP/s on this CPU (all of this process's threads), in bf16 or fp32, of the two dense
    kernels a GAN step is made of: a 2048^2 matmul and a 3x3 convolution (channels_last, 128 channels,
    32x32, batch 32). Returns {"matmul": ..., "conv": ..., "peak": the larger}. The larger is the peak
    because the BLAS behind fp32 matmul can be far slower than oneDNN's convolution on some CPUs
    (MKL's sgemm on AMD), which would put an fp32 model above 100% of a matmul-only peak."""
    import torch.nn.functional as F

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    n = 2048
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    mm = _best_rate(lambda: a @ b, 2 * n**3, seconds / 2) / 1e12
    x = torch.randn(32, 128, 32, 32, dtype=dtype).to(memory_format=torch.channels_last)
    w = torch.randn(128, 128, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
    conv = _best_rate(lambda: F.conv2d(x, w, padding=1), 2 * 32 * 128 * 128 * 9 * 32 * 32, seconds / 2) / 1e12
    return {"matmul": mm, "conv": conv, "peak": max(mm, conv)}


def peak_tflops(device: torch.device, precision: str, remeasure: bool = False) -> tuple[float, str]:
    """(peak TFLOP/s, where it came from): the GPU table, or on CPU the best dense-kernel rate measured
    (matmul or conv, see measure_cpu_peak), cached in $GAN_BENCH_CACHE/cpu_peak.json. `remeasure`
    (bench throughput) measures again and keeps the higher of the cached and the new figure."""
    import json
    import platform

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in GPU_PEAK_TFLOPS.items():
            if key in name:
                return table[precision], f"table:{key}"
        return float("nan"), f"unknown GPU {name}"
    cpu = "cpu"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    key = f"v2|{cpu}|{torch.get_num_threads()}t|{precision}|torch{torch.__version__}|{platform.machine()}"
    path = _cache_dir() / "cpu_peak.json"
    cache = {}
    if path.exists():
        try:
            cache = json.loads(path.read_text())
        except json.JSONDecodeError:
            cache = {}
    if key not in cache or remeasure or not isinstance(cache[key], dict):
        m = measure_cpu_peak(precision)
        old = cache.get(key) if isinstance(cache.get(key), dict) else None
        if old and old["peak"] >= m["peak"]:
            m = old
        cache[key] = m
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=2))
        tmp.replace(path)
    m = cache[key]
    kind = "matmul" if m["matmul"] >= m["conv"] else "3x3 conv"
    return m["peak"], f"measured {precision} {kind} peak"
