"""The real side streamed from the shards (bench.eval.features.ShardImages, real_images): the same images in the same
order as the whole tensor bench.eval.classifier.load_images reads, so FID / KID / precision-recall equal the
tensor path's; the labels intra-FID needs; nothing read for a cached real side; a count without a manifest; a
manifest that counts more than can be read is one line; a pass holds one batch, never every image; `bench eval
stats` on the stream equals FID against the shards."""
import numpy as np
import pytest
import torch

from bench.data.shards import ShardSetSpec, make_shards
from bench.eval import classifier as C
from bench.eval import metrics as M
from bench.eval.errors import EvalError
from bench.eval.features import ImageDataset, ShardImages, real_images

N = 300


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "shapes32"
    make_shards(out, ShardSetSpec(source="shapes", resolution=32, num_samples=N, samples_per_shard=70, seed=0),
                progress=False)
    return out


@pytest.fixture(scope="module")
def clf(shards):
    """A domain classifier for the features (two epochs: the test compares two computations of the same metric)."""
    settings = C.ClassifierSettings(epochs=2, width=16, holdout=0.2, precision="fp32")
    return C.train_classifier(shards, settings=settings, progress=False)["path"]


def settings(clf, **kw):
    return M.MetricSettings(extractor="domain", weights_path=clf, metrics=("fid", "kid", "prc", "dc"),
                            batch_size=64, **kw)


def test_metrics_on_the_stream_equal_the_whole_tensor(shards, clf):
    x, y = C.load_images(shards, 32, seed=0)  # the tensor path: every real image in memory at once
    assert x.shape == (N, 3, 32, 32)
    fake = ImageDataset(x[:200].flip(-1) // 2 + 40)  # a generated side that differs from the real one
    n_real = 250  # not a multiple of the stream's batches (70-image shards, 96-image reads) or of the extractor's 64
    whole = M.compute_metrics(fake, ImageDataset(x[:n_real].clone()), settings(clf))
    stream = ShardImages(shards, 32, n_real, batch_size=96)
    streamed = M.compute_metrics(fake, stream, settings(clf))
    assert whole["eval/FID"] > 1.0
    for key in ("eval/FID", "eval/KID", "eval/KID_std", "eval/precision", "eval/recall", "eval/density",
                "eval/coverage", "fid_imag_residue"):
        assert streamed[key] == pytest.approx(whole[key], rel=1e-6, abs=1e-9), key
    # one pass, in order (torch-fidelity's first look at item 0 included), and the labels in the images' order
    assert stream.passes == 1
    assert torch.equal(stream.labels, y[:n_real])
    # at most one decoded batch is held: the images never pile up
    assert stream._x is not None and stream._x.shape[0] <= 96 and stream._ys == []


def test_the_stream_serves_the_tensor_images_with_resize_and_progress(shards):
    x, _ = C.load_images(shards, 32, seed=0)
    stream = ShardImages(shards, 32, N, batch_size=64)
    stream.resize = lambda b: b.flip(-2)  # as features.clean_resize is attached: on each image's batch of one
    got = torch.stack([stream[i] for i in range(N)])
    assert torch.equal(got, x.flip(-2)) and stream.passes == 1
    assert torch.equal(stream[5], x[5].flip(-2)) and stream.passes == 2  # going back starts the stream again
    with pytest.raises(IndexError):
        stream[N]


def test_labels_without_the_images_and_a_cached_real_side_reads_nothing(shards, clf, tmp_path):
    _, y = C.load_images(shards, 32, seed=0)
    labels_only = ShardImages(shards, 32, 120, batch_size=50)
    assert torch.equal(labels_only(), y[:120]) and labels_only.passes == 1 and labels_only._x is None
    cache = dict(cache_dir=tmp_path / "cache", input2_cache_name="real-test", num_real=120)
    fake = ImageDataset(C.load_images(shards, 32, seed=0)[0][:150] // 2)
    first = ShardImages(shards, 32, 120)
    m1 = M.compute_metrics(fake, first, settings(clf, **cache))
    again = ShardImages(shards, 32, 120)
    m2 = M.compute_metrics(fake, again, settings(clf, **cache))
    assert first.passes == 1 and again.passes == 0 and again.labels is None  # from torch-fidelity's cache
    assert m2["eval/FID"] == m1["eval/FID"]


def test_the_count_without_a_manifest_and_a_short_manifest(shards):
    _, y = C.load_images(shards, 32, seed=0)
    counted = ShardImages(shards, 32, None, limit=10_000)  # n unknown: one pass counts (and keeps the labels)
    assert len(counted) == N and counted.passes == 1 and torch.equal(counted.labels, y)
    capped = ShardImages(shards, 32, None, limit=100)
    assert len(capped) == 100 and torch.equal(capped.labels, y[:100])
    real, n = real_images(shards, 32, 10_000)  # the manifest's count caps eval.num_real
    assert n == N == len(real) and real.passes == 0  # known from the manifest: nothing read yet
    short = ShardImages(shards, 32, N + 20)  # a manifest that counts more images than can be read
    assert torch.equal(short[N - 1], C.load_images(shards, 32, seed=0)[0][N - 1])
    with pytest.raises(EvalError, match=rf"gave {N} readable images.*needs {N + 20}.*eval.num_real"):
        short[N]


def test_bench_eval_stats_on_the_stream_equals_fid_against_the_shards(shards, clf, tmp_path):
    """write_ref_stats reads the real side through real_images; its mu / sigma are the moments of the features the
    whole-tensor path extracts from the same images."""
    from bench.eval.features import extractor_settings, feature_extractor, features_of
    from bench.eval.realstats import write_ref_stats
    from bench.eval.refstats import load_ref_stats
    from bench.eval.stats import feature_statistics

    out = tmp_path / "ref.npz"
    s = M.EvalSettings(cache_dir=str(tmp_path / "cache"), classifier_path=clf, batch_size=64)
    meta = write_ref_stats(shards, out, s, 32, num_real=200, progress=False)
    assert meta["num_real"] == 200
    ref = load_ref_stats(out)
    x, _ = C.load_images(shards, 32, limit=200, seed=0)
    kw, layers, used = M.fidelity_kwargs(None, ImageDataset(x), settings(clf, num_real=200, num_samples=200),
                                     torch.device("cpu"))
    feats, _ = features_of(2, feature_extractor(kw, used), kw)
    mu, sigma = feature_statistics(feats[layers["fid"]])
    np.testing.assert_allclose(ref.mu, mu, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(ref.sigma, sigma, rtol=1e-6, atol=1e-9)
    assert extractor_settings("domain", clf)[3] == meta["extractor_id"]
