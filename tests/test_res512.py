"""512x512 (BigGAN and BigGAN-deep): the arch tables, a tiny-width forward, the full-width parameter counts
against BigGAN-PyTorch's own classes (built on the meta device: no memory, no arithmetic), `bench inspect` at
512, and the data side's resolution cap."""

from __future__ import annotations

import json

import pytest
import torch

from bench import models
from bench.cli import main
from bench.models.layers import SelfAttention

# Measured by building BigGAN-PyTorch's classes (github.com/ajbrock/BigGAN-PyTorch) with these settings and
# n_classes 1000 (nn.Parameters only); written out again here so that an edit of a model's table is caught.
DEEP = dict(family="biggan_deep", ch=128, d_ch=128, z_dim=128, shared_dim=128, hier=True, attn=[64], depth=2)
DEEP_512_G_PR72 = 56_163_905  # pull request #72's BigGANdeep.Generator: a 128-channel output conv (TF-Hub layout)
OUTPUT_CONV_EXTRA = 3 * 3 * 128 * (128 - 3) + (128 - 3)  # its output conv's channels beyond the 3 we have
DEEP_512_D = 38_301_122  # BigGANdeep.Discriminator given a 512 D_arch entry (in 1,1,2,4,8,8,16; out 1,2,4,8,8,16,16)
BIGGAN = dict(family="biggan", ch=96, d_ch=96, shared_dim=128, hier=True, attn=[64])
BIGGAN_MEASURED = {128: (120, 70_433_988, 87_982_370), 256: (140, 82_235_844, 99_225_890),
                   512: (128, 82_296_804, 99_401_282)}  # z_dim, G, D (512's D: a 512 D_arch entry added)


def test_tiny_biggan_deep_512_forwards_a_batch_of_one():
    torch.manual_seed(0)
    cfg = dict(DEEP, ch=4, d_ch=4, z_dim=8, shared_dim=4, init="N02")
    G, D = models.build(cfg, 512, n_classes=3)
    assert [s["resolution"] for s in G.arch["stages"]] == [8, 16, 32, 64, 128, 256, 512]
    assert [s["resolution"] for s in D.arch["stages"]] == [256, 128, 64, 32, 16, 8, 4]
    assert [s["attention"] for s in G.arch["stages"]] == [r == 64 for r in (8, 16, 32, 64, 128, 256, 512)]
    assert sum(isinstance(m, SelfAttention) for m in D.modules()) == 1 and D.arch["stages"][2]["attention"]
    # Widths of the 512 tables at ch 4: G 16,16,8,8,4,2,1 x ch in; D the reflection, from its stem's ch.
    assert [s["blocks"][0]["in"] for s in G.arch["stages"]] == [64, 64, 32, 32, 16, 8, 4]
    assert [s["blocks"][-1]["out"] for s in D.arch["stages"]] == [4, 8, 16, 32, 32, 64, 64]
    y = torch.tensor([2])
    x = G(torch.randn(1, 8), y)
    assert x.shape == (1, 3, 512, 512) and torch.isfinite(x).all()
    logits, feats = D(x, y, return_features=True)
    assert logits.shape == (1,) and feats.shape == (1, 64) and torch.isfinite(logits).all()
    assert models.param_count(G) > 0 and models.param_count(D) > 0


def test_tiny_biggan_512_forwards_a_batch_of_one():
    torch.manual_seed(0)
    G, D = models.build(dict(BIGGAN, ch=4, d_ch=4, z_dim=16, shared_dim=4, init="N02"), 512, n_classes=3)
    assert [b["resolution"] for b in G.arch["blocks"]] == [8, 16, 32, 64, 128, 256, 512]
    assert [b["resolution"] for b in D.arch["blocks"]] == [256, 128, 64, 32, 16, 8, 4, 4]
    assert [b["out"] for b in D.arch["blocks"]] == [4, 4, 8, 16, 32, 32, 64, 64]
    x = G(torch.randn(1, 16), torch.tensor([1]))
    assert x.shape == (1, 3, 512, 512) and D(x, torch.tensor([1])).shape == (1,)


