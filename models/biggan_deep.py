"""BigGAN-deep (Brock et al. 2019, appendix B), in the layout of BigGAN-PyTorch's BigGANdeep.py: bottleneck
residual blocks, `depth` of them per resolution, skips without a learned projection, a hierarchical latent that
feeds the whole z everywhere. Its differences from BigGAN, G and D, one class, the switches and the parameter
counts: docs/architecture.md, "Models"."""

from __future__ import annotations

import dataclasses
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.registry import MODELS

from .biggan import G_ARCH, BigGANConfig, _check_resolution, g_resolutions
from .checks import ModelConfigError, check_attn, check_positive, g_bn_kind, is_conditional
from .layers import (ConditionalBatchNorm2d, MinibatchDiscrimination, MinibatchStdDev,
                     SelfAttention, SNConv2d, SNEmbedding, SNLinear, init_weights)
from .norms import VirtualBatchNormReference, make_bn
from .spectral import SNSettings

CHANNEL_RATIO = 4  # bottleneck: hidden width = in / 4 (G) or out / 4 (D)
BOTTOM = 4         # side of G's first feature map

# G: the same channel multipliers per stage as BigGAN (biggan.G_ARCH: (in, out) per stage).
# D: (in multipliers, out multipliers, downsample flags) per stage; the stem conv maps RGB to
# in[0] * d_ch channels.
D_ARCH: dict[int, tuple[tuple[int, ...], tuple[int, ...], tuple[bool, ...]]] = {
    32: ((4, 4, 4), (4, 4, 4), (True, True, False)),                         # 32 -> 16 -> 8 -> 8
    64: ((1, 2, 4, 8), (2, 4, 8, 16), (True,) * 4),                          # 64 -> ... -> 4
    128: ((1, 2, 4, 8, 16), (2, 4, 8, 16, 16), (True,) * 5),                 # 128 -> ... -> 4
    256: ((1, 2, 4, 8, 8, 16), (2, 4, 8, 8, 16, 16), (True,) * 6),           # 256 -> ... -> 4
    # 512: the reflection of G_ARCH[512], as at every other resolution (BigGAN-PyTorch has no 512
    # D; StudioGAN's big_resnet_deep 512 table is this one).
    512: ((1, 1, 2, 4, 8, 8, 16), (1, 2, 4, 8, 8, 16, 16), (True,) * 7),     # 512 -> ... -> 4
}

# Parameter counts (nn.Parameters only; spectral-norm vectors and BN statistics are buffers) of
# BigGAN-PyTorch's BigGANdeep.py (github.com/ajbrock/BigGAN-PyTorch, Generator / Discriminator),
# measured by building its classes with the settings of scripts/launch_BigGAN_deep.sh:
# G_ch = D_ch = 128, G_depth = D_depth = 2, dim_z 128, shared_dim 128, hier, G_shared,
# G_attn = D_attn = 64, n_classes 1000. Its master (98459431) has no 512 tables; the 512 entry says
# where its counts come from (models.reference_params merges an entry's own source / note).
REFERENCE_SOURCE = "BigGAN-PyTorch BigGANdeep.py (scripts/launch_BigGAN_deep.sh settings)"
REFERENCE_SETTINGS = {"ch": 128, "d_ch": 128, "z_dim": 128, "shared_dim": 128, "hier": True,
                      "attn": (64,), "depth": 2, "n_classes": 1000}
REFERENCE_PARAMS: dict[int, dict] = {
    128: {"G": 50_244_484, "D": 34_590_210},
    256: {"G": 55_736_708, "D": 38_247_426},
    512: {"G": 56_163_905, "D": 38_301_122,
          "source": "G: BigGAN-PyTorch pull request #72 (f584c36, 'Support 512x512', unmerged), "
                    "BigGANdeep.Generator; D: BigGAN-PyTorch BigGANdeep.Discriminator given this "
                    "file's D_ARCH[512] (its D_arch has no 512 entry)",
          "note": "G: the pull request's output conv has 128 output channels and keeps the first "
                  "3 (TF-Hub's layout); ours has 3, so ours is its count less 144,125 (3x3x128x125 "
                  "+ 125), exactly. Its G at 128 / 256 counts 50,388,609 / 55,880,833: with 512, "
                  "the published TF-Hub BigGAN-deep sizes 50.4M / 55.9M / 56.2M "
                  "(pytorch-pretrained-BigGAN). D: BigGAN-PyTorch has no 512 discriminator and "
                  "TF-Hub's was not released; this is its Discriminator built with our D_ARCH[512], "
                  "so it checks our blocks, not the table."},
}
REFERENCE = {"source": REFERENCE_SOURCE, "settings": REFERENCE_SETTINGS, "params": REFERENCE_PARAMS}


