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
NONFINITE, STOP, TIMES = 0, 1, 2  # the slots after the gradients in a net's last bucket (GradSync.extras); after
# the world's TIMES slots, one per parameter: whether the phase's backward reached it on this rank


@dataclass
class _Bucket:
    params: list  # in the order their gradients are expected
    flat: torch.Tensor  # persistent: every parameter's .grad is a view into it (DDP's gradient_as_bucket_view)
    views: list  # the parameters' gradient views, in `params` order
    numel: int  # the gradients' part of `flat` (the net's last bucket carries GradSync.extras after it)
    fired: set = field(default_factory=set)  # ids of the parameters whose gradient the armed backward produced
    launched: bool = False
    work: object = None
    t_launch: float = 0.0
    t_done: Optional[float] = None


@dataclass
class CommStats:
    """Sums over the phases since the last `take_stats`."""
    bytes: int = 0
    comm_s: float = 0.0
    exposed_s: float = 0.0
    peer_wait_s: float = 0.0  # how much longer the slowest rank's compute took than this rank's (CPU only)
    phases: int = 0

    def add(self, other: "CommStats") -> None:
        self.bytes += other.bytes
        self.comm_s += other.comm_s
        self.exposed_s += other.exposed_s
        self.peer_wait_s += other.peer_wait_s
        self.phases += other.phases


@dataclass
class Agreed:
    """What every rank learnt from a phase's gradient all-reduce, with no collective of its own."""
    nonfinite: bool  # some rank's loss was not finite in one of the phase's micro-batches
    stop: bool  # some rank had a stop request when the phase's last backward began


def make_buckets(params: list, bucket_bytes: int) -> list[list]:
    """Parameters (those that take gradients) in reverse registration order, cut into buckets of at most
    `bucket_bytes` (a parameter bigger than that is a bucket of its own), and wherever the dtype or device
    changes (a bucket is one flat buffer)."""
    buckets, cur, size = [], [], 0
    for p in reversed([p for p in params if p.requires_grad]):
        nbytes = p.numel() * p.element_size()
        if cur and (size + nbytes > bucket_bytes or (p.dtype, p.device) != (cur[0].dtype, cur[0].device)):
            buckets.append(cur)
            cur, size = [], 0
        cur.append(p)
        size += nbytes
    if cur:
        buckets.append(cur)
    return buckets


def _dense(t: torch.Tensor) -> bool:
    """`t` fills exactly t.numel() elements of memory, in some order of its dimensions (contiguous, channels_last,
    a transposed weight)."""
    expected = 1
    for d in sorted(range(t.dim()), key=t.stride):
        if t.size(d) != 1 and t.stride(d) != expected:
            return False
        expected *= t.size(d)
    return True


def _grad_view(flat: torch.Tensor, offset: int, p: torch.Tensor) -> torch.Tensor:
    """A view of flat[offset:offset + p.numel()] shaped like `p`, with p's strides when p is dense in another
    memory order (channels_last, a transpose): a fused optimiser walks a parameter and its gradient as flat memory."""
    if not p.is_contiguous() and _dense(p):
        return flat.as_strided(p.shape, p.stride(), flat.storage_offset() + offset)
    return flat[offset:offset + p.numel()].view(p.shape)


def _union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b <= end:
            continue
        total += b - max(a, end)
        end = b
    return total


