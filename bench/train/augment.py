"""Differentiable augmentation of D's inputs: the DiffAugment ops (color, translation, cutout; flip for
consistency regularisation), each applied per sample with ADA's probability p, and `AdaptiveP`, which moves p
so that r_t = E[sign D(real)] stays near `aug.ada_target` (docs/architecture.md, "One training step")."""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from bench.registry import AUG_OPS
from bench.train.telemetry import report

Tensor = torch.Tensor
TRANSLATION_RATIO = 0.125  # DiffAugment's: shifts of up to 1/8 of the image size
CUTOUT_RATIO = 0.5  # DiffAugment's: a square of half the image size


# ---- the ops, given their parameters (one value per sample) -----------------------------------------
def _per_sample(v: Tensor, x: Tensor) -> Tensor:
    return v.to(x.dtype).view(-1, 1, 1, 1)


def brightness(x: Tensor, b: Tensor) -> Tensor:
    return x + _per_sample(b, x)


def saturation(x: Tensor, s: Tensor) -> Tensor:
    mean = x.mean(dim=1, keepdim=True)
    return (x - mean) * _per_sample(s, x) + mean


def contrast(x: Tensor, c: Tensor) -> Tensor:
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * _per_sample(c, x) + mean


def translate(x: Tensor, shift: Tensor) -> Tensor:
    """out[b, :, h, w] = x[b, :, h - dy_b, w - dx_b], zero where that falls outside; shift: (B, 2) int."""
    B, _, H, W = x.shape
    rows = torch.arange(H, device=x.device).view(1, H) - shift[:, :1]  # (B, H)
    cols = torch.arange(W, device=x.device).view(1, W) - shift[:, 1:]  # (B, W)
    inside = ((rows >= 0) & (rows < H)).view(B, 1, H, 1) & ((cols >= 0) & (cols < W)).view(B, 1, 1, W)
    b = torch.arange(B, device=x.device).view(B, 1, 1)
    out = x[b, :, rows.clamp(0, H - 1).view(B, H, 1), cols.clamp(0, W - 1).view(B, 1, W)]  # (B, H, W, C)
    return out.permute(0, 3, 1, 2) * inside.to(x.dtype)


def cutout(x: Tensor, corner: Tensor, side: Tensor) -> Tensor:
    """Zero the square [y0, y0 + side) x [x0, x0 + side) of each sample; corner: (B, 2), side: (B,) ints."""
    B, _, H, W = x.shape
    rows = torch.arange(H, device=x.device).view(1, H) - corner[:, :1]
    cols = torch.arange(W, device=x.device).view(1, W) - corner[:, 1:]
    s = side.view(B, 1)
    square = ((rows >= 0) & (rows < s)).view(B, 1, H, 1) & ((cols >= 0) & (cols < s)).view(B, 1, 1, W)
    return x * (~square).to(x.dtype)


def hflip(x: Tensor, flip: Tensor) -> Tensor:
    return torch.where(flip.view(-1, 1, 1, 1), x.flip(3), x)


# ---- random parameters -------------------------------------------------------------------------------
class DiffAugment:
    """`aug(x, p=None)`: the policy's ops on a batch. p None: every op on every sample (DiffAugment);
    p a 0-d tensor in [0, 1]: each op on each sample with probability p (ADA). `gen` draws every parameter
    (the run's latent generator, so a resumed run draws the same)."""

    def __init__(self, policy: Sequence[str], gen: Optional[torch.Generator] = None):
        self.policy = tuple(policy)
        self.gen = gen

    def _rand(self, n: int, x: Tensor) -> Tensor:
        return torch.rand(n, device=x.device, generator=self.gen)

    def _gate(self, x: Tensor, p: Optional[Tensor]) -> Tensor:
        """1 for the samples an op applies to, else 0 (float, shape (B,))."""
        if p is None:
            return torch.ones(x.shape[0], device=x.device)
        return (self._rand(x.shape[0], x) < p).float()

    def _ints(self, x: Tensor, low: int, high: int, shape) -> Tensor:
        return torch.randint(low, high + 1, shape, device=x.device, generator=self.gen)

    def __call__(self, x: Tensor, p: Optional[Tensor] = None) -> Tensor:
        for name in self.policy:
            x = AUG_OPS[name](self, x, p)
        return x

    def consistency(self, x: Tensor) -> Tensor:
        """bCR's T (Zhao et al. 2021): a random horizontal flip and a translation (as in the paper)."""
        return translation(self, hflip(x, self._rand(x.shape[0], x) < 0.5))


