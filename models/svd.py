"""The singular-value maths of gan-bench: a layer's weight as a matrix, power iteration, and the
warm-started top-k subspace iteration with its batched Jacobi SVD. Torch only (no project imports);
models/spectral.py builds spectral norm, sigma telemetry and the regularisers on it (docs/architecture.md,
"Singular values")."""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F
from torch import nn

WEIGHT_LAYERS = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)
SV_K = 3            # default number of tracked singular values per layer
JACOBI_SWEEPS = 3   # sweeps of the k x k Jacobi SVD (2 reach fp32 precision from a random start)
TINY = 1e-30        # guards divisions by a zero singular value

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


def matrix_shape(module: nn.Module) -> tuple[int, int]:
    """weight_matrix(module).shape without materialising it."""
    shape = module.weight.shape
    if isinstance(module, nn.ConvTranspose2d):
        shape = (shape[1], shape[0], *shape[2:])
    return shape[0], int(torch.Size(shape[1:]).numel())


def as_weight(module: nn.Module, mat: torch.Tensor) -> torch.Tensor:
    """Inverse of weight_matrix: an (out, in) matrix back in the layout of module.weight."""
    w = module.weight
    if isinstance(module, nn.ConvTranspose2d):
        return mat.reshape(w.shape[1], w.shape[0], *w.shape[2:]).transpose(0, 1)
    return mat.reshape(w.shape)


def matrix_view(module: nn.Module, weight: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, tuple[int, int, int] | None]:
    """The weight as an (out, in) matrix without a copy where possible: (mat, None) when mat is
    weight_matrix's layout, or (mat, (c, kh, kw)) for a channels_last conv weight, whose columns
    are then ordered (kh, kw, c) instead of (c, kh, kw) (same singular values; map row vectors
    with cols_to_view / cols_from_view)."""
    w = module.weight if weight is None else weight
    if (w.dim() == 4 and not isinstance(module, nn.ConvTranspose2d) and not w.is_contiguous()
            and w.is_contiguous(memory_format=torch.channels_last)):
        o, c, kh, kw = w.shape
        return w.permute(0, 2, 3, 1).reshape(o, -1), (c, kh, kw)
    return weight_matrix(module, w), None


def cols_to_view(rows: torch.Tensor, cl) -> torch.Tensor:
    """(k, c*kh*kw) rows in weight_matrix order -> the order of matrix_view's columns."""
    if cl is None:
        return rows
    return rows.reshape(-1, *cl).permute(0, 2, 3, 1).reshape(rows.shape[0], -1)


def cols_from_view(rows: torch.Tensor, cl) -> torch.Tensor:
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


