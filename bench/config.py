"""Composing a config (the schema's defaults, then the YAML presets under configs/, then the command line), checking
it against bench/schema.py (types, ranges, rules across keys: one ConfigError line naming the key), and resolving
what `auto` means here (docs/architecture.md, "Configuration").
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from bench.metrics_registry import BEST_METRICS, EXTRACTORS, TRUNC_MODES
from bench.registry import AUG_OPS, LOSSES, MODELS, OPTIMIZERS
from bench.schema import NON_NEGATIVE, Config, LossCfg, ModelCfg


def _own_configs() -> Path:
    """gan-bench's configs: the package data bench.configs (the repository's configs/ folder, mapped by
    pyproject.toml's package-dir; docs/architecture.md, "Packaging")."""
    root = resources.files("bench.configs")
    if not isinstance(root, Path) or not (root / "config.yaml").is_file():
        raise RuntimeError(f"gan-bench's configs ({root}) are not a folder with config.yaml; reinstall gan-bench")
    return root


CONFIG_DIR = _own_configs()
CONFIG_PATH_ENV = "GAN_BENCH_CONFIG_PATH"  # your own config folders, searched after CONFIG_DIR: DIR1:DIR2

DATASETS = ("shapes", "folder")
PRECISIONS = ("bf16", "fp32", "fp16")
TRAIN_PRECISIONS = ("auto",) + PRECISIONS  # auto: resolved by resolve() (resolve_precision)
EVAL_PRECISIONS = ("auto", "bf16", "fp32")
MEM_RE = r"\s*([0-9.]+)\s*([MGT]?)B?\s*"                      # cluster.mem: 500M, 4G, 1T
TIME_RE = r"(?:\d+|(?:(?:\d+-)?\d+:)?\d+:\d+)"             # cluster.time: minutes, MM:SS, HH:MM:SS, D-HH:MM:SS
LOG_BACKENDS = ("tb", "mlflow", "wandb")  # bench/train/loggers.py's BACKENDS (a test keeps them equal)


COMPILE_MODES = ("false", "default", "max-autotune")  # train.compile


class ConfigError(ValueError):
    """A bad config value. The message is one line that names the key and the valid choices."""



def _one_line(exc: OmegaConfBaseException) -> str:
    msg = str(exc).splitlines()[0]
    key = getattr(exc, "full_key", None)
    return f"config key '{key}': {msg}" if key else msg


# telemetry keys renamed since runs were recorded: a run's config.yaml with the old name still loads (bench eval,
# sample, truncation, eval watch, the collapse suite's replay)
RENAMED_TELEMETRY = {"collapse_class_progress": "collapse_progress", "collapse_class_window": "collapse_progress_window"}


