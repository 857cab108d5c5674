"""Class-conditional DCGAN (Radford et al. 2016): a transposed-conv G and a strided-conv D with a projection
term, spectral norm optional (g_sn / d_sn). G and D, one class and the switches: docs/architecture.md,
"Models"."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from bench.registry import MODELS

from .checks import (ModelConfigError, check_arch_switches, check_positive, choices_str,
                     config_from_mapping, g_bn_kind, is_conditional)
from .layers import (INITS, MinibatchDiscrimination, MinibatchStdDev, SNConv2d, SNConvTranspose2d,
                     SNEmbedding, SNLinear, init_weights)
from .norms import VirtualBatchNorm2d, VirtualBatchNormReference, make_bn
from .spectral import SNSettings

RESOLUTIONS = (16, 32, 64, 128)
BOTTOM_SIDE = 4  # G's first and D's last feature map side


@dataclasses.dataclass(frozen=True)
class DCGANConfig:
    """The model.* keys DCGAN reads. model.hier and model.attn do not apply and are ignored."""

    ch: int = 64              # G width at R/2 (doubles towards 4x4)
    d_ch: int = 64            # D width after the first conv (doubles towards 4x4)
    z_dim: int = 100          # latent size
    shared_dim: int = 0       # class-embedding size concatenated to z; 0 = one-hot labels
    g_sn: bool = False        # spectral norm in G
    d_sn: bool = False        # spectral norm in D
    sn_iters: int = 1         # power iterations per training forward
    sn_eps: float = 1e-6      # epsilon of the power-iteration normalisation
    init: str = "N02"         # N02 (DCGAN; BN gains N(1, 0.02)) | ortho | xavier
    bn_eps: float = 1e-5      # BatchNorm epsilon
    # Stability switches (as in biggan.BigGANConfig), all off:
    mbdisc: int = 0           # minibatch-discrimination kernels before D's output; 0 = off
    mbdisc_dim: int = 16      # size of each minibatch-discrimination kernel's projection
    mbstd: int = 0            # minibatch-stddev group size (before D's last conv); 0 = off
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
    def from_mapping(cls, cfg: Mapping) -> "DCGANConfig":
        return config_from_mapping(cls, cfg)


def _n_stages(resolution: int) -> int:
    if resolution not in RESOLUTIONS:
        raise ModelConfigError(f"data.resolution={resolution} has no dcgan architecture; "
                               f"choose one of: {choices_str(RESOLUTIONS)}")
    return resolution.bit_length() - 3  # log2(R / 4)


def _init(net: nn.Module, scheme: str) -> None:
    init_weights(net, scheme)
    if scheme == "N02":  # DCGAN: BatchNorm gains ~ N(1, 0.02), biases 0
        for m in net.modules():
            if (isinstance(m, (nn.BatchNorm2d, VirtualBatchNorm2d)) and m.affine
                    and not m.weight.is_meta):
                nn.init.normal_(m.weight, 1.0, 0.02)
                nn.init.zeros_(m.bias)


class Generator(VirtualBatchNormReference, nn.Module):
    """G(z (B, z_dim), y (B,) long, class_vec (B, E) | None) -> (B, 3, R, R) in [-1, 1].
    `shared` is the class embedding concatenated to z (nn.Embedding, no SN), or None when
    shared_dim = 0 (one-hot class vectors, E = n_classes) or G is unconditional (E = 0; y is
    ignored and may be None). With vbn, every forward also runs
    the reference batch (vbn_z, vbn_y; set_vbn_reference)."""

    family = "dcgan"
    resolutions = RESOLUTIONS
    Config = DCGANConfig

    def __init__(self, cfg: DCGANConfig = DCGANConfig(), resolution: int = 64,
                 n_classes: int = 10):
        super().__init__()
        n_up = _n_stages(resolution)
        check_positive("n_classes", n_classes)
        self.cfg = cfg
        self.resolution = resolution
        self.n_classes = n_classes
        self.conditional = is_conditional(n_classes)
        self.z_dim = cfg.z_dim
        shared = self.conditional and cfg.shared_dim > 0
        self.shared = nn.Embedding(n_classes, cfg.shared_dim) if shared else None
        self.class_dim = (cfg.shared_dim if shared else n_classes) if self.conditional else 0
        sn = SNSettings(cfg.g_sn, cfg.sn_iters, cfg.sn_eps)
        self.bn_kind = g_bn_kind(cfg)
        self.widths = [cfg.ch * 2 ** (n_up - 1 - i) for i in range(n_up)]  # at 4, 8, ..., R/2
        layers: list[nn.Module] = []
        in_ch = cfg.z_dim + self.class_dim
        for i, w in enumerate(self.widths):
            layers += [SNConvTranspose2d(in_ch, w, 4, 1 if i == 0 else 2, 0 if i == 0 else 1,
                                         bias=False, sn=sn),
                       make_bn(self.bn_kind, w, eps=cfg.bn_eps), nn.ReLU()]
            in_ch = w
        # Bias only where no BatchNorm follows.
        layers += [SNConvTranspose2d(in_ch, 3, 4, 2, 1, bias=True, sn=sn), nn.Tanh()]
        self.net = nn.Sequential(*layers)
        _init(self, cfg.init)
        self.init_vbn(cfg.vbn, cfg.vbn_ref, cfg.z_dim, n_classes)

    @property
    def arch(self) -> dict:
        return {"family": self.family, "resolution": self.resolution, "z_dim": self.z_dim,
                "conditional": self.conditional, "class_dim": self.class_dim, "bn": self.bn_kind,
                "widths": {BOTTOM_SIDE * 2 ** i: w for i, w in enumerate(self.widths)}}

    def class_embedding(self, y: torch.Tensor) -> torch.Tensor:
        """(B,) long -> (B, E): the class vector concatenated to z ((B, 0) when unconditional)."""
        if not self.conditional:
            return self.net[0].weight.new_zeros((y.shape[0], 0))
        if self.shared is not None:
            return self.shared(y)
        return F.one_hot(y, self.n_classes).to(self.net[0].weight.dtype)

    def forward(self, z: torch.Tensor, y: Optional[torch.Tensor] = None,
                class_vec: Optional[torch.Tensor] = None) -> torch.Tensor:
        if class_vec is None:
            class_vec = (self.class_embedding(y) if self.conditional
                         else z.new_zeros((z.shape[0], 0)))
        n_ref = 0
        if self.vbn:  # reference batch first: (R + B, ...) from here on
            z, class_vec, n_ref = self._vbn_prepend(z, class_vec)
        h = torch.cat([z, class_vec], dim=1)[:, :, None, None]  # (B, z_dim + E, 1, 1)
        return self.net(h)[n_ref:]                               # (B, 3, R, R)


class Discriminator(nn.Module):
    """D(x (B, 3, R, R), y (B,)) -> logits (B,) float32 [, features (B, feature_dim)];
    feature_dim = 16 * d_ch * 2^(n_down - 1). `embed` is the projection class embedding (None
    when unconditional).
    mbstd: a MinibatchStdDev layer in `net` adds a channel to the input of the last conv.
    mbdisc: `mbdisc` maps features to (B, out_dim = feature_dim + mbdisc), which `linear` and
    the projection read; return_features still gives the flattened features."""

    family = "dcgan"
    resolutions = RESOLUTIONS
    Config = DCGANConfig

    def __init__(self, cfg: DCGANConfig = DCGANConfig(), resolution: int = 64,
                 n_classes: int = 10):
        super().__init__()
        n_down = _n_stages(resolution)
        check_positive("n_classes", n_classes)
        self.cfg = cfg
        self.resolution = resolution
        self.n_classes = n_classes
        self.conditional = is_conditional(n_classes)
        sn = SNSettings(cfg.d_sn, cfg.sn_iters, cfg.sn_eps)
        self.widths = [cfg.d_ch * 2 ** i for i in range(n_down)]  # at R/2, R/4, ..., 4
        layers: list[nn.Module] = []
        in_ch = 3
        for i, w in enumerate(self.widths):
            if cfg.mbstd and i == n_down - 1:
                layers.append(MinibatchStdDev(cfg.mbstd))
                in_ch += 1
            layers.append(SNConv2d(in_ch, w, 4, 2, 1, bias=i == 0, sn=sn))
            if i > 0:
                layers.append(nn.BatchNorm2d(w, eps=cfg.bn_eps))
            layers.append(nn.LeakyReLU(0.2))
            in_ch = w
        self.net = nn.Sequential(*layers)
        self.feature_dim = in_ch * BOTTOM_SIDE ** 2
        self.mbdisc = (MinibatchDiscrimination(self.feature_dim, cfg.mbdisc, cfg.mbdisc_dim,
                                               sn=sn) if cfg.mbdisc else None)
        self.out_dim = self.feature_dim + cfg.mbdisc  # what linear and the projection read
        self.linear = SNLinear(self.out_dim, 1, sn=sn)
        self.embed = SNEmbedding(n_classes, self.out_dim, sn=sn) if self.conditional else None
        _init(self, cfg.init)

    @property
    def arch(self) -> dict:
        return {"family": self.family, "resolution": self.resolution, "conditional": self.conditional,
                "feature_dim": self.feature_dim, "out_dim": self.out_dim,
                "mbstd": self.cfg.mbstd, "mbdisc": self.cfg.mbdisc,
                "widths": {self.resolution // 2 ** (i + 1): w for i, w in enumerate(self.widths)}}

    def forward(self, x: torch.Tensor, y: torch.Tensor, return_features: bool = False):
        features = self.net(x).flatten(1)                              # (B, 16 * C)
        out = self.mbdisc(features) if self.mbdisc is not None else features  # (B, out_dim)
        logits = self.linear(out).squeeze(1)                            # (B,)
        if self.embed is not None:                                      # projection term
            logits = logits + (self.embed(y) * out).sum(1)
        logits = logits.float()
        if return_features:
            return logits, features.float()
        return logits


MODELS.register("dcgan", (Generator, Discriminator))