def full_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """Disable autocast for the sigma maths (mv is a lower-precision op under CUDA autocast)."""
    if torch.amp.is_autocast_available(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


@contextlib.contextmanager
def sv_maths(device: torch.device):
    """Context of the subspace maths: float32 (autocast off) and, on CPU, one intra-op thread.
    Its ops are tiny (k = 3 rows); splitting them over threads gains nothing, and when the cores
    are shared (data-loader workers, other jobs) every parallel region waits for a descheduled
    thread: measured 2-3 ms per 10-us matmul, i.e. 100x slower, on a busy 2-core machine."""
    with full_precision(device):
        n = torch.get_num_threads()
        if device.type != "cpu" or n == 1:
            yield
            return
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(n)


def start_basis(rows: int, cols: int, device, dtype, salt: int) -> torch.Tensor:
    """A fixed, generic (rows, cols) matrix to start the subspace iteration from: a hash of the
    index (no global RNG draw, so building a model consumes the same random numbers as before
    these buffers existed; works on the meta device)."""
    i = torch.arange(rows * cols, dtype=torch.float64) + 1.0 + 7919.0 * salt
    x = torch.frac(torch.sin(i * 12.9898) * 43758.5453) - 0.5
    return x.view(rows, cols).to(device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Warm-started top-k subspace iteration
# ---------------------------------------------------------------------------------------------

# Subspace state of plain torch layers (no buffers to hold it), keyed by the module object.
_SIDE_STATE: "weakref.WeakKeyDictionary[nn.Module, list[torch.Tensor]]" = \
    weakref.WeakKeyDictionary()


def subspace_state(module: nn.Module, k: int) -> list[torch.Tensor]:
    """[U (k', out), V (k', in)]: the module's persistent state, k' >= min(k, out, in) rows.

    Layers with sv_u / sv_v buffers (every SpectralNorm layer): those buffers, whose width is
    fixed at construction (so state dicts and EMA buffer copies keep their shapes). Plain torch layers, and requests for
    more rows than the buffers have: a side-table entry (not saved; seeded from the buffers)."""
    w = module.weight
    out_dim, in_dim = matrix_shape(module)
    want = max(1, min(int(k), out_dim, in_dim))
    bufs = getattr(module, "sv_u", None), getattr(module, "sv_v", None)
    if bufs[1] is not None and bufs[1].shape[0] >= want:
        return list(bufs)
    state = _SIDE_STATE.get(module)
    if state is None or state[1].shape[0] < want or state[1].device != w.device:
        seed = [b.float() for b in bufs] if bufs[1] is not None else (state or [])
        have = seed[1].shape[0] if seed else 0
        state = [start_basis(want, dim, w.device, torch.float32, i) for i, dim in
                 enumerate((out_dim, in_dim))]
        for new, old in zip(state, seed):
            new[:have].copy_(old[:want])
        _SIDE_STATE[module] = state
    return state


_NUDGE = 1e-4  # relative size of the fixed generic component added to the warm start
_NUDGE_CACHE: dict[tuple, torch.Tensor] = {}


def nudge_basis(rows: int, cols: int, device) -> torch.Tensor:
    """A fixed (rows, cols) float32 matrix with orthonormal rows (cached per shape and device)."""
    key = (rows, cols, str(device))
    b = _NUDGE_CACHE.get(key)
    if b is None:
        b = torch.linalg.qr(start_basis(rows, cols, "cpu", torch.float64, 7).t()).Q.t()
        b = _NUDGE_CACHE.setdefault(key, b.to(device=device, dtype=torch.float32))
    return b


_PLANES_CACHE: dict[tuple, tuple] = {}


def jacobi_planes(k: int, device) -> tuple[torch.Tensor, list]:
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


def jacobi_svd(B: torch.Tensor, sweeps: int = JACOBI_SWEEPS
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched SVD of small square matrices by one-sided (Hestenes) Jacobi rotations.

    B: (L, k, k) -> P (L, k, k), s (L, k), R (L, k, k) with B R = P diag(s), R orthogonal,
    s >= 0 sorted descending per matrix. Elementwise ops and tiny bmms only: no host sync, no
    cuSOLVER call, NaN propagates instead of raising.
    """
    L, k, _ = B.shape
    eye, planes = jacobi_planes(k, B.device)
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
    P = B / s.clamp_min(TINY)[:, None, :]
    return P, s, R


def refresh(modules: list[nn.Module], k: int, iters: int
             ) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Advance every module's subspace state by `iters` rounds and rotate it to Ritz vectors.

    Returns per module (U (k', out), s (k',), V (k', in)), float32, rows sorted by s descending,
    with u_j^T W v_j = s_j; the persistent state is NOT written (see store). Call under no_grad.
    """
    per_layer, groups = [], {}
    for m in modules:
        state = subspace_state(m, k)
        w, cl = matrix_view(m, m.weight.detach())                        # (out, in), no copy
        w = w.float()
        # Warm start, plus a tiny fixed generic component: an exactly invariant subspace (e.g.
        # equal singular values after orthogonal init, then a clamp) would otherwise never let
        # a larger untracked singular direction in. Non-finite state (diverged weights) resets.
        V = torch.nan_to_num(state[1].float(), nan=0.0, posinf=0.0, neginf=0.0)
        V = cols_to_view(torch.add(V, nudge_basis(*V.shape, V.device), alpha=_NUDGE), cl)
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
        P, s, R = jacobi_svd(torch.stack([per_layer[i][2] for i in idx]))
        for j, i in enumerate(idx):
            U, V, _, cl = per_layer[i]
            out[i] = (P[j].t() @ U, s[j], cols_from_view(R[j].t() @ V, cl))
    return out


def store(module: nn.Module, U: torch.Tensor, V: torch.Tensor) -> None:
    """Write refreshed rows back: into the state they came from and, when that was a wider
    side-table entry, also the leading rows into the layer's buffers (they stay warm)."""
    state = subspace_state(module, U.shape[0])
    state[0].copy_(U)
    state[1].copy_(V)
    bufs = getattr(module, "sv_u", None), getattr(module, "sv_v", None)
    if bufs[1] is not None and bufs[1] is not state[1]:
        r = bufs[1].shape[0]
        bufs[0].copy_(U[:r])
        bufs[1].copy_(V[:r])


def sv_modules(modules) -> list[nn.Module]:
    """The weight layers among `modules` (one module or an iterable of them)."""
    if isinstance(modules, nn.Module):
        modules = [modules]
    return [m for m in modules if isinstance(m, WEIGHT_LAYERS)]