def check_schema(cfg: DictConfig) -> DictConfig:
    """Merge a composed config onto the schema: unknown keys and wrong types become ConfigError."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    telemetry = plain.get("telemetry") or {}
    for was, now in RENAMED_TELEMETRY.items():
        if was in telemetry:
            telemetry.setdefault(now, telemetry.pop(was))
    if "cluster" in plain and isinstance(plain["cluster"].get("time"), int):
        plain["cluster"]["time"] = str(plain["cluster"]["time"])
    for key in ("sigma_clamp", "sigma_target"):
        if isinstance(plain.get("reg", {}).get(key), (int, float)):
            plain["reg"][key] = str(plain["reg"][key])
    policy = plain.get("aug", {}).get("policy", [])
    if policy is None or isinstance(policy, str):  # aug.policy='color,translation' (quoted) or null
        plain["aug"]["policy"] = [p.strip() for p in (policy or "").split(",") if p.strip()]
    backends = plain.get("log", {}).get("backends", [])
    if backends is None or isinstance(backends, str):  # log.backends=tb, 'log.backends=tb,wandb' or null
        plain["log"]["backends"] = [b.strip() for b in (backends or "").split(",") if b.strip()]
    own_keys = {group: _own_keys(plain, group, schema) for group, schema in (("model", ModelCfg), ("loss", LossCfg))}
    try:
        merged = OmegaConf.merge(OmegaConf.structured(Config), plain)
    except OmegaConfBaseException as exc:
        raise ConfigError(_one_line(exc)) from None
    for group, keys in own_keys.items():
        with open_dict(merged[group]):
            merged[group].update(keys)
    return merged


def _own_keys(plain: dict, group: str, schema) -> dict:
    """A model or loss of your own code (`model._target_`, `loss._target_`) may carry keys the schema does not
    know: they are taken out of `plain` here and kept as given, for your builder (docs/architecture.md)."""
    section = plain.get(group) or {}
    if not section.get("_target_"):
        return {}
    known = {f.name for f in dataclasses.fields(schema)}
    return {k: section.pop(k) for k in list(section) if k not in known}


SEARCHPATH = "hydra.searchpath"


def user_search_path(overrides: list[str]) -> list[str]:
    """The config folders a user adds, in Hydra's form and search order: a `hydra.searchpath=[...]`
    override's entries (file://DIR, pkg://package, or a plain DIR), then $GAN_BENCH_CONFIG_PATH's folders
    (os.pathsep-separated). Folders become absolute; a missing one is a ConfigError."""
    entries: list[tuple[str, str]] = []  # (where it came from, entry)
    for o in overrides:
        if o.split("=", 1)[0].lstrip("+~") == SEARCHPATH:
            from hydra.core.override_parser.overrides_parser import OverridesParser
            from hydra.errors import HydraException

            try:
                value = OverridesParser.create().parse_override(o).value()
            except HydraException as exc:
                raise ConfigError(f"{o!r} is not a valid override: {str(exc).splitlines()[0]}") from None
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise ConfigError(f"{SEARCHPATH}={value!r} is not valid; use a list of folders, e.g. "
                                  f"{SEARCHPATH}=[file:///home/me/configs]")
            entries += [(SEARCHPATH, v) for v in value]
    entries += [(CONFIG_PATH_ENV, d) for d in os.environ.get(CONFIG_PATH_ENV, "").split(os.pathsep) if d.strip()]
    out = []
    for source, entry in entries:
        scheme, sep, rest = entry.partition("://")
        if not sep or scheme == "file":
            folder = Path(rest if sep else entry).expanduser().resolve()
            if not folder.is_dir():
                raise ConfigError(f"{source}: {entry!r} is not a folder; it should hold your config groups, "
                                  f"e.g. model/<name>.yaml")
            entry = f"file://{folder}"
        out.append(entry)
    return out


def _search_roots(search_path: list[str]) -> list[tuple[str, Any]]:
    """(entry, folder) for CONFIG_DIR and each file:// / pkg:// entry: where check_group_choices looks."""
    roots: list[tuple[str, Any]] = [("gan-bench", CONFIG_DIR)]
    for entry in search_path:
        scheme, _, rest = entry.partition("://")
        if scheme == "file":
            roots.append((rest, Path(rest)))
        elif scheme == "pkg":
            try:
                roots.append((entry, resources.files(rest.replace("/", "."))))
            except (ImportError, TypeError) as exc:
                raise ConfigError(f"{SEARCHPATH}: {entry!r} names no importable package ({exc})") from None
    return roots


def check_group_choices(overrides: list[str]) -> None:
    """`model=foo` with no model/foo.yaml in gan-bench's configs or the user's folders (user_search_path) ->
    one line listing the valid choices; a user's option that has the name of a built-in one (which Hydra's
    search order would pick instead) -> one line saying so."""
    roots = None
    for o in overrides:
        if "=" not in o:
            raise ConfigError(f"argument {o!r} is not a key=value override; see `bench --help`")
        key, value = o.split("=", 1)
        key = key.lstrip("+~")
        if "." in key or "," in value:
            continue
        roots = roots if roots is not None else _search_roots(user_search_path(overrides))
        groups = [(where, root / key) for where, root in roots if (root / key).is_dir()]
        if not groups:
            continue
        found = [where for where, group in groups if (group / f"{value}.yaml").is_file()]
        if not found:
            lists = [(where, ", ".join(sorted(p.name[:-5] for p in group.iterdir() if p.name.endswith(".yaml"))))
                     for where, group in groups]
            raise ConfigError(f"{key}={value!r} is not available; choose one of: "
                              + "; ".join(names if where == "gan-bench" else f"in {where}: {names}"
                                          for where, names in lists))
        if found[0] == "gan-bench" and len(found) > 1:
            raise ConfigError(f"{key}={value!r}: your {found[1]}/{key}/{value}.yaml has the name of gan-bench's own "
                              f"{key}/{value}.yaml, which Hydra would use instead; rename yours")


