"""Batch-norm variants of the generators (`make_bn(kind, ...)`, kind in BN_KINDS): "batch"
(nn.BatchNorm2d), "virtual" (VirtualBatchNorm2d, model.vbn) and "cross_replica"
(CrossReplicaBatchNorm2d, model.cross_replica_bn), and the generator mixin that holds virtual batch
norm's reference batch. The conditional BN of BigGAN / SAGAN (its gain and bias are spectral-norm
layers) is in models/layers.py. Shapes use B = batch, C = channels, H x W = spatial size.
"""

from __future__ import annotations

import torch
from torch import nn

from .checks import ModelConfigError, choices_str

BN_KINDS = ("batch", "virtual", "cross_replica")


def _world_size(group=None) -> int:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(group)
    return 1


class CrossReplicaBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics are those of the global batch (BigGAN's cross-replica
    BN; torch.nn.SyncBatchNorm semantics): per-channel sum, sum of squares and count are summed
    over the ranks of `process_group` (default: the whole world) by one differentiable
    all-reduce, so gradients flow through the statistics of every rank as in SyncBatchNorm.
    Running statistics use the global count (unbiased variance). Works with any backend (gloo
    on CPU too; torch.nn.SyncBatchNorm refuses CPU tensors). In eval mode, or when
    torch.distributed is not initialised or has one rank, it is exactly nn.BatchNorm2d.

    The global statistics are computed in float32 as E[x^2] - E[x]^2 (as BigGAN-PyTorch does).
    """

    process_group = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or _world_size(self.process_group) <= 1:
            return super().forward(x)
        self._check_input_dim(x)
        from torch.distributed.nn.functional import all_reduce  # differentiable collective

        C = x.shape[1]
        xf = x.float()
        local = torch.cat([xf.sum((0, 2, 3)), xf.square().sum((0, 2, 3)),
                           xf.new_full((1,), x.numel() // C)])                   # (2C + 1,)
        group = (self.process_group if self.process_group is not None
                 else torch.distributed.group.WORLD)
        total = all_reduce(local, group=group)
        n = total[-1]
        mean = total[:C] / n
        var = (total[C:2 * C] / n - mean.square()).clamp_min(0.0)                # biased
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = (self.momentum if self.momentum is not None
                     else 1.0 / float(self.num_batches_tracked))  # host sync, as in BatchNorm2d
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), f)
                unbiased = var * n / (n - 1).clamp_min(1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), f)
        y = (xf - mean[None, :, None, None]) * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(x.dtype)


def convert_sync_bn(net: nn.Module, process_group=None) -> nn.Module:
    """Switch every plain nn.BatchNorm2d of `net` (those inside conditional BNs included) to
    CrossReplicaBatchNorm2d, in place, and return `net`. The modules keep their parameters and
    buffers (same objects: optimisers stay valid; state-dict keys unchanged): only the class
    changes, which is sound because CrossReplicaBatchNorm2d adds no state. The same as building
    with model.cross_replica_bn=true."""
    for m in net.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = CrossReplicaBatchNorm2d
            if process_group is not None:
                m.process_group = process_group
    return net


class VirtualBatchNorm2d(nn.Module):
    """Virtual batch norm (Salimans et al. 2016), the paper's formulation. The input batch is
    [reference batch (the first n_ref samples); samples]. The reference part is normalised with
    its own statistics; every other sample x with those of (reference batch U {x}), per channel:

        mean_x = w m(x) + (1 - w) m_ref,    w = 1 / (n_ref + 1)
        var_x  = w v(x) + (1 - w) v_ref + w (1 - w) (m(x) - m_ref)^2

    with m, v the (biased) mean and variance over the positions (and, for the reference, the
    samples), then the affine weight / bias of BatchNorm2d. No running statistics: training and
    eval compute the same thing, and a sample's output does not depend on the other samples of
    its batch. `n_ref` is set by the generator before each forward (VirtualBatchNormReference);
    statistics are computed in float32.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = None,
                 affine: bool = True):
        super().__init__()
        del momentum  # no running statistics
        self.num_features = num_features
        self.eps = eps
        self.affine = affine
        self.n_ref = 0
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        R = self.n_ref
        if R < 1 or R > x.shape[0]:
            raise RuntimeError(f"VirtualBatchNorm2d: expected the reference batch (n_ref={R}) "
                               f"at the start of a batch of {x.shape[0]}; run it inside a "
                               "generator built with model.vbn=true")
        xf = x.float()
        ref, cur = xf[:R], xf[R:]
        v_ref, m_ref = torch.var_mean(ref, dim=(0, 2, 3), unbiased=False)          # (C,)
        out_ref = (ref - m_ref[:, None, None]) * torch.rsqrt(v_ref + self.eps)[:, None, None]
        v_x, m_x = torch.var_mean(cur, dim=(2, 3), unbiased=False)                # (B, C)
        w = 1.0 / (R + 1)
        mean = w * m_x + (1 - w) * m_ref
        var = w * v_x + (1 - w) * v_ref + w * (1 - w) * (m_x - m_ref).square()
        out_cur = (cur - mean[:, :, None, None]) * torch.rsqrt(var + self.eps)[:, :, None, None]
        y = torch.cat([out_ref, out_cur])
        if self.affine:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}"


