"""Unconditional nets for one-class (unlabelled) data (models.checks.is_conditional): the class parameters each
family drops, against a count of where the class vector enters; a training run on a real unlabelled shard set
through the CLI (biggan, dcgan), its checkpoint, `bench sample`, and the evaluation's skip line and refusals."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from bench import models
from conftest import ROOT, TINY
from bench.models.layers import ConditionalBatchNorm2d

SKIP_LINE = "gan-bench eval: 1 class (unlabelled data): class_acc and intra-FID skipped"
TINY_CFG = dict(ch=8, d_ch=8, z_dim=24, shared_dim=12, attn=[16], init="N02")


def class_params(G, family: str, n_classes: int) -> int:
    """Parameters a conditional G spends on the class, from where the class vector (E = G.class_dim values)
    enters: the shared table (n_classes x shared_dim), E more inputs to every gain / bias projection of a
    conditional BN (2 x E x C each), and in DCGAN E more input channels of the first transposed conv (4 x 4
    kernel); with z in the BNs (BigGAN's hier chunks, BigGAN-deep's hier) the unconditional BNs keep their z
    projections, otherwise they become plain BatchNorms with a learned affine (2 x C each, not class
    parameters); BigGAN-deep's hier also feeds E more inputs to the first linear layer."""
    E = G.class_dim
    table = n_classes * G.shared.embedding_dim if G.shared is not None else 0
    if family == "dcgan":
        return table + E * G.net[0].out_channels * 4 * 4
    widths = [m.bn.num_features for m in G.modules() if isinstance(m, ConditionalBatchNorm2d)]
    z_in_bns = G.hier
    affine = 0 if z_in_bns else sum(2 * c for c in widths)
    first = E * G.linear.out_features if family == "biggan_deep" and G.hier else 0
    return table + sum(2 * E * c for c in widths) - affine + first


@pytest.mark.parametrize("hier", [True, False])
@pytest.mark.parametrize("family", ["biggan", "biggan_deep", "sagan", "dcgan"])
def test_one_class_drops_exactly_the_class_parameters(family, hier):
    torch.manual_seed(0)
    cfg = dict(TINY_CFG, family=family, hier=hier)
    G7, D7 = models.build(cfg, 32, 7)
    G1, D1 = models.build(cfg, 32, 1)
    assert (G7.conditional, D7.conditional, G1.conditional, D1.conditional) == (True, True, False, False)
    names = [n for n, _ in [*G1.named_parameters(), *D1.named_parameters()]]
    assert not [n for n in names if n.startswith(("shared.", "embed."))]
    assert G1.shared is None and D1.embed is None and G1.class_dim == 0
    # D: the projection table, n_classes rows of what the output layer reads.
    assert models.param_count(D7) - models.param_count(D1) == 7 * D7.out_dim
    assert models.param_count(G7) - models.param_count(G1) == class_params(G7, family, 7)
    # The unconditional nets run, and G ignores the labels.
    z = torch.randn(4, G1.z_dim)
    G1(z, torch.zeros(4, dtype=torch.long))  # a training forward: spectral norm's first power iteration
    G1.eval()
    x = G1(z, torch.zeros(4, dtype=torch.long))
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
    assert torch.equal(G1(z), x) and torch.equal(G1(z, torch.ones(4, dtype=torch.long)), x)
    assert D1(x, torch.zeros(4, dtype=torch.long)).shape == (4,)


def test_conditional_state_dicts_keep_their_keys():
    """Checkpoints of conditional nets load as before: the projection table and the class embedding keep their
    names and shapes, and only a one-class net lacks them."""
    G, D = models.build(dict(TINY_CFG, family="biggan"), 32, 5)
    assert G.state_dict()["shared.weight"].shape == (5, 12) and D.state_dict()["embed.weight"].shape == (5, D.out_dim)
    assert G.state_dict()["blocks.0.bn1.gain.weight"].shape[1] == 12 + G.z_chunks[1]
    G1, D1 = models.build(dict(TINY_CFG, family="biggan"), 32, 1)
    assert set(D.state_dict()) - set(D1.state_dict()) == {k for k in D.state_dict() if k.startswith("embed.")}
    assert set(G.state_dict()) - set(G1.state_dict()) == {"shared.weight"}
    assert G1.state_dict()["blocks.0.bn1.gain.weight"].shape[1] == G1.z_chunks[1]  # z alone


# ------------------------------------------------------------------------------------------
# End to end on a real unlabelled shard set
# ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def unlabelled_shards(tmp_path_factory):
    """48 images in a flat folder (a disc of random colour and place on a plain background) as a shard set: its
    manifest has one class, "unlabelled", and says the set is not labelled."""
    from bench.data.shards import ShardSetSpec, load_manifest, make_shards

    root = tmp_path_factory.mktemp("unlabelled")
    folder = root / "images"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:32, :32]
    for i in range(48):
        img = np.empty((32, 32, 3), np.uint8)
        img[:] = rng.integers(0, 256, 3)
        cy, cx, r = rng.integers(8, 24), rng.integers(8, 24), rng.integers(4, 9)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = rng.integers(0, 256, 3)
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    out = root / "shards"
    make_shards(out, ShardSetSpec(source="folder", folder=root / "images", resolution=32, seed=0), progress=False)
    manifest = load_manifest(out)
    assert manifest["class_names"] == ["unlabelled"] and manifest["labelled"] is False
    return out


