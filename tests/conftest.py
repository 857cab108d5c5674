import os
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
    from bench.data import make_shards

    out = tmp_path_factory.mktemp("shards") / "shapes32"
    make_shards(out, source="shapes", resolution=32, num_samples=240, samples_per_shard=60, seed=0,
                progress=False)
    return out
