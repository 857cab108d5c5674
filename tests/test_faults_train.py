"""Faults around a training run's directory: a second writer, a failed checkpoint save, hostile
checkpoint files, and resuming under a changed config (docs/architecture.md, "Run directory" and
"Checkpoints")."""
import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import TINY

pytestmark = pytest.mark.faults


def _bench(*args):
    return [sys.executable, "-m", "bench.cli", *args]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (os.getcwd(), env.get("PYTHONPATH")) if p)
    return env


def test_a_second_writer_is_refused_while_the_first_runs(tmp_path, tiny_shards):
    run_dir = tmp_path / "locked"
    args = ["train", f"data.shards={tiny_shards}", f"run.dir={run_dir}", *TINY, "train.batch_size=4",
            "train.precision=fp32"]
    steps = 40
    first = subprocess.Popen(_bench(*args, f"train.steps={steps}", "train.ckpt_every=10"), env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 300
        metrics = run_dir / "metrics.jsonl"
        while not (metrics.exists() and metrics.read_text().strip()):  # the first one is training
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        # Pause the first run so it cannot finish before the second has tried (the second waits out
        # rundir.LOCK_RETRY_S after its own start-up). A stopped process still holds its lock.
        first.send_signal(signal.SIGSTOP)
        try:
            second = subprocess.run(_bench(*args, "train.steps=2"), env=_env(), capture_output=True, text=True,
                                    timeout=300)
        finally:
            first.send_signal(signal.SIGCONT)
        assert first.poll() is None, "the first run ended before the second tried"
        err = second.stderr.strip()
        assert second.returncode == 2, err[-2000:]
        assert len(err.splitlines()) == 1 and err.startswith("error: "), err
        assert f"pid {first.pid}" in err, err
        out, err1 = first.communicate(timeout=600)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err1[-2000:]
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    assert json.loads((run_dir / "summary.json").read_text())["status"] == "completed"


def _checkpoints(tmp_path):
    from bench.train.state import Checkpoints

    ckpts = Checkpoints(tmp_path, keep=2, is_main=True)
    ckpts.save(1, lambda: {"step": 1, "w": torch.ones(3)})
    return ckpts


def test_a_failed_checkpoint_save_leaves_no_temp_file(tmp_path, monkeypatch):
    from bench import rundir

    ckpts = _checkpoints(tmp_path)

    def full_disk(obj, f, *a, **k):
        f.write(b"partial bytes")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError) as info:
        ckpts.save(2, lambda: {"step": 2, "w": torch.zeros(3)})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.undo()
    assert sorted(p.name for p in ckpts.dir.iterdir()) == [rundir.ckpt_name(1)]
    state, path = ckpts.load_newest()
    assert path.name == rundir.ckpt_name(1) and state["step"] == 1


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root ignores directory permissions")
def test_a_save_into_a_read_only_directory_fails_cleanly(tmp_path):
    from bench import rundir

    ckpts = _checkpoints(tmp_path)
    ckpts.dir.chmod(0o555)
    try:
        with pytest.raises(OSError):
            ckpts.save(2, lambda: {"step": 2, "w": torch.zeros(3)})
    finally:
        ckpts.dir.chmod(0o755)
    assert sorted(p.name for p in ckpts.dir.iterdir()) == [rundir.ckpt_name(1)]
    assert ckpts.load_newest()[0]["step"] == 1


def test_the_directory_is_fsynced_before_old_checkpoints_are_pruned(tmp_path, monkeypatch):
    from bench import rundir

    ckpts = _checkpoints(tmp_path)
    ckpts.save(2, lambda: {"step": 2})
    events = []
    real_fsync, real_unlink = rundir.fsync_dir, type(ckpts.dir).unlink
    monkeypatch.setattr(rundir, "fsync_dir", lambda p: (events.append(("fsync", str(p))), real_fsync(p))[1])
    monkeypatch.setattr(type(ckpts.dir), "unlink",
                        lambda self, *a, **k: (events.append(("unlink", self.name)), real_unlink(self, *a, **k))[1])
    ckpts.save(3, lambda: {"step": 3})
    unlinks = [i for i, e in enumerate(events) if e == ("unlink", rundir.ckpt_name(1))]
    assert unlinks, events
    assert ("fsync", str(ckpts.dir)) in events[: unlinks[0]], events
    assert [p.name for _, p in rundir.list_checkpoints(ckpts.dir)] == [rundir.ckpt_name(2), rundir.ckpt_name(3)]


