"""Building blocks shared by the model families.

Shapes use B = batch, C = channels, H x W = spatial size, E = conditioning-vector size.
Every weight layer takes `sn: bool` (spectral norm on/off, see models/spectral.py); with sn=False
it computes exactly what the plain torch layer computes (it still carries the sv_u / sv_v
subspace-iteration buffers of models/spectral.py).

Batch-norm variants for G (`make_bn(kind, ...)`, kind in BN_KINDS): "batch" (nn.BatchNorm2d),
"virtual" (VirtualBatchNorm2d, model.vbn) and "cross_replica" (CrossReplicaBatchNorm2d,
model.cross_replica_bn). D-side layers: MinibatchStdDev (model.mbstd) and
MinibatchDiscrimination (model.mbdisc).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from .spectral import SV_K, WEIGHT_LAYERS, SpectralNorm

INITS = ("N02", "ortho", "xavier")
BN_KINDS = ("batch", "virtual", "cross_replica")


class ModelConfigError(ValueError):
    """A model setting that cannot be built; the message names the config key and the choices."""


def choices_str(values: Iterable) -> str:
    return ", ".join(str(v) for v in values)


def config_from_mapping(cls, cfg: Mapping):
    """Build the config dataclass `cls` from the keys of `cfg` it declares (others are ignored;
    missing or null keys keep the dataclass default). Lists become tuples."""
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name in cfg and cfg[f.name] is not None:
            value = cfg[f.name]
            if isinstance(value, Iterable) and not isinstance(value, (str, bytes)):
                value = tuple(value)
            kwargs[f.name] = value
    return cls(**kwargs)


def check_positive(key: str, value, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ModelConfigError(f"model.{key}={value!r} must be an integer >= {minimum}")


def check_arch_switches(cfg) -> None:
    """Validate the stability switches every family's config declares (mbdisc, mbdisc_dim, mbstd,
    vbn, vbn_ref, cross_replica_bn)."""
    check_positive("mbdisc", cfg.mbdisc, minimum=0)
    check_positive("mbdisc_dim", cfg.mbdisc_dim)
    check_positive("mbstd", cfg.mbstd, minimum=0)
    if cfg.mbstd == 1:
        raise ModelConfigError("model.mbstd=1 is a group of one sample (its stddev is 0); use 0 "
                               "(off) or a group size >= 2")
    check_positive("vbn_ref", cfg.vbn_ref)
    if cfg.vbn and cfg.cross_replica_bn:
        raise ModelConfigError("model.vbn=true and model.cross_replica_bn=true exclude each "
                               "other (virtual batch norm uses no batch statistics to sync); "
                               "switch one off")


def g_bn_kind(cfg) -> str:
    """The BatchNorm kind of a generator: "virtual", "cross_replica" or "batch"."""
    return "virtual" if cfg.vbn else "cross_replica" if cfg.cross_replica_bn else "batch"


def check_attn(attn, family: str, resolution: int, allowed: Iterable[int]) -> tuple[int, ...]:
    """Validate model.attn against the resolutions where a family's G and D both have a stage."""
    allowed = sorted(set(allowed))
    if isinstance(attn, int):
        attn = (attn,)
    bad = [a for a in attn if a not in allowed]
    if bad:
        raise ModelConfigError(
            f"model.attn={list(attn)} is not a resolution of the {family}_{resolution} "
            f"generator and discriminator; choose from: {choices_str(allowed)} (or [] for none)")
    return tuple(attn)


# ---------------------------------------------------------------------------------------------
# Weight layers with optional spectral norm
# ---------------------------------------------------------------------------------------------


