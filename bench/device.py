"""What the hardware can do, decided once: bf16 capability, autocast, channels_last, seeding, the
process-wide CPU settings, and the peak TFLOP/s that MFU is measured against (docs/architecture.md)."""
from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from bench import rundir

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}

# Dense peak TFLOP/s of known GPUs by dtype (vendor datasheets; SXM parts; fp32 = without TF32).
GPU_PEAK_TFLOPS = {
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "V100": {"bf16": 125.0, "fp16": 125.0, "fp32": 15.7},  # no bf16 tensor cores: fp16 figure
}


@functools.lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True where bf16 on this CPU is worth it (AVX512-BF16 or AMX). Read once per process."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def channels_last(choice, precision: str, device: torch.device) -> bool:
    """`train.channels_last`: true / false, or auto = on GPU always, on CPU only for bf16 with fast bf16
    (oneDNN's channels_last fp32 convs are slower than contiguous ones on CPUs without it)."""
    choice = str(choice).lower()
    if choice in ("true", "false"):
        return choice == "true"
    if device.type == "cuda":
        return True
    return precision == "bf16" and cpu_has_fast_bf16()


def autocast(precision: str, device: torch.device):
    """A factory of autocast contexts for `precision` (fp32: a null context)."""
    dtype = AUTOCAST_DTYPES.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def eval_precision(precision: str, device: torch.device) -> str:
    """`eval.precision` auto -> bf16 on GPU or a CPU with fast bf16, else fp32."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" or (device.type == "cpu" and cpu_has_fast_bf16()) else "fp32"
    return precision


@contextlib.contextmanager
def plain_autograd(grad: bool = True):
    """The default autograd state whatever the caller is inside: gradients on (or off with grad=False), not in
    inference mode, no autocast. A resource built lazily on first use (the domain classifier, the real-feature
    cache, the CPU peak) is built under it, so that a caller's no_grad, inference_mode or autocast cannot reach
    it (training under no_grad fails; features or a peak under autocast would be the wrong precision)."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.inference_mode(False))
        stack.enter_context(torch.set_grad_enabled(grad))
        # Only where the caller is in autocast: an autocast region, even a disabled one, makes every autocast inside
        # it a nested one, whose exit no longer clears the cast cache, so a net trained inside would keep using the
        # bf16 copies of its first weights (the classifier then learned nothing).
        for dev in ("cpu", "cuda"):
            if torch.is_autocast_enabled(dev):
                stack.enter_context(torch.autocast(device_type=dev, enabled=False))
        yield


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def keep_freed_memory() -> bool:
    """Keep freed memory in the process instead of handing it back to the OS (glibc malloc only).

    PyTorch's CPU allocator is plain malloc. glibc serves blocks over its mmap threshold (at most 32 MiB)
    with fresh mmaps and unmaps them on free, and trims the heap top past its trim threshold, so every
    step's big activations are page-faulted in again: on a 2-core machine fp32 BigGAN at batch 64 spent
    half its wall time in the kernel (43 s of system time in an 83 s `bench throughput`) and ran at 28
    img/s, 43 img/s with memory kept. The process keeps its peak footprint instead, which a training run
    reaches in its first step anyway. Set GAN_BENCH_MALLOC=default to leave malloc alone."""
    if os.environ.get("GAN_BENCH_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    return libc.mallopt(m_trim_threshold, 1 << 30) == 1 and ok


def configure_process(device: torch.device, deterministic: bool, tf32: bool = False,
                      cudnn_benchmark: bool = False) -> None:
    """Process-wide settings a training process makes once, before building anything (train.deterministic,
    train.tf32, train.cudnn_benchmark: the last two only matter on CUDA)."""
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32  # torch's default is on: off unless asked, so fp32 means fp32
        torch.backends.cudnn.benchmark = cudnn_benchmark and not deterministic
    if device.type == "cpu":
        # Denormal floats (a diverging or dying net's activations) run 10-100x slower on x86;
        # flushing them to zero costs nothing in accuracy that a GAN step could notice.
        torch.set_flush_denormal(True)
        keep_freed_memory()


# train.fused_optim=auto on a CPU: fused. Adam's step on the small BigGAN's weights took 0.54 ms fused against 2.12 ms
# in torch's loop (G; D 0.42 against 1.58); whole training steps were within noise of each other (README, "Throughput
# and MFU")
CPU_FUSED_DEFAULT = True
# the optimisers whose fused kernel torch has on each device (another class, yours included: foreach where it takes it)
FUSED = {"cuda": ("Adam", "AdamW", "SGD"), "cpu": ("Adam", "AdamW", "SGD", "Adagrad")}


def optimizer_impl(choice, optimizer_cls, device: torch.device) -> dict:
    """The optimiser's kernel keywords for `train.fused_optim` (true / false / auto): true = fused (one kernel per
    step) where `optimizer_cls` has it (torch's Adam on CUDA and CPU), else foreach (one kernel per op over all
    tensors); false = torch's loop over tensors; auto = true on CUDA, CPU_FUSED_DEFAULT on a CPU."""
    import inspect

    choice = str(choice).lower()
    on = device.type == "cuda" or CPU_FUSED_DEFAULT if choice == "auto" else choice == "true"
    takes = inspect.signature(optimizer_cls).parameters
    if not on:
        return {"foreach": False} if "foreach" in takes else {}
    if "fused" in takes and optimizer_cls.__module__.startswith("torch.optim") \
            and optimizer_cls.__name__ in FUSED.get(device.type, ()):
        return {"fused": True}
    return {"foreach": True} if "foreach" in takes else {}


def impl_name(kwargs: dict) -> str:
    """How run.json names the kernels optimizer_impl chose (an optimiser's defaults): fused | foreach | loop, or
    "its own" for a class that takes neither keyword (yours)."""
    if "fused" not in kwargs and "foreach" not in kwargs:
        return "its own"
    return "fused" if kwargs.get("fused") else "foreach" if kwargs.get("foreach") else "loop"


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    except Exception:
        return float("nan")


# ---- peak TFLOP/s -----------------------------------------------------------------------------------
def _best_rate(fn, flop: float, seconds: float, trials: int = 3) -> float:
    """Best FLOP/s over `trials` timed windows of `fn` (a busy neighbour only ever slows a window down)."""
    fn()
    best = 0.0
    for _ in range(trials):
        reps, t0 = 0, time.perf_counter()
        while reps == 0 or time.perf_counter() - t0 < seconds / trials:
            fn()
            reps += 1
        best = max(best, flop * reps / (time.perf_counter() - t0))
    return best


def _sized(make, flop_of, sizes, budget_s: float = 0.05):
    """The largest of `sizes` whose kernel runs in under `budget_s` once warm (the first that does not
    is used as is): a CPU that emulates bf16 runs a 2048^2 matmul in minutes, not milliseconds."""
    for size in sizes:
        fn = make(size)
        fn()
        t0 = time.perf_counter()
        fn()
        if time.perf_counter() - t0 > budget_s or size == sizes[-1]:
            return fn, flop_of(size)
    raise AssertionError("unreachable")


def measure_cpu_peak(precision: str, seconds: float = 1.5) -> dict[str, float]:
    """Achieved TFLOP/s on this CPU (all of this process's threads), in bf16 or fp32, of the two dense
    kernels a GAN step is made of: a square matmul (up to 2048^2) and a 3x3 convolution (channels_last,
    128 channels, 32x32, up to batch 32). Returns {"matmul": ..., "conv": ..., "peak": the larger}. The
    larger is the peak because the BLAS behind fp32 matmul can be far slower than oneDNN's convolution
    on some CPUs (MKL's sgemm on AMD), which would put an fp32 model above 100% of a matmul-only peak.
    The kernels grow only while they stay fast, so a CPU without native bf16 is measured in seconds."""
    import torch.nn.functional as F

    dtype = torch.bfloat16 if precision == "bf16" else torch.float32

    def matmul(n):
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        return lambda: a @ b

    def conv(batch):
        x = torch.randn(batch, 128, 32, 32, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.randn(128, 128, 3, 3, dtype=dtype).to(memory_format=torch.channels_last)
        return lambda: F.conv2d(x, w, padding=1)

    mm = _best_rate(*_sized(matmul, lambda n: 2 * n**3, (256, 512, 1024, 2048)), seconds / 2) / 1e12
    cv = _best_rate(*_sized(conv, lambda b: 2 * b * 128 * 128 * 9 * 32 * 32, (1, 4, 8, 32)), seconds / 2) / 1e12
    return {"matmul": mm, "conv": cv, "peak": max(mm, cv)}


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "cpu"


def _peak_entry_ok(entry) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(k), (int, float)) for k in ("peak", "matmul", "conv"))