DEFAULTS_NODE = "gan_bench_defaults"  # configs/config.yaml lists it first


def register_defaults() -> None:
    """Every key's default (bench/schema.py) as Hydra's config DEFAULTS_NODE, under the presets: plain values, not a
    structured config, so that a preset or the command line may still give a string for a list
    (aug.policy='color,translation') or a model's own keys; check_schema types the composed result."""
    from hydra.core.config_store import ConfigStore

    store = ConfigStore.instance()
    if DEFAULTS_NODE + ".yaml" not in store.list("/"):  # once per process (28 ms each time: every compose calls it)
        store.store(name=DEFAULTS_NODE, node=OmegaConf.to_container(OmegaConf.structured(Config)))


def with_search_path(overrides: list[str]) -> list[str]:
    """The overrides with one `hydra.searchpath=[...]` that holds user_search_path (none when empty):
    what compose and a sweep hand to Hydra, so your folders are searched after gan-bench's configs. Registers
    the schema's defaults (register_defaults), which every composition starts from."""
    register_defaults()
    path = user_search_path(overrides)
    rest = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") != SEARCHPATH]
    quoted = ["'" + p.replace("'", "\\'") + "'" for p in path]  # Hydra's quoting: a path may hold , [ ] or spaces
    return rest + ([f"{SEARCHPATH}=[{','.join(quoted)}]"] if path else [])


