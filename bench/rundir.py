"""The run directory's files, in one torch-free module: file names, checkpoint naming, ONE atomic writer, ONE JSON
and ONE JSONL reader, and the ONE rule that picks a run's best evaluation. Training, `bench eval`,
`bench truncation` and `bench report` all go through here (docs/architecture.md, "Run directory")."""
from __future__ import annotations

import json
import math
import os
import re
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Mapping, Optional, Union

from bench import metrics_registry as registry

# ---- names ----------------------------------------------------------------------------------------
CONFIG = "config.yaml"
RUN_JSON = "run.json"
METRICS = "metrics.jsonl"
EVALS = "evals.jsonl"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
SAMPLES = "samples"
TB = "tb"
TRUNCATION = "truncation"
ERRORS = "errors"            # errors/rank-<r>.json: a failed rank's error in a multi-process run (bench.train.ranks)
CKPT_PREFIX = "ckpt-"
BEST_CKPT = "best.pt"
RUN_MARKERS = (RUN_JSON, METRICS, CONFIG, SUMMARY)  # any of these makes a folder a run directory

# ---- statuses (run.json while it runs; summary.json when it ends) -----------------------------------
RUNNING = "running"
COMPLETED = "completed"
COLLAPSED = "collapsed"      # finished, with the collapse detector's flag set
DIVERGED = "diverged"        # non-finite steps that rollbacks could not fix (a result of an ablation)
FAILED = "failed"
INTERRUPTED = "interrupted"  # a signal (preemption, scancel, Ctrl-C); resumable
STALLED = "stalled"          # the report's verdict on a "running" run that stopped writing
FINISHED = frozenset({COMPLETED, COLLAPSED, DIVERGED})

SOURCE_BENCH_EVAL = "bench eval"  # evals.jsonl records written by `bench eval`, not by training


def ckpt_name(step: int) -> str:
    return f"{CKPT_PREFIX}{int(step):07d}.pt"


def list_checkpoints(ckpt_dir: Union[str, Path]) -> list[tuple[int, Path]]:
    """[(step, path)] of the numbered checkpoints in ckpt_dir, oldest first (best.pt and temp files
    are not numbered checkpoints)."""
    out = []
    d = Path(ckpt_dir)
    if d.is_dir():
        for p in d.glob(f"{CKPT_PREFIX}*.pt"):
            digits = p.stem[len(CKPT_PREFIX):]
            if digits.isdigit():
                out.append((int(digits), p))
    return sorted(out)


def cache_root() -> Path:
    """$GAN_BENCH_CACHE, else ~/.cache/gan-bench: built-in shards, classifiers, feature caches, CPU peak."""
    root = os.environ.get("GAN_BENCH_CACHE") or "~/.cache/gan-bench"
    return Path(os.path.expanduser(root)).absolute()


# ---- writing ---------------------------------------------------------------------------------------
def fsync_dir(path: Union[str, Path]) -> None:
    """Make a rename or unlink inside `path` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_tree(path: Union[str, Path]) -> None:
    """fsync every file under `path`, then every directory, deepest first: a directory published by one
    rename (a shard set) is then complete on disk before its name appears."""
    path = Path(path)
    for f in (p for p in path.rglob("*") if p.is_file()):
        fd = os.open(str(f), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    for d in sorted((p for p in path.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)) + [path]:
        fsync_dir(d)


def temp_path(path: Union[str, Path]) -> Path:
    """A hidden temp name beside `path`, unique to this process and call."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


TEMP_RE = re.compile(r"\..+\.tmp-\d+-[0-9a-f]{8}")  # temp_path's names


def remove_temps(directory: Union[str, Path]) -> list[Path]:
    """Delete the temp files atomic_write left in `directory` when its process was killed mid-write
    (kill -9, power loss). Only the writer that holds the run lock may call this: a live writer's temp
    file has the same form."""
    gone = []
    for p in Path(directory).glob(".*.tmp-*"):
        if TEMP_RE.fullmatch(p.name) and p.is_file():
            p.unlink(missing_ok=True)
            gone.append(p)
    return gone


def atomic_write(path: Union[str, Path], data: Union[str, bytes, None] = None, *,
                 write: Optional[Callable] = None) -> Path:
    """THE writer of every file a reader may see half-written: write to a process-unique temp file,
    fsync it, rename it over `path`, fsync the directory. Give `data` (str or bytes) or `write`, a
    function that writes to the open binary file (e.g. `lambda f: torch.save(obj, f)`). On any error
    the temp file is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if write is not None:
                write(f)
            else:
                f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def json_value(v):
    """Strict JSON: NaN / inf become null; numpy scalars and paths become plain values."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if hasattr(v, "item") and not isinstance(v, (str, bytes)) and getattr(v, "ndim", 1) == 0:
        return json_value(v.item())
    if isinstance(v, Path):
        return str(v)
    return v


def dumps(obj) -> str:
    return json.dumps(obj, default=str)


def write_json(path: Union[str, Path], obj: Mapping) -> Path:
    return atomic_write(path, json.dumps(obj, indent=2, default=str) + "\n")


