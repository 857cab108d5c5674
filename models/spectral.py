"""All singular-value maths of gan-bench lives here.

Everything is organised around one view: a layer's weight as a matrix of shape (out, in), where
"in" folds the fan-in (input channels x kernel height x kernel width for a convolution). Layers
(models/layers.py), regularisers and telemetry import the helpers below; nothing else computes
singular values. Layers are always found by module type (Conv2d, ConvTranspose2d, Linear,
Embedding and their SN subclasses), never by state-dict key names.

Spectral norm (Miyato et al. 2018) is implemented as a mixin, `SpectralNorm`, so that the raw
weight stays the parameter called `weight` (orthogonal regularisation and sigma clamping act on
it), while three buffers hold the power-iteration state:

    u      (out,)  left singular vector estimate, persistent across steps
    v      (in,)   right singular vector estimate
    sigma  ()      the last sigma = u^T W v, for telemetry (read it; it is never a parameter)

In training mode each forward runs `sn_iters` power iterations under no_grad, then divides the
weight by sigma = u^T W v computed with gradient flowing through W. In eval mode u and v are
left unchanged. Nothing in the forward synchronises with the host.

Top-k singular values (telemetry, sigma0 clamp, sigma0 penalty) come from a warm-started
subspace iteration on the RAW weight (with spectral norm on too: the raw weight's spectrum is
what is measured, clamped and penalised). Its state is persistent per layer:

    sv_u   (k, out)  rows: left singular vector estimates u_0, u_1, ..., sorted by sigma
    sv_v   (k, in)   rows: right singular vector estimates v_0, v_1, ...

Every SpectralNorm layer (SN on or off) registers these two buffers at construction (k = sv_k,
default 3, at most min(out, in)), so they are saved and restored with checkpoints and copied by
an EMA buffer copy; their shapes never change. Checkpoints written before they existed still
load with strict=True (the fresh state is kept). Plain torch layers (e.g. BigGAN's shared class
embedding, an nn.Embedding), and requests for more than sv_k values, use the same state in a
side table keyed by the module object: not saved, warm again after a few calls.

One refresh of `iters` rounds, for every layer in a list at once:

    start:      V <- V + 1e-4 F  (F a fixed generic orthonormal basis: lets a larger singular
                direction into an exactly invariant subspace, e.g. equal values after ortho init)
    per round:  U <- orth(V W^T),  V <- orth(U W)      (two passes over W, two thin QRs)
    Rayleigh-Ritz: B = U W V^T (k x k; the last QR's R^T, free), B = P diag(s) R^T by a batched
    one-sided Jacobi SVD over all layers' B at once; U <- P^T U, V <- R^T V.

So u_j^T W v_j = s_j > 0 exactly, rows are sorted by s, and the Ritz values converge to the
top-k singular values at rate (s_k / s_j)^2 per round (fast for a separated top value, slower
for a clustered spectrum such as a random matrix's, where a few dozen rounds are needed for 1%).
There is no .item() and no SVD / eigh of a weight (both synchronise on CUDA): only matmuls, thin
QRs and elementwise ops, in float32 with autocast off, and on CPU with one intra-op thread (see
_sv_maths). Everything also runs on the meta device, which the tests use to prove it sync-free.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "SpectralNorm",
    "weight_matrix",
    "power_iteration",
    "spectral_modules",
    "weight_modules",
    "reg_modules",
    "top_singular_value",
    "top_singular_values",
    "sigma_stats",
    "sigma0_clamp_",
    "sigma0_penalty",
    "ortho_penalty",
    "ortho_grad_",
]

WEIGHT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)
SV_K = 3            # default number of tracked singular values per layer
JACOBI_SWEEPS = 3   # sweeps of the k x k Jacobi SVD (2 reach fp32 precision from a random start)
_TINY = 1e-30       # guards divisions by a zero singular value


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


def _matrix_shape(module: nn.Module) -> tuple[int, int]:
    """weight_matrix(module).shape without materialising it."""
    shape = module.weight.shape
    if isinstance(module, nn.ConvTranspose2d):
        shape = (shape[1], shape[0], *shape[2:])
    return shape[0], int(torch.Size(shape[1:]).numel())


def _as_weight(module: nn.Module, mat: torch.Tensor) -> torch.Tensor:
    """Inverse of weight_matrix: an (out, in) matrix back in the layout of module.weight."""
    w = module.weight
    if isinstance(module, nn.ConvTranspose2d):
        return mat.reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1)
    return mat.reshape(w.shape)


def _matrix_view(module: nn.Module, weight: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
    """The weight as an (out, in) matrix without a copy where possible: (mat, None) when mat is
    weight_matrix's layout, or (mat, (c, kh, kw)) for a channels_last conv weight, whose columns
    are then ordered (kh, kw, c) instead of (c, kh, kw) (same singular values; map row vectors
    with _cols_to_view / _cols_from_view)."""
    w = module.weight if weight is None else weight
    if (w.dim() == 4 and not isinstance(module, nn.ConvTranspose2d) and not w.is_contiguous()
            and w.is_contiguous(memory_format=torch.channels_last)):
        o, c, kh, kw = w.shape
        return w.permute(0, 2, 3, 1).reshape(o, -1), (c, kh, kw)
    return weight_matrix(module, w), None


def _cols_to_view(rows: torch.Tensor, cl) -> torch.Tensor:
    """(k, c*kh*kw) rows in weight_matrix order -> the order of _matrix_view's columns."""
    if cl is None:
        return rows
    return rows.reshape(-1, *cl).permute(0, 2, 3, 1).reshape(rows.shape[0], -1)