def compose(overrides: list[str]) -> DictConfig:
    """Compose gan-bench's configs (and the user's folders: with_search_path) with the overrides and
    check it against the schema (`validate` comes next)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    check_group_choices(overrides)
    overrides = with_search_path(overrides)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = hydra_compose("config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        raise ConfigError(" ".join(lines[:3])) from None
    return check_schema(cfg)


def _choice(key: str, value: Any, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not valid; choose one of: {', '.join(map(str, choices))}")


def _positive(key: str, value, allow_zero: bool = False) -> None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and (
        value >= 0 if allow_zero else value > 0)
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {'>= 0' if allow_zero else '> 0'}")


def check_ranges(cfg, *groups: str) -> None:
    """Every key of these groups whose schema field declares a range (bench.schema.ranged) is in it; an Optional
    key may be null."""
    for group in groups:
        for f in dataclasses.fields(_GROUP_SCHEMAS[group]):
            rule = f.metadata.get("range")
            value = OmegaConf.select(cfg, f"{group}.{f.name}")
            if rule is not None and value is not None:
                _positive(f"{group}.{f.name}", value, allow_zero=rule == NON_NEGATIVE)


_GROUP_SCHEMAS = {f.name: f.default_factory for f in dataclasses.fields(Config)}


@dataclass(frozen=True)
class SigmaSpec:
    """A sigma0 bound: a fixed value, or (relative) the ratio R in R * sg(sigma1)."""
    value: float
    relative: bool


@dataclass(frozen=True)
class RegSpecs:
    """The parsed sigma settings of `reg`: what the trainer keeps (parsed once, in its constructor)."""
    sigma_clamp: Optional[SigmaSpec]
    sigma_target: Optional[SigmaSpec]


def parse_sigma_spec(key: str, value) -> Optional[SigmaSpec]:
    """null/"off" -> None; "2.0" -> SigmaSpec(2.0, False); "ratio:1.5" -> SigmaSpec(1.5, True).
    A bad value is a ConfigError that names `key`."""
    if value is None or str(value).lower() in ("", "null", "none", "off"):
        return None
    s = str(value)
    m = re.fullmatch(r"ratio:([0-9.eE+-]+)", s)
    try:
        number = float(m.group(1) if m else s)
    except ValueError:
        number = math.nan
    if not number > 0:  # also rejects nan
        raise ConfigError(f"{key}={value!r} is not valid; use null (off), a positive number, or ratio:R with R > 0")
    return SigmaSpec(number, relative=m is not None)


def reg_specs(reg_cfg) -> RegSpecs:
    return RegSpecs(sigma_clamp=parse_sigma_spec("reg.sigma_clamp", reg_cfg.sigma_clamp),
                    sigma_target=parse_sigma_spec("reg.sigma_target", reg_cfg.sigma_target))


def per_process_batch(train_cfg, world_size: int) -> int:
    """train.batch_size as resolve will set it (from train.global_batch when given)."""
    if train_cfg.global_batch is not None:
        return train_cfg.global_batch // (world_size * train_cfg.accumulate)
    return train_cfg.batch_size


def effective_batch(train_cfg, world_size: int) -> int:
    """Images per optimiser step over all processes: batch_size x world_size x accumulate."""
    return int(train_cfg.batch_size) * int(world_size) * int(train_cfg.accumulate)


def resolve_precision(precision: str) -> str:
    """`train.precision`: auto -> bf16 on CUDA or a CPU with fast bf16 (bench.device), else fp32; others kept."""
    import torch

    from bench.device import eval_precision  # THE auto rule, shared with eval.precision

    return eval_precision(precision, torch.device("cuda" if _cuda() else "cpu"))


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def prepare(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """validate, then resolve: the config a run starts from (config.yaml records it)."""
    return resolve(validate(cfg, world_size), world_size)


def resolve(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """Derive, in place, what `auto` and friends mean on this machine and world: train.precision=auto, eval.final=auto,
    train.global_batch (into train.batch_size) and train.kimg (into train.steps). Idempotent; run after validate."""
    t = cfg.train
    t.batch_size = per_process_batch(t, world_size)
    if t.kimg is not None:
        t.steps = max(1, math.ceil(t.kimg * 1000 / effective_batch(t, world_size)))
    cfg.eval.final = resolve_final(cfg)
    t.precision = resolve_precision(t.precision)  # the first torch import: checks come first
    return cfg


def validate(cfg: DictConfig, world_size: int = 1) -> DictConfig:
    """Check values a schema cannot express, every group, before anything is written (a bad value is
    one ConfigError line naming the key). Returns `cfg`, unchanged but for one value: an unset data.resolution
    (data=folder) is read from the shards' manifest here, since the architecture check builds the nets at it;
    everything else derived is resolve()'s."""
    check_ranges(cfg, "model", "dist", "throughput", "suite")
    if cfg.model.get("_target_"):
        check_own_model(cfg.model)
    else:
        _choice("model", cfg.model.family, MODELS.names())
    if cfg.loss.get("_target_"):
        check_own_target("loss", cfg.loss._target_, "function (called with the loss config) -> "
                         "bench.train.objectives.Loss", cfg.loss.name, LOSSES.names())
    else:
        _choice("loss", cfg.loss.name, LOSSES.names())
    _choice("data", cfg.data.name, DATASETS)
    check_data(cfg)
    check_train(cfg, world_size)
    check_reg(cfg)
    check_aug(cfg)
    check_loss(cfg)
    validate_eval(cfg)
    check_telemetry(cfg)
    check_log(cfg)
    check_cluster(cfg.cluster)
    _choice("dist.grad_sync", cfg.dist.grad_sync, ("overlap", "flat"))
    _choice("suite.intent", cfg.suite.intent, ("", "collapse", "healthy"))
    every, ckpt = cfg.eval.every, cfg.train.ckpt_every
    if cfg.eval.get("async") and every and (not ckpt or every % ckpt):
        raise ConfigError(f"eval.async=true evaluates checkpoints: eval.every={every} must be a multiple of "
                          f"train.ckpt_every={ckpt} (> 0)")
    _choice("throughput.data", cfg.throughput.data, ("fake", "shards"))
    batch = per_process_batch(cfg.train, world_size)
    if cfg.model.mbstd and batch % min(cfg.model.mbstd, batch):
        raise ConfigError(f"model.mbstd={cfg.model.mbstd} (group size) must divide train.batch_size={batch}")
    if cfg.train.precision == "fp16" and not _cuda():
        raise ConfigError("train.precision=fp16 needs a GPU; use bf16, fp32 or auto on CPU")
    check_architecture(cfg)
    check_own_parts(cfg)
    return cfg