class SNConv2d(SpectralNorm, nn.Conv2d):
    """nn.Conv2d whose weight is divided by its spectral norm when sn=True."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, bias: bool = True, *, sn: bool = True, sn_iters: int = 1,
                 sn_eps: float = 1e-6, sv_k: int = SV_K):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding, bias=bias)
        self.init_spectral_norm(sn, sn_iters, sn_eps, sv_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.sn_weight(), self.bias)


class SNConvTranspose2d(SpectralNorm, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with optional spectral norm (weight viewed as (out, in*kh*kw))."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 4, stride: int = 2,
                 padding: int = 1, bias: bool = True, *, sn: bool = True, sn_iters: int = 1,
                 sn_eps: float = 1e-6, sv_k: int = SV_K):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding, bias=bias)
        self.init_spectral_norm(sn, sn_iters, sn_eps, sv_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.sn_weight(), self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


class SNLinear(SpectralNorm, nn.Linear):
    """nn.Linear with optional spectral norm."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 sn: bool = True, sn_iters: int = 1, sn_eps: float = 1e-6, sv_k: int = SV_K):
        super().__init__(in_features, out_features, bias=bias)
        self.init_spectral_norm(sn, sn_iters, sn_eps, sv_k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sn_weight(), self.bias)


class SNEmbedding(SpectralNorm, nn.Embedding):
    """nn.Embedding with optional spectral norm of its (num_embeddings, dim) table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *, sn: bool = True,
                 sn_iters: int = 1, sn_eps: float = 1e-6, sv_k: int = SV_K):
        super().__init__(num_embeddings, embedding_dim)
        self.init_spectral_norm(sn, sn_iters, sn_eps, sv_k)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return F.embedding(y, self.sn_weight())


def init_weights(net: nn.Module, scheme: str) -> None:
    """Initialise every conv / linear / embedding weight of `net` (biases keep torch defaults).

    ortho: orthogonal (BigGAN); N02: normal(0, 0.02) (DCGAN); xavier: Glorot uniform.
    """
    if scheme not in INITS:
        raise ModelConfigError(f"model.init={scheme!r} is not an init scheme; "
                               f"choose one of: {choices_str(INITS)}")
    for m in net.modules():
        if not isinstance(m, WEIGHT_LAYERS) or m.weight.is_meta:
            continue
        if scheme == "ortho":
            nn.init.orthogonal_(m.weight)
        elif scheme == "N02":
            nn.init.normal_(m.weight, 0.0, 0.02)
        else:
            nn.init.xavier_uniform_(m.weight)


# ---------------------------------------------------------------------------------------------
# Normalisation and attention
# ---------------------------------------------------------------------------------------------


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


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine, then per-sample gain and bias from a condition vector:

        out = BN(x) * (1 + gain(c)) + bias(c),   gain, bias: Linear(E -> C), no bias term.

    x: (B, C, H, W); c: (B, E). With E = shared_dim (+ z chunk) this is BigGAN's conditional BN;
    with c one-hot over classes it is the per-class-embedding conditional BN of SAGAN.
    bn: the normalisation (BN_KINDS); with "cross_replica" the statistics are synced across
    ranks and the per-sample gain / bias are applied after, locally.
    """

    def __init__(self, num_features: int, cond_dim: int, *, eps: float = 1e-5,
                 momentum: float = 0.1, sn: bool = True, sn_iters: int = 1, sn_eps: float = 1e-6,
                 bn: str = "batch"):
        super().__init__()
        self.bn = make_bn(bn, num_features, eps=eps, momentum=momentum, affine=False)
        snkw = dict(sn=sn, sn_iters=sn_iters, sn_eps=sn_eps)
        self.gain = SNLinear(cond_dim, num_features, bias=False, **snkw)
        self.bias = SNLinear(cond_dim, num_features, bias=False, **snkw)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        gain = (1 + self.gain(c))[:, :, None, None]  # (B, C, 1, 1)
        bias = self.bias(c)[:, :, None, None]
        return self.bn(x) * gain + bias