class GradSync:
    """Averages one net's gradients over `world` ranks of the default process group.

    Per phase: `begin()` (gradients zeroed, as views of the buckets), `note_loss()` for each micro-batch's loss,
    `arm(stop)` before the last micro-batch's backward, `finish()` after it, which returns the phase's `Agreed`.
    The net's last bucket (the first layers, whose gradients come last) carries `extras` after its gradients: a
    non-finite-loss count, the stop requests, each rank's compute time in the phase and which parameters the
    phase reached. Summed with the gradients, they tell every rank whether to skip the update and whether to stop,
    how long it waited for the slowest rank, and which parameters keep a gradient, without collectives of their
    own (docs/architecture.md, "Gradient sync")."""

    def __init__(self, net: torch.nn.Module, world: int, mode: str = "overlap", bucket_mb: Optional[float] = None,
                 rank: int = 0):
        if mode not in MODES:
            raise ValueError(f"dist.grad_sync={mode!r}: use one of {', '.join(MODES)}")
        self.net, self.world, self.mode, self.rank = net, world, mode, rank
        self.armed = False
        self.stats = CommStats()
        self._lock = threading.Lock()  # future callbacks run on the communication thread
        self._handles = []
        self.warned = False  # the one warning of a bucket left to finish()
        self.buckets: list[_Bucket] = []
        self.touched: set = set()  # ids of the parameters that got a gradient in this phase (any micro-batch)
        self.extras: Optional[torch.Tensor] = None
        self._t_phase = 0.0
        self._cuda_pending: list = []  # (backward's end, all buckets done) CUDA events, read at take_stats
        params = [p for p in net.parameters() if p.requires_grad]
        if world == 1 or not params:
            return
        if mode == "overlap":
            if bucket_mb is None:
                bucket_mb = auto_bucket_mb(sum(p.numel() * p.element_size() for p in params))
            groups = make_buckets(params, int(bucket_mb * 2**20))
        else:  # flat: one buffer per dtype and device, all-reduced after backward
            groups = make_buckets(params, 2**62)
        carry = groups[-1][0].dtype in (torch.float32, torch.float64)
        self.params = [p for group in groups for p in group]  # the extras' order of the touched flags
        for i, group in enumerate(groups):
            numel = sum(p.numel() for p in group)
            extra = TIMES + world + len(self.params) if carry and i == len(groups) - 1 else 0
            flat = torch.zeros(numel + extra, dtype=group[0].dtype, device=group[0].device)
            views, offset = [], 0
            for p in group:
                views.append(_grad_view(flat, offset, p))
                offset += p.numel()
            self.buckets.append(_Bucket(group, flat, views, numel))
            if extra:
                self.extras = flat[numel:]
        for i, bucket in enumerate(self.buckets):
            for p in bucket.params:
                self._handles.append(p.register_post_accumulate_grad_hook(self._hook(i)))

    def close(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---- a phase ----------------------------------------------------------------------------------------
    def begin(self) -> None:
        """Before the phase's first backward: every gradient zero, as a view into its bucket (an optimiser's
        zero_grad(set_to_none=True) dropped the views after the last step)."""
        if not self.buckets:
            return
        for b in self.buckets:
            b.flat.zero_()
            for p, view in zip(b.params, b.views):
                if p.grad is not view:
                    p.grad = view
            b.fired, b.launched, b.work, b.t_done = set(), False, None, None
        self.touched = set()
        self.armed = False
        self._t_phase = time.perf_counter()

    def note_loss(self, loss: torch.Tensor) -> None:
        """A micro-batch's loss, before its backward: counted in the extras when it is not finite (no host sync)."""
        if self.extras is not None:
            self.extras[NONFINITE] += (~torch.isfinite(loss.detach())).to(self.extras.dtype).sum()

    def arm(self, stop: bool = False) -> None:
        """Before the backward of the phase's last micro-batch: from now on a complete bucket is reduced.
        `stop`: this rank's stop request, agreed through the extras."""
        if not self.buckets:
            return
        if self.extras is not None:
            self.extras[STOP] = 1.0 if stop else 0.0
        for b in self.buckets:
            b.fired, b.launched, b.work, b.t_done = set(), False, None, None
        self.armed = self.mode == "overlap"

    def _hook(self, index: int):
        def hook(param: torch.Tensor) -> None:
            self.touched.add(id(param))
            if not self.armed:
                return
            bucket = self.buckets[index]
            bucket.fired.add(id(param))
            if len(bucket.fired) == len(bucket.params):
                self._launch_ready()
        return hook

    def _launch(self, bucket: _Bucket) -> None:
        for p, view in zip(bucket.params, bucket.views):
            if p.grad is not None and p.grad is not view:  # a backward that built a new gradient (create_graph)
                view.copy_(p.grad)
                p.grad = view
        if bucket is self.buckets[-1] and self.extras is not None:  # backward has ended on this rank
            self.extras[TIMES + self.rank] = 1000.0 * (time.perf_counter() - self._t_phase)
            touched = [1.0 if id(p) in self.touched else 0.0 for p in self.params]
            self.extras[TIMES + self.world:].copy_(torch.tensor(touched, dtype=self.extras.dtype))
        bucket.launched = True
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
    def finish(self) -> Optional[Agreed]:
        """After backward: every gradient of the net is the mean over ranks (a parameter no micro-batch of the
        phase reached keeps no gradient, as after zero_grad). The phase's Agreed, or None in one process."""
        if not self.buckets:
            return None
        self.armed = False
        cuda = self.buckets[0].flat.is_cuda
        t0 = time.perf_counter()
        if cuda:  # the GPU's own clock: backward's end, then the end of the last bucket's all-reduce
            bwd_end = torch.cuda.Event(enable_timing=True)
            bwd_end.record()
        late = [i for i, b in enumerate(self.buckets) if not b.launched]
        if late and self.mode == "overlap" and not self.warned:
            self._warn_late(late)
        for i in late:  # flat mode's buffers, and buckets with a parameter that got no gradient (and those after
            self._launch(self.buckets[i])  # them): launched now, in order
        nbytes, intervals, waited = 0, [], time.perf_counter() - t0
        for b in self.buckets:
            t1 = time.perf_counter()
            b.work.wait()  # on CUDA it only orders the stream: no host stall
            end = time.perf_counter()
            waited += end - t1
            with self._lock:
                t_done = b.t_done if b.t_done is not None else end
            intervals.append((b.t_launch, min(t_done, end)))
            b.flat[:b.numel] /= self.world
            nbytes += b.flat.numel() * b.flat.element_size()
            b.work = None
        if cuda:
            done = torch.cuda.Event(enable_timing=True)
            done.record()
            self._cuda_pending.append((bwd_end, done))
            # the host measures only the launches; the span and wait come from the events at take_stats
            self.stats.add(CommStats(nbytes, 0.0, 0.0, 0.0, 1))
        else:
            span = _union_seconds(intervals) if self.mode == "overlap" else waited
            self.stats.add(CommStats(nbytes, span, waited, 0.0, 1))
        if self.extras is None:
            reached = self.touched  # this rank's own: no extras to agree through (a last bucket not fp32/fp64)
        else:
            flags = self.extras[TIMES + self.world:].tolist()
            reached = {id(p) for p, f in zip(self.params, flags) if f > 0}  # by any rank: the same set on every rank
        for b in self.buckets:
            for p in b.params:
                if id(p) not in reached:  # no micro-batch of the phase reached it on any rank: no gradient, as after
                    p.grad = None         # zero_grad, so the optimiser skips it
        if self.extras is None:
            return None
        values = self.extras[:TIMES + self.world].tolist()
        if not cuda:  # host clocks mean compute time only on the CPU
            times = values[TIMES:]
            self.stats.peer_wait_s += max(0.0, (max(times) - times[self.rank]) / 1000.0)
        return Agreed(nonfinite=values[NONFINITE] > 0, stop=values[STOP] > 0)

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

    def take_stats(self) -> CommStats:
        """The sums since the last call (train_step takes them once per step). On CUDA the events recorded since
        then are read now (finish() has already waited for the extras, so this adds no stall): the exposed time is
        the GPU's from backward's end to the last all-reduce's end (flat: that is the whole communication;
        overlap: its span is not measured on CUDA, NaN)."""
        out, self.stats = self.stats, CommStats()
        if self._cuda_pending:
            exposed = 0.0
            for bwd_end, done in self._cuda_pending:
                done.synchronize()
                exposed += bwd_end.elapsed_time(done) / 1000.0
            self._cuda_pending = []
            out.exposed_s = exposed
            out.comm_s = exposed if self.mode == "flat" else float("nan")
            out.peer_wait_s = float("nan")
        return out


def step_record(stats: CommStats) -> dict[str, float]:
    """The tick-record fields of one G step's communication (all phases together)."""
    comm_ms, exposed_ms = 1000.0 * stats.comm_s, 1000.0 * stats.exposed_s
    if comm_ms != comm_ms:  # NaN: the span is not measured (CUDA)
        hidden = float("nan")
    else:
        hidden = max(0.0, 1.0 - exposed_ms / comm_ms) if comm_ms > 0 else 0.0
    return {"time/allreduce_ms": comm_ms, "time/allreduce_exposed_ms": exposed_ms,
            "comm/hidden_frac": hidden, "comm/bytes_per_step": float(stats.bytes),
            "time/peer_wait_ms": 1000.0 * stats.peer_wait_s}