def append_jsonl(path: Union[str, Path], record: Mapping) -> None:
    """Append one line and fsync it: a record either is in the file whole or is the one unreadable last
    line of a killed process (which read_jsonl counts)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(dumps({k: json_value(v) for k, v in record.items()}) + "\n")
        f.flush()
        os.fsync(f.fileno())


# ---- reading ---------------------------------------------------------------------------------------
def read_json(path: Union[str, Path]) -> Optional[dict]:
    """The JSON object in `path`; None when it is missing, unreadable or not an object."""
    try:
        value = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


@dataclass
class Jsonl:
    rows: list = field(default_factory=list)     # the readable records (JSON objects)
    bad_lines: list = field(default_factory=list)  # 1-based numbers of the lines that are not

    @property
    def bad(self) -> int:
        return len(self.bad_lines)


def read_jsonl(path: Union[str, Path], warn: bool = True) -> Jsonl:
    """Every JSON object line of `path` (missing file: none). A line that is not one is counted in
    `bad_lines` and, with `warn`, reported on stderr: a killed writer's half line, or damage."""
    out = Jsonl()
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return out
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            out.rows.append(row)
        else:
            out.bad_lines.append(i)
    if warn and out.bad_lines:
        shown = ", ".join(map(str, out.bad_lines[:5])) + (" ..." if out.bad > 5 else "")
        print(f"warning: {path}: {out.bad} unreadable line(s) skipped (line {shown})", file=sys.stderr)
    return out


def truncate_jsonl_after(path: Union[str, Path], step: int,
                         keep: Callable[[dict], bool] = lambda rec: False) -> int:
    """Drop the records after `step` (those of a resumed run's lost tail) unless keep(record); an
    unreadable line is dropped and reported. Returns how many records were dropped."""
    path = Path(path)
    if not path.exists():
        return 0
    data = read_jsonl(path)
    kept = [r for r in data.rows if r.get("step", 0) <= step or keep(r)]
    atomic_write(path, "".join(dumps(r) + "\n" for r in kept))
    return len(data.rows) - len(kept)


# ---- the ONE best-evaluation rule --------------------------------------------------------------------
def counts_for_best(rec: Mapping, metric: str, extractor: Optional[str]) -> bool:
    """An evaluation competes for "best" when training made it (not `bench eval`), it is untruncated,
    it used the run's extractor, and the metric is a finite number."""
    v = rec.get(metric)
    return (rec.get("source") != SOURCE_BENCH_EVAL and rec.get("truncation") is None
            and (extractor is None or rec.get("extractor", extractor) == extractor)
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))


def best_eval(summary: Optional[Mapping], evals: Iterable[Mapping], metric: str,
              extractor: Optional[str]) -> Optional[dict]:
    """The run's best evaluation by `metric`: {metric, value, step, extractor, from}, or None.

    summary.json's `best` wins when it is for this metric (a finished run recorded it). Otherwise the
    best of the training evaluations in evals.jsonl (see counts_for_best); of equal values the
    earliest. Training (checkpoints/best.pt), `bench eval which=best` and the report all call this."""
    b = (summary or {}).get("best") if summary else None
    if isinstance(b, Mapping) and b.get("metric") == metric and counts_for_best(
            {metric: b.get("value"), "extractor": b.get("extractor", extractor)}, metric, extractor):
        return {"metric": metric, "value": b["value"], "step": b.get("step"),
                "extractor": b.get("extractor", extractor), "from": SUMMARY}
    best = None
    for rec in evals:
        if counts_for_best(rec, metric, extractor) and (
                best is None or registry.is_better(metric, rec[metric], best["value"])):
            best = {"metric": metric, "value": rec[metric], "step": rec.get("step"),
                    "extractor": rec.get("extractor", extractor), "from": EVALS}
    return best


# ---- the run lock --------------------------------------------------------------------------------
LOCK = ".lock"


class RunLocked(RuntimeError):
    """Another live process holds the run directory."""


LOCK_RETRY_S = 2.0  # RunLock.acquire retries this long: a watcher holds the lock for moments (a probe, a write)


class RunLock:
    """An exclusive flock on <run dir>/.lock for the whole life of the writer (rank 0 of a run).

    The lock file holds the holder's host, pid and start time, so a second writer can say who has it.
    The kernel drops a flock when its process dies, so a lock left by a killed process is simply taken
    over; the file's stale contents are then rewritten."""

    def __init__(self, run_dir: Union[str, Path]):
        self.path = Path(run_dir) / LOCK
        self._fd: Optional[int] = None

    def acquire(self) -> "RunLock":
        import fcntl
        import socket
        import time

        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(str(self.path), os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + LOCK_RETRY_S
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:  # a brief holder (a watcher's probe, its summary update)
                    time.sleep(0.05)
                    continue
            holder = self.holder()
            os.close(fd)
            who = (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}"
                   if holder else "a process that has not written its name yet")
            raise RunLocked(f"run directory {self.path.parent} is in use by another gan-bench process "
                            f"({who}); wait for it, or use another run.dir") from None
        info = {"host": socket.gethostname(), "pid": os.getpid(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
        os.fsync(fd)
        self._fd = fd
        return self

    def holder(self) -> Optional[dict]:
        return read_json(self.path)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
