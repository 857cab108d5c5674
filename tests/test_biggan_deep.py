"""BigGAN-deep (models/biggan_deep.py): parameter counts against BigGAN-PyTorch's BigGANdeep.py,
shapes, the channel-drop / channel-pad skips and the bottleneck blocks against hand computations,
gradient flow, and a tiny training run through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from bench import models
from conftest import ROOT, TINY
from bench.models import ModelConfigError, build, param_count
from bench.models.biggan_deep import (REFERENCE_PARAMS, BigGANDeepConfig, DeepDBlock, DeepGBlock,
                                Discriminator, Generator)
from bench.models.layers import SelfAttention
from bench.models.spectral import SNSettings, spectral_modules

SN_OFF = SNSettings(enabled=False)

# The reference implementation's settings (scripts/launch_BigGAN_deep.sh), 1000 classes.
PAPER = dict(family="biggan_deep", ch=128, d_ch=128, z_dim=128, shared_dim=128, hier=True,
             attn=[64], g_sn=True, d_sn=True, sn_iters=1, sn_eps=1e-6, init="ortho", bn_eps=1e-5)
# Measured by building BigGAN-PyTorch's BigGANdeep.Generator / Discriminator with those settings
# (nn.Parameters only). Written out again here so that an edit of the model's table is caught.
MEASURED = {128: (50_244_484, 34_590_210), 256: (55_736_708, 38_247_426)}


def tiny_cfg(**over) -> dict:
    # init N02: orthogonal init's QR is what dominates building a tiny model on a busy CPU (the
    # CLI run below builds with the configs' ortho init).
    cfg = dict(family="biggan_deep", ch=8, d_ch=8, z_dim=16, shared_dim=12, hier=True, attn=[16],
               init="N02")
    cfg.update(over)
    return cfg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------
# Parameter counts: the reference implementation's
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res", [128, 256])
def test_parameter_counts_match_the_reference_implementation(res):
    with torch.device("meta"):  # shapes only: no memory, no init cost
        G, D = build(PAPER, res, n_classes=1000)
    g_ref, d_ref = MEASURED[res]
    assert REFERENCE_PARAMS[res] == {"G": g_ref, "D": d_ref}
    assert abs(param_count(G) - g_ref) / g_ref < 0.005, (param_count(G), g_ref)
    assert abs(param_count(D) - d_ref) / d_ref < 0.005, (param_count(D), d_ref)
    # The shared embedding is a plain embedding; spectral-norm state is buffers, never parameters.
    assert isinstance(G.shared, nn.Embedding) and G.shared.weight.shape == (1000, 128)
    names = {n.rsplit(".", 1)[-1] for n, _ in [*G.named_parameters(), *D.named_parameters()]}
    assert not names & {"u", "v", "sigma"}


def test_reference_params_lookup():
    ref = models.reference_params("biggan_deep", 128)
    assert (ref["G"], ref["D"]) == MEASURED[128]
    assert "BigGANdeep.py" in ref["source"]
    assert ref["settings"]["n_classes"] == 1000 and ref["settings"]["ch"] == 128
    ref["settings"]["ch"] = 1  # a copy: the table stays as it is
    assert models.reference_params("biggan_deep", 128)["settings"]["ch"] == 128
    assert models.reference_params("biggan_deep", 32) is None
    assert models.reference_params("biggan", 128) is None
    assert models.reference_params("nope", 128) is None


def test_paper_config_files_build_the_reference_counts():
    from bench.config import compose

    for res in (128, 256):
        cfg = compose([f"model=biggan_deep_{res}"])
        assert cfg.model.family == "biggan_deep" and cfg.data.resolution == res
        with torch.device("meta"):
            G, D = build(dict(cfg.model), res, cfg.model.n_classes)
        assert (param_count(G), param_count(D)) == MEASURED[res]


# ------------------------------------------------------------------------------------------
# Shapes and interface
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("res", [32, 64])
def test_shapes(res):
    G, D = build(tiny_cfg(), res, n_classes=5)
    assert type(G) is Generator and type(D) is Discriminator
    assert models.MODELS["biggan_deep"] == (Generator, Discriminator)
    assert (G.z_dim, G.n_classes, G.resolution) == (16, 5, res)
    n_stages = len(G.attn)
    assert len(G.blocks) == 2 * n_stages and len(D.blocks) == 2 * len(D.attn)
    assert [s["resolution"] for s in G.arch["stages"]] == [8 * 2 ** i for i in range(n_stages)]
    z, y = torch.randn(3, G.z_dim), torch.tensor([0, 4, 2])
    x = G(z, y)
    assert x.shape == (3, 3, res, res) and x.abs().max() <= 1.0
    D.eval()  # no power-iteration update between the two calls
    logits, feats = D(x, y, return_features=True)
    assert logits.shape == (3,) and logits.dtype == torch.float32
    assert feats.shape == (3, D.feature_dim) and D.feature_dim == D.blocks[-1].out_ch
    torch.testing.assert_close(D(x, y), logits)
    # Attention after the stage at 16 in G and after the first stage at 16 in D.
    assert [s["attention"] for s in G.arch["stages"]] == [s["resolution"] == 16
                                                          for s in G.arch["stages"]]
    assert [s["attention"] for s in D.arch["stages"]].count(True) == 1
    assert sum(isinstance(m, SelfAttention) for m in [*G.modules(), *D.modules()]) == 2


def test_hier_feeds_all_of_z_and_the_class_vector_to_every_block():
    G, _ = build(tiny_cfg(), 32, n_classes=5)
    assert G.linear.in_features == 12 + 16 and G.cond_dim == 12 + 16
    assert all(b.bn1.gain.in_features == 28 and b.bn4.bias.in_features == 28 for b in G.blocks)
    Gf, _ = build(tiny_cfg(hier=False), 32, n_classes=5)
    assert Gf.linear.in_features == 16 and all(b.bn1.gain.in_features == 12 for b in Gf.blocks)
    assert Gf(torch.randn(2, 16), torch.tensor([0, 1])).shape == (2, 3, 32, 32)
    Go, _ = build(tiny_cfg(shared_dim=0), 32, n_classes=5)  # one-hot class vectors
    assert Go.shared is None and Go.linear.in_features == 5 + 16
    assert Go(torch.randn(2, 16), torch.tensor([0, 4])).shape == (2, 3, 32, 32)
    G1, _ = build(tiny_cfg(z_dim=1), 32, n_classes=5)  # no chunks: any z_dim works
    assert G1(torch.randn(2, 1), torch.tensor([0, 1])).shape == (2, 3, 32, 32)


def test_class_vec_path_matches_labels():
    G, _ = build(tiny_cfg(), 32, 5)
    G(torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 3]))  # BN running stats
    G.eval()
    z, y = torch.randn(3, G.z_dim), torch.tensor([4, 0, 2])
    with torch.no_grad():
        torch.testing.assert_close(G(z, y), G(z, None, class_vec=G.class_embedding(y)))


def test_config_errors_name_the_key():
    with pytest.raises(ModelConfigError, match=r"model\.attn=\[32\].*biggan_deep_32"):
        build(tiny_cfg(attn=[32]), 32, 3)
    with pytest.raises(ModelConfigError, match=r"data\.resolution=48"):
        build(tiny_cfg(), 48, 3)
    with pytest.raises(ModelConfigError, match=r"model\.depth"):
        build(tiny_cfg(depth=0), 32, 3)
    with pytest.raises(ModelConfigError, match=r"model\.init"):
        build(tiny_cfg(init="he"), 32, 3)
    with pytest.raises(ModelConfigError, match="bottleneck"):
        build(tiny_cfg(ch=1, d_ch=1, attn=[]), 64, 3)  # 2-channel blocks: no width / 4
    assert BigGANDeepConfig.from_mapping({"ch": 8, "attn": [16]}).attn == (16,)


def test_depth_and_switches():
    G, D = build(tiny_cfg(depth=3, mbstd=2, mbdisc=3, g_sn=False), 32, 4)
    assert len(G.blocks) == 3 * len(G.attn) and len(D.blocks) == 3 * len(D.attn)
    assert spectral_modules(G) == [] and spectral_modules(D)
    assert D.blocks[-1].in_ch == D.blocks[-1].out_ch + 1      # the stddev channel
    assert D.out_dim == D.feature_dim + 3
    x, y = G(torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 3])), torch.tensor([0, 1, 2, 3])
    logits, feats = D(x, y, return_features=True)
    assert logits.shape == (4,) and feats.shape == (4, D.feature_dim)


def test_bf16_autocast_channels_last_with_switches():
    G, D = build(tiny_cfg(vbn=True, vbn_ref=4, mbstd=2), 32, 5)
    G = G.to(memory_format=torch.channels_last)
    D = D.to(memory_format=torch.channels_last)
    z, y = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = G(z, y)
        logits = D(x.to(memory_format=torch.channels_last), y)
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    logits.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in G.parameters() if p.grad is not None)


# ------------------------------------------------------------------------------------------
# Blocks against hand computations
# ------------------------------------------------------------------------------------------


def _bn(x):
    """Training-mode batch norm without affine, by hand (biased variance, eps 1e-5)."""
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5)


def _cbn(x, c, cbn):
    gain, bias = 1 + c @ cbn.gain.weight.T, c @ cbn.bias.weight.T           # (B, C)
    return _bn(x) * gain[:, :, None, None] + bias[:, :, None, None]


def _conv1x1(x, conv):
    out = torch.einsum("oi,bihw->bohw", conv.weight[:, :, 0, 0], x)
    return out + conv.bias[None, :, None, None]


def _up(x):
    return x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)


def _pool(x):
    B, C, H, W = x.shape
    return x.reshape(B, C, H // 2, 2, W // 2, 2).mean(dim=(3, 5))


def _randomise(block):
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.3)


def test_g_block_channel_drop_and_hand_computation():
    block = DeepGBlock(16, 8, cond_dim=5, upsample=True, sn=SN_OFF)
    _randomise(block)
    block.train()
    x, c = torch.randn(4, 16, 3, 3), torch.randn(4, 5)
    out = block(x, c)
    assert out.shape == (4, 8, 6, 6)
    assert not hasattr(block, "conv_sc") and block.conv1.out_channels == 4  # in / 4
    # Full block by hand: bottleneck branch + the first 8 input channels, upsampled.
    h = _conv1x1(F.relu(_cbn(x, c, block.bn1)), block.conv1)
    h = _up(F.relu(_cbn(h, c, block.bn2)))
    h = F.conv2d(h, block.conv2.weight, block.conv2.bias, padding=1)
    h = F.conv2d(F.relu(_cbn(h, c, block.bn3)), block.conv3.weight, block.conv3.bias, padding=1)
    h = _conv1x1(F.relu(_cbn(h, c, block.bn4)), block.conv4)
    torch.testing.assert_close(out, h + _up(x[:, :8]), rtol=1e-4, atol=1e-4)
    # The skip alone: with the last conv silenced the block is the dropped, upsampled input.
    with torch.no_grad():
        block.conv4.weight.zero_()
        block.conv4.bias.zero_()
    assert torch.equal(block(x, c), _up(x[:, :8]))
    # Same width, no upsampling: the skip is the identity.
    same = DeepGBlock(8, 8, cond_dim=5, upsample=False, sn=SN_OFF)
    with torch.no_grad():
        same.conv4.weight.zero_()
        same.conv4.bias.zero_()
    assert torch.equal(same(x[:, :8], c), x[:, :8])
    with pytest.raises(ModelConfigError, match="must not exceed"):
        DeepGBlock(8, 16, cond_dim=5, sn=SN_OFF)


def test_d_block_channel_pad_and_hand_computation():
    block = DeepDBlock(8, 20, downsample=True, sn=SN_OFF)
    _randomise(block)
    x = torch.randn(3, 8, 6, 6)
    out = block(x)
    assert out.shape == (3, 20, 3, 3)
    assert block.conv_sc.in_channels == 8 and block.conv_sc.out_channels == 12  # the 12 missing
    assert block.conv1.out_channels == 5                                         # out / 4
    h = _conv1x1(F.relu(x), block.conv1)
    h = F.conv2d(F.relu(h), block.conv2.weight, block.conv2.bias, padding=1)
    h = F.conv2d(F.relu(h), block.conv3.weight, block.conv3.bias, padding=1)
    h = _conv1x1(_pool(F.relu(h)), block.conv4)
    xp = _pool(x)
    skip = torch.cat([xp, _conv1x1(xp, block.conv_sc)], dim=1)
    torch.testing.assert_close(out, h + skip, rtol=1e-4, atol=1e-4)
    # The skip alone keeps the pooled input in its first 8 channels, exactly.
    torch.testing.assert_close(block.shortcut(x), skip, rtol=1e-5, atol=1e-5)
    assert torch.equal(block.shortcut(x)[:, :8], F.avg_pool2d(x, 2))
    # Narrowing (the minibatch-stddev channel before D's last block): the skip drops it.
    narrow = DeepDBlock(9, 8, downsample=False, sn=SN_OFF)
    assert narrow.conv_sc is None
    x9 = torch.randn(2, 9, 4, 4)
    assert torch.equal(narrow.shortcut(x9), x9[:, :8])


def test_generator_wires_blocks_per_stage():
    G, D = build(tiny_cfg(), 64, 3)
    g_blocks = [(b.in_ch, b.out_ch, b.upsample) for b in G.blocks]
    # biggan G_ARCH[64] x ch 8: stages 128->128, 128->64, 64->32, 32->16; only the last block
    # of a stage upsamples and narrows.
    assert g_blocks == [(128, 128, False), (128, 128, True), (128, 128, False), (128, 64, True),
                        (64, 64, False), (64, 32, True), (32, 32, False), (32, 16, True)]
    d_blocks = [(b.in_ch, b.out_ch, b.downsample) for b in D.blocks]
    # D_ARCH[64] x d_ch 8: stem 3->8, stages 8->16, 16->32, 32->64, 64->128; the first block
    # of a stage downsamples and widens (channel pad).
    assert D.stem.out_channels == 8
    assert d_blocks == [(8, 16, True), (16, 16, False), (16, 32, True), (32, 32, False),
                        (32, 64, True), (64, 64, False), (64, 128, True), (128, 128, False)]


# ------------------------------------------------------------------------------------------
# Gradients
# ------------------------------------------------------------------------------------------


def test_gradients_reach_every_parameter():
    G, D = build(tiny_cfg(mbdisc=2), 32, n_classes=3)
    with torch.no_grad():  # attention gates start at 0, which blocks their convs' gradients
        for m in [*G.modules(), *D.modules()]:
            if isinstance(m, SelfAttention):
                m.gamma.fill_(0.5)
    z, y = torch.randn(6, G.z_dim), torch.tensor([0, 1, 2, 0, 1, 2])
    real = torch.rand(6, 3, 32, 32) * 2 - 1
    # Weights that do not cancel D's output bias (a plain fake - real difference would).
    loss = D(G(z, y), y).mean() + 0.5 * D(real, y).mean()
    loss.backward()
    for net in (G, D):
        for name, p in net.named_parameters():
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


# ------------------------------------------------------------------------------------------
# End to end: a tiny training run through the CLI
# ------------------------------------------------------------------------------------------


def test_tiny_training_run_through_the_cli(tmp_path, tiny_shards):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "bench.cli", "train", *TINY, "model=biggan_deep",  # after TINY's model=biggan
           f"data.shards={tiny_shards}", f"run.dir={run_dir}", "train.steps=2", "train.batch_size=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 2
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(v == v for r in rows for v in r.values() if isinstance(v, float))  # no NaN
    assert "family: biggan_deep" in (run_dir / "config.yaml").read_text()
    ckpt = torch.load(sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=True)
    G = build(tiny_cfg(z_dim=32, shared_dim=16), 32, n_classes=10)[0]
    G.load_state_dict(ckpt["G"])  # strict: the checkpoint holds a biggan_deep G of that shape
