import dataclasses
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Tiny, fast model settings shared by the end-to-end tests.
TINY = ["model.ch=8", "model.d_ch=8", "model.z_dim=32", "model.shared_dim=16", "data.num_workers=0",
        "data.shuffle_buffer=50", "train.tick_every=1", "train.sample_cols=2", "ema.start=0"]


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


