"""D-output regularisers of the modern GANs: LeCam (`LeCam`: its EMA anchors and penalty) and consistency
regularisation (bCR, zCR). GANObjective adds them to the D and G losses; the maths is here
(docs/architecture.md, "One training step")."""
from __future__ import annotations

from typing import Optional

import torch

from bench.train.augment import dist_sum
from bench.train.telemetry import report

Tensor = torch.Tensor


def lecam_penalty(real: Tensor, fake: Tensor, anchor_real: Tensor, anchor_fake: Tensor) -> Tensor:
    """||D(x) - a_F||^2 + ||D(G(z)) - a_R||^2, each a mean over the batch (real pulled to the fake anchor)."""
    return (real.float() - anchor_fake).square().mean() + (fake.float() - anchor_real).square().mean()


def consistency_sq(a: Tensor, b: Tensor) -> Tensor:
    """E_batch ||a - b||^2: per sample the squared norm over everything but the batch dimension."""
    return (a.float() - b.float()).reshape(a.shape[0], -1).square().sum(1).mean()


def latent_perturbation(z: Tensor, sigma: float, gen: Optional[torch.Generator] = None) -> Tensor:
    """z' = z + N(0, sigma^2)."""
    return z + sigma * torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=gen)


def g_zcr(fake: Tensor, fake_perturbed: Tensor, weight: float) -> Tensor:
    """zCR's G term: -weight * mean over samples and pixels of (G(z) - G(z'))^2 (G is pushed to vary with
    z; the per-pixel mean keeps the term bounded by the image range)."""
    return -weight * (fake.float() - fake_perturbed.float()).square().mean()


class LeCam:
    """LeCam's anchors: a_R, a_F = EMA (reg.lecam_decay) of the mean real / fake D output of each D step,
    averaged over ranks. `penalty(real, fake)` during a D micro-batch (before the first update the anchors
    are that micro-batch's own detached means); `after_d_step()` folds the step's means into the anchors
    (a non-finite step leaves them as they were) and reports `lecam/anchor_real` / `lecam/anchor_fake`."""

    def __init__(self, weight: float, decay: float, device: torch.device):
        self.weight, self.decay = float(weight), float(decay)
        self.anchors = torch.zeros(2, device=device)  # (a_R, a_F)
        self.started = False  # whether the anchors hold at least one update
        self.sums = torch.zeros(3, device=device)  # (sum of real means, sum of fake means, micro-batches)

    def penalty(self, real: Tensor, fake: Tensor) -> Tensor:
        means = torch.stack([real.detach().float().mean(), fake.detach().float().mean()])
        self.sums = self.sums + torch.cat([means, means.new_ones(1)])
        a = self.anchors if self.started else means
        pen = self.weight * lecam_penalty(real, fake, a[0], a[1])
        report("loss/LeCam", pen.detach())
        return pen

    @torch.no_grad()
    def after_d_step(self) -> None:
        total = dist_sum(self.sums)
        means = total[:2] / total[2].clamp(min=1)
        new = self.decay * self.anchors + (1 - self.decay) * means if self.started else means
        self.anchors = torch.where(torch.isfinite(new).all(), new, self.anchors)  # both or neither
        self.started = True
        self.sums = torch.zeros_like(self.sums)
        report("lecam/anchor_real", self.anchors[0])
        report("lecam/anchor_fake", self.anchors[1])

    def state_dict(self) -> dict:
        return {"anchors": self.anchors.detach().cpu(), "started": int(self.started)}

    def load_state_dict(self, s: dict) -> None:
        """A checkpoint without LeCam's state: the anchors start again from the next step's means."""
        if "anchors" in s:
            self.anchors = s["anchors"].to(self.anchors.device, torch.float32)
        self.started = bool(s.get("started", False))
        self.sums = torch.zeros_like(self.sums)
