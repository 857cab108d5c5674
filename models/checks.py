"""Model settings that cannot be built: `ModelConfigError` and the checks every family's config
runs (a leaf: imports nothing from the project). Messages name the config key and the choices."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping


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


def is_conditional(n_classes: int) -> bool:
    """THE rule for class conditioning, read by every family: one class (an unlabelled data set, whose
    manifest has class_names ["unlabelled"]) builds an unconditional G and D. G then has no class
    embedding and no class input (its batch norms are conditioned on z alone, or plain); D has no
    projection term. With one class the projection term <embed(0), features> would only duplicate
    D's linear output layer."""
    return int(n_classes) > 1


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