def test_full_width_512_counts_against_the_reference_implementation():
    with torch.device("meta"):
        G, D = models.build(DEEP, 512, n_classes=1000)
    assert models.param_count(G) == DEEP_512_G_PR72 - OUTPUT_CONV_EXTRA == 56_019_780
    assert models.param_count(D) == DEEP_512_D
    ref = models.reference_params("biggan_deep", 512)
    assert (ref["G"], ref["D"]) == (DEEP_512_G_PR72, DEEP_512_D)
    assert "#72" in ref["source"] and "144,125" in ref["note"] and ref["settings"]["ch"] == 128
    for res, (z_dim, g, d) in BIGGAN_MEASURED.items():
        with torch.device("meta"):
            G, D = models.build(dict(BIGGAN, z_dim=z_dim), res, n_classes=1000)
        assert (models.param_count(G), models.param_count(D)) == (g, d), res
    ref = models.reference_params("biggan", 512)
    assert (ref["G"], ref["D"], ref["settings"]["z_dim"]) == (82_296_804, 99_401_282, 128)
    assert models.reference_params("sagan", 512) is None and models.reference_params("biggan", 128) is None


def inspect_json(capsys, *args) -> dict:
    capsys.readouterr()
    assert main(["inspect", *args]) == 0
    return json.loads(capsys.readouterr().out)


def test_inspect_at_512_prints_the_counts_beside_the_reference(capsys):
    out = inspect_json(capsys, "model=biggan_deep_512")
    assert (out["resolution"], out["n_classes"], out["conditional"]) == (512, 1000, True)
    assert (out["G_params"], out["D_params"]) == (56_019_780, DEEP_512_D)
    ref = out["reference_params"]
    assert ref["same_settings"] is True and (ref["G"], ref["D"]) == (DEEP_512_G_PR72, DEEP_512_D)
    assert ref["G_diff_pct"] == pytest.approx(-100 * OUTPUT_CONV_EXTRA / DEEP_512_G_PR72) and ref["D_diff_pct"] == 0
    big = inspect_json(capsys, "model=biggan_128", "data.resolution=512", "model.z_dim=128")
    assert (big["G_params"], big["D_params"]) == BIGGAN_MEASURED[512][1:]
    assert big["reference_params"]["same_settings"] is True and big["reference_params"]["G_diff_pct"] == 0
    # At another width the settings differ (and inspect says so). inspect counts on the meta device: its FLOPs
    # and parameters are those of the same nets built and run on the CPU.
    small = ["model.ch=4", "model.d_ch=4", "model.z_dim=8", "model.shared_dim=4", "model.init=N02"]
    tiny = inspect_json(capsys, "model=biggan_deep_512", *small)
    assert tiny["reference_params"]["same_settings"] is False
    from bench.train.telemetry import step_flops

    G, D = models.build(dict(DEEP, ch=4, d_ch=4, z_dim=8, shared_dim=4, init="N02"), 512, n_classes=1000)
    assert (tiny["G_params"], tiny["D_params"]) == (models.param_count(G), models.param_count(D))
    cpu = step_flops(G, D, batch=2, n_classes=1000, device=torch.device("cpu"))
    assert tiny["GFLOP_per_image"]["D_step"] * 1e9 == pytest.approx(cpu["D_step"], rel=1e-9)
    assert tiny["GFLOP_per_image"]["G_step"] * 1e9 == pytest.approx(cpu["G_step"], rel=1e-9)


def test_resolution_cap_is_512(capsys, tmp_path):
    from bench.config import ConfigError, compose, validate
    from bench.data.format import MAX_RESOLUTION, DataError, check_resolution
    from bench.data.shards import ShardSetSpec, make_shards
    from bench.data.loader import LoaderSettings, ShardLoader

    assert MAX_RESOLUTION == 512 and check_resolution(512, "test") == 512
    with pytest.raises(DataError, match="16 to 512"):
        check_resolution(1024, "test")
    assert validate(compose(["model=biggan_deep_512", "model.ch=8", "model.d_ch=8"])).data.resolution == 512
    with pytest.raises(ConfigError, match=r"data.resolution=1024 .*16\.\.512"):
        validate(compose(["data.resolution=1024"]))
    # Real 512 shards, written and read back.
    out = tmp_path / "s512"
    make_shards(out, ShardSetSpec(source="shapes", resolution=512, num_samples=2, samples_per_shard=2), progress=False)
    loader = ShardLoader(str(out), batch_size=2, resolution=512,
                         settings=LoaderSettings(num_workers=0, shuffle_buffer=0, resampled=False))
    with loader:
        x, y = next(iter(loader))
    assert x.shape == (2, 3, 512, 512) and y.shape == (2,)
