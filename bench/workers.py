"""Child processes that cannot hang a cold start (docs/architecture.md, "Faults"): `ordered_map(fn, jobs, nproc)`
yields fn's results in job order from worker processes that ignore SIGINT, SIGTERM and SIGUSR1, die with the
parent, each have their own result pipe, and are stopped by a bounded join, then SIGKILL, never by SIGTERM."""
from __future__ import annotations

import ctypes
import multiprocessing as mp
import os
import signal
import sys
import time
from typing import Callable, Iterator, Sequence

STOP_WAIT_S = 10.0       # how long a finished worker may take to exit before it is killed
CHILD_SIGNALS = ("SIGINT", "SIGTERM", "SIGUSR1")  # the stop requests the parent handles


def usable_cpus() -> int:
    """The cores this process may use: Slurm's SLURM_CPUS_PER_TASK when set, else the affinity mask."""
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def resolve_workers(value) -> int:
    """`auto`: half of this process's cores (the other half trains), at least 1 and at most 4; else the number.
    On 2 cores that is 1, so torch never warns that the workers outnumber the cores."""
    if value == "auto":
        return max(1, min(4, usable_cpus() // 2))
    return int(value)


def quiet_child_signals() -> None:
    """In a child: leave the parent's stop requests to the parent (SIG_IGN; a handler inherited through fork
    would swallow them silently), and die with the parent on Linux (PR_SET_PDEATHSIG), so nothing outlives it."""
    for name in CHILD_SIGNALS:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # 1 = PR_SET_PDEATHSIG
        except OSError:
            pass


def _worker(fn: Callable, jobs: Sequence, start: int, step: int, conn) -> None:
    quiet_child_signals()
    try:
        for job in jobs[start::step]:
            conn.send((True, fn(job)))
    except BaseException as exc:  # noqa: BLE001 - any failure goes back to the parent, which re-raises it
        try:
            conn.send((False, f"{type(exc).__name__}: {exc}"))
        except (BrokenPipeError, OSError):
            pass
    finally:
        conn.close()


class WorkerFailed(RuntimeError):
    """A worker raised, or died without sending its result."""


def ordered_map(fn: Callable, jobs: Sequence, nproc: int) -> Iterator:
    """fn(job) for every job, in order; with nproc > 1 in that many worker processes (job i on worker
    i % nproc). fn and jobs are inherited by fork on Linux, pickled under spawn elsewhere."""
    if nproc <= 1 or len(jobs) <= 1:
        yield from map(fn, jobs)
        return
    nproc = min(nproc, len(jobs))
    ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    procs, conns, finished = [], [], False
    try:
        for i in range(nproc):
            recv, send = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_worker, args=(fn, jobs, i, nproc, send), daemon=True,
                            name=f"gan-bench-worker-{i}")
            p.start()
            send.close()  # the child holds the write end; EOF here then means the child is gone
            procs.append(p)
            conns.append(recv)
        for j in range(len(jobs)):
            try:
                ok, value = conns[j % nproc].recv()
            except EOFError:
                dead = procs[j % nproc]
                dead.join(5)  # its exit code
                raise WorkerFailed(f"worker {j % nproc} (pid {dead.pid}) exited with code {dead.exitcode} before "
                                   f"finishing job {j}") from None
            if not ok:
                raise WorkerFailed(f"worker {j % nproc} failed on job {j}: {value}")
            yield value
        finished = True
    finally:
        # Cut short (an error, a second Ctrl-C, the caller stopped early): the workers' results are not
        # wanted, so kill them at once; after the last result they are exiting, so wait for them a while.
        stop(procs, STOP_WAIT_S if finished else 0.0, report=finished)
        for c in conns:
            c.close()


def stop(procs: list, wait_s: float = STOP_WAIT_S, report: bool = True) -> list[int]:
    """Join each worker for at most wait_s in all, SIGKILL the ones still alive (a worker ignores SIGTERM)
    and, with `report`, say so on stderr. Returns the pids killed."""
    deadline = time.monotonic() + wait_s
    killed = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
            killed.append(p.pid)
    if killed and report:
        print(f"gan-bench: {len(killed)} worker process(es) {killed} did not exit within {wait_s:g} s; killed",
              file=sys.stderr, flush=True)
    return killed
