"""Layers shared by the model families: weight layers with optional spectral norm (`sn: SNSettings`), weight
init, conditional batch norm, self-attention, the residual G and D blocks, and D's minibatch layers
(docs/architecture.md, "Models"). Shapes: B = batch, C = channels, H x W = spatial size, E = conditioning size."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .checks import ModelConfigError, choices_str
from .norms import make_bn
from .spectral import SNSettings, SpectralNorm
from .svd import WEIGHT_LAYERS

INITS = ("N02", "ortho", "xavier")


# ---------------------------------------------------------------------------------------------
# Weight layers with optional spectral norm
# ---------------------------------------------------------------------------------------------


class SNConv2d(SpectralNorm, nn.Conv2d):
    """nn.Conv2d whose weight is divided by its spectral norm when sn.enabled."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 3, stride: int = 1,
                 padding: int = 0, bias: bool = True, *, sn: SNSettings = SNSettings()):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding, bias=bias)
        self.init_spectral_norm(sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.sn_weight(), self.bias)


class SNConvTranspose2d(SpectralNorm, nn.ConvTranspose2d):
    """nn.ConvTranspose2d with optional spectral norm (weight viewed as (out, in*kh*kw))."""

    def __init__(self, in_ch: int, out_ch: int, kernel_size: int = 4, stride: int = 2,
                 padding: int = 1, bias: bool = True, *, sn: SNSettings = SNSettings()):
        super().__init__(in_ch, out_ch, kernel_size, stride, padding, bias=bias)
        self.init_spectral_norm(sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv_transpose2d(x, self.sn_weight(), self.bias, self.stride, self.padding,
                                  self.output_padding, self.groups, self.dilation)


class SNLinear(SpectralNorm, nn.Linear):
    """nn.Linear with optional spectral norm."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 sn: SNSettings = SNSettings()):
        super().__init__(in_features, out_features, bias=bias)
        self.init_spectral_norm(sn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.sn_weight(), self.bias)


class SNEmbedding(SpectralNorm, nn.Embedding):
    """nn.Embedding with optional spectral norm of its (num_embeddings, dim) table."""

    def __init__(self, num_embeddings: int, embedding_dim: int, *,
                 sn: SNSettings = SNSettings()):
        super().__init__(num_embeddings, embedding_dim)
        self.init_spectral_norm(sn)

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
# Conditional batch norm and attention
# ---------------------------------------------------------------------------------------------


class ConditionalBatchNorm2d(nn.Module):
    """BatchNorm without its own affine, then per-sample gain and bias from a condition vector:

        out = BN(x) * (1 + gain(c)) + bias(c),   gain, bias: Linear(E -> C), no bias term.

    x: (B, C, H, W); c: (B, E). With E = shared_dim (+ z chunk) this is BigGAN's conditional BN;
    with c one-hot over classes it is the per-class-embedding conditional BN of SAGAN.
    cond_dim = 0 (an unconditional G without z in its batch norms): plain BatchNorm with its own
    learned affine (bn.weight, bn.bias); c is ignored and gain / bias are None.
    bn: the normalisation (BN_KINDS); with "cross_replica" the statistics are synced across
    ranks and the per-sample gain / bias are applied after, locally.
    """

    def __init__(self, num_features: int, cond_dim: int, *, eps: float = 1e-5,
                 momentum: float = 0.1, sn: SNSettings = SNSettings(), bn: str = "batch"):
        super().__init__()
        self.bn = make_bn(bn, num_features, eps=eps, momentum=momentum, affine=cond_dim == 0)
        self.gain = SNLinear(cond_dim, num_features, bias=False, sn=sn) if cond_dim else None
        self.bias = SNLinear(cond_dim, num_features, bias=False, sn=sn) if cond_dim else None

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        if self.gain is None:
            return self.bn(x)
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

    def __init__(self, ch: int, *, sn: SNSettings = SNSettings()):
        super().__init__()
        if ch < 8:
            raise ModelConfigError(f"self-attention needs at least 8 channels, got {ch}; "
                                   "raise model.ch / model.d_ch or remove the resolution from "
                                   "model.attn")
        self.ch = ch
        self.theta = SNConv2d(ch, ch // 8, 1, bias=False, sn=sn)
        self.phi = SNConv2d(ch, ch // 8, 1, bias=False, sn=sn)
        self.g = SNConv2d(ch, ch // 2, 1, bias=False, sn=sn)
        self.o = SNConv2d(ch // 2, ch, 1, bias=False, sn=sn)
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
                 sn: SNSettings = SNSettings(), bn_eps: float = 1e-5,
                 cond_sn: SNSettings | None = None, bn: str = "batch"):
        super().__init__()
        bnkw = dict(eps=bn_eps, sn=sn if cond_sn is None else cond_sn, bn=bn)
        self.upsample = upsample
        self.bn1 = ConditionalBatchNorm2d(in_ch, cond_dim, **bnkw)
        self.conv1 = SNConv2d(in_ch, out_ch, 3, padding=1, sn=sn)
        self.bn2 = ConditionalBatchNorm2d(out_ch, cond_dim, **bnkw)
        self.conv2 = SNConv2d(out_ch, out_ch, 3, padding=1, sn=sn)
        self.conv_sc = (SNConv2d(in_ch, out_ch, 1, sn=sn)
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
                 preactivation: bool = True, wide: bool = True, sn: SNSettings = SNSettings()):
        super().__init__()
        hidden = out_ch if wide else in_ch
        self.downsample = downsample
        self.preactivation = preactivation
        self.conv1 = SNConv2d(in_ch, hidden, 3, padding=1, sn=sn)
        self.conv2 = SNConv2d(hidden, out_ch, 3, padding=1, sn=sn)
        self.conv_sc = (SNConv2d(in_ch, out_ch, 1, sn=sn)
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
                 sn: SNSettings = SNSettings()):
        super().__init__()
        self.n_kernels, self.kernel_dim = n_kernels, kernel_dim
        self.T = SNLinear(in_features, n_kernels * kernel_dim, bias=False, sn=sn)

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        B = f.shape[0]
        M = self.T(f).float().view(B, self.n_kernels, self.kernel_dim).transpose(0, 1)  # (b, B, C)
        dist = torch.cdist(M, M, p=1)                                        # (b, B, B)
        o = torch.exp(-dist).sum(dim=2) - 1.0                                # (b, B), minus self
        return torch.cat([f, o.t().to(f.dtype)], dim=1)                     # (B, A + b)
