"""Loss values on known logits, what each loss owns, R1 against an analytic value, the EMA update."""
import math

import pytest
import torch
from omegaconf import OmegaConf

from bench.train import objectives as O
from bench.train.state import ema_update

REAL = torch.tensor([2.0, 0.5, -1.0])
FAKE = torch.tensor([-2.0, 0.0, 1.5])


def sp(x):  # softplus, written out
    return math.log1p(math.exp(x))


def test_hinge():
    # D: mean(relu(1 - r)) + mean(relu(1 + f)); relu(1-r) = [0, .5, 2]; relu(1+f) = [0, 1, 2.5]
    assert O.d_hinge(REAL, FAKE).item() == pytest.approx(2.5 / 3 + 3.5 / 3)
    assert O.g_hinge(FAKE).item() == pytest.approx(-(-2.0 + 0.0 + 1.5) / 3)


def test_logistic_losses():
    expected_d = sum(sp(-r) for r in REAL.tolist()) / 3 + sum(sp(f) for f in FAKE.tolist()) / 3
    assert O.d_logistic(REAL, FAKE).item() == pytest.approx(expected_d, rel=1e-6)
    # non-saturating G: -log sigmoid(f); minimax G: log(1 - sigmoid(f))
    ns = sum(-math.log(1 / (1 + math.exp(-f))) for f in FAKE.tolist()) / 3
    mm = sum(math.log(1 - 1 / (1 + math.exp(-f))) for f in FAKE.tolist()) / 3
    assert O.g_nonsaturating(FAKE).item() == pytest.approx(ns, rel=1e-6)
    assert O.g_minimax(FAKE).item() == pytest.approx(mm, rel=1e-6)


def test_wasserstein():
    assert O.d_wasserstein(REAL, FAKE).item() == pytest.approx(FAKE.mean().item() - REAL.mean().item())
    assert set(O.LOSSES) == {"hinge", "ns", "minimax", "wgan", "wgan_gp", "rpgan"}


def test_relativistic_pairing():
    """RpGAN: D = mean softplus(-(r_i - f_i)), G = mean softplus(-(f_i - r_i)), pairs by index."""
    expected_d = sum(sp(-(r - f)) for r, f in zip(REAL.tolist(), FAKE.tolist())) / 3
    expected_g = sum(sp(-(f - r)) for r, f in zip(REAL.tolist(), FAKE.tolist())) / 3
    assert O.d_relativistic(REAL, FAKE).item() == pytest.approx(expected_d, rel=1e-6)
    assert O.g_relativistic(FAKE, REAL).item() == pytest.approx(expected_g, rel=1e-6)
    # another pairing of the same logits is another loss: it is not a function of the two means
    assert O.d_relativistic(REAL, FAKE.flip(0)).item() != pytest.approx(expected_d, rel=1e-3)


def test_each_loss_owns_its_specifics():
    """The Wasserstein losses' critic gap is unbounded (the collapse detector's divergence signal is off
    for them), wgan_gp adds the gradient penalty, and wgan clips D's weights after each D step."""
    assert {n for n, loss in O.LOSSES.items() if loss.gap_unbounded} == {"wgan", "wgan_gp"}
    assert {n for n, loss in O.LOSSES.items() if loss.gradient_penalty} == {"wgan_gp"}
    assert {n for n, loss in O.LOSSES.items() if loss.after_d_step is not None} == {"wgan"}
    assert {n for n, loss in O.LOSSES.items() if loss.relativistic} == {"rpgan"}
    D = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    with torch.no_grad():
        D[0].weight.fill_(0.5)
        D[1].bias.fill_(-0.3)
    keep = D[0].bias.detach().clone().clamp(-0.01, 0.01)
    O.LOSSES["wgan"].after_d_step(D, OmegaConf.create({"clip": 0.01}))
    assert torch.equal(D[0].weight, torch.full((4, 3), 0.01)) and torch.equal(D[1].bias, torch.tensor([-0.01]))
    assert torch.equal(D[0].bias, keep)


def test_the_optimiser_comes_from_the_loss_config():
    """configs/loss/wgan.yaml sets train.optimizer=rmsprop (Arjovsky et al.); the others keep Adam."""
    from bench.config import compose

    params = [torch.nn.Parameter(torch.zeros(2))]
    for loss, kind in (("wgan", torch.optim.RMSprop), ("hinge", torch.optim.Adam), ("wgan_gp", torch.optim.Adam),
                       ("rpgan", torch.optim.Adam)):
        cfg = compose([f"loss={loss}"])
        opt = O.make_optimizer(cfg.train, params, 1e-3, torch.device("cpu"))
        assert type(opt) is kind and opt.defaults["eps"] == cfg.train.eps
        if kind is torch.optim.Adam:
            assert opt.defaults["betas"] == tuple(cfg.train.betas)
    rp = compose(["loss=rpgan"])  # configs/loss/rpgan.yaml: R1 + R2 as in R3GAN's 32x32 baseline
    assert (rp.reg.r1_gamma, rp.reg.r2_gamma, rp.reg.r1_every) == (0.05, 0.05, 1)
    assert compose(["loss=rpgan", "reg.r2_gamma=0"]).reg.r2_gamma == 0  # the command line wins


class LinearD(torch.nn.Module):
    """D(x) = <w, x> + b: grad_x D = w everywhere, so R1 = gamma/2 * ||w||^2."""

    def __init__(self, shape):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(shape))
        self.b = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, y):
        return (x * self.w).flatten(1).sum(1) + self.b


def test_r1_matches_analytic_value_for_linear_D():
    torch.manual_seed(0)
    D = LinearD((3, 4, 4))
    x = torch.randn(5, 3, 4, 4)
    gamma = 10.0
    r1 = O.r1_penalty(D, x, torch.zeros(5, dtype=torch.long), gamma)
    assert r1.item() == pytest.approx(gamma / 2 * D.w.square().sum().item(), rel=1e-5)
    # and it is differentiable w.r.t. D's parameters: d/dw (gamma/2 ||w||^2) = gamma * w
    r1.backward()
    torch.testing.assert_close(D.w.grad, gamma * D.w.detach())


def test_gradient_penalty_linear_D():
    torch.manual_seed(0)
    D = LinearD((2, 3, 3))
    real, fake = torch.randn(4, 2, 3, 3), torch.randn(4, 2, 3, 3)
    gp = O.gradient_penalty(D, real, fake, torch.zeros(4, dtype=torch.long), lam=10.0)
    norm = D.w.detach().norm().item()
    assert gp.item() == pytest.approx(10.0 * (norm - 1) ** 2, rel=1e-4)


def test_ema_update():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    ema = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    before = [p.detach().clone() for p in ema.parameters()]
    net[1].running_mean.fill_(0.7)
    ema_update(ema, net, decay=0.9)
    for b, e, n in zip(before, ema.parameters(), net.parameters()):
        torch.testing.assert_close(e.detach(), 0.9 * b + 0.1 * n.detach())
    torch.testing.assert_close(ema[1].running_mean, torch.full((3,), 0.7))
    ema_update(ema, net, decay=0.0)  # decay 0: a copy
    for e, n in zip(ema.parameters(), net.parameters()):
        torch.testing.assert_close(e, n)
