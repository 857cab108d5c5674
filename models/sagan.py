"""SAGAN (Zhang et al. 2019): the residual SN-GAN with self-attention: BigGAN's blocks, arch tables and projection
discriminator without the hierarchical latent, with per-class gains and biases in G's conditional BatchNorms
(docs/architecture.md, "Models")."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import ClassVar

from bench.registry import MODELS

from . import biggan
from .checks import (ModelConfigError, check_arch_switches, check_positive, choices_str,
                     config_from_mapping)
from .layers import INITS


@dataclasses.dataclass(frozen=True)
class SAGANConfig:
    """The model.* keys SAGAN reads (defaults: the paper's 128x128 ImageNet model).
    model.shared_dim and model.hier do not apply to SAGAN and are ignored."""

    ch: int = 64              # G base width (biggan.G_ARCH multipliers)
    d_ch: int = 64            # D base width (biggan.D_ARCH multipliers)
    z_dim: int = 128          # latent size, all of it into the first linear layer
    attn: tuple[int, ...] = (32,)  # resolutions with self-attention in G and D; () = none
    g_sn: bool = True         # spectral norm in G
    d_sn: bool = True         # spectral norm in D
    sn_iters: int = 1         # power iterations per training forward
    sn_eps: float = 1e-6      # epsilon of the power-iteration normalisation
    init: str = "ortho"       # ortho | N02 | xavier
    bn_eps: float = 1e-5      # BatchNorm epsilon
    # Stability switches (as in biggan.BigGANConfig), all off:
    mbdisc: int = 0           # minibatch-discrimination kernels before D's output; 0 = off
    mbdisc_dim: int = 16      # size of each minibatch-discrimination kernel's projection
    mbstd: int = 0            # minibatch-stddev group size (before D's last block); 0 = off
    vbn: bool = False         # virtual batch norm in G (reference batch in G's buffers)
    vbn_ref: int = 32         # reference-batch size for vbn (extra samples per G forward)
    cross_replica_bn: bool = False  # G's BatchNorm statistics over all ranks (no-op on 1 rank)

    # Fixed by the architecture (read by the shared BigGAN-layout modules).
    shared_dim: ClassVar[int] = 0   # no shared embedding: one-hot class vectors
    hier: ClassVar[bool] = False    # no hierarchical latent

    def __post_init__(self):
        for key in ("ch", "d_ch", "z_dim", "sn_iters"):
            check_positive(key, getattr(self, key))
        check_arch_switches(self)
        if self.init not in INITS:
            raise ModelConfigError(f"model.init={self.init!r} is not an init scheme; "
                                   f"choose one of: {choices_str(INITS)}")

    @classmethod
    def from_mapping(cls, cfg: Mapping) -> "SAGANConfig":
        return config_from_mapping(cls, cfg)


RESOLUTIONS = (32, 64, 128)


class Generator(biggan.Generator):
    """G(z (B, z_dim), y (B,) long, class_vec (B, n_classes) | None) -> (B, 3, R, R) in [-1, 1].
    class_embedding(y) is one-hot; `shared` is None."""

    family = "sagan"
    resolutions = RESOLUTIONS
    Config = SAGANConfig
    reference = None  # biggan.Generator's counts are BigGAN's

    def __init__(self, cfg: SAGANConfig = SAGANConfig(), resolution: int = 128,
                 n_classes: int = 1000):
        super().__init__(cfg, resolution, n_classes)


class Discriminator(biggan.Discriminator):
    """D(x (B, 3, R, R), y (B,)) -> logits (B,) [, features (B, feature_dim)]; projection D."""

    family = "sagan"
    resolutions = RESOLUTIONS
    Config = SAGANConfig

    def __init__(self, cfg: SAGANConfig = SAGANConfig(), resolution: int = 128,
                 n_classes: int = 1000):
        super().__init__(cfg, resolution, n_classes)


MODELS.register("sagan", (Generator, Discriminator))