@dataclasses.dataclass(frozen=True)
class BigGANDeepConfig(BigGANConfig):
    """The model.* keys BigGAN-deep reads: those of BigGANConfig (same meaning, same checks),
    with the BigGAN-deep paper's defaults, except that hier does not split z (the whole z goes
    to every block, so any z_dim >= 1 works), plus `depth`."""

    ch: int = 128             # G base width (G_ARCH multipliers)
    d_ch: int = 128           # D base width (D_ARCH multipliers)
    z_dim: int = 128          # latent size; with hier, all of it feeds every block's CBNs
    depth: int = 2            # residual blocks per resolution in G and D

    def __post_init__(self):
        super().__post_init__()
        check_positive("depth", self.depth)


def d_resolutions(resolution: int) -> list[int]:
    """Output resolution of each D stage."""
    out, r = [], resolution
    for down in D_ARCH[resolution][2]:
        r = r // 2 if down else r
        out.append(r)
    return out


def attn_choices(resolution: int) -> list[int]:
    """Resolutions where both G and D have a stage output (valid model.attn entries)."""
    return sorted(set(g_resolutions(resolution)) & set(d_resolutions(resolution)))


def _checked_common(net: nn.Module, cfg, resolution: int, n_classes: int) -> None:
    """What G and D check and keep alike: the resolution, the attention resolutions, the class count."""
    _check_resolution(net.family, resolution, net.resolutions)
    net.attn_res = check_attn(cfg.attn, net.family, resolution, attn_choices(resolution))
    check_positive("n_classes", n_classes)
    net.cfg, net.resolution, net.n_classes = cfg, resolution, n_classes
    net.conditional = is_conditional(n_classes)


def _hidden(width: int, what: str) -> int:
    if width < CHANNEL_RATIO:
        raise ModelConfigError(f"a BigGAN-deep {what} block of {width} channels has no bottleneck "
                               f"(width / {CHANNEL_RATIO} < 1); raise model.ch / model.d_ch")
    return width // CHANNEL_RATIO


class DeepGBlock(nn.Module):
    """Bottleneck residual up block, (B, in, H, W) -> (B, out, 2H, 2W) (or (B, out, H, W)):

        h: ReLU(CBN1(x, c)) -> conv1 1x1 (in -> in/4) -> ReLU(CBN2(., c)) -> [nearest 2x]
           -> conv2 3x3 -> ReLU(CBN3(., c)) -> conv3 3x3 -> ReLU(CBN4(., c)) -> conv4 1x1 (-> out)
        skip: x[:, :out] (channel drop; no parameters) -> [nearest 2x]

    out <= in (the generator only narrows). c: (B, cond_dim), the condition of all four CBNs.
    """

    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, *, upsample: bool = True,
                 sn: SNSettings = SNSettings(), cond_sn: SNSettings | None = None,
                 bn: str = "batch", bn_eps: float = 1e-5):
        super().__init__()
        if out_ch > in_ch:
            raise ModelConfigError(f"DeepGBlock drops channels in its skip: out ({out_ch}) must "
                                   f"not exceed in ({in_ch})")
        hidden = _hidden(in_ch, "generator")
        self.in_ch, self.out_ch, self.upsample = in_ch, out_ch, upsample
        bnkw = dict(eps=bn_eps, sn=sn if cond_sn is None else cond_sn, bn=bn)
        self.bn1 = ConditionalBatchNorm2d(in_ch, cond_dim, **bnkw)
        self.conv1 = SNConv2d(in_ch, hidden, 1, sn=sn)
        self.bn2 = ConditionalBatchNorm2d(hidden, cond_dim, **bnkw)
        self.conv2 = SNConv2d(hidden, hidden, 3, padding=1, sn=sn)
        self.bn3 = ConditionalBatchNorm2d(hidden, cond_dim, **bnkw)
        self.conv3 = SNConv2d(hidden, hidden, 3, padding=1, sn=sn)
        self.bn4 = ConditionalBatchNorm2d(hidden, cond_dim, **bnkw)
        self.conv4 = SNConv2d(hidden, out_ch, 1, sn=sn)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(self.bn1(x, c)))                    # (B, in/4, H, W)
        h = F.relu(self.bn2(h, c))
        x = x[:, :self.out_ch]                                    # channel drop
        if self.upsample:
            h = F.interpolate(h, scale_factor=2, mode="nearest")
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        h = self.conv2(h)
        h = self.conv3(F.relu(self.bn3(h, c)))
        h = self.conv4(F.relu(self.bn4(h, c)))                    # (B, out, H', W')
        return h + x


