import dataclasses
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tiny, fast model settings shared by the end-to-end tests.
TINY_NETS = ["model=biggan", "model.ch=8", "model.d_ch=8", "model.z_dim=32", "model.shared_dim=16", "data.num_workers=0",
             "data.shuffle_buffer=50", "train.tick_every=1", "train.sample_cols=2", "ema.start=0"]
# model=biggan: the default net is the main job's DCGAN (configs/model/dcgan_sn.yaml); a test's own model= wins
TINY = [*TINY_NETS, "eval.final=false"]  # the main job's end-of-run evaluation (eval.final=auto) only where asked
# (an experiment's own eval.final: use TINY_NETS)


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    """Built-in shards go to a temp cache, never the user's ~/.cache."""
    cache = tmp_path_factory.mktemp("cache")
    old = os.environ.get("GAN_BENCH_CACHE")
    os.environ["GAN_BENCH_CACHE"] = str(cache)
    yield cache
    if old is None:
        os.environ.pop("GAN_BENCH_CACHE", None)
    else:
        os.environ["GAN_BENCH_CACHE"] = old


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory):
    from bench.data.shards import ShardSetSpec, make_shards

    out = tmp_path_factory.mktemp("shards") / "shapes32"
    make_shards(out, ShardSetSpec(source="shapes", resolution=32, num_samples=240, samples_per_shard=60, seed=0),
                progress=False)
    return out


# ---- the local Slurm cluster (slurm/local-cluster.sh) -------------------------------------------------
CLUSTER_SCRIPT = ROOT / "slurm" / "local-cluster.sh"
SUBMITTED_SUFFIX = "_submitted.pkl"  # submitit's pickle in each job's folder: <folder>/<job id>_submitted.pkl
CANCEL_WAIT_S = 90  # scancel, then up to KillWait (15 s, slurm/local-cluster.sh) before SIGKILL, on a busy machine