class _Planted:
    """Unpickling this runs code: it opens (creates) `marker`. A hostile checkpoint carries one."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _train(tmp_path, tiny_shards, *extra, name="run"):
    from bench.cli import main

    run_dir = tmp_path / name
    rc = main(["train", f"data.shards={tiny_shards}", f"run.dir={run_dir}", *TINY, "train.batch_size=4",
               "train.precision=fp32", *extra])
    return rc, run_dir


def test_a_hostile_checkpoint_is_not_executed_on_resume(tmp_path, tiny_shards, capsys):
    from bench import rundir

    marker = tmp_path / "pwned"
    probe = tmp_path / "probe.pt"  # the planted object does run when unpickled without weights_only
    torch.save({"x": _Planted(tmp_path / "probe-marker")}, probe)
    torch.load(probe, weights_only=False)
    assert (tmp_path / "probe-marker").exists()

    rc, run_dir = _train(tmp_path, tiny_shards, "train.steps=2", "train.ckpt_every=1", "train.ckpt_keep=3")
    assert rc == 0
    # checkpoints load with weights_only=True: RNG states and everything else are tensors and plain values
    torch.load(run_dir / rundir.CHECKPOINTS / rundir.ckpt_name(2), weights_only=True)
    hostile = run_dir / rundir.CHECKPOINTS / rundir.ckpt_name(3)
    torch.save({"step": 3, "G": _Planted(marker)}, hostile)
    capsys.readouterr()
    rc, run_dir = _train(tmp_path, tiny_shards, "train.steps=3", "train.ckpt_every=1", "train.ckpt_keep=3")
    captured = capsys.readouterr()
    assert rc == 0
    assert not marker.exists()
    assert f"checkpoint {hostile} is unreadable" in captured.err, captured.err
    assert f"resuming from {run_dir / rundir.CHECKPOINTS / rundir.ckpt_name(2)} at step 2" in captured.out
    rows = [json.loads(line) for line in (run_dir / rundir.METRICS).read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]


def test_resume_under_an_incompatible_config_is_one_line(tmp_path, tiny_shards, capsys):
    from bench import rundir

    rc, run_dir = _train(tmp_path, tiny_shards, "train.steps=1")
    assert rc == 0
    before = (run_dir / rundir.CONFIG).read_text()
    capsys.readouterr()
    rc, _ = _train(tmp_path, tiny_shards, "train.steps=2", "model.ch=16", "model.z_dim=64", "train.g_lr=0.001")
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert "model.ch: 8 -> 16" in err and "model.z_dim: 32 -> 64" in err, err
    assert "g_lr" not in err and "Traceback" not in err
    assert (run_dir / rundir.CONFIG).read_text() == before and not list(run_dir.glob("config-*.yaml"))
    assert len((run_dir / rundir.METRICS).read_text().splitlines()) == 1
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["steps"] == 1

    rc, _ = _train(tmp_path, tiny_shards, "train.steps=2", "model=dcgan")
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "model.family: 'biggan' -> 'dcgan'" in err, err


def test_resume_under_a_compatible_config_keeps_the_history(tmp_path, tiny_shards):
    import yaml

    from bench import rundir

    rc, run_dir = _train(tmp_path, tiny_shards, "train.steps=1")
    assert rc == 0
    old_lr = yaml.safe_load((run_dir / rundir.CONFIG).read_text())["train"]["g_lr"]
    rc, _ = _train(tmp_path, tiny_shards, "train.steps=2", "train.g_lr=0.00123")
    assert rc == 0
    run = json.loads((run_dir / rundir.RUN_JSON).read_text())
    assert run["config_changes"] == [{"step": 1, "changes": {"train.g_lr": [old_lr, 0.00123], "train.steps": [1, 2]}}]
    assert yaml.safe_load((run_dir / rundir.CONFIG).read_text())["train"]["g_lr"] == 0.00123
    kept = yaml.safe_load((run_dir / "config-0000001.yaml").read_text())["train"]
    assert kept["g_lr"] == old_lr and kept["steps"] == 1
    rc, _ = _train(tmp_path, tiny_shards, "train.steps=3", "train.g_lr=0.00123")
    assert rc == 0
    run = json.loads((run_dir / rundir.RUN_JSON).read_text())
    assert [c["step"] for c in run["config_changes"]] == [1, 2]
    assert run["config_changes"][1]["changes"] == {"train.steps": [2, 3]}
    assert sorted(p.name for p in run_dir.glob("config*.yaml")) == ["config-0000001.yaml", "config-0000002.yaml",
                                                                   "config.yaml"]
    assert [json.loads(line)["step"] for line in (run_dir / rundir.METRICS).read_text().splitlines()] == [1, 2, 3]


@pytest.mark.parametrize("signame", ["SIGINT", "SIGTERM"])
def test_a_group_signal_checkpoints_and_stops_with_one_line(tmp_path, tiny_shards, signame):
    """Ctrl-C in a terminal and Slurm's scancel / preemption signal every process of the job: here the
    whole process group of a `bench train` with two decode workers."""
    import signal

    from bench import rundir

    run_dir = tmp_path / "group"
    args = ("train", f"data.shards={tiny_shards}", f"run.dir={run_dir}", *TINY, "train.batch_size=4",
            "train.precision=fp32", "train.ckpt_every=1000", "train.sample_every=1000", "data.num_workers=2")
    # The dispositions a terminal gives: a test started from a background job inherits an ignored SIGINT, which
    # the harness rightly keeps ignored, so the test sets the default itself in the child.
    proc = subprocess.Popen(_bench(*args, "train.steps=5000"), env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=_default_signals)
    try:
        metrics = run_dir / rundir.METRICS
        deadline = time.time() + 300
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.time() < deadline
            time.sleep(0.2)
        os.killpg(proc.pid, getattr(signal, signame))  # the main process and its decode workers
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    summary = json.loads((run_dir / rundir.SUMMARY).read_text())
    step = summary["steps"]
    assert summary["status"] == rundir.INTERRUPTED and 2 <= step < 5000
    assert err.strip().splitlines() == [f"stopped by {signame} at step {step}: checkpoint written; run the same "
                                        "command to resume"], err
    assert [p.name for _, p in rundir.list_checkpoints(run_dir / rundir.CHECKPOINTS)] == [rundir.ckpt_name(step)]
    assert not list((run_dir / rundir.SAMPLES).glob("*.png"))  # the interrupted step wrote no samples
    assert not (run_dir / rundir.EVALS).exists()
    # and it resumes from the stop step (train.steps set to 2 past it: a compatible change)
    resumed = subprocess.run(_bench(*args, f"train.steps={step + 2}"), env=_env(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0 and f"resuming from {run_dir / 'checkpoints' / rundir.ckpt_name(step)}" in \
        resumed.stdout, resumed.stderr[-2000:]
    assert json.loads((run_dir / rundir.SUMMARY).read_text())["status"] == rundir.COMPLETED


def test_a_signal_during_set_up_stops_before_the_first_step(tmp_path, tiny_shards, capsys):
    """The CLI installs the handlers before the trainer is built: a signal that arrives during set-up
    or resume stops the run cleanly before its first step (a resumed one keeps its checkpoint)."""
    import signal

    from bench import rundir
    from bench.config import compose, validate
    from bench.train.loop import setup, train
    from bench.train.state import StopRequest

    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=4", "train.batch_size=4",
                            "train.precision=fp32", "train.ckpt_every=2"]))
    assert train(*setup(cfg, tmp_path / "r", quiet=True))["steps"] == 4
    cfg.train.steps = 8
    stop = StopRequest()
    stop.install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)  # delivered now, before the trainer exists
        summary = train(*setup(cfg, tmp_path / "r", quiet=True, stop=stop))
    finally:
        stop.restore()
    assert summary["status"] == rundir.INTERRUPTED and summary["steps"] == 4
    assert "stopped by SIGTERM during set-up, before training step 5; run the same command to resume" in \
        capsys.readouterr().err
    assert [s for s, _ in rundir.list_checkpoints(tmp_path / "r" / rundir.CHECKPOINTS)] == [2, 4]
    assert [json.loads(line)["step"] for line in (tmp_path / "r" / rundir.METRICS).read_text().splitlines()] == \
        [1, 2, 3, 4]


def _default_signals() -> None:
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_DFL)


@pytest.fixture
def terminal_sigint():
    """Python's own Ctrl-C handler, as in a terminal: pytest started as a background job inherits SIGINT ignored,
    and the harness leaves an ignored SIGINT ignored, so a test that sends SIGINT sets the disposition itself."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


