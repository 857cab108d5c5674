"""All singular-value maths of gan-bench lives here.

Everything is organised around one view: a layer's weight as a matrix of shape (out, in), where
"in" folds the fan-in (input channels x kernel height x kernel width for a convolution). Layers
(models/layers.py), regularisers and telemetry import the helpers below; nothing else computes
singular values.

Spectral norm (Miyato et al. 2018) is implemented as a mixin, `SpectralNorm`, so that the raw
weight stays the parameter called `weight` (orthogonal regularisation and sigma clamping act on
it), while three buffers hold the power-iteration state:

    u      (out,)  left singular vector estimate, persistent across steps
    v      (in,)   right singular vector estimate
    sigma  ()      the last sigma = u^T W v, for telemetry (read it; it is never a parameter)

In training mode each forward runs `sn_iters` power iterations under no_grad, then divides the
weight by sigma = u^T W v computed with gradient flowing through W. In eval mode u and v are
left unchanged. Nothing in the forward synchronises with the host.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "SpectralNorm",
    "weight_matrix",
    "power_iteration",
    "spectral_modules",
    "weight_modules",
    "top_singular_value",
]

WEIGHT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)


# ---------------------------------------------------------------------------------------------
# Weight as matrix
# ---------------------------------------------------------------------------------------------


def weight_matrix(module: nn.Module, weight: torch.Tensor | None = None) -> torch.Tensor:
    """The module's weight as an (out, in) matrix (a view where the memory layout allows).

    Conv2d / Linear: (out, in * kh * kw); ConvTranspose2d stores (in, out, kh, kw), so it is
    transposed first; Embedding: (num_embeddings, embedding_dim), one row per class.
    `weight` overrides module.weight (e.g. a detached or modified copy).
    """
    w = module.weight if weight is None else weight
    if isinstance(module, nn.ConvTranspose2d):
        w = w.transpose(0, 1)
    return w.reshape(w.shape[0], -1)


def power_iteration(
    w_mat: torch.Tensor, u: torch.Tensor, v: torch.Tensor, n_iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n_iters` rounds of v <- W^T u / |W^T u|, u <- W v / |W v|; returns fresh (u, v).

    Call under no_grad. w_mat: (out, in); u: (out,); v: (in,). The returned tensors are new
    (never views of the inputs), so callers may keep them in an autograd graph while copying
    them into persistent buffers.
    """
    for _ in range(n_iters):
        v = F.normalize(torch.mv(w_mat.t(), u), dim=0, eps=eps)
        u = F.normalize(torch.mv(w_mat, v), dim=0, eps=eps)
    return u, v


def _full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast for the sigma maths (mv is a lower-precision op under CUDA autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def top_singular_value(module: nn.Module) -> torch.Tensor:
    """Exact largest singular value of the module's raw weight (an SVD; for tests and checks)."""
    with torch.no_grad():
        return torch.linalg.svdvals(weight_matrix(module).float())[0]


# ---------------------------------------------------------------------------------------------
# Spectral norm mixin
# ---------------------------------------------------------------------------------------------


class SpectralNorm:
    """Mixin for a weight-bearing nn.Module (Conv2d, ConvTranspose2d, Linear, Embedding).

    Call `self.init_spectral_norm(enabled, n_iters, eps)` after the parent __init__, then use
    `self.sn_weight()` in place of `self.weight` in forward. With enabled=False the layer is a
    plain layer: no buffers, sn_weight() returns the raw weight.
    """

    sn_enabled: bool = False

    def init_spectral_norm(self, enabled: bool, n_iters: int = 1, eps: float = 1e-6) -> None:
        self.sn_enabled = bool(enabled)
        self.sn_iters = int(n_iters)
        self.sn_eps = float(eps)
        if not self.sn_enabled:
            return
        w = self.weight
        out_dim, in_dim = weight_matrix(self).shape
        kw = dict(device=w.device, dtype=w.dtype)
        self.register_buffer("u", F.normalize(torch.randn(out_dim, **kw), dim=0, eps=self.sn_eps))
        self.register_buffer("v", F.normalize(torch.randn(in_dim, **kw), dim=0, eps=self.sn_eps))
        self.register_buffer("sigma", torch.ones((), **kw))

    def sn_weight(self) -> torch.Tensor:
        """The weight divided by its estimated top singular value (raw weight if SN is off)."""
        w = self.weight
        if not self.sn_enabled:
            return w
        with _full_precision(w.device):
            w_mat = weight_matrix(self)
            if self.training:
                with torch.no_grad():
                    u, v = power_iteration(w_mat, self.u, self.v, self.sn_iters, self.sn_eps)
                    self.u.copy_(u)
                    self.v.copy_(v)
            else:
                # Clones: a later training forward may update the buffers in place before this
                # graph's backward runs.
                u, v = self.u.clone(), self.v.clone()
            sigma = torch.dot(u, torch.mv(w_mat, v))  # gradient flows through W only
            if self.training:
                with torch.no_grad():
                    self.sigma.copy_(sigma)
        return w / sigma

    def extra_repr(self) -> str:  # appended to the parent's repr
        base = super().extra_repr()  # type: ignore[misc]
        if self.sn_enabled:
            return f"{base}, sn_iters={self.sn_iters}, sn_eps={self.sn_eps}"
        return f"{base}, sn=False"


# ---------------------------------------------------------------------------------------------
# Finding layers (by module type, never by state-dict key names)
# ---------------------------------------------------------------------------------------------


def spectral_modules(net: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) for every layer of `net` with spectral norm switched on, in module order.

    `module.sigma` is its latest sigma estimate; `weight_matrix(module)` its raw weight matrix.
    """
    return [
        (name, m)
        for name, m in net.named_modules()
        if isinstance(m, SpectralNorm) and m.sn_enabled
    ]


def weight_modules(
    net: nn.Module, exclude: tuple[nn.Module, ...] | list[nn.Module] = ()
) -> list[tuple[str, nn.Module]]:
    """(name, module) for every Conv2d / ConvTranspose2d / Linear / Embedding in `net`, with or
    without spectral norm, except the modules in `exclude` (compared by identity; e.g. G.shared).
    """
    excluded = {id(m) for m in exclude if m is not None}
    return [
        (name, m)
        for name, m in net.named_modules()
        if isinstance(m, WEIGHT_LAYERS) and id(m) not in excluded
    ]
