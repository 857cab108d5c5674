"""Gradient averaging over ranks, one `GradSync` per net: buckets all-reduced while backward runs
(`dist.grad_sync=overlap`, the default) or one flat buffer after it (`flat`), armed only for the backward of a
phase's last micro-batch; the bytes, communication and exposed time per phase (docs/architecture.md,
"Gradient sync")."""
from __future__ import annotations

import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from bench.scaling import auto_bucket_mb

MODES = ("overlap", "flat")


@dataclass
class _Bucket:
    params: list  # in the order their gradients are expected
    fired: set = field(default_factory=set)  # ids of the parameters whose gradient this backward produced
    launched: bool = False
    work: object = None
    flat: Optional[torch.Tensor] = None
    grads: list = field(default_factory=list)
    t_launch: float = 0.0
    t_done: Optional[float] = None


@dataclass
class CommStats:
    """Sums over the phases since the last `take_stats`."""
    bytes: int = 0
    comm_s: float = 0.0
    exposed_s: float = 0.0
    phases: int = 0

    def add(self, other: "CommStats") -> None:
        self.bytes += other.bytes
        self.comm_s += other.comm_s
        self.exposed_s += other.exposed_s
        self.phases += other.phases


def make_buckets(params: list, bucket_bytes: int) -> list[list]:
    """Parameters (those that take gradients) in reverse registration order, cut into buckets of at most
    `bucket_bytes` (a parameter bigger than that is a bucket of its own)."""
    buckets, cur, size = [], [], 0
    for p in reversed([p for p in params if p.requires_grad]):
        nbytes = p.numel() * p.element_size()
        if cur and size + nbytes > bucket_bytes:
            buckets.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += nbytes
    if cur:
        buckets.append(cur)
    return buckets


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class GradSync:
    """Averages one net's gradients over `world` ranks of the default process group."""

    def __init__(self, net: torch.nn.Module, world: int, mode: str = "overlap", bucket_mb: Optional[float] = None):
        if mode not in MODES:
            raise ValueError(f"dist.grad_sync={mode!r}: use one of {', '.join(MODES)}")
        self.net, self.world, self.mode = net, world, mode
        self.armed = False
        self.stats = CommStats()
        self._lock = threading.Lock()  # future callbacks run on the communication thread
        self._handles = []
        self.warned = False  # the one warning of a bucket left to finish()
        self.buckets: list[_Bucket] = []
        if world > 1 and mode == "overlap":
            if bucket_mb is None:
                bucket_mb = auto_bucket_mb(sum(p.numel() * p.element_size() for p in net.parameters() if p.requires_grad))
            self.buckets = [_Bucket(b) for b in make_buckets(list(net.parameters()), int(bucket_mb * 2**20))]
            for i, bucket in enumerate(self.buckets):
                for p in bucket.params:
                    self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- overlap ---------------------------------------------------------------------------------------
    def arm(self) -> None:
        """Before the backward of the phase's last micro-batch: from now on a complete bucket is reduced."""
        if not self.buckets:
            return
        for b in self.buckets:
            b.fired, b.launched, b.work, b.flat, b.grads, b.t_done = set(), False, None, None, [], None
        self.armed = True

    def _hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            if not self.armed:
                return
            bucket = self.buckets[index]
            bucket.fired.add(id(param))
            if len(bucket.fired) == len(bucket.params):
                self._launch_ready()
        return hook

    def _launch(self, bucket: _Bucket) -> None:
        bucket.grads = [p.grad for p in bucket.params if p.grad is not None]
        bucket.launched = True
        if not bucket.grads:
            return
        bucket.flat = torch._utils._flatten_dense_tensors(bucket.grads)
        bucket.t_launch = time.perf_counter()
        bucket.work = dist.all_reduce(bucket.flat, async_op=True)

        def done(_fut, bucket=bucket) -> None:
            with self._lock:
                bucket.t_done = time.perf_counter()
        try:
            bucket.work.get_future().then(done)
        except (RuntimeError, AttributeError):  # a backend without futures: completion is timed at wait()
            pass

    def _launch_ready(self) -> None:
        """Launch, in index order, every complete bucket whose predecessors are all launched."""
        for b in self.buckets:
            if b.launched:
                continue
            if len(b.fired) < len(b.params):
                return
            self._launch(b)

    # ---- both modes -------------------------------------------------------------------------------------
    def finish(self) -> None:
        """After backward: every gradient of the net is the mean over ranks."""
        if self.world == 1:
            return
        if self.mode == "flat":
            self._finish_flat()
            return
        self.armed = False
        t0 = time.perf_counter()
        cuda = any(p.is_cuda for b in self.buckets[:1] for p in b.params)
        late = [i for i, b in enumerate(self.buckets) if not b.launched]
        if late and not self.warned:
            self._warn_late(late)
        for i in late:  # buckets with a parameter that got no gradient (and those after them): launched now, in order
            self._launch(self.buckets[i])
        nbytes, intervals, waited = 0, [], time.perf_counter() - t0
        for b in self.buckets:
            if b.work is None:
                continue
            t1 = time.perf_counter()
            b.work.wait()
            if cuda:  # wait() only orders the stream: the host waits here for the collective itself
                torch.cuda.current_stream().synchronize()
            end = time.perf_counter()
            waited += end - t1
            with self._lock:
                t_done = b.t_done if b.t_done is not None else end
            intervals.append((b.t_launch, min(t_done, end)))
            b.flat /= self.world
            for g, s in zip(b.grads, torch._utils._unflatten_dense_tensors(b.flat, b.grads)):
                g.copy_(s)
            nbytes += b.flat.numel() * b.flat.element_size()
            b.work, b.flat, b.grads = None, None, []
        span = _union_seconds(intervals) if not cuda else float("nan")  # NCCL futures complete when queued
        self.stats.add(CommStats(nbytes, span, waited, 1))

    def _warn_late(self, late: list) -> None:
        """Once per net (rank 0): a bucket was still incomplete when backward ended, so it and every later one
        were sent after backward (correct, but nothing of them hidden). Names what held it."""
        self.warned = True
        if dist.get_rank() != 0:
            return
        first = self.buckets[late[0]]
        names = {id(p): n for n, p in self.net.named_parameters()}
        held = [names.get(id(p), "?") for p in first.params if id(p) not in first.fired] or ["a parameter"]
        print(f"warning: dist.grad_sync=overlap: {type(self.net).__name__}'s gradient bucket {late[0] + 1} of "
              f"{len(self.buckets)} was incomplete at the end of backward ({', '.join(held[:3])}"
              f"{f' and {len(held) - 3} more' if len(held) > 3 else ''} got no gradient), so {len(late)} bucket(s) "
              f"were sent after backward, none hidden behind it; set requires_grad=False on parameters a step does "
              f"not use, or use dist.grad_sync=flat", file=sys.stderr, flush=True)

    def _finish_flat(self) -> None:
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        if not grads:
            self.stats.add(CommStats(0, 0.0, 0.0, 1))
            return
        flat = torch._utils._flatten_dense_tensors(grads)
        t0 = time.perf_counter()
        dist.all_reduce(flat)
        if flat.is_cuda:  # NCCL returns once queued
            torch.cuda.current_stream().synchronize()
        spent = time.perf_counter() - t0
        flat /= self.world
        for g, s in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(s)
        self.stats.add(CommStats(flat.numel() * flat.element_size(), spent, spent, 1))

    def take_stats(self) -> CommStats:
        out, self.stats = self.stats, CommStats()
        return out


def step_record(stats: CommStats) -> dict[str, float]:
    """The tick-record fields of one G step's communication (all phases together)."""
    comm_ms, exposed_ms = 1000.0 * stats.comm_s, 1000.0 * stats.exposed_s
    if comm_ms != comm_ms:  # NaN: the span is not measured (CUDA)
        hidden = float("nan")
    else:
        hidden = max(0.0, 1.0 - exposed_ms / comm_ms) if comm_ms > 0 else 0.0
    return {"time/allreduce_ms": comm_ms, "time/allreduce_exposed_ms": exposed_ms,
            "comm/hidden_frac": hidden, "comm/bytes_per_step": float(stats.bytes)}
