"""DiffAugment's ops against their definitions, gradients through them, ADA's gate and its p controller."""
import pytest
import torch

from bench.train import augment as A
from bench.train.telemetry import Collector


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ---- each op with given parameters -------------------------------------------------------------------
def test_brightness_shifts_each_sample_mean_by_b():
    x = torch.randn(3, 3, 5, 5, generator=gen())
    b = torch.tensor([0.3, -0.2, 0.0])
    out = A.brightness(x, b)
    for i in range(3):
        assert (out[i] - x[i]).mean().item() == pytest.approx(b[i].item(), abs=1e-6)
        assert (out[i] - x[i]).std().item() == pytest.approx(0.0, abs=1e-6)


def test_saturation_scales_the_spread_across_channels():
    x = torch.randn(2, 3, 4, 4, generator=gen(1))
    out = A.saturation(x, torch.tensor([0.0, 2.0]))
    for h in range(4):
        for w in range(4):
            grey = sum(x[0, c, h, w].item() for c in range(3)) / 3
            for c in range(3):  # s = 0: every channel is the pixel's grey value
                assert out[0, c, h, w].item() == pytest.approx(grey, abs=1e-5)
            mean1 = sum(x[1, c, h, w].item() for c in range(3)) / 3
            for c in range(3):  # s = 2: twice as far from the pixel's channel mean
                assert out[1, c, h, w].item() == pytest.approx(mean1 + 2 * (x[1, c, h, w].item() - mean1), abs=1e-5)


def test_contrast_keeps_the_mean_and_scales_the_std():
    x = torch.randn(2, 3, 6, 6, generator=gen(2))
    c = torch.tensor([0.5, 1.5])
    out = A.contrast(x, c)
    for i in range(2):
        assert out[i].mean().item() == pytest.approx(x[i].mean().item(), abs=1e-5)
        assert out[i].std().item() == pytest.approx(c[i].item() * x[i].std().item(), rel=1e-5)


def test_translate_shifts_by_the_given_amount_with_zero_padding():
    x = torch.arange(2 * 2 * 5 * 6, dtype=torch.float32).view(2, 2, 5, 6) + 1  # no zero pixel of its own
    shift = torch.tensor([[2, -1], [-3, 4]])
    out = A.translate(x, shift)
    for b in range(2):
        dy, dx = shift[b].tolist()
        for h in range(5):
            for w in range(6):
                sh, sw = h - dy, w - dx
                want = x[b, :, sh, sw] if 0 <= sh < 5 and 0 <= sw < 6 else torch.zeros(2)
                assert torch.equal(out[b, :, h, w], want), (b, h, w)


def test_cutout_zeroes_a_square_of_the_stated_side():
    x = torch.ones(2, 3, 8, 8)
    out = A.cutout(x, torch.tensor([[1, 2], [4, 0]]), torch.tensor([4, 4]))
    for b, (y0, x0) in enumerate([(1, 2), (4, 0)]):
        zero = out[b, 0] == 0
        assert zero.sum().item() == 16 and bool(zero[y0:y0 + 4, x0:x0 + 4].all())
        assert bool((out[b, :, ~zero] == 1).all()) and torch.equal(out[b, 0], out[b, 2])


def test_the_ops_are_differentiable():
    """Numerical gradients (float64) agree with autograd for every op given its parameters."""
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, generator=gen(3), requires_grad=True)
    p = torch.tensor([0.4, 1.7], dtype=torch.float64)
    for f in (lambda t: A.brightness(t, p), lambda t: A.saturation(t, p), lambda t: A.contrast(t, p),
              lambda t: A.translate(t, torch.tensor([[1, -2], [0, 3]])),
              lambda t: A.cutout(t, torch.tensor([[0, 1], [2, 2]]), torch.tensor([2, 2]))):
        assert torch.autograd.gradcheck(f, (x,))


# ---- random parameters: DiffAugment ------------------------------------------------------------------
def test_color_draws_follow_the_definitions():
    """On a constant grey image saturation and contrast are identities: what is left is the brightness
    shift b ~ U(-0.5, 0.5) (mean 0, variance 1/12)."""
    out = A.color(A.DiffAugment(["color"], gen(4)), torch.zeros(4000, 3, 2, 2))
    b = out[:, 0, 0, 0]
    assert torch.equal(out, b.view(-1, 1, 1, 1).expand_as(out))
    assert b.min() >= -0.5 and b.max() <= 0.5
    assert b.mean().item() == pytest.approx(0.0, abs=0.02) and b.var().item() == pytest.approx(1 / 12, rel=0.1)
    # channels (1, 0, -1): brightness cancels in out[0] - out[2], saturation s ~ U(0, 2) and contrast
    # c ~ U(0.5, 1.5) scale it: (out[0] - out[2]) / 2 = s * c, in [0, 3] with mean E[s] E[c] = 1
    x = torch.zeros(4000, 3, 1, 1)
    x[:, 0], x[:, 2] = 1.0, -1.0
    out = A.DiffAugment(["color"], gen(5))(x)
    spread = (out[:, 0] - out[:, 2]).flatten() / 2
    assert spread.min() >= 0 and spread.max() <= 3.0 and spread.mean().item() == pytest.approx(1.0, abs=0.05)
    assert spread.var().item() == pytest.approx(4 / 3 * 13 / 12 - 1, rel=0.15)  # E[s^2] E[c^2] - 1