def _cols_from_view(rows: torch.Tensor, cl) -> torch.Tensor:
    if cl is None:
        return rows
    c, kh, kw = cl
    return rows.reshape(-1, kh, kw, c).permute(0, 3, 1, 2).reshape(rows.shape[0], -1)


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


@contextlib.contextmanager
def _sv_maths(device: torch.device):
    """Context of the subspace maths: float32 (autocast off) and, on CPU, one intra-op thread.
    Its ops are tiny (k = 3 rows); splitting them over threads gains nothing, and when the cores
    are shared (data-loader workers, other jobs) every parallel region waits for a descheduled
    thread: measured 2-3 ms per 10-us matmul, i.e. 100x slower, on a busy 2-core machine."""
    with _full_precision(device):
        n = torch.get_num_threads()
        if device.type != "cpu" or n == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)


def top_singular_value(module: nn.Module) -> torch.Tensor:
    """Exact largest singular value of the module's raw weight (an SVD; for tests and checks)."""
    with torch.no_grad():
        return torch.linalg.svdvals(weight_matrix(module).float())[0]


def _start_basis(rows: int, cols: int, device, dtype, salt: int) -> torch.Tensor:
    """A fixed, generic (rows, cols) matrix to start the subspace iteration from: a hash of the
    index (no global RNG draw, so building a model consumes the same random numbers as before
    these buffers existed; works on the meta device)."""
    i = torch.arange(rows * cols, dtype=torch.float64) + 1.0 + 7919.0 * salt
    x = torch.frac(torch.sin(i * 12.9898) * 43758.5453) - 0.5
    return x.view(rows, cols).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Spectral norm mixin
# ---------------------------------------------------------------------------------------------


class SpectralNorm:
    """Mixin for a weight-bearing nn.Module (Conv2d, ConvTranspose2d, Linear, Embedding).

    Call `self.init_spectral_norm(enabled, n_iters, eps, sv_k)` after the parent __init__, then
    use `self.sn_weight()` in place of `self.weight` in forward. With enabled=False the layer
    computes exactly what the plain torch layer computes: sn_weight() returns the raw weight and
    there are no u / v / sigma buffers. In both cases the layer carries the top-k subspace state
    `sv_u` (k, out) and `sv_v` (k, in) used by top_singular_values & co (see the module doc).
    """

    sn_enabled: bool = False

    def init_spectral_norm(self, enabled: bool, n_iters: int = 1, eps: float = 1e-6,
                           sv_k: int = SV_K) -> None:
        self.sn_enabled = bool(enabled)
        self.sn_iters = int(n_iters)
        self.sn_eps = float(eps)
        w = self.weight
        out_dim, in_dim = _matrix_shape(self)
        kw = dict(device=w.device, dtype=w.dtype)
        k = max(1, min(int(sv_k), out_dim, in_dim))
        self.register_buffer("sv_u", _start_basis(k, out_dim, salt=0, **kw))
        self.register_buffer("sv_v", _start_basis(k, in_dim, salt=1, **kw))
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


# ---------------------------------------------------------------------------------------------
# Warm-started top-k subspace iteration
# ---------------------------------------------------------------------------------------------

# Subspace state of plain torch layers (no buffers to hold it), keyed by the module object.
_SIDE_STATE: "weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]]" = \
    weakref.WeakKeyDictionary()