def check_own_parts(cfg: DictConfig) -> None:
    """Your own loss (`loss._target_`) and optimiser (`train.optimizer=package.module.Class`) are imported and
    checked now, before anything runs: one line if they cannot be (bench/plugins.py)."""
    from bench.plugins import own_optimizer
    from bench.train.objectives import own_loss

    try:
        if cfg.loss.get("_target_"):
            own_loss(OmegaConf.to_container(cfg.loss, resolve=True))
        if "." in str(cfg.train.optimizer):
            own_optimizer(str(cfg.train.optimizer))
    except ValueError as exc:
        raise ConfigError(str(exc)) from None


def resolve_final(cfg: DictConfig) -> bool:
    """eval.final=auto: evaluate at the end (the run's quality line) when training on the built-in shapes set with the
    domain extractor, whose classifier is quick to train and whose numbers mean something; not on the user's own
    shards, nor with another extractor (Inception needs its weights file)."""
    final = cfg.eval.final
    if final != "auto":
        return bool(final)
    return cfg.data.name == "shapes" and not cfg.data.shards and cfg.eval.extractor == "domain"


DOTTED = r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)+"  # package.module.name: a target in the user's own importable package


def check_own_target(group: str, target, what: str, name, builtin, name_key: str = "name") -> None:
    """`<group>._target_` is a dotted path, and `<group>.<name_key>` a name of your own, not one of gan-bench's."""
    if not isinstance(target, str) or not re.fullmatch(DOTTED, target):
        raise ConfigError(f"{group}._target_={target!r} is not valid; use the dotted path of your {what}")
    if name in builtin or not re.fullmatch(r"[A-Za-z0-9][\w.-]*", str(name)):
        raise ConfigError(f"{group}.{name_key}={name!r} with {group}._target_={target}: set {group}.{name_key} to a "
                          f"name of your own (letters, digits, _ . -), not one of gan-bench's: {', '.join(builtin)}")


def check_own_model(model) -> None:
    """A model built by your own code: `_target_` is a dotted 'package.module.function' and model.family a
    name of your own (it names the run directory and the records), not a built-in family's."""
    check_own_target("model", model._target_, "builder, package.module.function (called with (model config, "
                     "resolution, n_classes) -> (G, D))", model.family, MODELS.names(), name_key="family")


def check_data(cfg: DictConfig) -> None:
    check_ranges(cfg, "data")
    if cfg.data.resolution is None:
        from bench.data.shards import resolution_from_manifest
        cfg.data.resolution = resolution_from_manifest(cfg.data.shards)
    from bench.data.format import MAX_RESOLUTION, MIN_RESOLUTION

    if not isinstance(cfg.data.resolution, int) or not MIN_RESOLUTION <= cfg.data.resolution <= MAX_RESOLUTION:
        raise ConfigError(f"data.resolution={cfg.data.resolution!r} is out of range; use "
                          f"{MIN_RESOLUTION}..{MAX_RESOLUTION}")
    nw = cfg.data.num_workers
    if nw != "auto" and (not isinstance(nw, int) or isinstance(nw, bool) or nw < 0):
        raise ConfigError(f"data.num_workers={nw!r}: use auto or an integer >= 0")
    _positive("data.num_samples", cfg.data.num_samples, allow_zero=cfg.data.name != "shapes")  # folder: 0 = all
    if not isinstance(cfg.data.get("mirror", False), bool):
        raise ConfigError(f"data.mirror={cfg.data.mirror!r}: use true or false")


