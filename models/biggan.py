"""BigGAN (Brock et al. 2019), in the layout of BigGAN-PyTorch: a hierarchical latent and a shared class
embedding feeding conditional BatchNorms, residual blocks with self-attention, a projection discriminator.
G and D, one class, the stability switches and the parameter counts: docs/architecture.md, "Models"."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.registry import MODELS

from .checks import (ModelConfigError, check_arch_switches, check_attn, check_positive, choices_str,
                     config_from_mapping, g_bn_kind, is_conditional)
from .layers import (INITS, DBlock, GBlock, MinibatchDiscrimination, MinibatchStdDev,
                     SelfAttention, SNConv2d, SNEmbedding, SNLinear, init_weights)
from .norms import VirtualBatchNormReference, make_bn
from .spectral import SNSettings

# Architecture tables: channel multipliers of ch (G) / d_ch (D) per block.
# G starts from a 4x4 map and doubles the resolution in every block.
G_ARCH: dict[int, tuple[tuple[int, ...], tuple[int, ...]]] = {
    #     in multipliers           out multipliers
    32: ((4, 4, 4), (4, 4, 4)),
    64: ((16, 16, 8, 4), (16, 8, 4, 2)),
    128: ((16, 16, 8, 4, 2), (16, 8, 4, 2, 1)),
    256: ((16, 16, 8, 8, 4, 2), (16, 8, 8, 4, 2, 1)),
    512: ((16, 16, 8, 8, 4, 2, 1), (16, 8, 8, 4, 2, 1, 1)),     # BigGAN-PyTorch's G_arch[512]
}
# D: (out multipliers, downsample flags); the input of block 0 is the RGB image.
D_ARCH: dict[int, tuple[tuple[int, ...], tuple[bool, ...]]] = {
    32: ((4, 4, 4, 4), (True, True, False, False)),             # 32 -> 16 -> 8 -> 8 -> 8
    64: ((1, 2, 4, 8, 16), (True, True, True, True, False)),    # 64 -> 32 ... 4 -> 4
    128: ((1, 2, 4, 8, 16, 16), (True,) * 5 + (False,)),        # 128 -> 64 ... 4 -> 4
    256: ((1, 2, 4, 8, 8, 16, 16), (True,) * 6 + (False,)),     # 256 -> 128 ... 4 -> 4
    # 512: BigGAN-PyTorch's D_arch stops at 256; its pattern extended by one ch-wide block at
    # 512 -> 256, as G_ARCH[512] adds one at its end (StudioGAN's big_resnet 512 table is this).
    512: ((1, 1, 2, 4, 8, 8, 16, 16), (True,) * 7 + (False,)),  # 512 -> 256 ... 4 -> 4
}
BOTTOM = 4  # side of G's first feature map

# Parameter counts (nn.Parameters only) of BigGAN-PyTorch's BigGAN.py (github.com/ajbrock/BigGAN-PyTorch,
# 98459431; Generator / Discriminator) built with G_ch = D_ch = 96, dim_z 128 (8 chunks of 16, as the
# TF-Hub BigGAN 512 module), shared_dim 128, hier, G_shared, G_attn = D_attn = 64, n_classes 1000.
# Built the same way at 128 (dim_z 120) and 256 (dim_z 140) it counts 70,433,988 / 87,982,370 and
# 82,235,844 / 99,225,890, equal to ours (tests/test_res512.py).
REFERENCE = {
    "source": "BigGAN-PyTorch BigGAN.py (G_ch = D_ch = 96, shared_dim 128, hier, attention at 64)",
    "settings": {"ch": 96, "d_ch": 96, "z_dim": 128, "shared_dim": 128, "hier": True, "attn": (64,),
                 "n_classes": 1000},
    "params": {
        512: {"G": 82_296_804, "D": 99_401_282,
              "note": "D: BigGAN-PyTorch's D_arch has no 512 entry; this is its Discriminator built with our "
                      "D_ARCH[512], so it checks our blocks, not the table"},
    },
}


@dataclasses.dataclass(frozen=True)
class BigGANConfig:
    """The model.* keys BigGAN reads (defaults: the paper's 128x128 ImageNet model)."""

    ch: int = 96              # G base width; block widths are multiples of it (G_ARCH)
    d_ch: int = 96            # D base width (D_ARCH)
    z_dim: int = 120          # latent size; split into num_blocks + 1 chunks when hier
    shared_dim: int = 128     # shared class-embedding size; 0 = none: CBNs read one-hot labels
    hier: bool = True         # hierarchical latent (z chunks feed the blocks' CBNs)
    attn: tuple[int, ...] = (64,)  # resolutions with self-attention in G and D; () = none
    g_sn: bool = True         # spectral norm in G
    d_sn: bool = True         # spectral norm in D
    sn_iters: int = 1         # power iterations per training forward
    sn_eps: float = 1e-6      # epsilon of the power-iteration normalisation
    init: str = "ortho"       # ortho | N02 | xavier
    bn_eps: float = 1e-5      # BatchNorm epsilon
    # Stability switches (Salimans et al. 2016; Karras et al. 2018; Brock et al. 2019), all off:
    mbdisc: int = 0           # minibatch-discrimination kernels before D's output; 0 = off
    mbdisc_dim: int = 16      # size of each minibatch-discrimination kernel's projection
    mbstd: int = 0            # minibatch-stddev group size (channel added before D's last
                              # block); 0 = off; must divide the batch D sees
    vbn: bool = False         # virtual batch norm in G (reference batch in G's buffers)
    vbn_ref: int = 32         # reference-batch size for vbn (extra samples per G forward)
    cross_replica_bn: bool = False  # G's BatchNorm statistics over all ranks (no-op on 1 rank)

    def __post_init__(self):
        for key in ("ch", "d_ch", "z_dim", "sn_iters"):
            check_positive(key, getattr(self, key))
        check_positive("shared_dim", self.shared_dim, minimum=0)
        check_arch_switches(self)
        if self.init not in INITS:
            raise ModelConfigError(f"model.init={self.init!r} is not an init scheme; "
                                   f"choose one of: {choices_str(INITS)}")

    @classmethod
    def from_mapping(cls, cfg: Mapping) -> "BigGANConfig":
        return config_from_mapping(cls, cfg)


def _check_resolution(family: str, resolution: int, supported) -> None:
    if resolution not in supported:
        raise ModelConfigError(f"data.resolution={resolution} has no {family} architecture; "
                               f"choose one of: {choices_str(sorted(supported))}")


def g_resolutions(resolution: int) -> list[int]:
    """Output resolution of each G block."""
    return [BOTTOM * 2 ** (i + 1) for i in range(len(G_ARCH[resolution][0]))]


def d_resolutions(resolution: int) -> list[int]:
    """Output resolution of each D block."""
    out, r = [], resolution
    for down in D_ARCH[resolution][1]:
        r = r // 2 if down else r
        out.append(r)
    return out


def attn_choices(resolution: int) -> list[int]:
    """Resolutions where both G and D have a block output (valid model.attn entries)."""
    return sorted(set(g_resolutions(resolution)) & set(d_resolutions(resolution)))


class Generator(VirtualBatchNormReference, nn.Module):
    """G(z (B, z_dim), y (B,) long, class_vec (B, E) | None) -> images (B, 3, R, R) in [-1, 1].

    class_vec, when given, replaces class_embedding(y) (y is then ignored): interpolate class
    vectors from `class_embedding` to move between classes.
    `shared` is the shared class embedding (nn.Embedding, no SN), or None when shared_dim = 0
    (then class vectors are one-hot, E = n_classes) or when G is unconditional (one class:
    E = 0, y is ignored and may be None). Exclude it from orthogonal regularisation.
    With vbn, every forward also runs the reference batch (vbn_z, vbn_y; set_vbn_reference).
    """

    family = "biggan"
    resolutions = tuple(G_ARCH)
    Config = BigGANConfig
    reference = REFERENCE  # read by models.reference_params

    def __init__(self, cfg: BigGANConfig = BigGANConfig(), resolution: int = 128,
                 n_classes: int = 1000):
        super().__init__()
        _check_resolution(self.family, resolution, self.resolutions)
        self.attn_res = check_attn(cfg.attn, self.family, resolution, attn_choices(resolution))
        check_positive("n_classes", n_classes)
        self.cfg = cfg
        self.resolution = resolution
        self.n_classes = n_classes
        self.conditional = is_conditional(n_classes)
        self.z_dim = cfg.z_dim
        self.hier = cfg.hier
        ch = cfg.ch
        in_mult, out_mult = G_ARCH[resolution]
        n_blocks = len(in_mult)
        sn = SNSettings(cfg.g_sn, cfg.sn_iters, cfg.sn_eps)

        # Hierarchical latent: num_blocks + 1 chunks of z_dim // (num_blocks + 1); the first
        # chunk also takes the remainder, so any z_dim >= num_blocks + 1 works (120 at 128: 6x20).
        if cfg.hier:
            chunk = cfg.z_dim // (n_blocks + 1)
            if chunk < 1:
                raise ModelConfigError(
                    f"model.z_dim={cfg.z_dim} is too small for model.hier=true at resolution "
                    f"{resolution}: it is split into {n_blocks + 1} chunks; use z_dim >= "
                    f"{n_blocks + 1} or hier=false")
            self.z_chunks = [cfg.z_dim - chunk * n_blocks] + [chunk] * n_blocks
        else:
            chunk = 0
            self.z_chunks = [cfg.z_dim]

        # Class vector: the shared embedding, or one-hot labels when shared_dim = 0; none (E = 0)
        # when unconditional.
        shared = self.conditional and cfg.shared_dim > 0
        self.shared = nn.Embedding(n_classes, cfg.shared_dim) if shared else None
        self.class_dim = (cfg.shared_dim if shared else n_classes) if self.conditional else 0
        cond_dim = self.class_dim + chunk  # 0: unconditional without hier -> plain BatchNorms
        # Projections of a learned embedding (or of z alone) are SN layers; per-class gains read
        # from one-hot labels are plain per-class embeddings, as in BigGAN-PyTorch / SAGAN.
        cond_sn = SNSettings(cfg.g_sn and (shared or not self.conditional), cfg.sn_iters, cfg.sn_eps)
        self.bn_kind = g_bn_kind(cfg)

        self.linear = SNLinear(self.z_chunks[0], in_mult[0] * ch * BOTTOM ** 2, sn=sn)
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleList()
        for i, (mi, mo) in enumerate(zip(in_mult, out_mult)):
            self.blocks.append(GBlock(mi * ch, mo * ch, cond_dim, upsample=True,
                                      bn_eps=cfg.bn_eps, cond_sn=cond_sn, bn=self.bn_kind,
                                      sn=sn))
            res = BOTTOM * 2 ** (i + 1)
            self.attn.append(SelfAttention(mo * ch, sn=sn) if res in self.attn_res
                             else nn.Identity())
        self.out_bn = make_bn(self.bn_kind, out_mult[-1] * ch, eps=cfg.bn_eps)
        self.out_conv = SNConv2d(out_mult[-1] * ch, 3, 3, padding=1, sn=sn)
        init_weights(self, cfg.init)
        self.init_vbn(cfg.vbn, cfg.vbn_ref, cfg.z_dim, n_classes)

    @property
    def arch(self) -> dict:
        """The resolved architecture (JSON-serialisable), e.g. for `bench inspect`."""
        in_mult, out_mult = G_ARCH[self.resolution]
        return {
            "family": self.family, "resolution": self.resolution, "z_dim": self.z_dim,
            "conditional": self.conditional,
            "z_chunks": list(self.z_chunks), "class_dim": self.class_dim, "bn": self.bn_kind,
            "blocks": [{"in": a * self.cfg.ch, "out": b * self.cfg.ch, "resolution": r,
                        "attention": r in self.attn_res}
                       for a, b, r in zip(in_mult, out_mult, g_resolutions(self.resolution))],
        }

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
            zs = torch.split(z, self.z_chunks, dim=1)
            conds = [torch.cat([class_vec, zi], dim=1) for zi in zs[1:]]  # (B, E + chunk) each
            z = zs[0]
        else:
            conds = [class_vec] * len(self.blocks)
        h = self.linear(z).view(z.shape[0], -1, BOTTOM, BOTTOM)          # (B, 16ch, 4, 4)
        for block, attn, c in zip(self.blocks, self.attn, conds):
            h = attn(block(h, c))                                        # (B, C', 2H, 2W)
        h = self.out_conv(F.relu(self.out_bn(h)))                        # (B, 3, R, R)
        return torch.tanh(h[n_ref:])


class Discriminator(nn.Module):
    """D(x (B, 3, R, R), y (B,) long) -> logits (B,) float32, or (logits, features (B, F)) with
    return_features=True; features are the ReLU + sum-pooled output of the last block,
    F = feature_dim = last block width (16 * d_ch for 64-256, 4 * d_ch for 32).
    `embed` is the SN class embedding of the projection term; None when D is unconditional
    (one class: logit = linear(features) alone).
    mbstd: `mbstd` (MinibatchStdDev) adds a channel to the input of the last block.
    mbdisc: `mbdisc` (MinibatchDiscrimination) maps features to [features, o] (B, out_dim =
    F + mbdisc); `linear` and `embed` read that, return_features still gives the pooled F."""

    family = "biggan"
    resolutions = tuple(D_ARCH)
    Config = BigGANConfig

    def __init__(self, cfg: BigGANConfig = BigGANConfig(), resolution: int = 128,
                 n_classes: int = 1000):
        super().__init__()
        _check_resolution(self.family, resolution, self.resolutions)
        self.attn_res = check_attn(cfg.attn, self.family, resolution, attn_choices(resolution))
        check_positive("n_classes", n_classes)
        self.cfg = cfg
        self.resolution = resolution
        self.n_classes = n_classes
        self.conditional = is_conditional(n_classes)
        sn = SNSettings(cfg.d_sn, cfg.sn_iters, cfg.sn_eps)
        out_mult, downs = D_ARCH[resolution]
        widths = [3] + [m * cfg.d_ch for m in out_mult]
        n_blocks = len(out_mult)
        # Minibatch stddev: one more input channel for the last block.
        self.mbstd = MinibatchStdDev(cfg.mbstd) if cfg.mbstd else None
        self.blocks = nn.ModuleList()
        self.attn = nn.ModuleList()
        placed = set()
        for i, (down, res) in enumerate(zip(downs, d_resolutions(resolution))):
            in_ch = widths[i] + (1 if self.mbstd is not None and i == n_blocks - 1 else 0)
            self.blocks.append(DBlock(in_ch, widths[i + 1], downsample=down,
                                      preactivation=i > 0, wide=True, sn=sn))
            if res in self.attn_res and res not in placed:  # once, after the first block at res
                placed.add(res)
                self.attn.append(SelfAttention(widths[i + 1], sn=sn))
            else:
                self.attn.append(nn.Identity())
        self.feature_dim = widths[-1]
        self.mbdisc = (MinibatchDiscrimination(self.feature_dim, cfg.mbdisc, cfg.mbdisc_dim,
                                               sn=sn) if cfg.mbdisc else None)
        self.out_dim = self.feature_dim + cfg.mbdisc  # what linear and the projection read
        self.linear = SNLinear(self.out_dim, 1, sn=sn)
        self.embed = SNEmbedding(n_classes, self.out_dim, sn=sn) if self.conditional else None
        init_weights(self, cfg.init)

    @property
    def arch(self) -> dict:
        out_mult, downs = D_ARCH[self.resolution]
        widths = [3] + [m * self.cfg.d_ch for m in out_mult]
        return {
            "family": self.family, "resolution": self.resolution, "conditional": self.conditional,
            "feature_dim": self.feature_dim, "out_dim": self.out_dim,
            "mbstd": self.cfg.mbstd, "mbdisc": self.cfg.mbdisc,
            "blocks": [{"in": widths[i], "out": widths[i + 1], "resolution": r,
                        "downsample": d, "attention": not isinstance(self.attn[i], nn.Identity)}
                       for i, (d, r) in enumerate(zip(downs, d_resolutions(self.resolution)))],
        }

    def forward(self, x: torch.Tensor, y: torch.Tensor, return_features: bool = False):
        h = x
        last = len(self.blocks) - 1
        for i, (block, attn) in enumerate(zip(self.blocks, self.attn)):
            if i == last and self.mbstd is not None:
                h = self.mbstd(h)                                 # (B, C' + 1, H', W')
            h = attn(block(h))                                    # (B, C', H', W')
        features = torch.sum(F.relu(h), dim=(2, 3))               # (B, F)
        out = self.mbdisc(features) if self.mbdisc is not None else features  # (B, out_dim)
        logits = self.linear(out).squeeze(1)                      # (B,)
        if self.embed is not None:                                # projection term
            logits = logits + (self.embed(y) * out).sum(1)
        logits = logits.float()
        if return_features:
            return logits, features.float()
        return logits


MODELS.register("biggan", (Generator, Discriminator))