def _subspace_state(module: nn.Module, k: int) -> list[torch.Tensor]:
    """[U (k', out), V (k', in)]: the module's persistent state, k' >= min(k, out, in) rows.

    SpectralNorm layers: their sv_u / sv_v buffers, whose width is fixed at construction (so
    state dicts and EMA buffer copies keep their shapes). Plain torch layers, and requests for
    more rows than the buffers have: a side-table entry (not saved; seeded from the buffers)."""
    w = module.weight
    out_dim, in_dim = _matrix_shape(module)
    want = max(1, min(int(k), out_dim, in_dim))
    bufs = getattr(module, "sv_u", None), getattr(module, "sv_v", None)
    if isinstance(module, SpectralNorm) and bufs[1] is not None and bufs[1].shape[0] >= want:
        return list(bufs)
    state = _SIDE_STATE.get(module)
    if state is None or state[1].shape[0] < want or state[1].device != w.device:
        seed = [b.float() for b in bufs] if bufs[1] is not None else (state or [])
        have = seed[1].shape[0] if seed else 0
        state = [_start_basis(want, dim, w.device, torch.float32, i) for i, dim in
                 enumerate((out_dim, in_dim))]
        for new, old in zip(state, seed):
            new[:have].copy_(old[:want])
        _SIDE_STATE[module] = state
    return state


_NUDGE = 1e-4  # relative size of the fixed generic component added to the warm start
_NUDGE_CACHE: dict[tuple, torch.Tensor] = {}


def _nudge_basis(rows: int, cols: int, device) -> torch.Tensor:
    """A fixed (rows, cols) float32 matrix with orthonormal rows (cached per shape and device)."""
    key = (rows, cols, str(device))
    b = _NUDGE_CACHE.get(key)
    if b is None:
        b = torch.linalg.qr(_start_basis(rows, cols, "cpu", torch.float64, 7).t()).Q.t()
        b = _NUDGE_CACHE.setdefault(key, b.to(device=device, dtype=torch.float32))
    return b


_PLANES_CACHE: dict[tuple, tuple] = {}


def _jacobi_planes(k: int, device) -> tuple[torch.Tensor, list]:
    """eye(k) and, per plane p < q, (p, q, dpq, spq): a rotation by theta in that plane is
    J = eye + (cos - 1) dpq + sin spq, i.e. J[p,p] = J[q,q] = cos, J[q,p] = sin, J[p,q] = -sin.
    float32, cached per (k, device)."""
    key = (k, str(device))
    if key not in _PLANES_CACHE:
        eye = torch.eye(k)
        planes = []
        for p in range(k - 1):
            for q in range(p + 1, k):
                dpq, spq = torch.zeros(k, k), torch.zeros(k, k)
                dpq[p, p] = dpq[q, q] = 1.0
                spq[q, p], spq[p, q] = 1.0, -1.0
                planes.append((p, q, dpq.to(device), spq.to(device)))
        _PLANES_CACHE[key] = (eye.to(device), planes)
    return _PLANES_CACHE[key]


