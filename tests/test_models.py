"""Fast tests of models/: shapes, parameter counts, config errors, spectral norm, bf16."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import models
from models import ModelConfigError, build, param_count
from models.layers import SelfAttention, SNConv2d, SNConvTranspose2d, SNEmbedding, SNLinear
from models.spectral import spectral_modules, weight_matrix, weight_modules

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
    assert sorted(models.REGISTRY) == ["biggan", "dcgan", "sagan"]
    for family, (G_cls, D_cls) in models.REGISTRY.items():
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
    with pytest.raises(ModelConfigError, match=r"model\.family='foo'.*biggan, dcgan, sagan"):
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


def test_config_error_is_value_error():
    assert issubclass(ModelConfigError, ValueError)


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