# ---- the policy's ops (aug.policy), in the order DiffAugment's paper gives them -----------------------------
@AUG_OPS.register("color")
def color(aug: DiffAugment, x: Tensor, p: Optional[Tensor] = None) -> Tensor:
    n = x.shape[0]
    x = brightness(x, (aug._rand(n, x) - 0.5) * aug._gate(x, p))
    x = saturation(x, 1.0 + (aug._rand(n, x) * 2.0 - 1.0) * aug._gate(x, p))
    return contrast(x, 1.0 + (aug._rand(n, x) - 0.5) * aug._gate(x, p))


@AUG_OPS.register("translation")
def translation(aug: DiffAugment, x: Tensor, p: Optional[Tensor] = None) -> Tensor:
    r = int(x.shape[2] * TRANSLATION_RATIO + 0.5), int(x.shape[3] * TRANSLATION_RATIO + 0.5)
    shift = torch.stack([aug._ints(x, -r[0], r[0], (x.shape[0],)), aug._ints(x, -r[1], r[1], (x.shape[0],))], 1)
    return translate(x, shift * aug._gate(x, p).long().view(-1, 1))


@AUG_OPS.register("cutout")
def cutout_op(aug: DiffAugment, x: Tensor, p: Optional[Tensor] = None) -> Tensor:
    n, H, W = x.shape[0], x.shape[2], x.shape[3]
    side = int(min(H, W) * CUTOUT_RATIO + 0.5)
    corner = torch.stack([aug._ints(x, 0, H - side, (n,)), aug._ints(x, 0, W - side, (n,))], 1)
    return cutout(x, corner, side * aug._gate(x, p).long())


def dist_sum(t: Tensor) -> Tensor:
    """Sum over ranks when torch.distributed is initialised (one all-reduce), else `t`."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        t = t.clone()
        torch.distributed.all_reduce(t)
    return t


class AdaptiveP:
    """ADA's augmentation probability. `observe(real_logits)` during each D micro-batch; `after_d_step()`
    after each D optimiser step: every `interval` D steps, r_t = E[sign D(real)] over the interval (all
    ranks), and p <- clamp(p + sign(r_t - target) * images / (kimg * 1000), 0, 1), `images` being what D
    saw in the interval over all ranks (batch x accumulate x ranks x interval). p stays on the device (no
    host sync). Reports `aug/p` and `aug/rt` (r_t of the interval so far, this rank) every D step."""

    def __init__(self, target: float, interval: int, kimg: float, device: torch.device):
        self.target, self.interval, self.kimg = float(target), int(interval), float(kimg)
        self.p = torch.zeros((), device=device)
        self.signs = torch.zeros((), device=device)  # sum of sign D(real) over the interval so far
        self.count = torch.zeros((), device=device)  # logits summed into `signs` (D gives one per image)
        self.steps = 0  # D steps since the run began

    def observe(self, real_logits: Tensor) -> None:
        logits = real_logits.detach().float()
        self.signs = self.signs + logits.sign().sum()
        self.count = self.count + logits.numel()

    @torch.no_grad()
    def after_d_step(self) -> None:
        self.steps += 1
        report("aug/rt", self.signs / self.count.clamp(min=1))
        if self.steps % self.interval == 0:
            total = dist_sum(torch.stack([self.signs, self.count]))
            rt = total[0] / total[1].clamp(min=1)
            new = (self.p + torch.sign(rt - self.target) * total[1] / (self.kimg * 1000)).clamp(0.0, 1.0)
            self.p = torch.where(torch.isfinite(new), new, self.p)
            self.signs, self.count = torch.zeros_like(self.signs), torch.zeros_like(self.count)
        report("aug/p", self.p)

    def state_dict(self) -> dict:
        return {"p": self.p.detach().cpu(), "signs": self.signs.detach().cpu(), "count": self.count.detach().cpu(),
                "steps": self.steps}

    def load_state_dict(self, s: dict) -> None:
        """A checkpoint without ADA's state (written before it existed, or with ADA off) means p = 0."""
        dev = self.p.device
        self.p = torch.as_tensor(s.get("p", 0.0), dtype=torch.float32).to(dev)
        self.signs = torch.as_tensor(s.get("signs", 0.0), dtype=torch.float32).to(dev)
        self.count = torch.as_tensor(s.get("count", 0.0), dtype=torch.float32).to(dev)
        self.steps = int(s.get("steps", 0))