def check_train(cfg: DictConfig, world_size: int) -> None:
    check_ranges(cfg, "train", "ema")
    t = cfg.train
    _choice("train.precision", t.precision, TRAIN_PRECISIONS)
    if "." in str(t.optimizer):  # your own torch.optim.Optimizer subclass, by its dotted path
        if not re.fullmatch(DOTTED, str(t.optimizer)):
            raise ConfigError(f"train.optimizer={t.optimizer!r} is not valid; use one of: {', '.join(OPTIMIZERS.names())}, or "
                              f"the dotted path of your torch.optim.Optimizer class (package.module.Class)")
    else:
        _choice("train.optimizer", t.optimizer, OPTIMIZERS.names())
    _choice("train.channels_last", str(t.channels_last).lower(), ("auto", "true", "false"))
    _choice("train.fused_optim", str(t.fused_optim).lower(), ("auto", "true", "false"))
    _choice("train.compile", str(t.compile).lower(), COMPILE_MODES)
    _choice("train.compile_backend", t.compile_backend, ("inductor", "aot_eager", "eager"))
    if str(t.compile).lower() != "false":
        penalties = [f"{k}={v}" for k, v in (("reg.r1_gamma", cfg.reg.r1_gamma), ("reg.r2_gamma", cfg.reg.r2_gamma))
                     if v] + (["loss=wgan_gp"] if cfg.loss.name == "wgan_gp" and not cfg.loss.get("_target_") else [])
        if penalties:
            raise ConfigError(f"train.compile={t.compile} cannot train with {', '.join(penalties)}: a gradient penalty "
                              "needs a double backward, which torch.compile's graphs do not support; set "
                              "train.compile=false")
    for key in ("tf32", "cudnn_benchmark"):
        if not isinstance(t.get(key, False), bool):
            raise ConfigError(f"train.{key}={t[key]!r}: use true or false")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise ConfigError(f"ema.decay={cfg.ema.decay} must be in [0, 1)")
    if len(t.betas) != 2 or not all(0.0 <= b < 1.0 for b in t.betas):
        raise ConfigError(f"train.betas={list(t.betas)} must be two numbers in [0, 1)")
    if t.global_batch is not None:
        per_step = world_size * t.accumulate
        if t.global_batch % per_step:
            raise ConfigError(
                f"train.global_batch={t.global_batch} does not divide into {world_size} processes x "
                f"train.accumulate={t.accumulate}; use a positive multiple of {per_step}")


def check_reg(cfg: DictConfig) -> None:
    check_ranges(cfg, "reg")
    specs = reg_specs(cfg.reg)
    if cfg.reg.sigma_penalty > 0 and specs.sigma_target is None:
        raise ConfigError("reg.sigma_penalty > 0 needs reg.sigma_target: a number or ratio:R")
    for key in ("reg.ortho_nets", "reg.sigma_clamp_nets", "reg.sigma_penalty_nets"):
        for net in OmegaConf.select(cfg, key):
            _choice(key, net, ("G", "D"))
    if not 0.0 <= cfg.reg.lecam_decay < 1.0:
        raise ConfigError(f"reg.lecam_decay={cfg.reg.lecam_decay} must be in [0, 1) (the anchors' EMA decay per D step)")
    _weights("reg.bcr", cfg.reg.bcr, 2, "[lambda_real, lambda_fake], each >= 0 (0 = off)")
    _weights("reg.zcr", cfg.reg.zcr, 3, "[lambda_dis, lambda_gen, sigma], lambdas >= 0 (0 = off), sigma > 0")


def _weights(key: str, value, n: int, allowed: str) -> None:
    """A list-valued switch (reg.bcr, reg.zcr): its length and signs; zcr's last entry (sigma) > 0."""
    v = list(value)
    ok = len(v) == n and all(isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0 for x in v)
    if not ok or (key == "reg.zcr" and not v[2] > 0):
        raise ConfigError(f"{key}={v!r} is not valid; use {allowed}")


def check_aug(cfg: DictConfig) -> None:
    check_ranges(cfg, "aug")
    a = cfg.aug
    for op in a.policy:
        _choice("aug.policy", op, AUG_OPS.names())
    if len(set(a.policy)) != len(a.policy):
        raise ConfigError(f"aug.policy={list(a.policy)} names an op twice; use each of {', '.join(AUG_OPS.names())} once")
    if a.ada_target is not None:
        if not (isinstance(a.ada_target, (int, float)) and 0.0 < a.ada_target < 1.0):
            raise ConfigError(f"aug.ada_target={a.ada_target!r} must be in (0, 1) (the paper's 0.6), or null = off")
        if not a.policy:
            raise ConfigError("aug.ada_target needs the ops it gates: set aug.policy, e.g. "
                              "aug.policy=[color,translation,cutout]")