def test_translation_draws_shifts_up_to_an_eighth():
    x = torch.arange(64, dtype=torch.float32).view(1, 1, 8, 8).repeat(200, 1, 1, 1) + 1
    out = A.DiffAugment(["translation"], gen(6))(x)
    seen = set()
    for b in range(200):
        match = [(dy, dx) for dy in range(-1, 2) for dx in range(-1, 2)
                 if torch.equal(out[b:b + 1], A.translate(x[:1], torch.tensor([[dy, dx]])))]
        assert match, b  # round(8 / 8) = 1: every output is the input shifted by at most one pixel
        seen.add(match[0])
    assert len(seen) == 9


def test_cutout_draws_zero_a_quarter_inside_the_image():
    out = A.DiffAugment(["cutout"], gen(7))(torch.ones(100, 3, 8, 8))
    zero = out[:, 0] == 0
    assert bool((zero.flatten(1).sum(1) == 16).all())  # side round(8 / 2) = 4: a quarter of the pixels


def test_gradients_reach_G_through_the_augmentation():
    torch.manual_seed(0)
    G = torch.nn.Linear(8, 3 * 8 * 8)
    w_D = torch.randn(3, 8, 8)
    aug = A.DiffAugment(["color", "translation", "cutout"], gen(8))
    fake = G(torch.randn(4, 8)).view(4, 3, 8, 8)
    (aug(fake) * w_D).sum().backward()
    assert G.weight.grad is not None and bool(torch.isfinite(G.weight.grad).all()) and G.weight.grad.abs().sum() > 0


# ---- ADA: the gate and p ------------------------------------------------------------------------------
def test_ada_gate_applies_each_op_with_probability_p():
    x = torch.ones(4000, 1, 8, 8)
    aug = A.DiffAugment(["color", "translation", "cutout"], gen(9))
    assert torch.equal(aug(x, torch.tensor(0.0)), x)  # p = 0: the identity
    changed = (A.DiffAugment(["cutout"], gen(10))(x, torch.tensor(0.3)) != x).flatten(1).any(1).float().mean()
    assert changed.item() == pytest.approx(0.3, abs=0.03)
    assert bool((A.DiffAugment(["cutout"], gen(11))(x, torch.tensor(1.0)) == 0).flatten(1).any(1).all())


def test_adaptive_p_moves_by_the_sign_of_rt_minus_target():
    ada = A.AdaptiveP(target=0.6, interval=2, kimg=0.016, device=torch.device("cpu"))
    with Collector(torch.device("cpu")) as c:
        ada.observe(torch.tensor([1.0, 2.0, 3.0, -1.0]))  # signs sum 2
        ada.after_d_step()
        assert ada.p.item() == 0.0  # not yet: the interval is 2 D steps
        ada.observe(torch.tensor([0.5, 0.5, 0.5, 0.5]))  # signs sum 4
        ada.after_d_step()
        row = c.tick()
    # r_t = 6 / 8 = 0.75 > 0.6: p += 8 images / (0.016 * 1000) = 0.5
    assert ada.p.item() == pytest.approx(0.5)
    assert row["aug/p"] == pytest.approx(0.25) and row["aug/rt"] == pytest.approx((0.5 + 0.75) / 2)
    for _ in range(2):
        ada.observe(torch.tensor([-1.0, -1.0, -1.0, 1.0]))  # r_t = -0.5 < 0.6: down, clamped at 0
        ada.after_d_step()
    assert ada.p.item() == 0.0
    for _ in range(6):
        ada.observe(torch.ones(4))
        ada.after_d_step()
    assert ada.p.item() == 1.0  # clamped at 1


def test_adaptive_p_state_round_trip_and_old_checkpoints():
    ada = A.AdaptiveP(0.6, 4, 500, torch.device("cpu"))
    ada.p = torch.tensor(0.37)
    ada.observe(torch.tensor([1.0, -1.0, 1.0]))
    ada.after_d_step()
    s = ada.state_dict()
    other = A.AdaptiveP(0.6, 4, 500, torch.device("cpu"))
    other.load_state_dict(s)
    assert other.p.item() == pytest.approx(0.37) and other.steps == 1 and other.signs.item() == 1.0
    other.load_state_dict({})  # a checkpoint written before ADA existed: p = 0
    assert other.p.item() == 0.0 and other.steps == 0


def test_the_config_offers_the_registered_ops():
    from bench.config import ConfigError, compose, validate
    from bench.registry import AUG_OPS

    assert AUG_OPS.names() == ("color", "translation", "cutout") and AUG_OPS["cutout"] is A.cutout_op
    with pytest.raises(ConfigError, match="choose one of: color, translation, cutout"):
        validate(compose(["aug.policy=[blur]"]))
