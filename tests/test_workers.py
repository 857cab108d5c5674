"""Child processes and lazily built resources on a cold start (bench/workers.py, bench.device.plain_autograd;
docs/architecture.md, "Cold starts"): a stop request never hangs a worker map, workers follow the cores, and a
resource built on first use is built outside the caller's no_grad / inference_mode / autocast."""
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from bench.workers import WorkerFailed, ordered_map, resolve_workers, usable_cpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _square(x):
    return x * x


def test_results_come_back_in_job_order_from_several_workers():
    assert list(ordered_map(_square, list(range(500)), 3)) == [x * x for x in range(500)]
    assert list(ordered_map(_square, [7], 4)) == [49]  # one job: no worker needed


def _run_isolated(code: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `code` in its own session (its own process group), so that a group signal it sends reaches only
    itself and its children, never pytest."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True, env={**os.environ, "PYTHONPATH": ROOT})


@pytest.mark.faults
@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT", "SIGUSR1"])
def test_a_group_signal_during_a_worker_map_neither_kills_the_workers_nor_hangs(sig):
    """The parent has a Python stop handler installed (as `bench train` does before writing the built-in data);
    the whole group gets the signal mid-map. Every result still arrives in order, the handler saw the signal
    once, and no worker is left behind."""
    proc = _run_isolated(f"""
        import multiprocessing as mp, os, signal, time
        from bench.workers import ordered_map
        seen = []
        signal.signal(signal.{sig}, lambda *a: seen.append(1))
        def slow(x):
            time.sleep(0.005)
            return x
        out = []
        for i, v in enumerate(ordered_map(slow, list(range(300)), 2)):
            out.append(v)
            if i == 20:
                os.killpg(0, signal.{sig})
        print(out == list(range(300)), len(seen), len(mp.active_children()))
    """)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["True", "1", "0"]


def test_the_built_in_data_is_written_by_workers_under_a_stop_handler(tmp_path):
    """The real shard writer with 2 workers, in a process whose SIGTERM handler would swallow Pool.terminate()'s
    SIGTERM: it finishes, and a group SIGTERM sent while it writes does not stop it."""
    proc = _run_isolated(f"""
        import os, signal, threading
        from bench.data.shards import ShardSetSpec, make_shards
        seen = []
        signal.signal(signal.SIGTERM, lambda *a: seen.append(1))
        threading.Timer(0.2, lambda: os.killpg(0, signal.SIGTERM)).start()
        make_shards({str(tmp_path / 'out')!r}, ShardSetSpec(source="shapes", resolution=32, num_samples=20000,
                    samples_per_shard=2500, seed=0, workers=2), progress=False)
        print("done", len(seen))
    """, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["done", "1"]  # the signal arrived while the workers wrote, and changed nothing
    assert len(list((tmp_path / "out").glob("*.tar"))) == 8


def _fail_on_50(x):
    if x == 50:
        raise ValueError("bad job")
    return x


def _die_on_51(x):
    if x == 51:
        os._exit(7)
    return x


def test_a_failing_or_dying_worker_is_one_error_naming_the_job():
    with pytest.raises(WorkerFailed, match=r"failed on job 50: ValueError: bad job"):
        list(ordered_map(_fail_on_50, list(range(100)), 2))
    with pytest.raises(WorkerFailed, match=r"exited with code 7 before finishing job 51"):
        list(ordered_map(_die_on_51, list(range(100)), 2))


def _sleepy(x):
    time.sleep(0.01)
    return x


def test_stopping_early_kills_the_workers_at_once():
    import multiprocessing as mp

    g = ordered_map(_sleepy, list(range(5000)), 2)
    next(g)
    t0 = time.monotonic()
    g.close()  # an error or a second Ctrl-C in the consumer
    assert time.monotonic() - t0 < 5
    assert mp.active_children() == []


def test_worker_counts_follow_the_cores_this_process_has(monkeypatch):
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert usable_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "6")
    assert usable_cpus() == 6 and resolve_workers("auto") == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "2")
    assert resolve_workers("auto") == 1  # torch warns above the core count: never with auto
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "64")
    assert resolve_workers("auto") == 4
    assert resolve_workers(0) == 0 and resolve_workers(3) == 3


@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_the_domain_classifier_trains_when_first_needed_inside_any_grad_context(tmp_path, context):
    """The diversity probe and evaluation build the classifier on first use from inside no_grad (and could be
    inside inference_mode or autocast); training it there must still work and give fp32 weights."""
    from bench.data.shards import ShardSetSpec, make_shards
    from bench.eval.classifier import load_classifier
    from bench.eval.metrics import ensure_classifier

    shards = tmp_path / "s"
    make_shards(shards, ShardSetSpec(source="shapes", resolution=16, num_samples=60, samples_per_shard=30, seed=0),
                progress=False)
    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
           "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}[context]
    with ctx:
        path = ensure_classifier(shards, 16, train_if_missing=True, progress=False)
    net, info = load_classifier(path)
    assert info["n_train"] > 0 and info["steps"] > 0
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in net.parameters())