def check_loss(cfg: DictConfig) -> None:
    check_ranges(cfg, "loss")
    loss = cfg.loss
    if not (isinstance(loss.real_target, (int, float)) and 0.0 < loss.real_target <= 1.0):
        raise ConfigError(f"loss.real_target={loss.real_target!r} must be in (0, 1]; 0.9 = one-sided smoothing")
    if not (isinstance(loss.label_noise, (int, float)) and 0.0 <= loss.label_noise < 0.5):
        raise ConfigError(f"loss.label_noise={loss.label_noise!r} must be in [0, 0.5)")
    if (loss.real_target < 1.0 or loss.label_noise > 0) and loss.name not in ("ns", "minimax"):
        raise ConfigError(f"loss.real_target / loss.label_noise apply to the logistic losses; use loss=ns or "
                          f"loss=minimax (got loss={loss.name})")


MIN_EVAL_SAMPLES = 6  # density / coverage take the 5th of the other real samples (k = 5); precision-recall k+1 = 4


def validate_eval(cfg: DictConfig) -> None:
    """Every eval.* key (also what `bench eval` / `bench truncation` check before loading anything)."""
    check_ranges(cfg, "eval")
    e = cfg.eval
    _choice("eval.extractor", e.extractor, EXTRACTORS)
    _choice("eval.trunc_mode", e.trunc_mode, TRUNC_MODES)
    _choice("eval.best_metric", e.best_metric, BEST_METRICS)
    _choice("eval.precision", e.precision, EVAL_PRECISIONS)
    from bench.eval.protocols import PROTOCOLS, RESIZES  # torch-free

    _choice("eval.protocol", OmegaConf.select(cfg, "eval.protocol", default="domain"), tuple(PROTOCOLS))
    _choice("eval.resize", OmegaConf.select(cfg, "eval.resize", default="fidelity"), RESIZES)
    final = OmegaConf.select(cfg, "eval.final", default=False)
    if not (isinstance(final, bool) or final == "auto"):
        raise ConfigError(f"eval.final={final!r} is not valid; choose one of: auto, true, false")
    for key, value in (("eval.num_samples", e.num_samples), ("eval.num_real", e.num_real or e.num_samples)):
        if not isinstance(value, int) or value < MIN_EVAL_SAMPLES:
            raise ConfigError(f"{key}={value!r} is too small; use at least {MIN_EVAL_SAMPLES} (density and "
                              f"coverage take the 5th nearest of the other real samples, k = 5)")
    repeats = OmegaConf.select(cfg, "eval.repeats", default=1)
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ConfigError(f"eval.repeats={repeats!r}: use an integer >= 1 (independent sample sets per evaluation, "
                          f"seeds eval.seed .. eval.seed + repeats - 1)")
    for psi in e.psi_sweep:
        if psi is not None and (not isinstance(psi, (int, float)) or isinstance(psi, bool) or not psi > 0):
            raise ConfigError(f"eval.psi_sweep={list(e.psi_sweep)}: use positive numbers (null = no truncation)")
    from bench.eval.intra_check import config_problem  # eval.intra_fid's rules (torch-free)

    intra_problem = config_problem(cfg)
    if intra_problem:
        raise ConfigError(intra_problem)


