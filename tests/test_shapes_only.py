"""The built-in shapes set is told apart by shape only (issue 22, section 4): its classes are balanced,
their colours have one distribution, a classifier trained on the set is at chance on colour-only
inputs but not on the images, and generation is deterministic for a seed."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from bench.data import shapes
from bench.data.shapes import SHAPES_CLASSES, shapes_sample
from bench.data.shards import ShardSetSpec, dataset_info, make_shards
from bench.eval.classifier import ClassifierSettings, accuracy, load_classifier, train_classifier

K = len(SHAPES_CLASSES)
CHANCE = 1.0 / K


def _images(n: int, seed: int, res: int) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (n, 3, res, res) images and int64 labels of the built-in set."""
    imgs, labels = zip(*(shapes_sample(i, seed, res) for i in range(n)))
    return torch.from_numpy(np.stack(imgs)).permute(0, 3, 1, 2).contiguous(), torch.tensor(labels)


def _mean_colour_filled(x: torch.Tensor) -> torch.Tensor:
    """Each image replaced by its mean colour, filled in: all the colour and none of the shape."""
    return x.float().mean((2, 3), keepdim=True).round().to(torch.uint8).expand_as(x).contiguous()


def _pixels_shuffled(x: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """Each image's pixels in a random order: its exact colour histogram, no shape."""
    g = torch.Generator().manual_seed(seed)
    n, c, h, w = x.shape
    perm = torch.stack([torch.randperm(h * w, generator=g) for _ in range(n)])
    return torch.gather(x.flatten(2), 2, perm[:, None, :].expand(-1, c, -1)).view_as(x).contiguous()


def _colour_features(x: torch.Tensor) -> torch.Tensor:
    """Colour statistics of each image: per-channel mean and std and a 4x4x4 colour histogram (fractions of
    pixels). Nothing about where the pixels are."""
    f = x.float().flatten(2)  # (n, 3, P)
    bins = (x.long() // 64).flatten(2)  # (n, 3, P) in 0..3
    code = bins[:, 0] * 16 + bins[:, 1] * 4 + bins[:, 2]
    hist = torch.zeros(len(x), 64).scatter_add_(1, code, torch.ones_like(code, dtype=torch.float32))
    return torch.cat([f.mean(2) / 255, f.std(2) / 255, hist / code.shape[1]], 1)


def _fit_softmax(feats: torch.Tensor, y: torch.Tensor) -> torch.nn.Linear:
    """Multinomial logistic regression (L2 0.001, L-BFGS) on standardised features."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(feats.shape[1], K)
    opt = torch.optim.LBFGS(lin.parameters(), max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(lin(feats), y) + 1e-3 * lin.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lin


# ------------------------------------------------------------------------------------------ (a) balance, colour


def test_classes_are_shapes_and_balanced():
    assert len(SHAPES_CLASSES) >= 10 and len(set(SHAPES_CLASSES)) == len(SHAPES_CLASSES)
    colour_words = {"red", "green", "blue", "yellow", "magenta", "cyan", "orange", "purple", "white", "brown"}
    assert not [c for c in SHAPES_CLASSES if set(c.split("_")) & colour_words]
    labels = [shapes_sample(i, 0, 16)[1] for i in range(20 * K)]
    assert np.bincount(labels, minlength=K).tolist() == [20] * K


def test_class_mean_colours_agree_within_sampling_noise():
    """Per-class mean RGB over 500 images a class: every class's mean is within 4 standard errors (of the
    image means' spread) of the overall mean in each channel, and the foreground (shape) and background
    colours have the same mean. The colour-per-class set fails this by ~20 standard errors."""
    n = 500 * K
    x, y = _images(n, seed=11, res=16)
    means = x.float().mean((2, 3))  # (n, 3): each image's mean RGB
    overall, spread = means.mean(0), means.std(0)
    se = spread / np.sqrt(n / K)
    per_class = torch.stack([means[y == c].mean(0) for c in range(K)])
    z = ((per_class - overall) / se).abs()
    assert float(z.max()) < 4.0, f"class mean RGB off by {float(z.max()):.1f} standard errors:\n{per_class}"
    # images really are varied in colour within a class (not one colour per class with small jitter)
    for c in range(K):
        assert float(means[y == c].std(0).min()) > 30


# ------------------------------------------------------------------------------------------ (b) shape, not colour


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small domain classifier (width 8) trained on 2000 32 px images of the set; ~10-20 s on one core."""
    out = tmp_path_factory.mktemp("shapes_only") / "shapes32"
    make_shards(out, ShardSetSpec(source="shapes", resolution=32, num_samples=2000, samples_per_shard=500, seed=0),
                progress=False)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        info = train_classifier(out, settings=ClassifierSettings(epochs=15, max_seconds=600, width=8, holdout=0.2,
                                                                 precision="fp32"), device="cpu", progress=False)
    finally:
        torch.set_num_threads(before)
    model, _ = load_classifier(info["path"])
    return out, info, model


def test_classifier_reads_shape_not_colour(trained):
    shards, info, model = trained
    assert dataset_info(shards)[0] == SHAPES_CLASSES
    assert info["accuracy"] >= 0.9, info  # its own held-out 400 images
    x, y = _images(1000, seed=5, res=32)  # images of another seed: never seen in training
    assert accuracy(model, x, y) >= 0.9
    # colour-only inputs: at chance (the colour-per-class set gave 13% mean-colour, 39% shuffled)
    for what, colour_only in (("mean colour", _mean_colour_filled(x)), ("shuffled pixels", _pixels_shuffled(x))):
        acc = accuracy(model, colour_only, y)
        assert acc < 2 * CHANCE, f"the classifier tells {acc:.1%} of images' classes from their {what} alone"


def test_colour_statistics_do_not_predict_the_class():
    """A classifier that sees only colour statistics (means, stds, colour histogram) and is fitted to the
    labels does no better than chance on held-out images (~11%; on the colour-per-class set: 99%)."""
    x, y = _images(3000, seed=3, res=16)
    feats = _colour_features(x)
    mu, sd = feats[:2000].mean(0), feats[:2000].std(0) + 1e-6
    feats = (feats - mu) / sd
    lin = _fit_softmax(feats[:2000], y[:2000])
    with torch.no_grad():
        acc = float((lin(feats[2000:]).argmax(1) == y[2000:]).float().mean())
    assert acc < 2 * CHANCE, f"colour statistics predict the class on {acc:.1%} of held-out images"


# ------------------------------------------------------------------------------------------ (c) determinism


def _digest(n: int, seed: int, res: int) -> str:
    h = hashlib.sha256()
    for i in range(n):
        img, label = shapes_sample(i, seed, res)
        h.update(img.tobytes())
        h.update(bytes([label]))
    return h.hexdigest()


def test_generation_is_deterministic_for_a_seed():
    here = _digest(40, 4, 32)
    assert _digest(40, 4, 32) == here
    code = ("import sys, hashlib; from bench.data.shapes import shapes_sample; h = hashlib.sha256()\n"
            "for i in range(40):\n"
            "    img, label = shapes_sample(i, 4, 32); h.update(img.tobytes()); h.update(bytes([label]))\n"
            "print(h.hexdigest())")
    other_process = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert other_process.stdout.strip() == here
    assert _digest(40, 5, 32) != here  # another seed, other images
    # an image depends on (seed, index) only, not on what was drawn before it
    backwards = [shapes_sample(i, 4, 32)[0] for i in reversed(range(40))][::-1]
    forwards = [shapes_sample(i, 4, 32)[0] for i in range(40)]
    assert all(np.array_equal(a, b) for a, b in zip(backwards, forwards))


def test_version_names_the_cache(tmp_path):
    from bench.data.shards import default_shards

    got = default_shards(16, cache_dir=tmp_path, num_samples=10, seed=0)
    assert got.name == f"shapes-v{shapes.SHAPES_VERSION}-r16-n10-s0" and shapes.SHAPES_VERSION >= 2
