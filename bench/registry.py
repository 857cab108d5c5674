"""The named parts a config key chooses (model families, losses, optimisers, augmentation ops), each registered
where it is defined; the config's choice lists are these names (docs/architecture.md, "Registries")."""
from __future__ import annotations

import importlib
from typing import Any, Callable, Iterator


class Registry:
    """name -> part, for the config key `key`. `register(name)` decorates a function or class (or
    `register(name, part)` adds a value); `homes` are the modules that register the built-in parts, imported
    on the first lookup, so that importing this module (and bench.config) stays light."""

    def __init__(self, key: str, homes: tuple[str, ...]):
        self.key, self.homes = key, homes
        self._parts: dict[str, Any] = {}
        self._loaded = False

    def register(self, name: str, part: Any = None) -> Any:
        if part is not None:
            self._add(name, part)
            return part

        def decorate(obj: Callable) -> Callable:
            self._add(name, obj)
            return obj

        return decorate

    def _add(self, name: str, part: Any) -> None:
        if name in self._parts and self._parts[name] is not part:
            raise ValueError(f"{self.key}={name!r} is registered twice")
        self._parts[name] = part

    def _load(self) -> dict[str, Any]:
        if not self._loaded:
            self._loaded = True  # before the imports: a home module looks itself up while it registers
            try:
                for module in self.homes:
                    importlib.import_module(module)
            except BaseException:
                self._loaded = False  # a failed import is not a complete registry: the next lookup tries again
                raise
        return self._parts

    def names(self) -> tuple[str, ...]:
        return tuple(self._load())

    def __getitem__(self, name: str) -> Any:
        return self._load()[name]

    def __contains__(self, name: object) -> bool:
        return name in self._load()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._load())

    def items(self):
        return self._load().items()

    def get(self, name: str, default: Any = None) -> Any:
        return self._load().get(name, default)


MODELS = Registry("model.family", ("bench.models",))  # family -> (Generator class, Discriminator class)
LOSSES = Registry("loss.name", ("bench.train.objectives",))  # name -> objectives.Loss
OPTIMIZERS = Registry("train.optimizer", ("bench.train.objectives",))  # name -> torch.optim.Optimizer class
AUG_OPS = Registry("aug.policy", ("bench.train.augment",))  # op -> function(DiffAugment, x, p) -> x
