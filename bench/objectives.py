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


class GANObjective:
    """Computes and backpropagates one micro-batch of a phase.

    backward: callable(loss) doing the (accelerator-scaled) backward pass.
    """

    def __init__(self, cfg, G, D, backward: Callable[[Tensor], None], autocast):
        self.G, self.D = G, D
        self.d_loss, self.g_loss = LOSSES[cfg.loss.name]
        self.loss_name = cfg.loss.name
        self.gp_lambda = float(cfg.loss.gp_lambda)
        self.r1_gamma = float(cfg.reg.r1_gamma)
        self.r1_every = int(cfg.reg.r1_every)
        self.backward = backward
        self.autocast = autocast

    def d_phase(self, real: Tensor, y_real: Tensor, z: Tensor, y_fake: Tensor, d_step: int, gen=None) -> None:
        with self.autocast():
            with torch.no_grad():
                fake = self.G(z, y_fake)
            real_logits = self.D(real, y_real).float()
            fake_logits = self.D(fake, y_fake).float()
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
        if self.r1_gamma > 0 and d_step % self.r1_every == 0:
            # Lazy regularisation: apply every r1_every D steps, scaled by the interval.
            with self.autocast():
                r1 = r1_penalty(self.D, real, y_real, self.r1_gamma)
            telemetry.report("loss/R1", r1.detach())
            total = total + r1 * self.r1_every
        self.backward(total)

    def g_phase(self, z: Tensor, y_fake: Tensor) -> None:
        with self.autocast():
            fake = self.G(z, y_fake)
            fake_logits = self.D(fake, y_fake).float()
            loss = self.g_loss(fake_logits)
        telemetry.report("loss/G", loss.detach())
        self.backward(loss)
