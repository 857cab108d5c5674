"""Keeping the ranks of one run together when something fails: rank 0's work inside `Ranks.rank0`, shared
decisions through `Ranks.any`, a failed rank's error file and the first error, the exit hook that destroys the
process groups (docs/architecture.md, "Faults"). The fault tests' hook lives in bench.faults."""
from __future__ import annotations

import atexit
import datetime
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional, TypeVar

import torch

from bench import rundir
from bench import errors
from bench.errors import is_user_error

T = TypeVar("T")
COMM_WORDS = ("gloo", "nccl", "timed out", "application timeout", "pair closure", "connection", "broken pipe", "socket")
# How long rank 0 looks for a failed peer's error file after its own collective broke.
PEER_ERROR_WAIT_S = 10.0


class RankFailed(RuntimeError):
    """Another rank failed; this one stops too. The message is that rank's error; `user_error` says it
    was bad input (the CLI then prints one line and exits 2, as the failing rank does)."""

    def __init__(self, message: str, user_error: bool = False):
        super().__init__(message)
        self.user_error = user_error




def first_line(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else ''}"[:limit]


def is_comm_error(exc: BaseException) -> bool:
    """A collective that broke because a peer died or hung (gloo and NCCL raise plain RuntimeErrors)."""
    dist_error = getattr(torch.distributed, "DistError", ())
    if dist_error and isinstance(exc, dist_error):
        return True
    return isinstance(exc, RuntimeError) and any(w in str(exc).lower() for w in COMM_WORDS)


def process_group_kwargs(timeout_s: int) -> list:
    """The Accelerator's kwargs_handlers that set the process-group timeout (dist.timeout_s)."""
    from accelerate import InitProcessGroupKwargs

    return [InitProcessGroupKwargs(timeout=datetime.timedelta(seconds=int(timeout_s)))]


class Ranks:
    """The run's processes as one: agreement after rank-0 work, shared decisions, and failure records."""

    def __init__(self, world: int, rank: int, device: torch.device, run_dir: Path, rank0_timeout_s: float = 0):
        self.world, self.rank, self.device = world, rank, device
        self.errors_dir = Path(run_dir) / rundir.ERRORS
        self._broken = False  # a rank failed: no more collectives
        self.started = time.time()
        # Agreements after rank-0 work (an evaluation, a checkpoint) wait on their own gloo group, whose
        # timeout is dist.rank0_timeout_s: the others wait that long for rank 0's work, while the training
        # collectives keep dist.timeout_s. A collective call: every rank builds its Ranks at once.
        self.group = None
        if world > 1 and not Ranks._leave_registered:  # once per process (a sweep trains several times in one)
            atexit.register(Ranks.leave)
            Ranks._leave_registered = True
        if world > 1 and rank0_timeout_s:
            self.group = torch.distributed.new_group(backend="gloo",
                                                     timeout=datetime.timedelta(seconds=rank0_timeout_s))

    _leave_registered = False

    @property
    def broken(self) -> bool:
        return self._broken

    @broken.setter
    def broken(self, value: bool) -> None:
        self._broken = bool(value)
        if value:
            errors.process_failed()  # and Ranks.leave, at exit, leaves the process groups alone

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---- agreement ------------------------------------------------------------------------------------
    def all_ok(self, error: Optional[BaseException], what: str) -> None:
        """Every rank says whether its part of `what` worked (one all_gather). Raises on every rank when
        one failed: the failing rank its own exception, the others RankFailed naming it."""
        if self.world > 1 and not self.broken:
            reports = [None] * self.world
            mine = (what, first_line(error) if error is not None else None, is_user_error(error) if error else False)
            torch.distributed.all_gather_object(reports, mine, group=self.group)
            if any(not isinstance(r, tuple) or r[0] != what for r in reports):  # a bug, not a fault to hide
                self.broken = True
                raise RankFailed(f"ranks out of step while {what}: they answered {[r for r in reports]!r}")
            bad = [(r, line, user) for r, (_, line, user) in enumerate(reports) if line]
            if bad:
                self.broken = True  # every rank leaves without another collective
                if error is None:
                    r, line, user = bad[0]
                    raise RankFailed(f"rank {r} failed while {what}: {line}", user_error=user)
        if error is not None:
            raise error

    def rank0(self, what: str, fn: Callable[[], T]) -> Optional[T]:
        """`fn()` on rank 0 only (None elsewhere), then every rank agrees that it worked."""
        result, error = None, None
        if self.is_main:
            try:
                result = fn()
            except Exception as exc:  # handed to every rank by all_ok
                error = exc
        self.all_ok(error, what)
        return result

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on any (one all-reduce)."""
        if self.world == 1 or self.broken:
            return flag
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
        return bool(t.item())

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum over ranks, in place (telemetry's one all-reduce per tick)."""
        torch.distributed.all_reduce(x)
        return x

    def broadcast(self, obj):
        """Rank 0's `obj` on every rank."""
        if self.world == 1:
            return obj
        box = [obj]
        torch.distributed.broadcast_object_list(box, src=0, group=self.group)
        return box[0]

    @staticmethod
    def leave() -> None:
        """At the process's exit (atexit, registered by the first multi-rank Ranks): all its process groups destroyed
        while Python is still whole. Left to interpreter teardown, gloo's threads can abort a process whose run
        worked ("terminate called without an active exception", SIGABRT; pytorch/pytorch#190489): 12 of 40
        two-process runs here (NCCL asks for the same: torch warns when it is not done). At exit, not after the
        run: a sweep or `bench throughput` trains several times in one process. Not after a failure anywhere in
        the process (`broken` on any Ranks, or bench.errors.process_failed): a hung peer's pending collective
        would be waited for, and the process exits non-zero anyway."""
        if not errors.failed_in_process() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

    # ---- failures -------------------------------------------------------------------------------------
    def failed(self, exc: BaseException) -> str:
        """This rank failed with `exc`: enter no more collectives and leave the error where rank 0 can
        read it (errors/rank-<r>.json; best effort, the disk may be what failed). Returns its line."""
        self.broken = True
        line = first_line(exc)
        kind = "peer" if isinstance(exc, RankFailed) else "comm" if is_comm_error(exc) else "own"
        if self.world > 1:
            host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()
            record = {"rank": self.rank, "host": host, "time": time.time(), "kind": kind, "error": line}
            try:
                rundir.write_json(self.errors_dir / f"rank-{self.rank}.json", record)
            except OSError:
                pass
        return line

    def first_error(self, own: BaseException) -> str:
        """Rank 0's account of a failed run: its own error when it caused the failure (or was told of
        one), else the earliest error a peer wrote since this run started."""
        line = first_line(own)
        if self.world == 1 or not is_comm_error(own) or isinstance(own, RankFailed):
            return f"rank 0: {line}" if self.world > 1 and not isinstance(own, RankFailed) else line
        deadline = time.time() + PEER_ERROR_WAIT_S
        while True:
            peers = [e for e in self._peer_errors() if e.get("kind") != "comm"]
            if peers or time.time() > deadline:
                break
            time.sleep(0.5)
        if not peers:
            return f"rank 0: {line} (no other rank recorded an error: one may have hung or been killed)"
        e = min(peers, key=lambda r: r["time"])
        return f"rank {e['rank']} ({e['host']}): {e['error']}"

    def _peer_errors(self) -> list[dict]:
        out = []
        for path in sorted(self.errors_dir.glob("rank-*.json")):
            rec = rundir.read_json(path)
            if rec and rec.get("rank") != self.rank and float(rec.get("time", 0)) >= self.started - 5:
                out.append(rec)
        return out