@pytest.fixture(scope="module")
def two_brightness_classes(tmp_path_factory):
    """Shards of a set any classifier learns at once: dark images against light ones (16 px, 40 of each)."""
    import numpy as np
    from PIL import Image

    from bench.data.shards import ShardSetSpec, make_shards

    root = tmp_path_factory.mktemp("bright")
    rng = np.random.default_rng(0)
    for name, lo in (("dark", 0), ("light", 170)):
        (root / "src" / name).mkdir(parents=True)
        for i in range(40):
            Image.fromarray(rng.integers(lo, lo + 86, (16, 16, 3), dtype=np.uint8)).save(root / "src" / name / f"{i}.png")
    make_shards(root / "s", ShardSetSpec(source="folder", folder=root / "src", resolution=16, samples_per_shard=20),
                progress=False)
    return root / "s"


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("context", ["no_grad", "inference_mode", "autocast"])
def test_a_classifier_built_inside_a_callers_context_learns(two_brightness_classes, tmp_path, context, precision):
    """What ensure_classifier does (train_classifier under plain_autograd) inside the caller's context learns an
    easy set. An autocast region around it, even a disabled one, used to keep the bf16 casts of the first
    weights for the whole training (the cast cache is cleared only by the outermost autocast): chance accuracy."""
    from bench.device import plain_autograd
    from bench.eval.classifier import ClassifierSettings, train_classifier

    ctx = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
           "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}[context]
    settings = ClassifierSettings(epochs=4, min_steps=80, width=8, holdout=0.25, precision=precision)
    with ctx, plain_autograd():
        info = train_classifier(two_brightness_classes, out=tmp_path / "c.pt", settings=settings, progress=False)
    assert info["accuracy"] >= 0.9, info


def test_the_cpu_peak_is_measured_in_its_own_precision_inside_autocast(tmp_path, monkeypatch):
    """Under a caller's bf16 autocast, an fp32 peak measured without plain_autograd would run bf16 kernels."""
    from bench import device as bdevice

    monkeypatch.setenv("GAN_BENCH_CACHE", str(tmp_path))
    seen = []
    real = bdevice.measure_cpu_peak

    def spy(precision, *a, **k):
        seen.append((torch.is_autocast_enabled("cpu"), torch.is_grad_enabled()))
        return real(precision, seconds=0.1)

    monkeypatch.setattr(bdevice, "measure_cpu_peak", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        bdevice.peak_tflops(torch.device("cpu"), "fp32", remeasure=True)
    assert seen == [(False, False)]


def test_the_classifier_budget_clock_counts_this_process_cpu_not_the_wall(one_thread):
    """On a busy machine the wall clock runs while this process waits for a core; the classifier's budget
    counts only its own CPU time, so contention slows training instead of cutting it short."""
    from bench.eval.classifier import _budget_clock

    clock = _budget_clock(torch.device("cpu"))
    time.sleep(0.8)  # waiting, as for a core another process holds
    assert clock() < 0.5  # CPU time ~0; the wall-clock floor counts a quarter of it (0.2 s)


def test_a_small_set_gets_enough_steps_and_a_useless_classifier_is_said(tmp_path, capsys):
    """min_steps stretches a small set's epochs (DEFAULT_SETTINGS: 600 steps); a classifier near chance is one
    warning line naming what to do."""
    from bench.data.shards import ShardSetSpec, make_shards
    from bench.eval.classifier import DEFAULT_SETTINGS, ClassifierSettings, train_classifier

    assert DEFAULT_SETTINGS.min_steps >= 500
    shards = tmp_path / "s"
    make_shards(shards, ShardSetSpec(source="shapes", resolution=16, num_samples=120, samples_per_shard=60, seed=0),
                progress=False)
    info = train_classifier(shards, out=tmp_path / "a.pt", settings=ClassifierSettings(
        epochs=1, min_steps=30, width=8, holdout=0.2, precision="fp32"), progress=False)
    assert info["steps"] >= 30 and info["epochs"] > 1
    capsys.readouterr()
    info = train_classifier(shards, out=tmp_path / "b.pt", settings=ClassifierSettings(
        epochs=1, min_steps=0, width=8, holdout=0.2, lr=1e-9, precision="fp32"), progress=False)  # learns nothing
    err = capsys.readouterr().err
    assert info["accuracy"] < 0.3
    assert err.count("warning: the domain classifier") == 1 and "bench eval train-classifier" in err
