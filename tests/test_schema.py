"""One source per config key (docs/architecture.md, "Configuration"): bench/schema.py declares each key's type,
default, range and comment once; the YAML presets only override; validate() checks and resolve() derives."""
import dataclasses
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench import config as C
from bench import schema

ROOT = Path(__file__).resolve().parent.parent


def _groups():
    return {f.name: f.default_factory for f in dataclasses.fields(schema.Config)}


def test_every_key_is_declared_once_with_a_comment():
    """Each field line of the schema carries its comment; no YAML under configs/ restates a group's defaults file."""
    text = (ROOT / "bench" / "schema.py").read_text().splitlines()
    for group, cls in _groups().items():
        start = next(i for i, line in enumerate(text) if line.startswith(f"class {cls.__name__}"))
        for f in dataclasses.fields(cls):
            name = "async_" if f.name == "async" else f.name
            line = next(line for line in text[start:] if re.match(rf"    {name}: ", line))
            assert "  # " in line and line.split("  # ", 1)[1].strip(), f"{group}.{f.name} has no comment"
    assert not list((ROOT / "configs").glob("*/default.yaml"))  # the defaults live in the schema only


def test_composed_defaults_are_the_schema_defaults():
    """With the presets that only pick a family (model=biggan, loss=hinge, data=shapes), every other key composes to
    the schema's default: nothing else holds a default."""
    cfg = C.compose(["model=biggan"])
    for group in ("train", "reg", "aug", "ema", "eval", "telemetry", "log", "dist", "throughput", "run", "loss",
                  "data", "model"):
        want = OmegaConf.to_container(OmegaConf.structured(_groups()[group]))
        got = OmegaConf.to_container(cfg[group])
        assert got == want, group


def test_a_range_is_declared_beside_its_field_and_checked():
    ranged = {(g, f.name): f.metadata["range"] for g, cls in _groups().items() for f in dataclasses.fields(cls)
              if "range" in f.metadata}
    assert ranged[("train", "steps")] == schema.POSITIVE and ranged[("train", "ckpt_every")] == schema.NON_NEGATIVE
    assert len(ranged) >= 60
    for (group, name), rule in ranged.items():
        bad = 0 if rule == schema.POSITIVE else -1
        if group in ("cluster",) or (group, name) in (("train", "global_batch"),):
            continue  # checked in their own functions (check_cluster; global_batch's divisibility first)
        with pytest.raises(C.ConfigError, match=rf"^{group}\.{name}=-?[0-9.]+ must be {re.escape(rule)}$"):
            C.validate(C.compose([f"{group}.{name}={bad}"]))


def test_typed_gives_a_group_as_its_dataclass():
    """schema.typed: a group as an instance of its schema dataclass, each value of the declared type; keys the schema
    does not declare (a `_target_` loss's own) are left out (the objective keeps the loss node for the loss)."""
    reg = schema.typed(C.compose(["reg.bcr=[10,10]", "reg.r1_every=2"]).reg, schema.RegCfg)
    assert isinstance(reg, schema.RegCfg) and reg.bcr == [10.0, 10.0] and reg.r1_every == 2
    assert all(type(v) is float for v in reg.bcr) and type(reg.r1_gamma) is float
    loss = schema.typed({"_target_": "pkg.losses.make", "name": "mine", "margin": 1.0, "gp_lambda": 5}, schema.LossCfg)
    assert loss.name == "mine" and loss.gp_lambda == 5.0 and type(loss.gp_lambda) is float
    assert not hasattr(loss, "margin") and not hasattr(loss, "_target_")


def test_validate_only_checks_and_resolve_derives(monkeypatch):
    monkeypatch.setattr(C, "resolve_precision", lambda p: "fp32" if p == "auto" else p)
    cfg = C.compose(["train.global_batch=64", "train.accumulate=2", "train.kimg=1", "train.precision=auto"])
    before = OmegaConf.to_container(cfg)
    C.validate(cfg, world_size=4)
    assert OmegaConf.to_container(cfg) == before  # validate changed nothing
    C.resolve(cfg, world_size=4)
    assert cfg.train.batch_size == 8 and cfg.train.steps == 16 and cfg.train.precision == "fp32"  # 1000 / 64 -> 16
    assert cfg.eval.final is True  # auto: the built-in set with the domain extractor
    again = OmegaConf.to_container(cfg)
    assert OmegaConf.to_container(C.resolve(cfg, world_size=4)) == again  # idempotent


def test_group_presets_restate_no_default():
    """A model / loss / data / cluster preset holds only what differs from the schema's defaults (and the key that
    names it): a default lives in bench/schema.py alone."""
    import yaml
    from omegaconf import OmegaConf

    defaults = OmegaConf.to_container(OmegaConf.structured(schema.Config))
    naming = {"model.family", "loss.name", "data.name"}
    # a loss preset may pin what its recipe needs over an earlier (your own global) preset: marked "pinned" there
    pins = {"loss/rpgan.yaml: reg.r1_every=1", "loss/wgan_gp.yaml: train.optimizer=adam"}
    restated = []
    for group in ("model", "loss", "data", "cluster"):
        for path in sorted((C.CONFIG_DIR / group).glob("*.yaml")):
            text = path.read_text()
            tree = yaml.safe_load(text) or {}
            tree = tree if "@package _global_" in text else {group: tree}
            stack = [((), tree)]
            while stack:
                prefix, node = stack.pop()
                for k, v in node.items():
                    if isinstance(v, dict):
                        stack.append((prefix + (k,), v))
                        continue
                    d = defaults
                    for part in prefix + (k,):
                        d = d.get(part, KeyError) if isinstance(d, dict) else KeyError
                    key = ".".join(prefix + (k,))
                    if key not in naming and d is not KeyError and isinstance(d, bool) == isinstance(v, bool) and d == v:
                        restated.append(f"{path.relative_to(C.CONFIG_DIR)}: {key}={v}")
    assert set(restated) == pins, restated
    assert all("# pinned:" in (C.CONFIG_DIR / pin.split(":")[0]).read_text() for pin in pins)