class SelfAttention(nn.Module):
    """SAGAN / BigGAN self-attention over positions, residual with a learnable gate:

        theta: C -> C/8 (all HW positions), phi: C -> C/8 and g: C -> C/2 (2x2 max-pooled, HW/4),
        beta = softmax(theta^T phi) (no 1/sqrt(d) scaling), out = x + gamma * o(g beta^T),
        o: C/2 -> C, all 1x1 convolutions without bias, gamma initialised to 0.

    On CPU plain bmm beats scaled_dot_product_attention in bf16 (forward + backward measured
    2-3x faster); elsewhere SDPA (same maths, scale=1) avoids materialising the HW x HW/4 map.
    """

    use_sdpa: bool | None = None  # None = SDPA off CPU, bmm on CPU; True / False force one

    def __init__(self, ch: int, *, sn: bool = True, sn_iters: int = 1, sn_eps: float = 1e-6):
        super().__init__()
        if ch < 8:
            raise ModelConfigError(f"self-attention needs at least 8 channels, got {ch}; "
                                   "raise model.ch / model.d_ch or remove the resolution from "
                                   "model.attn")
        snkw = dict(sn=sn, sn_iters=sn_iters, sn_eps=sn_eps)
        self.ch = ch
        self.theta = SNConv2d(ch, ch // 8, 1, bias=False, **snkw)
        self.phi = SNConv2d(ch, ch // 8, 1, bias=False, **snkw)
        self.g = SNConv2d(ch, ch // 2, 1, bias=False, **snkw)
        self.o = SNConv2d(ch // 2, ch, 1, bias=False, **snkw)
        self.gamma = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        q = self.theta(x).flatten(2).transpose(1, 2)                    # (B, HW, C/8)
        k = F.max_pool2d(self.phi(x), 2).flatten(2).transpose(1, 2)     # (B, HW/4, C/8)
        v = F.max_pool2d(self.g(x), 2).flatten(2).transpose(1, 2)       # (B, HW/4, C/2)
        use_sdpa = self.use_sdpa if self.use_sdpa is not None else x.device.type != "cpu"
        if not use_sdpa:
            beta = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # (B, HW, HW/4)
            o = torch.bmm(beta, v)                                          # (B, HW, C/2)
        else:
            o = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                               scale=1.0)[:, 0]
        o = o.reshape(B, H, W, C // 2).permute(0, 3, 1, 2)  # (B, C/2, H, W), channels-last strides
        return x + self.gamma * self.o(o)


# ---------------------------------------------------------------------------------------------
# Residual blocks
# ---------------------------------------------------------------------------------------------


class GBlock(nn.Module):
    """Residual up block (BigGAN / SAGAN generator), (B, in, H, W) -> (B, out, 2H, 2W):

        h: ReLU(CBN1(x, c)) -> nearest 2x -> conv1 3x3 -> ReLU(CBN2(., c)) -> conv2 3x3
        shortcut: nearest 2x -> conv_sc 1x1 (only when in != out or upsampling)
    """

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, *, upsample: bool = True,
                 sn: bool = True, sn_iters: int = 1, sn_eps: float = 1e-6,
                 bn_eps: float = 1e-5, cond_sn: bool | None = None, bn: str = "batch"):
        super().__init__()
        snkw = dict(sn=sn, sn_iters=sn_iters, sn_eps=sn_eps)
        bnkw = dict(eps=bn_eps, sn=sn if cond_sn is None else cond_sn, sn_iters=sn_iters,
                    sn_eps=sn_eps, bn=bn)
        self.upsample = upsample
        self.bn1 = ConditionalBatchNorm2d(in_ch, cond_dim, **bnkw)
        self.conv1 = SNConv2d(in_ch, out_ch, 3, padding=1, **snkw)
        self.bn2 = ConditionalBatchNorm2d(out_ch, cond_dim, **bnkw)
        self.conv2 = SNConv2d(out_ch, out_ch, 3, padding=1, **snkw)
        self.conv_sc = (SNConv2d(in_ch, out_ch, 1, **snkw)
                        if (in_ch != out_ch or upsample) else None)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(x, c))
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv1(h)
        h = self.conv2(F.relu(self.bn2(h, c)))
        if self.conv_sc is not None:
            x = self.conv_sc(x)
        return h + x


class DBlock(nn.Module):
    """Residual down block (BigGAN / SAGAN discriminator), (B, in, H, W) -> (B, out, H/2, W/2):

        h: [ReLU] -> conv1 3x3 -> ReLU -> conv2 3x3 -> [avgpool 2x2]
        shortcut: preactivation blocks: conv_sc 1x1 -> avgpool; first block: avgpool -> conv_sc
        (conv_sc only when in != out or downsampling). The first block (preactivation=False)
        skips the leading ReLU so the image is not rectified.
        wide=True: hidden width = out (BigGAN); False: hidden width = in.
    """

    def __init__(self, in_ch: int, out_ch: int, *, downsample: bool = True,
                 preactivation: bool = True, wide: bool = True, sn: bool = True,
                 sn_iters: int = 1, sn_eps: float = 1e-6):
        super().__init__()
        snkw = dict(sn=sn, sn_iters=sn_iters, sn_eps=sn_eps)
        hidden = out_ch if wide else in_ch
        self.downsample = downsample
        self.preactivation = preactivation
        self.conv1 = SNConv2d(in_ch, hidden, 3, padding=1, **snkw)
        self.conv2 = SNConv2d(hidden, out_ch, 3, padding=1, **snkw)
        self.conv_sc = (SNConv2d(in_ch, out_ch, 1, **snkw)
                        if (in_ch != out_ch or downsample) else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(x) if self.preactivation else x
        h = self.conv2(F.relu(self.conv1(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        if self.preactivation:
            if self.conv_sc is not None:
                x = self.conv_sc(x)
            if self.downsample:
                x = F.avg_pool2d(x, 2)
        else:
            if self.downsample:
                x = F.avg_pool2d(x, 2)
            if self.conv_sc is not None:
                x = self.conv_sc(x)
        return h + x


# ---------------------------------------------------------------------------------------------
# Minibatch layers of the discriminator
# ---------------------------------------------------------------------------------------------


class MinibatchStdDev(nn.Module):
    """(N, C, H, W) -> (N, C + 1, H, W): the minibatch-stddev feature map (Karras et al. 2018,
    ProGAN; grouping as in StyleGAN). The batch is split into groups of G = min(group_size, N)
    samples, sample n belonging to group n mod (N / G); per group, the standard deviation over
    its G samples of every (channel, position) (biased, sqrt(var + 1e-8)), averaged over channels
    and positions, is one number, appended as a constant channel to the group's samples.
    G must divide N (ModelConfigError, a shape check: no host sync). Computed in float32.
    """

    def __init__(self, group_size: int):
        super().__init__()
        self.group_size = group_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C, H, W = x.shape
        G = min(self.group_size, N)
        if N % G:
            raise ModelConfigError(f"model.mbstd={self.group_size} does not divide the batch of "
                                   f"{N} samples fed to D; use a group size that divides "
                                   "train.batch_size")
        y = x.float().reshape(G, N // G, C, H, W)
        std = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()                  # (N/G, C, H, W)
        s = std.mean(dim=(1, 2, 3))                                          # (N/G,)
        s = s.repeat(G)[:, None, None, None].expand(N, 1, H, W)            # sample n: s[n % (N/G)]
        return torch.cat([x, s.to(x.dtype)], dim=1)

    def extra_repr(self) -> str:
        return f"group_size={self.group_size}"


class MinibatchDiscrimination(nn.Module):
    """(B, A) -> (B, A + n_kernels): minibatch discrimination (Salimans et al. 2016, sec. 3.2).

        M_i = f_i T (n_kernels x kernel_dim),  c_b(x_i, x_j) = exp(-||M_i,b - M_j,b||_1),
        o(x_i)_b = sum over j != i of c_b(x_i, x_j),   output [f_i, o(x_i)]

    T (A -> n_kernels * kernel_dim) is an SNLinear without bias, so it is a weight layer like
    any other (spectral norm with the D's setting, init, sigma telemetry, regularisers). The
    self term j = i (always exp(0) = 1) is left out, as in the authors' code: the paper's sum
    includes it, which only adds 1 to every o_b. Distances and exponentials in float32.
    """

    def __init__(self, in_features: int, n_kernels: int, kernel_dim: int = 16, *,
                 sn: bool = True, sn_iters: int = 1, sn_eps: float = 1e-6):
        super().__init__()
        self.n_kernels, self.kernel_dim = n_kernels, kernel_dim
        self.T = SNLinear(in_features, n_kernels * kernel_dim, bias=False, sn=sn,
                          sn_iters=sn_iters, sn_eps=sn_eps)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        B = f.shape[0]
        M = self.T(f).float().view(B, self.n_kernels, self.kernel_dim).transpose(0, 1)  # (b, B, C)
        dist = torch.cdist(M, M, p=1)                                        # (b, B, B)
        o = torch.exp(-dist).sum(dim=2) - 1.0                                # (b, B), minus self
        return torch.cat([f, o.t().to(f.dtype)], dim=1)                     # (B, A + b)