def _read_peak_cache(path: Path) -> dict:
    """The measured-peak cache; a damaged file is reported in one line and rebuilt (measured again)."""
    if not path.exists():
        return {}
    cache = rundir.read_json(path)
    if cache is None:
        print(f"warning: CPU peak cache {path} is unreadable; measuring again and rewriting it",
              file=sys.stderr, flush=True)
        return {}
    return cache


def peak_tflops(device: torch.device, precision: str, remeasure: bool = False) -> tuple[float, str]:
    """(peak TFLOP/s, where it came from): the GPU table, or on CPU the best dense-kernel rate measured
    (matmul or conv, see measure_cpu_peak), cached in <cache_root>/cpu_peak.json. `remeasure`
    (bench throughput) measures again and keeps the higher of the cached and the new figure."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, table in GPU_PEAK_TFLOPS.items():
            if key in name:
                return table[precision], f"table:{key}"
        return float("nan"), f"unknown GPU {name}"
    key = f"v2|{_cpu_name()}|{torch.get_num_threads()}t|{precision}|torch{torch.__version__}|{platform.machine()}"
    path = rundir.cache_root() / "cpu_peak.json"
    cache = _read_peak_cache(path)
    if remeasure or not _peak_entry_ok(cache.get(key)):
        with plain_autograd(grad=False):  # a caller's autocast would measure another precision
            m = measure_cpu_peak(precision)
        old = cache.get(key) if _peak_entry_ok(cache.get(key)) else None
        if old and old["peak"] >= m["peak"]:
            m = old
        cache[key] = m
        rundir.atomic_write(path, json.dumps(cache, indent=2))
    m = cache[key]
    kind = "matmul" if m["matmul"] >= m["conv"] else "3x3 conv"
    return m["peak"], f"measured {precision} {kind} peak"