def test_the_interrupted_step_writes_no_samples_and_runs_no_evaluation(tmp_path, tiny_shards, capsys,
                                                                        terminal_sigint, monkeypatch):
    import signal

    from bench import rundir
    from bench.config import compose, validate
    from bench.train import loop

    calls = []
    step = loop.train_step

    def watched_step(run, state, data, watch):
        step(run, state, data, watch)
        if state.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C during step 3

    monkeypatch.setattr(loop, "train_step", watched_step)
    monkeypatch.setattr(loop, "evaluate", lambda run, state: calls.append(("eval", state.step)))
    monkeypatch.setattr(loop, "save_samples", lambda run, state: calls.append(("samples", state.step)))
    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=6", "train.batch_size=4",
                            "train.precision=fp32", "train.sample_every=1", "eval.every=1"]))
    summary = loop.train(*loop.setup(cfg, tmp_path / "int", quiet=True))
    assert summary["status"] == rundir.INTERRUPTED and summary["steps"] == 3
    assert calls == [("samples", 1), ("eval", 1), ("samples", 2), ("eval", 2)]
    assert rundir.ckpt_name(3) in [p.name for _, p in rundir.list_checkpoints(tmp_path / "int" / rundir.CHECKPOINTS)]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handler is restored
    assert "stopped by SIGINT at step 3" in capsys.readouterr().err