def bench(*args, timeout=900):
    return subprocess.run([sys.executable, "-m", "bench.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT)


TRAIN = ["train.steps=20", "train.precision=fp32", "train.batch_size=8", "train.ckpt_every=20"]


@pytest.fixture(scope="module")
def runs(unlabelled_shards, tmp_path_factory):
    """A 20-step fp32 training of biggan and of dcgan on the unlabelled shards, with the default eval.every=0."""
    out = {}
    for family in ("biggan", "dcgan"):
        run_dir = tmp_path_factory.mktemp(family) / "run"
        proc = bench("train", *TINY, f"model={family}", f"data.shards={unlabelled_shards}", f"run.dir={run_dir}",
                     *TRAIN)
        assert proc.returncode == 0, proc.stderr[-3000:]
        out[family] = run_dir
    return out


@pytest.mark.parametrize("family", ["biggan", "dcgan"])
def test_training_on_unlabelled_data_builds_unconditional_nets(runs, family, tmp_path):
    run_dir = runs[family]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 20
    ckpt = torch.load(sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
    assert not [k for k in [*ckpt["G"], *ckpt["G_ema"], *ckpt["D"]] if k.startswith(("shared.", "embed."))]
    cfg = dict(family=family, ch=8, d_ch=8, z_dim=32, shared_dim=16, attn=[16])
    G, D = models.build(cfg, 32, 1)
    G.load_state_dict(ckpt["G_ema"])  # strict: exactly the unconditional G's parameters and buffers
    D.load_state_dict(ckpt["D"])
    assert (run_dir / "samples" / "latest.png").is_file()

    out = tmp_path / "x.npz"
    proc = bench("sample", f"run={run_dir}", "n=16", f"out={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    with np.load(out) as f:
        assert f["x"].shape == (16, 32, 32, 3) and f["x"].dtype == np.uint8
        assert (f["y"] == 0).all() and f["z"].shape == (16, 32)
        assert len({f["x"][i].tobytes() for i in range(16)}) == 16  # 16 different latents, 16 different images


@pytest.fixture(scope="module")
def labelled_classifier(tiny_shards, tmp_path_factory):
    """A domain classifier trained on another, labelled shard set at the same resolution (briefly: these tests
    use it as a feature extractor, not for its accuracy)."""
    from bench.eval.classifier import ClassifierSettings, train_classifier

    path = tmp_path_factory.mktemp("clf") / "classifier.pt"
    train_classifier(tiny_shards, out=path, resolution=32, progress=False,
                     settings=ClassifierSettings(epochs=1, width=8, precision="fp32", augment=False))
    return path


def test_evaluation_skips_the_class_metrics_with_one_line(runs, labelled_classifier):
    run_dir = runs["biggan"]
    proc = bench("eval", f"run={run_dir}", f"eval.classifier_path={labelled_classifier}", "eval.num_samples=24",
                 "eval.batch_size=12", "eval.intra_fid=true", "eval.intra_min_per_class=2", "eval.precision=fp32")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count(SKIP_LINE) == 1
    record = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()][-1]
    assert record["eval/FID"] > 0
    assert not {"eval/class_acc", "eval/intra_FID", "intra_fid_per_class"} & set(record)
    # The sheets: 8 rows of different samples, and no class interpolation (there is no class space).
    sheets = sorted(p.name for p in (run_dir / "samples").glob("eval-*"))
    assert any(n.endswith("-classes.png") for n in sheets) and not any("interp-class" in n for n in sheets)
    assert any("interp-z" in n for n in sheets)


def test_the_domain_extractor_needs_labels(runs, unlabelled_shards, tmp_path):
    """Without a classifier trained on labelled data, the domain extractor is refused in one line that says what
    to use, before any image is read or step taken: in bench eval, in a training that evaluates, and in
    bench eval train-classifier."""
    for proc in (bench("eval", f"run={runs['biggan']}", "eval.num_samples=24"),
                 bench("train", *TINY, "model=dcgan", f"data.shards={unlabelled_shards}", f"run.dir={tmp_path / 'r'}",
                       *TRAIN, "eval.every=10"),
                 bench("eval", "train-classifier", f"data.shards={unlabelled_shards}")):
        assert proc.returncode == 2, proc.stderr[-2000:]
        lines = [line for line in proc.stderr.splitlines() if "1 class (unlabelled data)" in line]
        assert len(lines) == 1 and "eval.extractor=inception" in lines[0] and "eval.every=0" in lines[0], proc.stderr
    assert not (tmp_path / "r" / "checkpoints").exists() or not list((tmp_path / "r" / "checkpoints").glob("*.pt"))