def _local_slurm_conf() -> None:
    """Point the Slurm commands at the local cluster (what `eval "$(slurm/local-cluster.sh env)"` does)
    when SLURM_CONF is unset and the cluster's config exists, so that plain `pytest` works."""
    if os.environ.get("SLURM_CONF") or not CLUSTER_SCRIPT.exists():
        return
    try:
        out = subprocess.run(["bash", str(CLUSTER_SCRIPT), "env"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return
    conf = out.stdout.strip().rpartition("SLURM_CONF=")[2].strip().strip("'\"")
    if out.returncode == 0 and conf and Path(conf).is_file():
        os.environ["SLURM_CONF"] = conf


_local_slurm_conf()


def pytest_configure(config):
    config.addinivalue_line("markers", "faults: fault injection (cancelled jobs, failing ranks); slow")


def submitted_jobs(root: Path) -> set[str]:
    """Slurm job ids of the jobs submitted from under `root` (submitit's job folders)."""
    return {p.name[: -len(SUBMITTED_SUFFIX)] for p in Path(root).rglob(f"*{SUBMITTED_SUFFIX}")}


def cancel_jobs(job_ids) -> list[str]:
    """scancel these jobs (only these) if Slurm still has them, and wait until they are gone.
    Returns the ones that were still there."""
    job_ids = sorted(job_ids)
    if not job_ids or shutil.which("squeue") is None:
        return []
    left = queued_jobs(job_ids)
    if left:
        subprocess.run(["scancel", *left], capture_output=True, timeout=60)
        wait_until_gone(left)
    return left


def queued_jobs(job_ids) -> list[str]:
    """Those of these job ids that Slurm still has (pending, running or completing)."""
    job_ids = set(job_ids)
    if not job_ids:
        return []
    out = subprocess.run(["squeue", "-h", "-r", "-j", ",".join(sorted({j.split("_")[0] for j in job_ids})),
                          "-o", "%i"], capture_output=True, text=True, timeout=60)
    return sorted(j for j in out.stdout.split() if j in job_ids)


def wait_until_gone(job_ids, timeout: float = CANCEL_WAIT_S) -> list[str]:
    """Wait until Slurm has none of these jobs; returns those still there after `timeout`."""
    deadline = time.monotonic() + timeout
    while (left := queued_jobs(job_ids)) and time.monotonic() < deadline:
        time.sleep(1)
    return left


@pytest.fixture(autouse=True)
def _cancel_leftover_slurm_jobs(request):
    """After every `slurm` test: cancel the Slurm jobs it submitted (from its tmp_path) that are still
    queued or running (a failed or timed-out test), so no job processes stay behind."""
    yield
    tmp_path = getattr(request.node, "funcargs", {}).get("tmp_path")
    if request.node.get_closest_marker("slurm") is None or tmp_path is None:
        return
    left = cancel_jobs(submitted_jobs(tmp_path))
    if left:
        print(f"\ncancelled leftover Slurm jobs of {request.node.name}: {' '.join(left)}")


PARTITION = "debug"
NODES = ("n1", "n2")
UP_STATES = {"idle", "mix", "alloc", "comp"}
REQUIRE_ENV = "GAN_BENCH_REQUIRE_SLURM"


@dataclasses.dataclass(frozen=True)
class SlurmCluster:
    partition: str
    nodes: tuple[str, ...]


def _cluster_problem() -> str | None:
    """None when the local cluster is up, else a sentence saying what is wrong."""
    if shutil.which("sinfo") is None:
        return "sinfo not found (Slurm client not installed)"
    try:
        out = subprocess.run(
            ["sinfo", "-h", "-N", "-p", PARTITION, "-o", "%N %t"],
            capture_output=True, text=True, timeout=30,
        )
    except subprocess.TimeoutExpired:
        return "sinfo timed out (slurmctld not answering)"
    if out.returncode != 0:
        return f"sinfo failed: {out.stderr.strip() or out.stdout.strip()}"
    states = dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)
    bad = {n: states.get(n, "missing") for n in NODES if states.get(n) not in UP_STATES}
    if bad:
        return f"nodes not up in partition {PARTITION!r}: {bad}"
    return None


@pytest.fixture(scope="session")
def slurm_cluster() -> SlurmCluster:
    """The local Slurm cluster; skips when it is not up, fails instead if GAN_BENCH_REQUIRE_SLURM=1."""
    problem = _cluster_problem()
    if problem is not None:
        msg = (
            f"local Slurm cluster not available: {problem}. "
            "Start it with: slurm/local-cluster.sh install && slurm/local-cluster.sh start"
        )
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 but {msg}", pytrace=False)
        pytest.skip(msg)
    return SlurmCluster(partition=PARTITION, nodes=NODES)




def classified_shards(root: Path, num_samples: int = 300, per_shard: int = 100) -> Path:
    """Built-in shards at root/shapes32 with a quickly trained domain classifier beside them (width 8, 2 epochs:
    epochs, not the clock, set its length), for the evaluation tests."""
    from bench.data.shards import ShardSetSpec, make_shards
    from bench.eval import classifier as C

    shards = root / "shapes32"
    make_shards(shards, ShardSetSpec(source="shapes", resolution=32, num_samples=num_samples,
                                     samples_per_shard=per_shard, seed=0), progress=False)
    C.train_classifier(shards, settings=C.ClassifierSettings(epochs=2, max_seconds=600, width=8, holdout=0.2,
                                                             precision="fp32"), progress=False)
    return shards


@pytest.fixture
def one_thread():
    """One torch thread for the test (CPU convolutions differ in the last bits across thread counts)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def one_phase(phase, ranks=None, world: int = 1):
    """(run, state) for bench.train.loop.train_step with the single `phase` (one micro-batch of 2, no data, no
    EMA schedule, no rollback): what train_step reads, for tests of the phase code on a bare net. The net
    doubles as G (its `z_dim` sets the latents' width)."""
    import copy
    from types import SimpleNamespace

    import torch
    from omegaconf import OmegaConf

    from bench.train.gradsync import GradSync
    from bench.train.state import NonfiniteGuard

    net = phase.net
    net.z_dim = 3
    cfg = OmegaConf.create({"train": {"d_steps": 1, "accumulate": 1, "batch_size": 2},
                            "ema": {"decay": 0.0, "start": 0}, "telemetry": {"sigma_every": 0}})
    ranks = ranks or SimpleNamespace(any=lambda flag: flag)
    run = SimpleNamespace(cfg=cfg, rank=getattr(ranks, "rank", 0), world=world, device=torch.device("cpu"),
                          phases=[phase], syncs={phase.name: GradSync(net, world, rank=getattr(ranks, "rank", 0))}, n_data_classes=1,
                          ranks=ranks, eff_batch=2 * world, say=lambda line, err=False: None,
                          stop=SimpleNamespace(asked=False))
    state = SimpleNamespace(step=0, images_seen=0, G=net, G_ema=copy.deepcopy(net), zgen=torch.Generator(),
                            guard=NonfiniteGuard(0, 0), nets={})
    return run, state


@pytest.fixture
def quick_classifier(monkeypatch):
    """The domain classifier trained on first use (bench.eval.metrics.ensure_classifier) runs the real trainer with
    its default settings except their length: one epoch instead of DEFAULT_SETTINGS' 600-step floor (about 13 s on
    2 cores). For tests that assert it is made and used on a cold start, not its accuracy."""
    import dataclasses
    import functools

    from bench.eval import classifier, metrics

    quick = dataclasses.replace(classifier.DEFAULT_SETTINGS, epochs=1, min_steps=0)
    monkeypatch.setattr(metrics, "train_classifier", functools.partial(classifier.train_classifier, settings=quick))