def _jacobi_svd(B: torch.Tensor, sweeps: int = JACOBI_SWEEPS
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched SVD of small square matrices by one-sided (Hestenes) Jacobi rotations.

    B: (L, k, k) -> P (L, k, k), s (L, k), R (L, k, k) with B R = P diag(s), R orthogonal,
    s >= 0 sorted descending per matrix. Elementwise ops and tiny bmms only: no host sync, no
    cuSOLVER call, NaN propagates instead of raising.
    """
    L, k, _ = B.shape
    eye, planes = _jacobi_planes(k, B.device)
    R = eye.expand(L, k, k).clone()
    for _ in range(sweeps):
        for p, q, dpq, spq in planes:
            bp, bq = B[:, :, p], B[:, :, q]                              # (L, k) columns
            gamma = (bp * bq).sum(1)
            diff = (bp * bp).sum(1) - (bq * bq).sum(1)
            theta = 0.5 * torch.atan2(2.0 * gamma, diff)                 # zeroes bp . bq
            c, s = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
            J = eye + (c - 1.0) * dpq + s * spq
            B = B @ J
            R = R @ J
    s = torch.linalg.vector_norm(B, dim=1)                                # (L, k)
    s, order = torch.sort(s, dim=1, descending=True)
    idx = order[:, None, :].expand(L, k, k)
    B, R = B.gather(2, idx), R.gather(2, idx)
    P = B / s.clamp_min(_TINY)[:, None, :]
    return P, s, R


def _refresh(modules: list[nn.Module], k: int, iters: int
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Advance every module's subspace state by `iters` rounds and rotate it to Ritz vectors.

    Returns per module (U (k', out), s (k',), V (k', in)), float32, rows sorted by s descending,
    with u_j^T W v_j = s_j; the persistent state is NOT written (see _store). Call under no_grad.
    """
    per_layer, groups = [], {}
    for m in modules:
        state = _subspace_state(m, k)
        w, cl = _matrix_view(m, m.weight.detach())                        # (out, in), no copy
        w = w.float()
        # Warm start, plus a tiny fixed generic component: an exactly invariant subspace (e.g.
        # equal singular values after orthogonal init, then a clamp) would otherwise never let
        # a larger untracked singular direction in. Non-finite state (diverged weights) resets.
        V = torch.nan_to_num(state[1].float(), nan=0.0, posinf=0.0, neginf=0.0)
        V = _cols_to_view(torch.add(V, _nudge_basis(*V.shape, V.device), alpha=_NUDGE), cl)
        for _ in range(max(1, iters)):  # at least one round: it yields B
            # Row layout (k, dim): (k, in) @ (in, out) beats (out, in) @ (in, k) on CPU BLAS.
            U = torch.linalg.qr((V @ w.t()).t()).Q.t()                    # (k', out)
            Q, Rz = torch.linalg.qr((U @ w).t())                          # U W = Rz^T V
            V = Q.t()                                                     # (k', in)
            B = Rz.t()                                                    # U W V^T (k', k')
        groups.setdefault(B.shape[0], []).append(len(per_layer))
        per_layer.append([U, V, B, cl])
    out: list = [None] * len(per_layer)
    for kk, idx in groups.items():
        P, s, R = _jacobi_svd(torch.stack([per_layer[i][2] for i in idx]))
        for j, i in enumerate(idx):
            U, V, _, cl = per_layer[i]
            out[i] = (P[j].t() @ U, s[j], _cols_from_view(R[j].t() @ V, cl))
    return out


def _store(module: nn.Module, U: torch.Tensor, V: torch.Tensor) -> None:
    """Write refreshed rows back: into the state they came from and, when that was a wider
    side-table entry, also the leading rows into the layer's buffers (they stay warm)."""
    state = _subspace_state(module, U.shape[0])
    state[0].copy_(U)
    state[1].copy_(V)
    bufs = getattr(module, "sv_u", None), getattr(module, "sv_v", None)
    if bufs[1] is not None and bufs[1] is not state[1]:
        r = bufs[1].shape[0]
        bufs[0].copy_(U[:r])
        bufs[1].copy_(V[:r])


def _sv_modules(modules) -> list[nn.Module]:
    if isinstance(modules, nn.Module):
        modules = [modules]
    return [m for m in modules if isinstance(m, WEIGHT_LAYERS)]


def top_singular_values(module: nn.Module, k: int = SV_K, iters: int = 2) -> torch.Tensor:
    """(k,) float32: the k largest singular values of the module's raw weight matrix, estimated
    by `iters` more rounds of its warm-started subspace iteration (the state is updated).
    Entries beyond min(out, in) are 0. No host sync. Accurate to well under 1% once warm (a few
    calls), exact to fp32 precision for a well-separated spectrum."""
    with torch.no_grad(), _sv_maths(module.weight.device):
        U, s, V = _refresh([module], k, iters)[0]
        _store(module, U, V)
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
    with torch.no_grad(), _sv_maths(mods[0].weight.device):
        svs = _refresh(mods, k, iters)
        fro = torch._foreach_norm([m.weight.detach().float() for m in mods])
        stats = {}
        for (name, m), (U, s, V), f in zip(named, svs, fro):
            _store(m, U, V)
            vals = s[:k].unbind()
            row = {f"s{j}": v for j, v in enumerate(vals)}
            if len(vals) > 1:
                row["s0_over_s1"] = vals[0] / vals[1].clamp_min(_TINY)
            row["fro"] = f
            stats[name] = row
    return stats


def _check_one(what: str, fixed, ratio) -> None:
    if (fixed is None) == (ratio is None):
        raise ValueError(f"{what}: give exactly one of a fixed value or ratio= (got "
                         f"{fixed!r} and {ratio!r})")


def sigma0_clamp_(modules, clamp: float | None = None, ratio: float | None = None,
                  iters: int = 2) -> None:
    """BigGAN's sigma0 clamp, in place, for each weight layer in `modules`:

        W <- W - max(0, sigma0 - sigma_clamp) u0 v0^T,
        sigma_clamp = clamp (fixed) or ratio * sg(sigma1) (ratio mode; exactly one is given).

    W is the RAW weight (the parameter) viewed as weight_matrix. With spectral norm on, the
    normalised weight always has sigma0 = 1, so the clamp controls the raw weight's
    sigma0 / sigma1 (ratio mode) or its scale (fixed mode). (u0, v0, sigma0, sigma1) come from
    `iters` rounds of the warm-started subspace iteration; afterwards the state is still exact
    for the new W (u0, v0 keep their direction; only sigma0 drops), and SN layers' power-iteration
    vectors u, v (and sigma) are set to the new top singular pair, which may now be the old
    second one. Layers with a single singular value are skipped in ratio mode. Run it after the
    optimiser step; it runs under no_grad itself. No host sync.
    """
    _check_one("sigma0_clamp_", clamp, ratio)
    mods = _sv_modules(modules)
    if not mods:
        return
    with torch.no_grad(), _sv_maths(mods[0].weight.device):
        for m, (U, s, V) in zip(mods, _refresh(mods, SV_K, iters)):
            if ratio is not None:
                if s.shape[0] < 2:
                    _store(m, U, V)
                    continue
                target = float(ratio) * s[1]
            else:
                target = float(clamp)
            delta = (s[0] - target).clamp_min(0.0)                         # 0-d
            _rank_one_sub_(m, U[0] * delta, V[0])                          # W -= delta u0 v0^T
            # The rows stay exact singular pairs of the new W; re-sort them by the new values.
            s_new = torch.cat([(s[0] - delta)[None], s[1:]])
            order = torch.argsort(s_new, descending=True)
            U, V, s_new = U[order], V[order], s_new[order]
            _store(m, U, V)
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
    w.sub_(_as_weight(module, torch.outer(a, b)).to(w.dtype))


def sigma0_penalty(modules, target: float | None = None, ratio: float | None = None, *,
                   two_sided: bool = False, iters: int = 1) -> Tensor:
    """Differentiable sigma0 regulariser (multiply by its strength, then backward):

        sum over layers of relu(sigma0(W) - t)^2     (two_sided=False, the default: only an
                                                      excess over t is penalised)
        sum over layers of (sigma0(W) - t)^2         (two_sided=True: pulled toward t)

    with t = target (fixed) or ratio * sg(sigma1) (exactly one is given). sigma0(W) = u0^T W v0
    with u0, v0 from the warm-started subspace iteration (advanced by `iters` rounds, then
    detached), so d sigma0 / dW = u0 v0^T, the gradient of the exact top singular value.
    W is the raw weight matrix (as for the clamp). Layers with one singular value are skipped
    in ratio mode. Returns a 0-d float32 tensor (0 if nothing is penalised)."""
    _check_one("sigma0_penalty", target, ratio)
    mods = _sv_modules(modules)
    if not mods:
        return torch.zeros((), requires_grad=True)
    device = mods[0].weight.device
    with torch.no_grad(), _sv_maths(device):
        svs = _refresh(mods, SV_K, iters)
        for m, (U, _, V) in zip(mods, svs):
            _store(m, U, V)
    with _full_precision(device):
        terms = []
        for m, (U, s, V) in zip(mods, svs):
            if ratio is not None:
                if s.shape[0] < 2:
                    continue
                t = float(ratio) * s[1]
            else:
                t = float(target)
            w, cl = _matrix_view(m)                                       # differentiable view
            v0 = _cols_to_view(V[:1], cl)[0]
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
    mods = _sv_modules(modules)
    if not mods:
        return torch.zeros((), requires_grad=True)
    with _full_precision(mods[0].weight.device):
        vals = [_ortho_parts(weight_matrix(m).float(), full)[0] for m in mods]
    return float(beta) * torch.stack(vals).sum()


def ortho_grad_(modules, beta: float, full: bool = False) -> None:
    """Add the gradient of ortho_penalty(modules, beta, full) to each weight's .grad in place
    (as BigGAN-PyTorch does: no autograd graph, one Gram per layer):

        grad_W += 4 beta (W W^T - I) W       (full)   or   4 beta (W W^T (.) (1 - I)) W

    Note: BigGAN-PyTorch's utils.ortho adds 2 * strength * (...) W, i.e. the gradient of
    (strength / 2) ||...||^2; its --G_ortho 1e-4 equals beta = 5e-5 here. Weights without
    requires_grad are skipped; a missing .grad is created."""
    mods = _sv_modules(modules)
    if not mods:
        return
    with torch.no_grad(), _full_precision(mods[0].weight.device):
        for m in mods:
            w = m.weight
            if not w.requires_grad:
                continue
            _, ew = _ortho_parts(weight_matrix(m, w.detach()).float(), full)
            g = _as_weight(m, ew.mul_(4.0 * float(beta)))
            if w.grad is None:
                w.grad = g.to(w.dtype).contiguous(memory_format=_memory_format(w))
            else:
                w.grad.add_(g.to(w.grad.dtype))


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last) \
            and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format