def check_telemetry(cfg: DictConfig) -> None:
    check_ranges(cfg, "telemetry")
    for key in ("telemetry.collapse_sigma_factor", "telemetry.collapse_fid_factor"):
        value = OmegaConf.select(cfg, key)
        if not (isinstance(value, (int, float)) and value > 1.0):
            raise ConfigError(f"{key}={value!r} must be > 1 (a factor over the minimum / best so far)")
    if OmegaConf.select(cfg, "telemetry.diversity_samples") < 2:
        raise ConfigError(f"telemetry.diversity_samples={OmegaConf.select(cfg, 'telemetry.diversity_samples')!r} must "
                          f"be >= 2 (pairwise distances need two samples per class)")
    for key in ("telemetry.collapse_diversity_factor", "telemetry.collapse_recall_factor",
                "telemetry.collapse_progress"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value < 1.0):
            raise ConfigError(f"{key}={value!r} must be in [0, 1) (a fraction of the best so far; 0 = off)")
    value = OmegaConf.select(cfg, "telemetry.collapse_dwins_level")
    if isinstance(value, bool) or not (isinstance(value, (int, float)) and 0.0 <= value < 0.5):
        raise ConfigError(f"telemetry.collapse_dwins_level={value!r} must be in [0, 0.5) (a share of fakes D calls "
                          f"real; 0 = off)")
    for key in ("telemetry.collapse_class_factor", "telemetry.collapse_class_sep", "telemetry.collapse_recover_scale",
                "telemetry.collapse_logit_scale"):
        value = OmegaConf.select(cfg, key)
        if isinstance(value, bool) or not (isinstance(value, (int, float)) and value >= 0.0):
            raise ConfigError(f"{key}={value!r} must be a number >= 0 (0 = off)")


def check_log(cfg: DictConfig) -> None:
    """log.backends: known names, each once (whether each one's package is installed is checked by the trainer:
    bench.train.loggers.check_backends)."""
    backends = list(OmegaConf.select(cfg, "log.backends", default=None) or [])
    for name in backends:
        if name not in LOG_BACKENDS:
            raise ConfigError(f"log.backends={backends}: {name!r} is not a logging backend; choose any of "
                              f"{', '.join(LOG_BACKENDS)} (or [] for none)")
    if len(set(backends)) != len(backends):
        raise ConfigError(f"log.backends={backends} names a backend twice; list each of {', '.join(LOG_BACKENDS)} "
                          f"once")


def check_cluster(cluster) -> None:
    """The cluster profile's sizes and formats (bench.launch translates them; docs/architecture.md)."""
    c = OmegaConf.create({"cluster": OmegaConf.to_container(cluster, resolve=True)})
    m = re.fullmatch(MEM_RE, str(cluster.mem), re.I)
    if not m or m.group(1).count(".") > 1 or not float(m.group(1).strip(".") or 0) > 0:
        raise ConfigError(f"cluster.mem={cluster.mem!r} is not a memory size; use e.g. 500M, 4G, 1T")
    t = str(cluster.time).strip()
    if not re.fullmatch(TIME_RE, t) or not any(ch not in "0:-" for ch in t):
        raise ConfigError(f"cluster.time={cluster.time!r} is not a time limit; use minutes (60 > 0) or HH:MM:SS "
                          f"or D-HH:MM:SS")
    check_ranges(c, "cluster")


def check_architecture(cfg: DictConfig) -> None:
    """Build G and D on the meta device (no memory, well under a second): a resolution or attention
    setting with no architecture fails here, before any data is written."""
    import torch

    from bench import models

    with torch.device("meta"):
        G, D = models.build(OmegaConf.to_container(cfg.model, resolve=True), cfg.data.resolution,
                            cfg.model.n_classes or 10)
        if cfg.model.get("_target_"):  # your own nets: their output shapes (bench/plugins.py)
            from bench.plugins import check_own_nets

            check_own_nets(G, D, cfg.data.resolution, cfg.model.n_classes or 10)


def override_hash(overrides: list[str]) -> str:
    """Identity of a run: a short hash of its sorted override delta (run.* and log.* keys excluded: where a run's
    records are mirrored does not change the run)."""
    delta = sorted(o for o in overrides if not o.lstrip("+~").startswith(("run.", "hydra", "log.", "log=")))
    return hashlib.sha1(json.dumps(delta).encode()).hexdigest()[:8]


def readable_name(cfg: DictConfig) -> str:
    if cfg.run.name:
        return cfg.run.name
    return f"{cfg.model.family}-{cfg.data.name}{cfg.data.resolution}-{cfg.loss.name}-b{cfg.train.batch_size}"


def run_dir_for(cfg: DictConfig, overrides: list[str]) -> Path:
    if cfg.run.dir:
        return Path(cfg.run.dir)
    return Path(cfg.run.root) / f"{readable_name(cfg)}-{override_hash(overrides)}"