def make_bn(kind: str, num_features: int, *, eps: float = 1e-5, momentum: float = 0.1,
            affine: bool = True) -> nn.Module:
    """A 2d batch norm of kind "batch" | "virtual" | "cross_replica" (BN_KINDS)."""
    if kind == "batch":
        return nn.BatchNorm2d(num_features, eps=eps, momentum=momentum, affine=affine)
    if kind == "cross_replica":
        return CrossReplicaBatchNorm2d(num_features, eps=eps, momentum=momentum, affine=affine)
    if kind == "virtual":
        return VirtualBatchNorm2d(num_features, eps=eps, affine=affine)
    raise ModelConfigError(f"batch-norm kind {kind!r} is not one of: {choices_str(BN_KINDS)}")


class VirtualBatchNormReference:
    """Generator mixin for model.vbn: holds the reference batch and prepends it to every forward.

    Buffers (saved with checkpoints; only when vbn is on): vbn_z (R, z_dim) and vbn_y (R,) long,
    drawn at construction (z ~ N(0, I) from the global RNG, labels cycling over the classes), so
    G works without further set-up. `set_vbn_reference(z_ref, y_ref)` replaces them; if R
    changes, do it before deep-copying G into its EMA copy, or on both (the EMA update copies
    buffers). Every forward runs [reference; inputs] as one batch, so each layer's reference
    statistics are those of the current weights (the paper's formulation; cost: R extra samples
    per forward), and returns the inputs' part only.
    """

    vbn: bool = False

    def init_vbn(self, enabled: bool, ref_size: int, z_dim: int, n_classes: int) -> None:
        self.vbn = bool(enabled)
        if self.vbn:
            self.register_buffer("vbn_z", torch.randn(ref_size, z_dim))
            self.register_buffer("vbn_y", torch.arange(ref_size) % n_classes)

    def set_vbn_reference(self, z_ref: torch.Tensor, y_ref: torch.Tensor) -> None:
        """Fix the reference batch: z_ref (R, z_dim), y_ref (R,) class labels."""
        if not self.vbn:
            raise ModelConfigError("set_vbn_reference needs a generator built with "
                                   "model.vbn=true")
        if (z_ref.dim() != 2 or z_ref.shape[1] != self.vbn_z.shape[1]
                or y_ref.shape != (z_ref.shape[0],) or z_ref.shape[0] < 1):
            raise ValueError(f"set_vbn_reference: expected z_ref (R, {self.vbn_z.shape[1]}) and "
                             f"y_ref (R,), got {tuple(z_ref.shape)} and {tuple(y_ref.shape)}")
        self.vbn_z = z_ref.detach().to(self.vbn_z.device, self.vbn_z.dtype).clone()
        self.vbn_y = y_ref.detach().to(self.vbn_y.device, torch.long).clone()

    def _vbn_prepend(self, z: torch.Tensor, class_vec: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, int]:
        """[reference; z], [reference class vectors; class_vec], R; tells the VBN layers R."""
        n_ref = self.vbn_z.shape[0]
        for m in self.modules():  # type: ignore[attr-defined]
            if isinstance(m, VirtualBatchNorm2d):
                m.n_ref = n_ref
        ref_vec = self.class_embedding(self.vbn_y).to(class_vec.dtype)  # type: ignore[attr-defined]
        return (torch.cat([self.vbn_z.to(z.dtype), z]), torch.cat([ref_vec, class_vec]), n_ref)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        if self.vbn:  # adopt the checkpoint's reference-batch size
            for name in ("vbn_z", "vbn_y"):
                key, buf = prefix + name, getattr(self, name)
                if key in state_dict and state_dict[key].shape != buf.shape:
                    setattr(self, name, torch.empty(state_dict[key].shape, device=buf.device,
                                                    dtype=buf.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)  # type: ignore[misc]
