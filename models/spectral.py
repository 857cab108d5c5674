"""Spectral norm (the `SpectralNorm` mixin, `SNSettings`), sigma telemetry and the weight regularisers (sigma0
clamp and penalty, orthogonal regularisation), built on the singular-value maths of models/svd.py. Layers,
regularisers and telemetry import these helpers; nothing else computes singular values (docs/architecture.md,
"Singular values")."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .svd import (SV_K, TINY, WEIGHT_LAYERS, as_weight, cols_to_view, full_precision,
                  matrix_shape, matrix_view, power_iteration, refresh, start_basis, store,
                  sv_maths, sv_modules, weight_matrix)

__all__ = [
    "SNSettings",
    "SpectralNorm",
    "spectral_modules",
    "weight_modules",
    "reg_modules",
    "top_singular_values",
    "sigma_stats",
    "sigma0_clamp_",
    "sigma0_penalty",
    "ortho_penalty",
    "ortho_grad_",
]


@dataclass(frozen=True)
class SNSettings:
    """How a weight layer normalises: spectral norm on/off (model.g_sn / model.d_sn), power
    iterations per training forward (model.sn_iters), the normalisation epsilon (model.sn_eps),
    and how many top singular values its subspace state tracks."""
    enabled: bool = True
    iters: int = 1
    eps: float = 1e-6
    sv_k: int = SV_K

# ---------------------------------------------------------------------------------------------
# Spectral norm mixin
# ---------------------------------------------------------------------------------------------


class SpectralNorm:
    """Mixin for a weight-bearing nn.Module (Conv2d, ConvTranspose2d, Linear, Embedding).

    Call `self.init_spectral_norm(settings)` (an SNSettings) after the parent __init__, then use
    `self.sn_weight()` in place of `self.weight` in forward. With settings.enabled=False the layer
    computes exactly what the plain torch layer computes: sn_weight() returns the raw weight and
    there are no u / v / sigma buffers. In both cases the layer carries the top-k subspace state
    `sv_u` (k, out) and `sv_v` (k, in) used by top_singular_values & co (see the module doc).
    """

    sn_enabled: bool = False

    def init_spectral_norm(self, settings: SNSettings) -> None:
        self.sn_enabled = bool(settings.enabled)
        self.sn_iters = int(settings.iters)
        self.sn_eps = float(settings.eps)
        w = self.weight
        out_dim, in_dim = matrix_shape(self)
        kw = dict(device=w.device, dtype=w.dtype)
        k = max(1, min(int(settings.sv_k), out_dim, in_dim))
        self.register_buffer("sv_u", start_basis(k, out_dim, salt=0, **kw))
        self.register_buffer("sv_v", start_basis(k, in_dim, salt=1, **kw))
        if not self.sn_enabled:
            return
        self.register_buffer("u", F.normalize(torch.randn(out_dim, **kw), dim=0, eps=self.sn_eps))
        self.register_buffer("v", F.normalize(torch.randn(in_dim, **kw), dim=0, eps=self.sn_eps))
        self.register_buffer("sigma", torch.ones((), **kw))

    def sn_weight(self) -> torch.Tensor:
        """The weight divided by its estimated top singular value (raw weight if SN is off)."""
        w = self.weight
        if not self.sn_enabled:
            return w
        with full_precision(w.device):
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

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        # Checkpoints from before the subspace state existed: keep the fresh state. Checkpoints
        # tracking another k: adopt their width.
        for name in ("sv_u", "sv_v"):
            key, buf = prefix + name, getattr(self, name, None)
            if buf is None:
                continue
            if key not in state_dict:
                state_dict[key] = buf
            elif state_dict[key].shape != buf.shape:
                setattr(self, name, torch.empty(state_dict[key].shape, device=buf.device,
                                                dtype=buf.dtype))
        super()._load_from_state_dict(  # type: ignore[misc]
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)

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


def reg_modules(net: nn.Module, exclude: tuple[nn.Module, ...] | list[nn.Module] = ()
                ) -> list[nn.Module]:
    """The weight layers of `net` that weight regularisers (orthogonal penalty, sigma0 clamp and
    penalty) act on: every weight layer except `exclude` (pass [G.shared] for a generator)."""
    return [m for _, m in weight_modules(net, exclude)]



def top_singular_values(module: nn.Module, k: int = SV_K, iters: int = 2) -> torch.Tensor:
    """(k,) float32: the k largest singular values of the module's raw weight matrix, estimated
    by `iters` more rounds of its warm-started subspace iteration (the state is updated).
    Entries beyond min(out, in) are 0. No host sync. Accurate to well under 1% once warm (a few
    calls), exact to fp32 precision for a well-separated spectrum."""
    with torch.no_grad(), sv_maths(module.weight.device):
        U, s, V = refresh([module], k, iters)[0]
        store(module, U, V)
    s = s[:k]
    if s.shape[0] < k:
        s = torch.cat([s, s.new_zeros(k - s.shape[0])])
    return s


def sigma_stats(net: nn.Module, k: int = SV_K, iters: int = 2) -> dict[str, dict[str, Tensor]]:
    """{layer: {"s0", "s1", ..., "s{k-1}", "s0_over_s1", "fro"}} for every weight layer of `net`
    (conv, conv-transpose, linear, embedding; SN on or off; found by type), `layer` being the
    dotted module path ("blocks.0.conv1"). Values are 0-d float32 tensors on the weights' device
    (no .item(), no host sync). All values describe the RAW weight matrix: s_j its singular
    values (warm-started estimates, see top_singular_values), fro its Frobenius norm.
    A layer with fewer than k singular values (e.g. D's one-output linear layer) has only the
    s_j that exist, and "s0_over_s1" only if it has two."""
    named = [(n, m) for n, m in weight_modules(net)]
    if not named:
        return {}
    mods = [m for _, m in named]
    with torch.no_grad(), sv_maths(mods[0].weight.device):
        svs = refresh(mods, k, iters)
        fro = torch._foreach_norm([m.weight.detach().float() for m in mods])
        stats = {}
        for (name, m), (U, s, V), f in zip(named, svs, fro):
            store(m, U, V)
            vals = s[:k].unbind()
            row = {f"s{j}": v for j, v in enumerate(vals)}
            if len(vals) > 1:
                row["s0_over_s1"] = vals[0] / vals[1].clamp_min(TINY)
            row["fro"] = f
            stats[name] = row
    return stats


def _bound(s: Tensor, value: float, relative: bool):
    """The sigma0 bound of one layer: value, or value * sg(sigma1) when relative (None: the layer
    has a single singular value, so a relative bound does not apply)."""
    if not relative:
        return float(value)
    if s.shape[0] < 2:
        return None
    return float(value) * s[1]


def sigma0_clamp_(modules, value: float, relative: bool = False, iters: int = 2) -> None:
    """BigGAN's sigma0 clamp, in place, for each weight layer in `modules`:

        W <- W - max(0, sigma0 - sigma_clamp) u0 v0^T,
        sigma_clamp = value (fixed) or value * sg(sigma1) (relative=True: value is the ratio R).

    W is the RAW weight (the parameter) viewed as weight_matrix. With spectral norm on, the
    normalised weight always has sigma0 = 1, so the clamp controls the raw weight's
    sigma0 / sigma1 (relative) or its scale (fixed). (u0, v0, sigma0, sigma1) come from
    `iters` rounds of the warm-started subspace iteration; afterwards the state is still exact
    for the new W (u0, v0 keep their direction; only sigma0 drops), and SN layers' power-iteration
    vectors u, v (and sigma) are set to the new top singular pair, which may now be the old
    second one. Layers with a single singular value are skipped when relative. Run it after the
    optimiser step; it runs under no_grad itself. No host sync.
    """
    mods = sv_modules(modules)
    if not mods:
        return
    with torch.no_grad(), sv_maths(mods[0].weight.device):
        for m, (U, s, V) in zip(mods, refresh(mods, SV_K, iters)):
            target = _bound(s, value, relative)
            if target is None:
                store(m, U, V)
                continue
            delta = (s[0] - target).clamp_min(0.0)                         # 0-d
            _rank_one_sub_(m, U[0] * delta, V[0])                          # W -= delta u0 v0^T
            # The rows stay exact singular pairs of the new W; re-sort them by the new values.
            s_new = torch.cat([(s[0] - delta)[None], s[1:]])
            order = torch.argsort(s_new, descending=True)
            U, V, s_new = U[order], V[order], s_new[order]
            store(m, U, V)
            if isinstance(m, SpectralNorm) and m.sn_enabled:
                m.u.copy_(U[0])
                m.v.copy_(V[0])
                m.sigma.copy_(s_new[0])


def _rank_one_sub_(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> None:
    """weight_matrix(module) -= a b^T, in place in the weight's own memory layout: an in-place
    rank-one GEMM on a matrix view when there is one (contiguous or channels_last conv /
    linear / embedding weights), else through a full-size temporary (conv-transpose)."""
    w = module.weight
    if w.dtype == torch.float32 and not isinstance(module, nn.ConvTranspose2d):
        if w.is_contiguous():
            w.view(w.shape[0], -1).addmm_(a[:, None], b[None, :], alpha=-1.0)
            return
        if w.dim() == 4 and w.is_contiguous(memory_format=torch.channels_last):
            o, i, kh, kw = w.shape  # memory order (o, kh, kw, i)
            b_cl = b.view(i, kh, kw).permute(1, 2, 0).reshape(1, -1)
            w.permute(0, 2, 3, 1).view(o, -1).addmm_(a[:, None], b_cl, alpha=-1.0)
            return
    w.sub_(as_weight(module, torch.outer(a, b)).to(w.dtype))


def sigma0_penalty(modules, value: float, relative: bool = False, *, two_sided: bool = False,
                   iters: int = 1) -> Tensor:
    """Differentiable sigma0 regulariser (multiply by its strength, then backward):

        sum over layers of relu(sigma0(W) - t)^2     (two_sided=False, the default: only an
                                                      excess over t is penalised)
        sum over layers of (sigma0(W) - t)^2         (two_sided=True: pulled toward t)

    with t = value (fixed) or value * sg(sigma1) (relative=True). sigma0(W) = u0^T W v0
    with u0, v0 from the warm-started subspace iteration (advanced by `iters` rounds, then
    detached), so d sigma0 / dW = u0 v0^T, the gradient of the exact top singular value.
    W is the raw weight matrix (as for the clamp). Layers with one singular value are skipped
    when relative. Returns a 0-d float32 tensor (0 if nothing is penalised)."""
    mods = sv_modules(modules)
    if not mods:
        return torch.zeros((), requires_grad=True)
    device = mods[0].weight.device
    with torch.no_grad(), sv_maths(device):
        svs = refresh(mods, SV_K, iters)
        for m, (U, _, V) in zip(mods, svs):
            store(m, U, V)
    with full_precision(device):
        terms = []
        for m, (U, s, V) in zip(mods, svs):
            t = _bound(s, value, relative)
            if t is None:
                continue
            w, cl = matrix_view(m)                                       # differentiable view
            v0 = cols_to_view(V[:1], cl)[0]
            sigma0 = torch.dot(U[0], torch.mv(w.float(), v0))             # grad: u0 v0^T
            excess = sigma0 - t
            terms.append(excess.square() if two_sided else F.relu(excess).square())
    if not terms:
        return torch.zeros((), device=device, requires_grad=True)
    return torch.stack(terms).sum()


# ---------------------------------------------------------------------------------------------
# Orthogonal regularisation (BigGAN)
# ---------------------------------------------------------------------------------------------


def _ortho_parts(w: torch.Tensor, full: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """For W (m, n) with G = W W^T: (value, E W) where E = G - I (full) or G (.) (1 - I), so that
    value = ||E||_F^2 and d value / dW = 4 E W. Uses the n x n Gram W^T W when m > n (G W =
    W (W^T W)); there the value is ||W^T W||^2 - sum_i |w_i|^4 (off-diagonal; no cancellation:
    m > n rows cannot be orthogonal) or ||W^T W||^2 - 2 ||W||^2 + m (full)."""
    m, n = w.shape
    if m <= n:
        E = w @ w.t()
        if full:
            E.diagonal().sub_(1.0)
        else:
            E.diagonal().zero_()
        return E.square().sum(), E @ w
    H = w.t() @ w                                                        # (n, n)
    wh = w @ H                                                           # G W
    if full:
        return H.square().sum() - 2.0 * H.diagonal().sum() + m, wh - w
    r = w.square().sum(1)                                                # |w_i|^2 = diag(G)
    return H.square().sum() - r.square().sum(), wh - r[:, None] * w


def ortho_penalty(modules, beta: float, full: bool = False) -> Tensor:
    """BigGAN's orthogonal regulariser, differentiable:

        beta * sum over layers of ||W W^T (.) (1 - I)||_F^2     (full=False)
        beta * sum over layers of ||W W^T - I||_F^2             (full=True)

    with W the raw weight as an (out, in*kh*kw) matrix (weight_matrix), i.e. the Gram matrix of
    the output filters. Exclude the shared class embedding by building `modules` with
    reg_modules(G, exclude=[G.shared]). Returns a 0-d float32 tensor."""
    mods = sv_modules(modules)
    if not mods:
        return torch.zeros((), requires_grad=True)
    with full_precision(mods[0].weight.device):
        vals = [_ortho_parts(weight_matrix(m).float(), full)[0] for m in mods]
    return float(beta) * torch.stack(vals).sum()


def ortho_grad_(modules, beta: float, full: bool = False) -> None:
    """Add the gradient of ortho_penalty(modules, beta, full) to each weight's .grad in place
    (as BigGAN-PyTorch does: no autograd graph, one Gram per layer):

        grad_W += 4 beta (W W^T - I) W       (full)   or   4 beta (W W^T (.) (1 - I)) W

    Note: BigGAN-PyTorch's utils.ortho adds 2 * strength * (...) W, i.e. the gradient of
    (strength / 2) ||...||^2; its --G_ortho 1e-4 equals beta = 5e-5 here. Weights without
    requires_grad are skipped; a missing .grad is created."""
    mods = sv_modules(modules)
    if not mods:
        return
    with torch.no_grad(), full_precision(mods[0].weight.device):
        for m in mods:
            w = m.weight
            if not w.requires_grad:
                continue
            _, ew = _ortho_parts(weight_matrix(m, w.detach()).float(), full)
            g = as_weight(m, ew.mul_(4.0 * float(beta)))
            if w.grad is None:
                w.grad = g.to(w.dtype).contiguous(memory_format=_memory_format(w))
            else:
                w.grad.add_(g.to(w.grad.dtype))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
            and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
