"""bench.rundir: the one writer, the one reader, the one best rule, the run lock (docs/architecture.md)."""
import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from bench import metrics_registry as registry
from bench import rundir


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path):
    p = tmp_path / "sub" / "x.json"
    rundir.atomic_write(p, "old")
    rundir.atomic_write(p, b"new")
    assert p.read_bytes() == b"new"
    assert sorted(os.listdir(p.parent)) == ["x.json"]


def test_atomic_write_failure_keeps_the_old_file_and_no_temp(tmp_path):
    p = tmp_path / "ckpt.pt"
    rundir.atomic_write(p, "complete")

    def half(f):
        f.write(b"half of a checkpoint")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        rundir.atomic_write(p, write=half)
    assert p.read_text() == "complete"
    assert os.listdir(tmp_path) == ["ckpt.pt"]


def test_temp_names_are_unique_per_call(tmp_path):
    names = {rundir.temp_path(tmp_path / "a.pt").name for _ in range(50)}
    assert len(names) == 50 and all(n.startswith(".a.pt.tmp-") for n in names)


def test_read_jsonl_counts_and_reports_bad_lines(tmp_path, capsys):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1}\n[1, 2]\n\n{"step": 2}\n{"step": 3, "loss/D": 0.\n')
    data = rundir.read_jsonl(p)
    assert [r["step"] for r in data.rows] == [1, 2]
    assert data.bad_lines == [2, 5] and data.bad == 2
    assert "2 unreadable line(s)" in capsys.readouterr().err
    assert rundir.read_jsonl(tmp_path / "missing.jsonl").rows == []


def test_read_json_is_none_for_missing_broken_or_not_an_object(tmp_path):
    (tmp_path / "a.json").write_text('{"x": 1}')
    (tmp_path / "b.json").write_text('{"x": ')
    (tmp_path / "c.json").write_text('[1]')
    assert rundir.read_json(tmp_path / "a.json") == {"x": 1}
    assert [rundir.read_json(tmp_path / n) for n in ("b.json", "c.json", "d.json")] == [None, None, None]


def test_append_and_truncate_jsonl(tmp_path):
    p = tmp_path / "evals.jsonl"
    for step in (10, 20, 30):
        rundir.append_jsonl(p, {"step": step, "eval/FID": float("nan") if step == 20 else 1.0 * step})
    rundir.append_jsonl(p, {"step": 30, "source": "bench eval"})
    rows = rundir.read_jsonl(p).rows
    assert rows[1]["eval/FID"] is None  # strict JSON: NaN is null
    dropped = rundir.truncate_jsonl_after(p, 15, keep=lambda r: r.get("source") == "bench eval")
    assert dropped == 2
    assert [(r["step"], r.get("source")) for r in rundir.read_jsonl(p).rows] == [(10, None), (30, "bench eval")]


def test_list_checkpoints_orders_by_step_and_ignores_others(tmp_path):
    for step in (100, 20, 3):
        (tmp_path / rundir.ckpt_name(step)).write_bytes(b"x")
    for other in ("best.pt", ".ckpt-0000200.pt.tmp-1-ab", "ckpt-abc.pt"):
        (tmp_path / other).write_bytes(b"x")
    assert [s for s, _ in rundir.list_checkpoints(tmp_path)] == [3, 20, 100]
    assert rundir.list_checkpoints(tmp_path / "none") == []


def _ev(step, fid, **kw):
    return {"step": step, "eval/FID": fid, "eval/IS": 10.0 - fid / 10, "extractor": "domain", **kw}


def test_best_eval_one_rule():
    evals = [_ev(100, 50.0), _ev(200, 30.0), _ev(300, 30.0),
             _ev(400, 10.0, truncation=0.5),            # truncated: does not compete
             _ev(500, 5.0, source="bench eval"),         # a `bench eval` record: does not compete
             _ev(600, 1.0, extractor="inception"),       # another extractor
             {"step": 700, "eval/FID": None, "extractor": "domain"}]
    best = rundir.best_eval(None, evals, "eval/FID", "domain")
    assert (best["step"], best["value"], best["from"]) == (200, 30.0, "evals.jsonl")  # ties: the earliest
    assert rundir.best_eval(None, evals, "eval/IS", "domain")["step"] == 200  # higher is better
    assert rundir.best_eval(None, evals, "eval/FID", "inception")["step"] == 600
    assert rundir.best_eval(None, [], "eval/FID", "domain") is None
    summary = {"best": {"metric": "eval/FID", "value": 42.0, "step": 100}}
    assert rundir.best_eval(summary, evals, "eval/FID", "domain")["from"] == "summary.json"
    # a summary that recorded another metric does not answer for this one
    assert rundir.best_eval(summary, evals, "eval/IS", "domain")["from"] == "evals.jsonl"


def test_registry_is_consistent():
    assert registry.LOWER_IS_BETTER == {"eval/FID", "eval/KID", "eval/intra_FID"}
    assert set(registry.BEST_METRICS) <= set(registry.EVAL_METRICS)
    assert registry.FIDELITY_KEYS["frechet_inception_distance"] == "eval/FID"
    assert registry.is_better("eval/FID", 1.0, 2.0) and not registry.is_better("eval/IS", 1.0, 2.0)
    assert registry.format_value("eval/KID", 0.0123456) == "0.01235"


HOLD = textwrap.dedent("""
    import sys, time
    from bench import rundir
    lock = rundir.RunLock(sys.argv[1]).acquire()
    print("held", flush=True)
    time.sleep(120)
""")


def _holder(run_dir):
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_second_writer_is_refused_with_the_holder_named(tmp_path):
    p = _holder(tmp_path)
    try:
        with pytest.raises(rundir.RunLocked) as err:
            rundir.RunLock(tmp_path).acquire()
        msg = str(err.value)
        assert f"pid {p.pid}" in msg and "started" in msg and str(tmp_path) in msg
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def test_lock_of_a_killed_process_is_taken_over(tmp_path):
    p = _holder(tmp_path)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == p.pid  # stale contents
    with rundir.RunLock(tmp_path) as lock:
        assert lock.holder()["pid"] == os.getpid()
    # released: a second acquire in this process works again
    rundir.RunLock(tmp_path).acquire().release()


def test_fsync_tree_syncs_every_file_and_directory(tmp_path, monkeypatch):
    import os

    from bench import rundir

    (tmp_path / "set" / "sub").mkdir(parents=True)
    for name in ("set/a.tar", "set/sub/b.tar", "set/manifest.json"):
        (tmp_path / name).write_bytes(b"x")
    synced, real = [], os.fsync
    opened = {}
    real_open = os.open

    def track_open(path, flags, *a):
        fd = real_open(path, flags, *a)
        opened[fd] = os.path.relpath(path, tmp_path)
        return fd

    monkeypatch.setattr(os, "open", track_open)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(opened.get(fd)), real(fd))[1])
    rundir.fsync_tree(tmp_path / "set")
    assert set(synced) == {"set/a.tar", "set/sub/b.tar", "set/manifest.json", "set/sub", "set"}
    assert synced.index("set/sub") < synced.index("set")  # deepest directory first, the top last


PROBE = textwrap.dedent("""
    import fcntl, os, sys, time
    fd = os.open(sys.argv[1], os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_SH)  # what a watcher's probe takes, here held for a moment
    print("held", flush=True)
    time.sleep(0.5)
""")


def test_a_brief_holder_such_as_a_watchers_probe_is_waited_for_not_refused(tmp_path):
    """A training starting in the instant `bench eval watch` probes the run lock gets it (RunLock retries for
    rundir.LOCK_RETRY_S) instead of exiting 2."""
    (tmp_path / rundir.LOCK).write_text("")
    p = subprocess.Popen([sys.executable, "-c", PROBE, str(tmp_path / rundir.LOCK)], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "held"
        with rundir.RunLock(tmp_path) as lock:
            assert lock.holder()["pid"] == os.getpid()
    finally:
        p.wait()
