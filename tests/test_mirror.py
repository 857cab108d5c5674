"""data.mirror: the training loader flips each real image left-right with probability 1/2 (StudioGAN's
RandomHorizontalFlip), the flips follow the loader's seed (a resumed run flips the same samples), the evaluation's
loaders never flip, and the effective size the run reports is 2 x the images."""
import json

import numpy as np
import pytest
import torch

from bench.config import compose, validate
from bench.data.loader import LoaderSettings, ShardLoader
from bench.data.shards import ShardSetSpec, data_facts, describe_size, effective_size, make_shards

N, RES = 160, 16


@pytest.fixture(scope="module")
def noise_set(tmp_path_factory):
    """N random images (none equal to its own mirror image) as a shard set; (shard dir, images by sample key)."""
    tmp = tmp_path_factory.mktemp("mirror")
    x = np.random.default_rng(0).integers(0, 256, size=(N, RES, RES, 3), dtype=np.uint8)
    np.savez(tmp / "x.npz", x=x, y=np.arange(N) % 4)
    make_shards(tmp / "shards", ShardSetSpec(source="npz", file=tmp / "x.npz", samples_per_shard=20), progress=False)
    return tmp / "shards", x


def _uint8(x: torch.Tensor) -> np.ndarray:
    return ((x + 1.0) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _one_pass(shards, mirror: bool, seed: int = 0, num_workers: int = 0) -> np.ndarray:
    loader = ShardLoader(str(shards), 16, RES, LoaderSettings(num_workers=num_workers, shuffle_buffer=0, seed=seed,
                                                              resampled=False, mirror=mirror))
    with loader:
        return np.concatenate([_uint8(x) for x, _ in loader])


def _flipped(images: np.ndarray, x: np.ndarray) -> list[bool]:
    """For each loaded image: False when it is one of the inputs, True when it is an input's exact mirror image."""
    plain = {img.tobytes() for img in x}
    mirrored = {img[:, ::-1].tobytes() for img in x}
    out = []
    for img in images:
        b = img.tobytes()
        assert (b in plain) != (b in mirrored), "neither an input nor an input's exact horizontal flip"
        out.append(b in mirrored)
    return out


@pytest.mark.parametrize("num_workers", [0, 1])
def test_mirror_flips_about_half_exactly(noise_set, num_workers):
    shards, x = noise_set
    images = _one_pass(shards, mirror=True, num_workers=num_workers)
    assert len(images) == N
    flips = _flipped(images, x)
    assert 0.35 * N <= sum(flips) <= 0.65 * N  # Binomial(160, 1/2): 56..104 holds with probability > 0.9999
    unflipped = {img.tobytes() if not f else img[:, ::-1].tobytes() for img, f in zip(images, flips)}
    assert unflipped == {img.tobytes() for img in x}  # every image once, flipped or not: nothing else changed


def test_mirror_off_never_flips_and_flips_follow_the_seed(noise_set):
    shards, x = noise_set
    assert not any(_flipped(_one_pass(shards, mirror=False), x))
    a, b, c = (_flipped(_one_pass(shards, mirror=True, seed=s), x) for s in (5, 5, 6))
    assert a == b and a != c  # the same seed (a resumed run's) flips the same samples


def test_effective_size_is_reported(noise_set):
    shards, _ = noise_set
    for mirror, size in ((False, N), (True, 2 * N)):
        loader = ShardLoader(str(shards), 8, RES, LoaderSettings(num_workers=0, mirror=mirror))
        assert loader.effective_size == size
        facts = data_facts(shards, mirror)
        assert facts == {"data_num_samples": N, "data_mirror": mirror, "data_effective_size": size,
                         "data_labelled": True}
    assert describe_size(data_facts(shards, True)) == f"{N} images ({2 * N} with data.mirror)"
    assert describe_size(data_facts(shards, False)) == f"{N} images"
    assert effective_size(None, True) is None


def test_the_config_key():
    for group in ("shapes", "folder"):
        cfg = compose([f"data={group}"] + (["data.shards=/x"] if group == "folder" else []))
        assert cfg.data.mirror is False  # configs/data/*.yaml
    assert validate(compose(["data.mirror=true"])).data.mirror is True
    with pytest.raises(Exception, match="data.mirror"):
        validate(compose(["data.mirror=sometimes"]))


def test_a_mirrored_training_run_flips_and_records_its_effective_size(noise_set, tmp_path, monkeypatch, capfd):
    """data.mirror=true reaches training's loader, run.json says the effective size, the start line too."""
    from bench.cli import main
    from bench.train import loop as T
    from conftest import TINY

    shards, _ = noise_set
    settings = []
    real_loader = T.ShardLoader
    monkeypatch.setattr(T, "ShardLoader", lambda *a, **k: settings.append(a[3]) or real_loader(*a, **k))
    run = tmp_path / "run"
    assert main(["train", *TINY, "data=folder", f"data.shards={shards}", f"data.resolution={RES}", "data.mirror=true",
                 "model=dcgan", "train.steps=2", "train.batch_size=4", "train.precision=fp32", f"run.dir={run}"]) == 0
    assert settings and all(s.mirror for s in settings)
    facts = json.loads((run / "run.json").read_text())
    assert (facts["data_num_samples"], facts["data_mirror"], facts["data_effective_size"]) == (N, True, 2 * N)
    assert f"({N} images ({2 * N} with data.mirror))" in capfd.readouterr().out
