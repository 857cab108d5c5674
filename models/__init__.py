"""gan-bench model families: architectures only (no training logic). The registry, `build`, `param_count`,
`reference_params`; the interface every Generator and Discriminator has: docs/architecture.md, "Models"."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

from torch import nn

from bench.registry import MODELS

from . import biggan, biggan_deep, dcgan, sagan  # each registers its family in MODELS
from .checks import ModelConfigError
from .norms import convert_sync_bn
from .spectral import reg_modules, sigma_stats, spectral_modules, weight_modules
from .svd import weight_matrix

__all__ = ["MODELS", "build", "ModelConfigError", "convert_sync_bn", "param_count",
           "reference_params", "reg_modules", "sigma_stats", "spectral_modules", "weight_matrix",
           "weight_modules"]



def build(cfg: Mapping, resolution: int, n_classes: int) -> tuple[nn.Module, nn.Module]:
    """(G, D) for the model config `cfg` (the model.* mapping; keys a family does not use are
    ignored) at `resolution` pixels with `n_classes` classes. n_classes == 1 (an unlabelled set)
    builds unconditional nets (checks.is_conditional, the one rule: no class embedding in G, no
    projection term in D). Raises ModelConfigError."""
    if cfg.get("_target_"):  # your own nets (bench/plugins.py; docs/architecture.md, "Your own model without a fork")
        from bench.plugins import build_own
        return build_own(cfg, resolution, n_classes)
    family = cfg.get("family")
    if family not in MODELS:
        raise ModelConfigError(f"model.family={family!r} is not a model family; "
                               f"choose one of: {', '.join(sorted(MODELS))}")
    G_cls, D_cls = MODELS[family]
    config = G_cls.Config.from_mapping(cfg)
    return G_cls(config, resolution, n_classes), D_cls(config, resolution, n_classes)


def param_count(m: nn.Module) -> int:
    """Trainable parameters of `m` (buffers excluded)."""
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def reference_params(family: str, resolution: int) -> Optional[dict]:
    """A reference implementation's parameter counts for `family` at `resolution`, or None when
    the family's Generator declares none (its class attribute `reference`: {"source",
    "settings", "params": {resolution: {"G", "D"[, "source", "note"]}}}; an entry's own source
    replaces the family's). Returns {"G": int, "D": int, "source": str, "settings": {model key:
    value, ..., "n_classes": int}[, "note": str]}: the counts hold for those settings only;
    compare them with param_count of G and D built with the same ones."""
    G_cls = MODELS.get(family, (None, None))[0]
    ref = getattr(G_cls, "reference", None)
    if not ref or resolution not in ref["params"]:
        return None
    return {"source": ref["source"], **ref["params"][resolution], "settings": dict(ref["settings"])}