class DeepDBlock(nn.Module):
    """Bottleneck residual down block (pre-activated), (B, in, H, W) -> (B, out, H/2, W/2)
    (or (B, out, H, W)):

        h: ReLU -> conv1 1x1 (in -> out/4) -> ReLU -> conv2 3x3 -> ReLU -> conv3 3x3 -> ReLU
           -> [avgpool 2x2] -> conv4 1x1 (-> out)
        skip: [avgpool 2x2] -> in < out: [x, conv_sc(x)] (channel pad: a learned 1x1 conv makes
              the out - in missing channels); in > out: x[:, :out] (channel drop, e.g. the
              minibatch-stddev channel); in == out: x.
    """

    def __init__(self, in_ch: int, out_ch: int, *, downsample: bool = True,
                 sn: SNSettings = SNSettings()):
        super().__init__()
        hidden = _hidden(out_ch, "discriminator")
        self.in_ch, self.out_ch, self.downsample = in_ch, out_ch, downsample
        self.conv1 = SNConv2d(in_ch, hidden, 1, sn=sn)
        self.conv2 = SNConv2d(hidden, hidden, 3, padding=1, sn=sn)
        self.conv3 = SNConv2d(hidden, hidden, 3, padding=1, sn=sn)
        self.conv4 = SNConv2d(hidden, out_ch, 1, sn=sn)
        self.conv_sc = SNConv2d(in_ch, out_ch - in_ch, 1, sn=sn) if out_ch > in_ch else None

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        if self.downsample:
            x = F.avg_pool2d(x, 2)
        if self.conv_sc is not None:
            return torch.cat([x, self.conv_sc(x)], dim=1)          # channel pad
        return x[:, :self.out_ch]                                  # channel drop (or identity)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.relu(x))
        h = self.conv2(F.relu(h))
        h = F.relu(self.conv3(F.relu(h)))
        if self.downsample:
            h = F.avg_pool2d(h, 2)
        return self.conv4(h) + self.shortcut(x)


