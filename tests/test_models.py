"""Fast tests of models/: shapes, parameter counts, config errors, spectral norm, bf16, and the
stability switches (minibatch discrimination / stddev, virtual and cross-replica batch norm)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench import models
from bench.models import ModelConfigError, build, param_count
from bench.models.layers import (ConditionalBatchNorm2d, MinibatchDiscrimination, MinibatchStdDev,
                           SelfAttention, SNConv2d, SNConvTranspose2d, SNEmbedding, SNLinear)
from bench.models.norms import CrossReplicaBatchNorm2d, VirtualBatchNorm2d
from bench.models.spectral import SNSettings, spectral_modules, weight_modules
from bench.models.svd import weight_matrix

SN_OFF = SNSettings(enabled=False)

SUPPORTED = [("biggan", r) for r in (32, 64, 128, 256)] + \
            [("sagan", r) for r in (32, 64, 128)] + \
            [("dcgan", r) for r in (16, 32, 64, 128)]


def small_cfg(family: str, **over) -> dict:
    cfg = dict(family=family, ch=8, d_ch=8, z_dim=24, shared_dim=16, hier=True, attn=[16],
               g_sn=True, d_sn=True, sn_iters=1, sn_eps=1e-6, init="ortho", bn_eps=1e-5,
               cross_replica_bn=False, n_classes=None)
    cfg.update(over)
    return cfg


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ------------------------------------------------------------------------------------------
# Shapes and interface
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family,res", SUPPORTED)
def test_shapes_every_family_and_resolution(family, res):
    G, D = build(small_cfg(family), res, n_classes=5)
    assert (G.z_dim, G.n_classes, G.resolution) == (24, 5, res)
    z, y = torch.randn(2, G.z_dim), torch.tensor([0, 4])
    x = G(z, y)
    assert x.shape == (2, 3, res, res)
    assert x.abs().max() <= 1.0
    logits = D(x, y)
    assert logits.shape == (2,) and logits.dtype == torch.float32
    logits2, feats = D(x, y, return_features=True)
    assert feats.shape == (2, D.feature_dim)
    torch.testing.assert_close(logits, logits2)
    assert G.class_embedding(y).shape[0] == 2


def test_registry_and_build_types():
    assert sorted(models.MODELS) == ["biggan", "biggan_deep", "dcgan", "sagan"]
    for family, (G_cls, D_cls) in models.MODELS.items():
        G, D = build(small_cfg(family), 32, 3)
        assert type(G) is G_cls and type(D) is D_cls


def test_biggan_attention_placement():
    G, D = build(small_cfg("biggan", attn=[8, 16]), 64, 3)
    assert [b["attention"] for b in G.arch["blocks"]] == [True, True, False, False]
    assert [b["attention"] for b in D.arch["blocks"]] == [False, True, True, False, False]
    G, D = build(small_cfg("biggan", attn=[]), 64, 3)
    assert not any(isinstance(m, SelfAttention) for m in [*G.modules(), *D.modules()])


def test_hier_latent_uneven_split_uses_all_of_z():
    G, _ = build(small_cfg("biggan", z_dim=128), 64, 3)  # 5 slots: 28 + 4 x 25
    assert sum(G.z_chunks) == 128 and G.z_chunks == [28, 25, 25, 25, 25]
    assert G(torch.randn(2, 128), torch.tensor([0, 1])).shape == (2, 3, 64, 64)


def test_no_shared_embedding_means_one_hot_class_vectors():
    G, _ = build(small_cfg("biggan", shared_dim=0, hier=False), 32, 7)
    assert G.shared is None
    assert torch.equal(G.class_embedding(torch.tensor([3])), torch.eye(7)[[3]])
    Gs, _ = build(small_cfg("sagan"), 32, 7)
    assert Gs.shared is None and Gs.class_embedding(torch.tensor([1])).shape == (1, 7)


# ------------------------------------------------------------------------------------------
# The paper's parameter counts
# ------------------------------------------------------------------------------------------


def test_biggan_128_parameter_counts():
    cfg = dict(family="biggan", ch=96, d_ch=96, z_dim=120, shared_dim=128, hier=True, attn=[64],
               g_sn=True, d_sn=True, sn_iters=1, sn_eps=1e-6, init="ortho", bn_eps=1e-5)
    with torch.device("meta"):  # shapes only: no memory, no init cost
        G, D = build(cfg, 128, n_classes=1000)
    assert abs(param_count(G) - 70.4e6) / 70.4e6 < 0.005, param_count(G)
    assert abs(param_count(D) - 88.0e6) / 88.0e6 < 0.005, param_count(D)
    # Spectral-norm state is buffers, never parameters.
    names = {n.rsplit(".", 1)[-1] for n, _ in [*G.named_parameters(), *D.named_parameters()]}
    assert not names & {"u", "v", "sigma"}
    assert isinstance(G.shared, nn.Embedding) and not isinstance(G.shared, SNEmbedding)


# ------------------------------------------------------------------------------------------
# Config errors name the key to fix
# ------------------------------------------------------------------------------------------


def test_bad_family_names_key():
    with pytest.raises(ModelConfigError, match=r"model\.family='foo'.*biggan, biggan_deep, dcgan, sagan"):
        build(small_cfg("foo"), 32, 3)


@pytest.mark.parametrize("family,res", [("biggan", 48), ("sagan", 256), ("dcgan", 48)])
def test_bad_resolution_names_key(family, res):
    with pytest.raises(ModelConfigError, match=rf"data\.resolution={res}.*choose one of"):
        build(small_cfg(family), res, 3)


def test_bad_attn_names_key():
    with pytest.raises(ModelConfigError, match=r"model\.attn=\[48\].*biggan_32.*8, 16"):
        build(small_cfg("biggan", attn=[48]), 32, 3)
    with pytest.raises(ModelConfigError, match=r"model\.attn"):
        build(small_cfg("sagan", attn=[128]), 128, 3)


@pytest.mark.parametrize("over,key", [(dict(init="he"), "model.init"),
                                      (dict(ch=0), "model.ch"),
                                      (dict(z_dim=3), "model.z_dim")])
def test_other_bad_values_name_key(over, key):
    with pytest.raises(ModelConfigError, match=key.replace(".", r"\.")):
        build(small_cfg("biggan", **over), 32, 3)


def test_bad_model_config_message_and_cli_exit(tmp_path, capsys):
    """A model setting that cannot be built names the key, the value and the choices; the CLI
    prints it as one line and exits 2, before anything is written."""
    with pytest.raises(ModelConfigError) as info:
        build(small_cfg("biggan", init="he"), 32, 3)
    msg = str(info.value)
    assert "model.init" in msg and "'he'" in msg and "N02, ortho, xavier" in msg, msg
    assert len(msg.splitlines()) == 1

    from bench.cli import main

    run_dir = tmp_path / "run"
    assert main(["train", "model.init=he", f"run.dir={run_dir}"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "model.init='he'" in err and "N02, ortho, xavier" in err, err
    assert not run_dir.exists()


# ------------------------------------------------------------------------------------------
# Spectral norm
# ------------------------------------------------------------------------------------------

SN_LAYERS = [
    (lambda: SNConv2d(8, 16, 3, padding=1), lambda: torch.randn(2, 8, 5, 5)),
    (lambda: SNConvTranspose2d(8, 6, 4, 2, 1), lambda: torch.randn(2, 8, 3, 3)),
    (lambda: SNLinear(12, 20), lambda: torch.randn(3, 12)),
    (lambda: SNEmbedding(10, 6), lambda: torch.tensor([1, 2, 9])),
]


@pytest.mark.parametrize("make,inp", SN_LAYERS)
def test_spectral_norm_converges_to_top_singular_value(make, inp):
    m = make()
    x = inp()
    assert {"u", "v", "sigma"} <= dict(m.named_buffers()).keys()
    assert "u" not in dict(m.named_parameters())
    m.train()
    for _ in range(200):
        m(x)
    w_mat = weight_matrix(m).detach()
    s0 = torch.linalg.svdvals(w_mat)[0]
    assert m.sigma.shape == ()
    assert abs(m.sigma.item() - s0.item()) / s0.item() < 0.01
    w_sn = weight_matrix(m, m.sn_weight()).detach()
    assert abs(torch.linalg.svdvals(w_sn)[0].item() - 1.0) < 0.01


def test_spectral_norm_eval_leaves_state_alone():
    m = SNConv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 6, 6)
    m.train()
    m(x)
    m.eval()
    u, v, sigma = m.u.clone(), m.v.clone(), m.sigma.clone()
    m(x)
    m(x)
    assert torch.equal(m.u, u) and torch.equal(m.v, v) and torch.equal(m.sigma, sigma)
    m.train()
    m(x)
    assert not torch.equal(m.u, u)


def test_spectral_norm_gradient_and_repeated_forwards():
    # Two training forwards (e.g. D on real, then on fake) before one backward must work.
    m = SNLinear(6, 5)
    loss = m(torch.randn(4, 6)).sum() + m(torch.randn(4, 6)).sum()
    loss.backward()
    assert m.weight.grad is not None and torch.isfinite(m.weight.grad).all()
    # Gradient flows through sigma (Miyato): compare with autograd through an exact division.
    m.zero_grad()
    m.eval()
    x = torch.randn(4, 6)
    m(x).pow(2).sum().backward()
    w = m.weight.detach().clone().requires_grad_(True)
    sigma = torch.dot(m.u, (w @ m.v))
    torch.nn.functional.linear(x, w / sigma, m.bias.detach()).pow(2).sum().backward()
    torch.testing.assert_close(m.weight.grad, w.grad)


def test_sn_off_gives_plain_layers():
    G, D = build(small_cfg("biggan", g_sn=False, d_sn=False), 32, 3)
    assert spectral_modules(G) == [] and spectral_modules(D) == []
    assert not any(n.endswith((".u", ".sigma")) for n, _ in D.named_buffers())
    G(torch.randn(2, 24), torch.tensor([0, 1]))
    D(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))


def test_spectral_modules_found_by_type():
    G, D = build(small_cfg("biggan"), 32, 3)
    d_names = [n for n, _ in spectral_modules(D)]
    assert "linear" in d_names and "embed" in d_names and "blocks.0.conv1" in d_names
    assert all(m.sigma.shape == () for _, m in spectral_modules(D))
    g_names = [n for n, _ in spectral_modules(G)]
    assert "shared" not in g_names and "blocks.0.bn1.gain" in g_names
    assert "shared" in [n for n, _ in weight_modules(G)]
    assert "shared" not in [n for n, _ in weight_modules(G, exclude=[G.shared])]
    _, Ddc = build(small_cfg("dcgan", d_sn=True), 32, 3)
    assert len(spectral_modules(Ddc)) == len(weight_modules(Ddc))


# ------------------------------------------------------------------------------------------
# bf16 autocast, channels_last, class vectors
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["biggan", "sagan", "dcgan"])
def test_bf16_autocast_channels_last(family):
    G, D = build(small_cfg(family, d_sn=True, g_sn=True), 32, 5)
    G = G.to(memory_format=torch.channels_last)
    D = D.to(memory_format=torch.channels_last)
    z, y = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = G(z, y)
        real = torch.rand(4, 3, 32, 32).mul(2).sub(1).to(memory_format=torch.channels_last)
        d_real = D(real, y)
        d_fake, feats = D(x.to(memory_format=torch.channels_last), y, return_features=True)
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
    assert d_real.dtype == d_fake.dtype == feats.dtype == torch.float32
    (d_real.mean() - d_fake.mean()).backward()
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)
    assert all(torch.isfinite(m.sigma) for _, m in spectral_modules(D))


@pytest.mark.parametrize("family", ["biggan", "sagan", "dcgan"])
def test_class_vec_path_matches_labels(family):
    G, _ = build(small_cfg(family, shared_dim=16), 32, 5)
    G.train()
    G(torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 3]))  # populate BN running stats
    G.eval()
    z, y = torch.randn(3, G.z_dim), torch.tensor([4, 0, 2])
    with torch.no_grad():
        a = G(z, y)
        b = G(z, None, class_vec=G.class_embedding(y))
    torch.testing.assert_close(a, b)


def test_attention_bmm_and_sdpa_agree():
    attn = SelfAttention(16)
    nn.init.constant_(attn.gamma, 0.7)
    attn.eval()
    x = torch.randn(2, 16, 8, 8)
    attn.use_sdpa = False
    a = attn(x)
    attn.use_sdpa = True
    b = attn(x)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert not torch.equal(a, x)


# ------------------------------------------------------------------------------------------
# Stability switches: minibatch discrimination, minibatch stddev, virtual BN, cross-replica BN
# ------------------------------------------------------------------------------------------


def test_switches_off_by_default():
    for family in ("biggan", "sagan", "dcgan"):
        G, D = build(dict(family=family, attn=[], ch=8, d_ch=8), 32, 3)
        kinds = {type(m) for m in [*G.modules(), *D.modules()]}
        assert not kinds & {MinibatchDiscrimination, MinibatchStdDev, VirtualBatchNorm2d,
                            CrossReplicaBatchNorm2d}
        assert not G.vbn and "vbn_z" not in G.state_dict()
        assert D.out_dim == D.feature_dim


@pytest.mark.parametrize("over,key", [(dict(mbstd=1), "model.mbstd=1"),
                                      (dict(mbdisc=-1), "model.mbdisc"),
                                      (dict(mbdisc_dim=0), "model.mbdisc_dim"),
                                      (dict(vbn_ref=0), "model.vbn_ref"),
                                      (dict(vbn=True, cross_replica_bn=True), "model.vbn")])
def test_switch_config_errors_name_key(over, key):
    for family in ("biggan", "sagan", "dcgan"):
        with pytest.raises(ModelConfigError, match=key.replace(".", r"\.")):
            build(small_cfg(family, **over), 32, 3)


def test_minibatch_discrimination_matches_loop():
    torch.manual_seed(1)
    layer = MinibatchDiscrimination(7, n_kernels=4, kernel_dim=3, sn=SN_OFF)
    f = torch.randn(5, 7) * 0.3
    out = layer(f)
    assert out.shape == (5, 7 + 4)
    torch.testing.assert_close(out[:, :7], f)
    T = layer.T.weight.detach().t().reshape(7, 4, 3)            # (A, B, C) as in the paper
    M = torch.einsum("na,abc->nbc", f, T)
    expect = torch.zeros(5, 4)
    for i in range(5):
        for j in range(5):
            if j == i:
                continue  # self term left out (documented)
            for b in range(4):
                expect[i, b] += torch.exp(-(M[i, b] - M[j, b]).abs().sum())
    torch.testing.assert_close(out[:, 7:], expect, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    assert torch.isfinite(layer.T.weight.grad).all() and layer.T.weight.grad.abs().sum() > 0
    assert torch.equal(layer(f[:1])[:, 7:], torch.zeros(1, 4))  # no other sample, no signal


def test_minibatch_stddev_matches_manual():
    layer = MinibatchStdDev(3)
    x = torch.randn(6, 2, 3, 3)
    out = layer(x)
    assert out.shape == (6, 3, 3, 3)
    torch.testing.assert_close(out[:, :2], x)
    for n in range(6):
        group = [m for m in range(6) if m % 2 == n % 2]             # n mod (N / G), N / G = 2
        g = x[group].double()
        std = ((g - g.mean(0)).square().mean(0) + 1e-8).sqrt().mean()
        torch.testing.assert_close(out[n, 2].double(), std.expand(3, 3), rtol=1e-5, atol=1e-6)
    big = MinibatchStdDev(8)(x)                                      # group > batch: whole batch
    torch.testing.assert_close(big[0, 2, 0, 0].double(),
                               ((x.double().var(0, unbiased=False) + 1e-8).sqrt()).mean(),
                               rtol=1e-5, atol=1e-6)
    with pytest.raises(ModelConfigError, match=r"model\.mbstd=4 does not divide the batch of 6"):
        MinibatchStdDev(4)(x)


@pytest.mark.parametrize("family", ["biggan", "sagan", "dcgan"])
def test_d_with_mbstd_and_mbdisc(family):
    G, D = build(small_cfg(family, mbstd=2, mbdisc=5, mbdisc_dim=4), 32, 3)
    assert D.out_dim == D.feature_dim + 5
    assert D.linear.in_features == D.embed.embedding_dim == D.out_dim
    assert any(isinstance(m, MinibatchStdDev) for m in D.modules())
    assert D.mbdisc.T in [m for _, m in weight_modules(D)]     # T is a weight layer like others
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    logits, feats = D(x, y, return_features=True)
    assert logits.shape == (4,) and feats.shape == (4, D.feature_dim)
    logits.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)
    with pytest.raises(ModelConfigError, match="model.mbstd=2"):
        D(x[:3], y[:3])
    # R1 needs a double backward through both layers.
    x.requires_grad_(True)
    (g,) = torch.autograd.grad(D(x, y).sum(), x, create_graph=True)
    D.zero_grad()
    g.square().sum().backward()
    assert D.mbdisc.T.weight.grad is not None
    assert all(torch.isfinite(p.grad).all() for p in D.parameters() if p.grad is not None)


@pytest.mark.parametrize("family", ["biggan", "dcgan"])
def test_switches_under_bf16_autocast_channels_last(family):
    G, D = build(small_cfg(family, mbstd=2, mbdisc=3, vbn=True, vbn_ref=4), 32, 5)
    G = G.to(memory_format=torch.channels_last)
    D = D.to(memory_format=torch.channels_last)
    z, y = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 4])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = G(z, y)
        logits = D(x.to(memory_format=torch.channels_last), y)
    assert x.shape == (4, 3, 32, 32) and torch.isfinite(x).all()
    assert logits.dtype == torch.float32
    logits.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in G.parameters() if p.grad is not None)


def test_virtual_batch_norm_layer_uses_reference_union_sample():
    bn = VirtualBatchNorm2d(3, eps=1e-5)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    ref, x = torch.randn(5, 3, 4, 4) * 2 + 1, torch.randn(2, 3, 4, 4)
    bn.n_ref = 5
    out = bn(torch.cat([ref, x]))

    def norm(t, stats):
        mean = stats.mean((0, 2, 3), keepdim=True)
        var = stats.var((0, 2, 3), unbiased=False, keepdim=True)
        return (t - mean) / (var + 1e-5).sqrt() * bn.weight[:, None, None] + bn.bias[:, None, None]

    torch.testing.assert_close(out[:5], norm(ref, ref), rtol=1e-4, atol=1e-5)
    for i in range(2):
        xi = x[i:i + 1]
        torch.testing.assert_close(out[5 + i:6 + i], norm(xi, torch.cat([ref, xi])),
                                   rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["biggan", "sagan", "dcgan"])
def test_vbn_outputs_do_not_depend_on_the_rest_of_the_batch(family):
    # g_sn off: spectral norm's power iteration would change G between training forwards.
    G, _ = build(small_cfg(family, vbn=True, vbn_ref=6, g_sn=False), 32, 5)
    assert G.vbn and any(isinstance(m, VirtualBatchNorm2d) for m in G.modules())
    assert not any(type(m) is nn.BatchNorm2d for m in G.modules())
    assert G.state_dict()["vbn_z"].shape == (6, G.z_dim)
    z, y = torch.randn(4, G.z_dim), torch.tensor([0, 1, 2, 3])
    G.train()
    a = G(z, y)
    b = G(z[:1], y[:1])
    c = G(torch.cat([z[:1], 5 * torch.randn(3, G.z_dim)]), torch.tensor([0, 4, 4, 4]))
    assert a.shape == (4, 3, 32, 32)
    torch.testing.assert_close(a[:1], b, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(a[:1], c[:1], rtol=1e-4, atol=1e-5)
    G.eval()  # no running statistics: eval computes the same thing
    with torch.no_grad():
        torch.testing.assert_close(G(z, y), a.detach(), rtol=1e-4, atol=1e-5)
    # Plain BN (default): the same sample changes with its batch.
    Gb, _ = build(small_cfg(family, g_sn=False), 32, 5)
    Gb.train()
    assert not torch.allclose(Gb(z, y)[:1], Gb(torch.cat([z[:1], 5 * z[1:]]), y)[:1], atol=1e-4)


def test_vbn_reference_is_state_and_can_be_set():
    G, _ = build(small_cfg("biggan", vbn=True, vbn_ref=4), 32, 5)
    z, y = torch.randn(2, G.z_dim), torch.tensor([0, 1])
    G.eval()
    with torch.no_grad():
        before = G(z, y)
        G.set_vbn_reference(torch.randn(8, G.z_dim), torch.arange(8) % 5)
        after = G(z, y)
    assert not torch.allclose(before, after)
    G2, _ = build(small_cfg("biggan", vbn=True, vbn_ref=4), 32, 5)
    G2.load_state_dict(G.state_dict())  # strict; adopts the 8-sample reference
    G2.eval()
    with torch.no_grad():
        torch.testing.assert_close(G2(z, y), after)
    with pytest.raises(ValueError, match="z_ref"):
        G.set_vbn_reference(torch.randn(3, 5), torch.zeros(3, dtype=torch.long))
    Gp, _ = build(small_cfg("biggan"), 32, 5)
    with pytest.raises(ModelConfigError, match="model.vbn=true"):
        Gp.set_vbn_reference(torch.randn(3, Gp.z_dim), torch.zeros(3, dtype=torch.long))


def _bn_modules(net):
    return [m for m in net.modules() if isinstance(m, nn.BatchNorm2d)]


@pytest.mark.parametrize("family", ["biggan", "dcgan"])
def test_cross_replica_bn_single_process_is_plain_bn(family):
    torch.manual_seed(3)
    Gp, _ = build(small_cfg(family), 32, 5)
    Gc, Dc = build(small_cfg(family, cross_replica_bn=True), 32, 5)
    assert all(type(m) is CrossReplicaBatchNorm2d for m in _bn_modules(Gc))
    assert not any(type(m) is CrossReplicaBatchNorm2d for m in Dc.modules())
    if family == "biggan":
        assert type(Gc.blocks[0].bn1.bn) is CrossReplicaBatchNorm2d  # conditional BN too
    Gc.load_state_dict(Gp.state_dict())  # same keys
    z, y = torch.randn(4, Gp.z_dim), torch.tensor([0, 1, 2, 3])
    for G in (Gp, Gc):
        G.train()
        G.zero_grad()
        G(z, y).square().mean().backward()
    torch.testing.assert_close(Gc(z, y), Gp(z, y), rtol=0, atol=0)
    for (n, a), b in zip(Gp.named_parameters(), Gc.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, msg=n)
    for a, b in zip(_bn_modules(Gp), _bn_modules(Gc)):
        assert torch.equal(a.running_mean, b.running_mean)
        assert torch.equal(a.running_var, b.running_var)
    # convert_sync_bn: in place, the same parameter objects.
    params = list(Gp.parameters())
    assert models.convert_sync_bn(Gp) is Gp and list(Gp.parameters()) == params
    assert all(type(m) is CrossReplicaBatchNorm2d for m in _bn_modules(Gp))


def _cross_replica_worker(rank, world, init_file, x, c, state, out_dir):
    import os

    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    torch.set_num_threads(1)
    cbn = ConditionalBatchNorm2d(3, 4, sn=SN_OFF, bn="cross_replica")
    cbn.load_state_dict(state)
    cbn.train()
    part = slice(rank * x.shape[0] // world, (rank + 1) * x.shape[0] // world)
    xr = x[part].clone().requires_grad_(True)
    out = cbn(xr, c[part])
    (out * torch.arange(out.numel()).reshape(out.shape).cos()[None]
     .expand(world, *out.shape)[rank]).sum().backward()
    torch.save({"out": out.detach(), "x_grad": xr.grad, "gain_grad": cbn.gain.weight.grad,
                "running_mean": cbn.bn.running_mean, "running_var": cbn.bn.running_var},
               f"{out_dir}/{rank}.pt")
    dist.barrier()  # both ranks done communicating
    # Leave without running gloo's C++ teardown, which now and then aborts the process
    # ("terminate called without an active exception") when the peer exits first.
    os._exit(0)


def test_cross_replica_bn_two_ranks_equal_one_big_batch(tmp_path):
    import torch.multiprocessing as mp
    torch.manual_seed(4)
    x, c = torch.randn(6, 3, 4, 4) * 2 + 0.5, torch.randn(6, 4)
    ref = ConditionalBatchNorm2d(3, 4, sn=SN_OFF)
    nn.init.normal_(ref.gain.weight)
    state = ref.state_dict()
    mp.spawn(_cross_replica_worker, args=(2, str(tmp_path / "init"), x, c, state, str(tmp_path)),
             nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    # Reference: one process, the whole batch, the same per-rank loss weights.
    ref.train()
    xf = x.clone().requires_grad_(True)
    out = ref(xf, c)
    w = torch.arange(out[:3].numel()).reshape(out[:3].shape).cos()
    (out * torch.cat([w, w])).sum().backward()
    torch.testing.assert_close(torch.cat([r["out"] for r in ranks]), out.detach(),
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(torch.cat([r["x_grad"] for r in ranks]), xf.grad,
                               rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ranks[0]["gain_grad"] + ranks[1]["gain_grad"],
                               ref.gain.weight.grad, rtol=1e-4, atol=1e-5)
    for r in ranks:
        torch.testing.assert_close(r["running_mean"], ref.bn.running_mean)
        torch.testing.assert_close(r["running_var"], ref.bn.running_var)
