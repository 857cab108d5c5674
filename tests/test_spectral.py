"""Tests of models/spectral.py and models/svd.py: top-k singular values, sigma telemetry, sigma0
clamp and penalty, orthogonal regularisation. Reference values come from torch.linalg.svdvals / autograd."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from bench.models import build
from bench.models.layers import SNConv2d, SNConvTranspose2d, SNEmbedding, SNLinear
from bench.models.spectral import (SNSettings, ortho_grad_, ortho_penalty, reg_modules, sigma0_clamp_,
                             sigma0_penalty, sigma_stats, top_singular_values, weight_modules)
from bench.models.svd import as_weight, jacobi_svd, subspace_state, weight_matrix

SN_OFF = SNSettings(enabled=False)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def small_cfg(family: str = "biggan", **over) -> dict:
    cfg = dict(family=family, ch=8, d_ch=8, z_dim=24, shared_dim=16, hier=True, attn=[16])
    cfg.update(over)
    return cfg


def svals(m: nn.Module) -> torch.Tensor:
    return torch.linalg.svdvals(weight_matrix(m).detach().double()).float()


def set_spectrum(m: nn.Module, top=(5.0, 3.0, 2.0), rest_max: float = 1.5) -> torch.Tensor:
    """Give m's weight matrix the spectrum U diag(s) V^T with the given well-separated top
    values and the rest spread in (0, rest_max]; returns s."""
    out_dim, in_dim = weight_matrix(m).shape
    r = min(out_dim, in_dim)
    U, _ = torch.linalg.qr(torch.randn(out_dim, r, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(in_dim, r, dtype=torch.float64))
    s = torch.cat([torch.tensor(top[:r], dtype=torch.float64),
                   torch.linspace(rest_max, 0.1, max(r - len(top), 0), dtype=torch.float64)])
    mat = (U * s) @ V.t()
    w = m.weight
    if isinstance(m, nn.ConvTranspose2d):
        new = mat.reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1)
    else:
        new = mat.reshape(w.shape)
    with torch.no_grad():
        w.copy_(new)
    return s.float()


LAYERS = {
    "linear": lambda: SNLinear(40, 24),
    "linear_tall": lambda: SNLinear(12, 50, sn=SN_OFF),
    "conv": lambda: SNConv2d(6, 16, 3, padding=1),
    "conv_channels_last": lambda: SNConv2d(6, 16, 3).to(memory_format=torch.channels_last),
    "conv_transpose": lambda: SNConvTranspose2d(8, 6, 4, 2, 1),
    "embedding": lambda: SNEmbedding(10, 32),
    "plain_linear": lambda: nn.Linear(30, 20),          # no buffers: side-table state
    "plain_embedding": lambda: nn.Embedding(7, 16),
}


# ------------------------------------------------------------------------------------------
# Top-k singular values
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(LAYERS))
def test_top3_known_spectrum_within_1pct(name):
    m = LAYERS[name]()
    s = set_spectrum(m)
    for _ in range(4):  # warm-up
        est = top_singular_values(m)
    assert est.dtype == torch.float32 and est.shape == (3,)
    torch.testing.assert_close(est, s[:3], rtol=1e-2, atol=0)
    # Well separated: fp32-exact after a few more rounds.
    for _ in range(4):
        est = top_singular_values(m)
    torch.testing.assert_close(est, svals(m)[:3], rtol=1e-4, atol=0)


def test_top3_random_matrix_warm_start_converges():
    # Gaussian weights: the top singular values are clustered (the slow case).
    m = SNConv2d(16, 48, 3)
    for _ in range(40):
        est = top_singular_values(m)
    torch.testing.assert_close(est, svals(m)[:3], rtol=1e-2, atol=0)


def test_top_values_track_a_changing_weight():
    m = SNLinear(64, 32)
    set_spectrum(m, top=(4.0, 2.0, 1.8))
    for _ in range(6):
        top_singular_values(m)
    for _ in range(5):  # small drift per step, one round per step
        with torch.no_grad():
            m.weight.add_(1e-3 * torch.randn_like(m.weight))
        est = top_singular_values(m, iters=1)
        torch.testing.assert_close(est, svals(m)[:3], rtol=1e-2, atol=0)


def test_k_larger_than_rank_pads_with_zeros_and_k_can_grow():
    m = SNLinear(8, 2)
    est = top_singular_values(m, k=3)
    assert est.shape == (3,) and est[2] == 0
    torch.testing.assert_close(est[:2], svals(m), rtol=1e-4, atol=0)
    m = SNLinear(20, 30)
    set_spectrum(m, top=(9.0, 8.0, 7.0, 6.0, 5.0))
    for _ in range(6):
        est = top_singular_values(m, k=5)
    assert m.sv_u.shape == (3, 30) and m.sv_v.shape == (3, 20)  # buffers keep their shape
    torch.testing.assert_close(est, svals(m)[:5], rtol=1e-3, atol=0)
    torch.testing.assert_close(top_singular_values(m, k=3), svals(m)[:3], rtol=1e-3, atol=0)


def test_jacobi_svd_matches_svd():
    B = torch.randn(6, 3, 3)
    B[0] = torch.diag(torch.tensor([1.0, 3.0, 2.0]))   # already diagonal, unsorted
    B[1, :, 2] = 0                                     # rank-deficient
    P, s, R = jacobi_svd(B)
    torch.testing.assert_close(s, torch.linalg.svdvals(B), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(B @ R, P * s[:, None, :], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(R.mT @ R, torch.eye(3).expand(6, 3, 3), rtol=0, atol=1e-5)


def test_no_host_sync_shapes_only():
    """Everything runs on the meta device, where any .item(), data-dependent branch or
    error-checking linalg call would fail: the maths is sync-free."""
    with torch.device("meta"):
        G, D = build(small_cfg(), 32, 5)
    stats = sigma_stats(D)
    assert stats["blocks.0.conv1"]["s0"].device.type == "meta"
    sigma0_clamp_(reg_modules(D), 2.0, relative=True)
    sigma0_clamp_(reg_modules(D), 1.0)
    assert sigma0_penalty(reg_modules(D), 1.0).shape == ()
    ortho_grad_(reg_modules(G, exclude=[G.shared]), 1e-4)


# ------------------------------------------------------------------------------------------
# sigma_stats: every weight layer, found by type
# ------------------------------------------------------------------------------------------


def test_sigma_stats_every_layer_of_biggan():
    G, D = build(small_cfg(g_sn=False), 32, 5)  # G without SN: plain-weight layers included
    for net in (G, D):
        names = [n for n, _ in weight_modules(net)]
        for _ in range(15):
            stats = sigma_stats(net)
        assert list(stats) == names
        for name, m in weight_modules(net):
            row = stats[name]
            ref = svals(m)
            assert all(v.dim() == 0 and v.dtype == torch.float32 for v in row.values())
            torch.testing.assert_close(row["fro"], weight_matrix(m).detach().norm())
            k = min(3, ref.numel())
            assert set(row) == {f"s{j}" for j in range(k)} | {"fro"} | (
                {"s0_over_s1"} if k > 1 else set())
            torch.testing.assert_close(torch.stack([row[f"s{j}"] for j in range(k)]), ref[:k],
                                       rtol=2e-2, atol=0)
    assert "shared" in sigma_stats(G)                     # plain nn.Embedding: side-table state
    assert set(sigma_stats(D)["linear"]) == {"s0", "fro"}  # (1, F): a single singular value


def test_sigma_stats_does_not_depend_on_names():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.sv0 = nn.Linear(6, 5)           # names that look like state keys
            self.u = SNConv2d(3, 4, 3, sn=SN_OFF)
            self.weight_orig = nn.Sequential(SNEmbedding(4, 6))

    net = Odd()
    stats = sigma_stats(net)
    assert set(stats) == {"sv0", "u", "weight_orig.0"}
    assert stats["sv0"]["s0"] > 0


def test_sigma_stats_under_bf16_autocast_is_fp32():
    m = SNConv2d(4, 8, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        for _ in range(10):
            stats = sigma_stats(nn.Sequential(m))
    assert stats["0"]["s0"].dtype == torch.float32
    torch.testing.assert_close(stats["0"]["s0"], svals(m)[0], rtol=1e-2, atol=0)


# ------------------------------------------------------------------------------------------
# Persistent state: checkpoints
# ------------------------------------------------------------------------------------------


def test_state_survives_state_dict_round_trip():
    G, D = build(small_cfg(), 32, 5)
    for _ in range(5):
        sigma_stats(D)
    sd = D.state_dict()
    assert "blocks.0.conv1.sv_u" in sd and sd["blocks.0.conv1.sv_v"].shape[0] == 3
    _, D2 = build(small_cfg(), 32, 5)
    D2.load_state_dict(sd)  # strict
    torch.testing.assert_close(D2.blocks[0].conv1.sv_v, D.blocks[0].conv1.sv_v)


def test_state_dicts_from_before_the_buffers_load_strictly():
    G, D = build(small_cfg(), 32, 5)
    old = {k: v for k, v in D.state_dict().items() if not k.endswith((".sv_u", ".sv_v"))}
    _, D2 = build(small_cfg(), 32, 5)
    fresh = D2.blocks[0].conv1.sv_v.clone()
    D2.load_state_dict(old)  # strict: no missing-key error
    assert torch.equal(D2.blocks[0].conv1.sv_v, fresh)
    torch.testing.assert_close(D2.linear.weight, D.linear.weight)
    # A checkpoint from layers built with another sv_k loads too, and keeps its width.
    m = SNLinear(20, 30, sn=SNSettings(sv_k=5))
    top_singular_values(m, k=5)
    m2 = SNLinear(20, 30)
    m2.load_state_dict(m.state_dict())
    assert m2.sv_u.shape == (5, 30) and torch.equal(m2.sv_v, m.sv_v)


# ------------------------------------------------------------------------------------------
# sigma0 clamp
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["linear", "linear_tall", "conv_channels_last",
                                  "conv_transpose", "embedding", "plain_linear"])
def test_clamp_fixed(name):
    m = LAYERS[name]()
    s = set_spectrum(m, top=(6.0, 2.0, 1.5), rest_max=1.0)
    for _ in range(3):
        top_singular_values(m)
    sigma0_clamp_([m], 4.0)
    after = svals(m)
    assert abs(after[0] - 4.0) / 4.0 < 1e-3
    torch.testing.assert_close(after[1:], s[1:], rtol=1e-4, atol=1e-6)
    if name == "conv_channels_last":
        assert m.weight.is_contiguous(memory_format=torch.channels_last)


def test_clamp_ratio_and_noop():
    m = SNLinear(48, 32)
    s = set_spectrum(m, top=(6.0, 2.0, 1.5), rest_max=1.0)
    for _ in range(3):
        top_singular_values(m)
    sigma0_clamp_([m], 1.5, relative=True)                      # sigma_clamp = 1.5 * sigma1 = 3
    after = svals(m)
    assert abs(after[0] - 3.0) / 3.0 < 1e-3
    torch.testing.assert_close(after[1:], s[1:], rtol=1e-4, atol=1e-6)
    w = m.weight.detach().clone()
    sigma0_clamp_([m], 2.0, relative=True)                      # 3 < 2 * 2: nothing to remove
    sigma0_clamp_([m], 10.0)
    torch.testing.assert_close(m.weight.detach(), w, rtol=0, atol=1e-6)


def test_clamp_acts_on_raw_weight_with_sn_and_keeps_state_valid():
    m = SNLinear(40, 30)
    set_spectrum(m, top=(6.0, 3.0, 2.0), rest_max=1.0)
    for _ in range(3):
        top_singular_values(m)
    sigma0_clamp_([m], 2.5)                      # below sigma1: the old u1 becomes top
    after = svals(m)
    torch.testing.assert_close(after[:3], torch.tensor([3.0, 2.5, 2.0]), rtol=1e-4, atol=0)
    # State: orthonormal rows that are still singular pairs of the new W, sorted.
    U, V = subspace_state(m, 3)
    torch.testing.assert_close(U @ U.t(), torch.eye(3), rtol=0, atol=1e-5)
    torch.testing.assert_close(V @ V.t(), torch.eye(3), rtol=0, atol=1e-5)
    w = weight_matrix(m).detach()
    torch.testing.assert_close(torch.diagonal(U @ w @ V.t()), after[:3], rtol=1e-4, atol=0)
    torch.testing.assert_close(top_singular_values(m, iters=1), after[:3], rtol=1e-4, atol=0)
    # Spectral norm's own vectors follow the new top pair: the SN weight has sigma0 = 1.
    torch.testing.assert_close(m.sigma, after[0], rtol=1e-4, atol=0)
    m.eval()
    torch.testing.assert_close(svals_of(m.sn_weight()), torch.tensor(1.0), rtol=1e-4, atol=0)


def svals_of(w: torch.Tensor) -> torch.Tensor:
    return torch.linalg.svdvals(w.detach().reshape(w.shape[0], -1))[0]


def test_clamp_over_a_whole_model():
    # Each call removes the excess along each layer's current top pair (BigGAN's clamp acts on
    # sigma0 only), so sigma0 drops to max(clamp, old sigma1).
    G, D = build(small_cfg(), 32, 5)
    mods = reg_modules(G, exclude=[G.shared]) + reg_modules(D)
    with torch.no_grad():  # a spike on top of the orthogonal init: sigma0 ~ 5, sigma1 ~ 1
        for m in mods:
            w = weight_matrix(m)
            a, b = torch.randn(w.shape[0]), torch.randn(w.shape[1])
            spike = 4.0 * torch.outer(a / a.norm(), b / b.norm())
            m.weight.add_(as_weight(m, spike))
    for _ in range(4):
        sigma_stats(G), sigma_stats(D)
    before = [svals(m) for m in mods]
    sigma0_clamp_(mods, 2.0)
    for m, s in zip(mods, before):
        expect = max(2.0, s[1].item()) if s.numel() > 1 else 2.0
        assert abs(svals(m)[0].item() - expect) / expect < 1e-3, m


# ------------------------------------------------------------------------------------------
# sigma0 penalty
# ------------------------------------------------------------------------------------------


def test_sigma0_penalty_value_and_gradient():
    a, b = SNLinear(40, 30), SNConv2d(4, 12, 3)
    sa = set_spectrum(a, top=(5.0, 2.0, 1.5), rest_max=1.0)
    sb = set_spectrum(b, top=(1.0, 0.8, 0.5), rest_max=0.4)
    for _ in range(8):
        top_singular_values(a), top_singular_values(b)
    pen = sigma0_penalty([a, b], 3.0)           # one-sided: only a exceeds
    torch.testing.assert_close(pen, (sa[0] - 3.0) ** 2, rtol=1e-4, atol=0)
    pen.backward()
    # d/dW (s0 - t)^2 = 2 (s0 - t) u0 v0^T: compare with autograd through the exact SVD.
    w = weight_matrix(a).detach().clone().requires_grad_(True)
    ((torch.linalg.svdvals(w)[0] - 3.0) ** 2).backward()
    torch.testing.assert_close(weight_matrix(a, a.weight.grad), w.grad, rtol=1e-3, atol=1e-5)
    assert b.weight.grad is None or b.weight.grad.abs().max() == 0
    two = sigma0_penalty([a, b], 3.0, two_sided=True)
    torch.testing.assert_close(two, (sa[0] - 3.0) ** 2 + (sb[0] - 3.0) ** 2, rtol=1e-4, atol=0)
    ratio = sigma0_penalty([a], 2.0, relative=True)             # target 2 * sg(sigma1) = 4
    torch.testing.assert_close(ratio, (sa[0] - 4.0) ** 2, rtol=1e-4, atol=0)


# ------------------------------------------------------------------------------------------
# Orthogonal regularisation
# ------------------------------------------------------------------------------------------

ORTHO_LAYERS = [
    lambda: SNLinear(12, 20),                                       # out <= in*: W W^T
    lambda: SNLinear(6, 25),                                        # out > in: W^T W path
    lambda: SNConv2d(3, 8, 3),
    lambda: SNConv2d(2, 30, 3).to(memory_format=torch.channels_last),  # 30 > 18
    lambda: SNConvTranspose2d(5, 4, 4, 2, 1),
    lambda: nn.Embedding(9, 4),
]


@pytest.mark.parametrize("full", [False, True])
def test_ortho_penalty_value_matches_the_formula(full):
    mods = [make() for make in ORTHO_LAYERS]
    expect = 0.0
    for m in mods:
        w = weight_matrix(m).detach().double()
        g = w @ w.t()
        eye = torch.eye(g.shape[0], dtype=torch.float64)
        expect += ((g - eye) if full else g * (1 - eye)).square().sum()
    torch.testing.assert_close(ortho_penalty(mods, 0.5, full=full).double(), 0.5 * expect,
                               rtol=1e-4, atol=0)


@pytest.mark.parametrize("full", [False, True])
def test_ortho_grad_equals_autograd(full):
    mods = [make() for make in ORTHO_LAYERS]
    beta = 1e-2
    ortho_penalty(mods, beta, full=full).backward()
    auto = [m.weight.grad.clone() for m in mods]
    for m in mods:
        m.weight.grad = torch.ones_like(m.weight)      # ortho_grad_ adds to existing grads
    ortho_grad_(mods, beta, full=full)
    for m, g in zip(mods, auto):
        torch.testing.assert_close(m.weight.grad - 1.0, g, rtol=1e-4, atol=1e-6)
    for m in mods:
        m.weight.grad = None                           # and creates missing ones
    ortho_grad_(mods, beta, full=full)
    for m, g in zip(mods, auto):
        torch.testing.assert_close(m.weight.grad, g, rtol=1e-4, atol=1e-6)


def test_ortho_zero_for_orthogonal_filters_and_reg_modules_exclude_shared():
    m = SNLinear(16, 8)
    nn.init.orthogonal_(m.weight)  # 8 orthonormal rows
    assert ortho_penalty([m], 1.0) < 1e-10 and ortho_penalty([m], 1.0, full=True) < 1e-10
    G, _ = build(small_cfg(), 32, 5)
    mods = reg_modules(G, exclude=[G.shared])
    assert G.shared not in mods and G.linear in mods
    assert len(mods) == len(weight_modules(G)) - 1