def test_a_signal_during_the_samples_of_a_step_stops_after_the_next_step(tmp_path, tiny_shards, capsys, monkeypatch):
    import signal

    from bench import rundir
    from bench.config import compose, validate
    from bench.train import loop

    def samples(run, state):
        if state.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)  # after step 2's checkpoint decision

    monkeypatch.setattr(loop, "save_samples", samples)
    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=6", "train.batch_size=4",
                            "train.precision=fp32", "train.sample_every=1", "train.ckpt_every=100"]))
    summary = loop.train(*loop.setup(cfg, tmp_path / "between", quiet=True))
    # every rank stops at the same step: the request is agreed after the next step, which is checkpointed
    assert summary["status"] == rundir.INTERRUPTED and summary["steps"] == 3
    ckpts = [p.name for _, p in rundir.list_checkpoints(tmp_path / "between" / rundir.CHECKPOINTS)]
    assert ckpts == [rundir.ckpt_name(3)]
    assert "stopped by SIGTERM at step 3" in capsys.readouterr().err


def _eval_cfg(metric="eval/FID"):
    from omegaconf import OmegaConf

    return OmegaConf.create({"best_metric": metric, "extractor": "domain"})


def _evals(*pairs):
    return [{"step": s, "eval/FID": v, "eval/IS": 10 - v, "extractor": "domain"} for s, v in pairs]


def test_best_pt_knows_the_evaluation_it_was_kept_for(tmp_path):
    """best.pt is written after the evaluation of its step, so it carries that evaluation as its best."""
    from bench import rundir
    from bench.eval.safeload import load_weights

    ckpts = _checkpoints(tmp_path)
    state = lambda best: {"step": 4, "w": torch.ones(2), "best": best}  # noqa: E731
    assert ckpts.keep_if_best(2, _evals((2, 5.0)), _eval_cfg(), state) == {
        "metric": "eval/FID", "value": 5.0, "step": 2, "extractor": "domain"}
    assert ckpts.keep_if_best(4, _evals((2, 5.0), (4, 7.0)), _eval_cfg(), state) is None  # worse: kept as it was
    kept = load_weights(ckpts.dir / rundir.BEST_CKPT)
    assert kept["best"]["step"] == 2 and kept["best"]["value"] == 5.0