class Generator(VirtualBatchNormReference, nn.Module):
    """G(z (B, z_dim), y (B,) long, class_vec (B, E) | None) -> images (B, 3, R, R) in [-1, 1].

    The interface of biggan.Generator: class_vec, when given, replaces class_embedding(y);
    `shared` is the shared class embedding (nn.Embedding, no SN) or None when shared_dim = 0
    (one-hot class vectors, E = n_classes) or G is unconditional (E = 0; y is ignored and may be
    None). `blocks` holds depth blocks per stage, in order;
    `attn[s]` follows stage s.
    """

    family = "biggan_deep"
    resolutions = tuple(G_ARCH)
    Config = BigGANDeepConfig
    reference = REFERENCE  # read by models.reference_params

    def __init__(self, cfg: BigGANDeepConfig = BigGANDeepConfig(), resolution: int = 128,
                 n_classes: int = 1000):
        super().__init__()
        _checked_common(self, cfg, resolution, n_classes)
        self.z_dim, self.hier, self.depth = cfg.z_dim, cfg.hier, cfg.depth
        sn = SNSettings(cfg.g_sn, cfg.sn_iters, cfg.sn_eps)
        shared = self.conditional and cfg.shared_dim > 0
        self.shared = nn.Embedding(n_classes, cfg.shared_dim) if shared else None
        self.class_dim = (cfg.shared_dim if shared else n_classes) if self.conditional else 0
        # hier: [class_vec, z] feeds the first linear layer and every CBN; else z / class_vec
        # (cond_dim 0, unconditional without hier: plain BatchNorms).
        self.cond_dim = self.class_dim + (cfg.z_dim if cfg.hier else 0)
        in_dim = cfg.z_dim + (self.class_dim if cfg.hier else 0)
        # As in biggan: CBN projections of a learned embedding (or of z alone) are SN layers;
        # those reading one-hot labels are plain per-class tables.
        cond_sn = SNSettings(cfg.g_sn and (shared or not self.conditional), cfg.sn_iters, cfg.sn_eps)
        self.bn_kind = g_bn_kind(cfg)
        in_mult, out_mult = G_ARCH[resolution]
        self.linear = SNLinear(in_dim, in_mult[0] * cfg.ch * BOTTOM ** 2, sn=sn)
        self.blocks, self.attn = nn.ModuleList(), nn.ModuleList()
        for mi, mo, res in zip(in_mult, out_mult, g_resolutions(resolution)):
            for j in range(cfg.depth):
                last = j == cfg.depth - 1
                self.blocks.append(DeepGBlock(mi * cfg.ch, (mo if last else mi) * cfg.ch,
                                              self.cond_dim, upsample=last, sn=sn,
                                              cond_sn=cond_sn, bn=self.bn_kind,
                                              bn_eps=cfg.bn_eps))
            self.attn.append(SelfAttention(mo * cfg.ch, sn=sn) if res in self.attn_res
                             else nn.Identity())
        self.out_bn = make_bn(self.bn_kind, out_mult[-1] * cfg.ch, eps=cfg.bn_eps)
        self.out_conv = SNConv2d(out_mult[-1] * cfg.ch, 3, 3, padding=1, sn=sn)
        init_weights(self, cfg.init)
        self.init_vbn(cfg.vbn, cfg.vbn_ref, cfg.z_dim, n_classes)

    @property
    def arch(self) -> dict:
        """The resolved architecture (JSON-serialisable), e.g. for `bench inspect`."""
        stages = [{"resolution": r, "attention": r in self.attn_res,
                   "blocks": [{"in": b.in_ch, "out": b.out_ch, "upsample": b.upsample}
                              for b in self.blocks[s * self.depth:(s + 1) * self.depth]]}
                  for s, r in enumerate(g_resolutions(self.resolution))]
        return {"family": self.family, "resolution": self.resolution, "z_dim": self.z_dim,
                "conditional": self.conditional,
                "hier": self.hier, "class_dim": self.class_dim, "cond_dim": self.cond_dim,
                "depth": self.depth, "bn": self.bn_kind, "stages": stages}

    def class_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """(B,) long -> (B, E): the class vector G conditions on (shared embedding or one-hot;
        (B, 0) when unconditional)."""
        if not self.conditional:
            return self.linear.weight.new_zeros((y.shape[0], 0))
        if self.shared is not None:
            return self.shared(y)
        return F.one_hot(y, self.n_classes).to(self.linear.weight.dtype)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None,
                class_vec: Optional[torch.Tensor] = None) -> torch.Tensor:
        if class_vec is None:
            class_vec = (self.class_embedding(y) if self.conditional
                         else z.new_zeros((z.shape[0], 0)))             # (B, E)
        n_ref = 0
        if self.vbn:  # reference batch first: (R + B, ...) from here on
            z, class_vec, n_ref = self._vbn_prepend(z, class_vec)
        if self.hier:
            z = cond = torch.cat([class_vec, z.to(class_vec.dtype)], dim=1)  # (B, E + z_dim)
        else:
            cond = class_vec
        h = self.linear(z).view(z.shape[0], -1, BOTTOM, BOTTOM)          # (B, 16ch, 4, 4)
        for s, attn in enumerate(self.attn):
            for block in self.blocks[s * self.depth:(s + 1) * self.depth]:
                h = block(h, cond)
            h = attn(h)                                                  # (B, C', 2H, 2W)
        h = self.out_conv(F.relu(self.out_bn(h)))                        # (B, 3, R, R)
        return torch.tanh(h[n_ref:])


