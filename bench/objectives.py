"""GAN losses and regularisers as named terms.

Each D loss maps (real_logits, fake_logits) -> scalar; each G loss maps fake_logits -> scalar.
`GANObjective` owns every forward/backward of a phase (D or G), reports its terms by name through
`bench.telemetry.report`, and leaves gradients in the nets for the loop to step.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from bench import telemetry

Tensor = torch.Tensor


# ---- D losses: (real_logits, fake_logits) -> scalar ------------------------------------------------
def d_hinge(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def d_logistic(real: Tensor, fake: Tensor) -> Tensor:
    # -log sigmoid(real) - log(1 - sigmoid(fake)); shared by minimax and non-saturating GANs.
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def d_wasserstein(real: Tensor, fake: Tensor) -> Tensor:
    return fake.mean() - real.mean()


# ---- G losses: fake_logits -> scalar ---------------------------------------------------------------
def g_hinge(fake: Tensor) -> Tensor:
    return -fake.mean()


def g_nonsaturating(fake: Tensor) -> Tensor:
    # -log sigmoid(fake): the -log D trick.
    return F.softplus(-fake).mean()


def g_minimax(fake: Tensor) -> Tensor:
    # log(1 - sigmoid(fake)) = -softplus(fake): G minimises what D maximises.
    return -F.softplus(fake).mean()


LOSSES: dict[str, tuple[Callable[[Tensor, Tensor], Tensor], Callable[[Tensor], Tensor]]] = {
    "hinge": (d_hinge, g_hinge),
    "ns": (d_logistic, g_nonsaturating),
    "minimax": (d_logistic, g_minimax),
    "wgan": (d_wasserstein, g_hinge),
    "wgan_gp": (d_wasserstein, g_hinge),
}


# ---- penalties -------------------------------------------------------------------------------------
def input_grad_sq_norm(D, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample ||grad_x D(x, y)||^2 with a graph for a second backward (R1, R2, GP)."""
    x = x.detach().requires_grad_(True)
    logits = D(x, y)
    (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    return grad.float().flatten(1).square().sum(1)


def r1_penalty(D, real: Tensor, y: Tensor, gamma: float) -> Tensor:
    """R1 = gamma/2 * E_real ||grad_x D(x)||^2 (Mescheder et al. 2018)."""
    return 0.5 * gamma * input_grad_sq_norm(D, real, y).mean()


def gradient_penalty(D, real: Tensor, fake: Tensor, y: Tensor, lam: float, generator=None) -> Tensor:
    """WGAN-GP: lam * E[(||grad D(x_hat)|| - 1)^2] on random interpolates of real and fake."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator, dtype=real.dtype)
    x_hat = eps * real.detach() + (1 - eps) * fake.detach()
    norm = (input_grad_sq_norm(D, x_hat, y) + 1e-12).sqrt()
    return lam * (norm - 1.0).square().mean()


def d_logistic_targets(real: Tensor, fake: Tensor, real_target: float = 1.0, flip: Tensor | None = None) -> Tensor:
    """Logistic D loss with soft/noisy targets: BCE(real, t_real) + BCE(fake, 0).

    real_target < 1 is one-sided label smoothing (Salimans et al. 2016: 0.9); `flip` is a pair of bool
    masks (real, fake) of samples whose targets are swapped (noisy labels)."""
    t_real = torch.full_like(real, real_target)
    t_fake = torch.zeros_like(fake)
    if flip is not None:
        t_real = torch.where(flip[0], 1.0 - t_real, t_real)
        t_fake = torch.where(flip[1], torch.full_like(t_fake, real_target), t_fake)
    return (F.binary_cross_entropy_with_logits(real, t_real) + F.binary_cross_entropy_with_logits(fake, t_fake))


def feature_matching_loss(real_features: Tensor, fake_features: Tensor) -> Tensor:
    """||E f(real) - E f(fake)||^2 over an intermediate D feature (Salimans et al. 2016)."""
    return (real_features.float().mean(0) - fake_features.float().mean(0)).square().sum()


class HistoricalAverage:
    """||theta - running mean of past theta||^2 (Salimans et al. 2016), the mean kept online.

    `add_grad_` adds the penalty's gradient 2 w (theta - mean) to .grad (cheaper than autograd) and
    then folds the current theta into the mean. Returns the penalty value (0-d tensor)."""

    def __init__(self, params, weight: float):
        self.params = [p for p in params if p.requires_grad]
        self.weight = weight
        self.mean = [p.detach().clone() for p in self.params]
        self.count = 1

    @torch.no_grad()
    def add_grad_(self) -> Tensor:
        diffs = torch._foreach_sub([p.detach() for p in self.params], self.mean)
        value = self.weight * torch.stack([d.float().square().sum() for d in diffs]).sum()
        for p, d in zip(self.params, diffs):
            g = 2.0 * self.weight * d
            p.grad = g if p.grad is None else p.grad.add_(g)
        self.count += 1
        torch._foreach_add_(self.mean, torch._foreach_div(diffs, float(self.count)))
        return value

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        for m, v in zip(self.mean, s["mean"]):
            m.copy_(v)
        self.count = int(s["count"])


def _batch_dependent(net: torch.nn.Module) -> bool:
    """True when some layer of `net` mixes the samples of a batch (BatchNorm in training, minibatch
    discrimination / stddev): then real and fake batches must not share a forward pass."""
    from models.layers import MinibatchDiscrimination, MinibatchStdDev, VirtualBatchNorm2d

    kinds = (torch.nn.modules.batchnorm._BatchNorm, MinibatchDiscrimination, MinibatchStdDev, VirtualBatchNorm2d)
    return any(isinstance(m, kinds) for m in net.modules())


class GANObjective:
    """Computes and backpropagates one micro-batch of a phase.

    backward: callable(loss) doing the (accumulation-scaled) backward pass. Each phase returns its
    total loss (detached) so the loop can skip non-finite steps.
    """

    def __init__(self, cfg, G, D, backward: Callable[[Tensor], None], autocast):
        self.G, self.D = G, D
        self.d_loss, self.g_loss = LOSSES[cfg.loss.name]
        self.loss_name = cfg.loss.name
        self.gp_lambda = float(cfg.loss.gp_lambda)
        self.real_target = float(cfg.loss.real_target)
        self.label_noise = float(cfg.loss.label_noise)
        self.fm_weight = float(cfg.loss.feature_matching)
        self.r1_gamma = float(cfg.reg.r1_gamma)
        self.r2_gamma = float(cfg.reg.r2_gamma)
        self.r_every = int(cfg.reg.r1_every)
        self.backward = backward
        self.autocast = autocast
        self.last_real = None  # (real, y) of the latest D phase, for feature matching
        # Real and fake go through D as one batch (bigger, faster kernels; one spectral-norm power
        # iteration per D step, as BigGAN-PyTorch does) unless a D layer looks across the batch.
        self.joint_d = not _batch_dependent(D)

    def d_phase(self, real: Tensor, y_real: Tensor, z: Tensor, y_fake: Tensor, d_step: int, gen=None) -> Tensor:
        with self.autocast():
            with torch.no_grad():
                fake = self.G(z, y_fake)
            if self.joint_d and real.shape[1:] == fake.shape[1:]:
                logits = self.D(torch.cat([real, fake]), torch.cat([y_real, y_fake])).float()
                real_logits, fake_logits = logits.split([real.shape[0], fake.shape[0]])
            else:
                real_logits = self.D(real, y_real).float()
                fake_logits = self.D(fake, y_fake).float()
            if self.real_target < 1.0 or self.label_noise > 0.0:
                flip = None
                if self.label_noise > 0.0:
                    flip = (torch.rand(real_logits.shape, device=real.device, generator=gen) < self.label_noise,
                            torch.rand(fake_logits.shape, device=real.device, generator=gen) < self.label_noise)
                loss = d_logistic_targets(real_logits, fake_logits, self.real_target, flip)
            else:
                loss = self.d_loss(real_logits, fake_logits)
        telemetry.report("loss/D", loss.detach())
        telemetry.report("D/real_logit_mean", real_logits.detach().mean())
        telemetry.report("D/fake_logit_mean", fake_logits.detach().mean())
        telemetry.report("D/real_sign_mean", (real_logits.detach() > 0).float().mean())
        telemetry.report("D/fake_sign_mean", (fake_logits.detach() > 0).float().mean())
        total = loss
        if self.loss_name == "wgan_gp":
            with self.autocast():
                gp = gradient_penalty(self.D, real, fake, y_real, self.gp_lambda, generator=gen)
            telemetry.report("loss/GP", gp.detach())
            total = total + gp
        if d_step % self.r_every == 0:
            # Lazy regularisation: apply every r1_every D steps, scaled by the interval.
            if self.r1_gamma > 0:
                with self.autocast():
                    r1 = r1_penalty(self.D, real, y_real, self.r1_gamma)
                telemetry.report("loss/R1", r1.detach())
                total = total + r1 * self.r_every
            if self.r2_gamma > 0:
                with self.autocast():
                    r2 = r1_penalty(self.D, fake, y_fake, self.r2_gamma)  # same form, on fakes
                telemetry.report("loss/R2", r2.detach())
                total = total + r2 * self.r_every
        if self.fm_weight > 0:
            self.last_real = (real, y_real)
        self.backward(total)
        return total.detach()

    def g_phase(self, z: Tensor, y_fake: Tensor) -> Tensor:
        with self.autocast():
            fake = self.G(z, y_fake)
            if self.fm_weight > 0 and self.last_real is not None:
                fake_logits, fake_feat = self.D(fake, y_fake, return_features=True)
                with torch.no_grad():
                    _, real_feat = self.D(*self.last_real, return_features=True)
                fm = feature_matching_loss(real_feat, fake_feat)
            else:
                fake_logits, fm = self.D(fake, y_fake), None
            loss = self.g_loss(fake_logits.float())
        telemetry.report("loss/G", loss.detach())
        total = loss
        if fm is not None:
            telemetry.report("loss/FM", fm.detach())
            total = total + self.fm_weight * fm
        self.backward(total)
        return total.detach()