def test_a_resume_drops_a_best_pt_from_steps_it_no_longer_has(tmp_path, capsys):
    """Killed after the evaluation of step 6 was kept as best.pt, with ckpt-6 lost: the resume from step 4
    drops the evaluation of step 6 and best.pt becomes the checkpoint of the best evaluation kept."""
    from bench import rundir
    from bench.eval.safeload import load_weights

    ckpts = _checkpoints(tmp_path)
    for step in (2, 4):
        ckpts.save(step, lambda step=step: {"step": step, "w": torch.full((2,), float(step)), "best": None})
    rundir.atomic_write(ckpts.dir / rundir.BEST_CKPT, write=lambda f: torch.save(
        {"step": 6, "w": torch.zeros(2), "best": {"metric": "eval/FID", "step": 6, "value": 1.0}}, f))
    best = ckpts.reconcile_best(_evals((2, 3.0), (4, 9.0)), _eval_cfg(), resume_step=4)  # step 6's record is gone
    assert best["step"] == 2 and best["value"] == 3.0
    assert "best.pt (step 6) is not the best evaluation kept" in capsys.readouterr().err
    kept = load_weights(ckpts.dir / rundir.BEST_CKPT)
    assert kept["step"] == 2 and kept["best"] == best  # the best step's own checkpoint, knowing its evaluation
    # missing (killed between the evaluation and best.pt) or unreadable: restored from the best step's checkpoint
    for damage, said in ((lambda p: p.unlink(), "(missing)"), (lambda p: p.write_bytes(b"junk"), "(unreadable)")):
        damage(ckpts.dir / rundir.BEST_CKPT)
        ckpts.reconcile_best(_evals((2, 3.0), (4, 9.0)), _eval_cfg(), resume_step=4)
        assert said in capsys.readouterr().err and load_weights(ckpts.dir / rundir.BEST_CKPT)["step"] == 2
    # with ckpt-2 pruned too, nothing can stand in for it: no best.pt rather than a wrong one
    (ckpts.dir / rundir.ckpt_name(2)).unlink()
    rundir.atomic_write(ckpts.dir / rundir.BEST_CKPT, write=lambda f: torch.save({"step": 6, "best": {}}, f))
    assert ckpts.reconcile_best(_evals((2, 3.0), (4, 9.0)), _eval_cfg(), resume_step=4)["step"] == 2
    assert not (ckpts.dir / rundir.BEST_CKPT).exists()
    ckpts.save(2, lambda: {"step": 2, "w": torch.full((2,), 2.0), "best": None})
    ckpts.keep = 10
    rundir.atomic_write(ckpts.dir / rundir.BEST_CKPT, write=lambda f: torch.save({"step": 6, "best": {}}, f))
    assert ckpts.reconcile_best(_evals((2, 3.0), (4, 9.0)), _eval_cfg(), resume_step=4)["step"] == 2
    assert load_weights(ckpts.dir / rundir.BEST_CKPT)["step"] == 2  # the best step's own checkpoint
    # consistent: left alone, and a changed eval.best_metric picks its own best
    capsys.readouterr()
    assert ckpts.reconcile_best(_evals((2, 3.0), (4, 9.0)), _eval_cfg(), 4)["step"] == 2
    assert "not the best" not in capsys.readouterr().err
    best = ckpts.reconcile_best(_evals((2, 3.0), (4, 1.0)), _eval_cfg("eval/IS"), 4)
    assert best == {"metric": "eval/IS", "value": 9.0, "step": 4, "extractor": "domain"}
    assert load_weights(ckpts.dir / rundir.BEST_CKPT)["step"] == 4


def test_temp_files_of_a_killed_save_are_removed_at_resume(tmp_path, capsys):
    from bench import rundir

    ckpts = _checkpoints(tmp_path)
    cut = rundir.temp_path(ckpts.dir / rundir.ckpt_name(2))
    cut.write_bytes(b"half a checkpoint")
    mine = ckpts.dir / ".notes.tmp-backup"  # not one of ours: kept
    mine.write_text("x")
    state, path = ckpts.for_resume()
    assert state["step"] == 1 and not cut.exists() and mine.exists()
    assert f"removed {cut.name}" in capsys.readouterr().err


def test_an_fp16_skip_backs_the_scale_off_and_the_next_step_runs():
    """A non-finite step with a GradScaler (fp16): the update is skipped, the scale backs off, and the next
    phase's unscale_ works (without scaler.update() on the skip it raises)."""
    from bench.train.loop import train_step
    from bench.train.phases import Phase
    from bench.train.telemetry import Stopwatch
    from conftest import one_phase

    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    poison = [True]

    def step(mb, backward):
        loss = net(torch.ones(2, 3)).sum() * (float("inf") if poison[0] else 1.0)
        backward(loss)
        return loss.detach()

    run, state = one_phase(Phase("D", net, opt, scaler, step, reads_data=False))
    before = net.weight.detach().clone()
    train_step(run, state, None, Stopwatch(torch.device("cpu")))
    assert state.guard.total == 1 and torch.equal(net.weight, before) and scaler.get_scale() == 512.0
    poison[0] = False
    train_step(run, state, None, Stopwatch(torch.device("cpu")))
    assert state.guard.total == 1 and not torch.equal(net.weight, before)