class Discriminator(nn.Module):
    """D(x (B, 3, R, R), y (B,) long) -> logits (B,) float32, or (logits, features (B, F)) with
    return_features=True; features are the ReLU + sum-pooled output of the last block,
    F = feature_dim = the last stage's width. The interface of biggan.Discriminator (embed, None
    when unconditional; feature_dim, out_dim, mbstd, mbdisc). `blocks` holds depth blocks per stage, in order;
    `attn[s]` follows stage s."""

    family = "biggan_deep"
    resolutions = tuple(D_ARCH)
    Config = BigGANDeepConfig

    def __init__(self, cfg: BigGANDeepConfig = BigGANDeepConfig(), resolution: int = 128,
                 n_classes: int = 1000):
        super().__init__()
        _checked_common(self, cfg, resolution, n_classes)
        self.depth = cfg.depth
        sn = SNSettings(cfg.d_sn, cfg.sn_iters, cfg.sn_eps)
        in_mult, out_mult, downs = D_ARCH[resolution]
        self.mbstd = MinibatchStdDev(cfg.mbstd) if cfg.mbstd else None
        self.stem = SNConv2d(3, in_mult[0] * cfg.d_ch, 3, padding=1, sn=sn)
        self.blocks, self.attn = nn.ModuleList(), nn.ModuleList()
        placed = set()
        for s, (mi, mo, down, res) in enumerate(zip(in_mult, out_mult, downs,
                                                     d_resolutions(resolution))):
            for j in range(cfg.depth):
                in_ch = (mi if j == 0 else mo) * cfg.d_ch
                is_last = s == len(out_mult) - 1 and j == cfg.depth - 1
                in_ch += 1 if self.mbstd is not None and is_last else 0
                self.blocks.append(DeepDBlock(in_ch, mo * cfg.d_ch, downsample=down and j == 0,
                                              sn=sn))
            if res in self.attn_res and res not in placed:  # once, after the first stage at res
                placed.add(res)
                self.attn.append(SelfAttention(mo * cfg.d_ch, sn=sn))
            else:
                self.attn.append(nn.Identity())
        self.feature_dim = out_mult[-1] * cfg.d_ch
        self.mbdisc = (MinibatchDiscrimination(self.feature_dim, cfg.mbdisc, cfg.mbdisc_dim,
                                               sn=sn) if cfg.mbdisc else None)
        self.out_dim = self.feature_dim + cfg.mbdisc  # what linear and the projection read
        self.linear = SNLinear(self.out_dim, 1, sn=sn)
        self.embed = SNEmbedding(n_classes, self.out_dim, sn=sn) if self.conditional else None
        init_weights(self, cfg.init)

    @property
    def arch(self) -> dict:
        stages = [{"resolution": r, "attention": not isinstance(self.attn[s], nn.Identity),
                   "blocks": [{"in": b.in_ch, "out": b.out_ch, "downsample": b.downsample}
                              for b in self.blocks[s * self.depth:(s + 1) * self.depth]]}
                  for s, r in enumerate(d_resolutions(self.resolution))]
        return {"family": self.family, "resolution": self.resolution, "depth": self.depth,
                "conditional": self.conditional, "stem": {"in": 3, "out": self.stem.out_channels},
                "feature_dim": self.feature_dim, "out_dim": self.out_dim,
                "mbstd": self.cfg.mbstd, "mbdisc": self.cfg.mbdisc, "stages": stages}

    def forward(self, x: torch.Tensor, y: torch.Tensor, return_features: bool = False):
        h = self.stem(x)                                          # (B, in0 * d_ch, R, R)
        last = len(self.blocks) - 1
        for s, attn in enumerate(self.attn):
            for i in range(s * self.depth, (s + 1) * self.depth):
                if i == last and self.mbstd is not None:
                    h = self.mbstd(h)                             # (B, C + 1, H, W)
                h = self.blocks[i](h)                             # (B, C', H', W')
            h = attn(h)
        features = torch.sum(F.relu(h), dim=(2, 3))               # (B, F)
        out = self.mbdisc(features) if self.mbdisc is not None else features  # (B, out_dim)
        logits = self.linear(out).squeeze(1)                      # (B,)
        if self.embed is not None:                                # projection term
            logits = logits + (self.embed(y) * out).sum(1)
        logits = logits.float()
        if return_features:
            return logits, features.float()
        return logits


MODELS.register("biggan_deep", (Generator, Discriminator))
