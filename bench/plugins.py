"""Your own nets, loss or optimiser without a fork: `model._target_` / `loss._target_` name a builder in your own
importable package, `train.optimizer` the dotted path of your optimiser class; models.build, objectives.own_loss and
objectives.make_optimizer call here. The protocol: docs/architecture.md, "Your own model without a fork"."""
from __future__ import annotations

import importlib
from collections.abc import Mapping

from torch import nn

from bench.models.checks import ModelConfigError

G_ATTRIBUTES = ("z_dim", "resolution", "n_classes")  # integers every part of gan-bench may read from G


def load_target(key: str, target: str, error=ModelConfigError):
    """The object `target` ("package.module.name") names, for config key `key`; a module that cannot be found or a
    missing name is one `error` line naming the key (a missing import inside your module keeps its traceback)."""
    module, _, name = str(target).rpartition(".")
    if not module:
        raise error(f"{key}={target!r} is not valid; use package.module.name")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError as exc:
        if not (exc.name and (module == exc.name or module.startswith(exc.name + "."))):
            raise  # your module imports something that is missing: its own traceback says what
        raise error(f"{key}={target!r}: no module named {exc.name!r}; put your package on PYTHONPATH or pip install "
                    f"it") from None
    except AttributeError:
        raise error(f"{key}={target!r}: module {module!r} has no {name!r}") from None


def own_optimizer(path: str) -> type:
    """Your torch.optim.Optimizer subclass named by train.optimizer's dotted path (else a ValueError naming it)."""
    import torch

    cls = load_target("train.optimizer", path, ValueError)
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError(f"train.optimizer={path!r} is not a torch.optim.Optimizer subclass")
    return cls


def build_own(cfg: Mapping, resolution: int, n_classes: int) -> tuple[nn.Module, nn.Module]:
    """(G, D) from cfg["_target_"] = "package.module.function", called as function(dict(cfg), resolution,
    n_classes). A builder that cannot be imported, or a result that is not two modules with G's integer
    attributes, is a ModelConfigError naming model._target_."""
    target = str(cfg["_target_"])
    nets = load_target("model._target_", target)(dict(cfg), resolution, n_classes)
    if not (isinstance(nets, tuple) and len(nets) == 2 and all(isinstance(n, nn.Module) for n in nets)):
        raise ModelConfigError(f"model._target_={target!r} returned {type(nets).__name__}; it must return (G, D), "
                               f"two torch.nn.Modules")
    missing = [a for a in G_ATTRIBUTES if not isinstance(getattr(nets[0], a, None), int)]
    if missing:
        raise ModelConfigError(f"model._target_={target!r}: its G needs the integer attribute(s) {', '.join(missing)}")
    return nets


def check_own_nets(G: nn.Module, D: nn.Module, resolution: int, n_classes: int) -> None:
    """One forward of two samples through G and D (bench.config runs it on the meta device: no memory, no
    time): G(z, y) must give (2, 3, R, R) and D(x, y) logits of shape (2,), else a ModelConfigError. A net
    with an op that has no meta kernel is not probed."""
    import torch

    z = torch.randn(2, G.z_dim)
    y = torch.arange(2) % max(1, n_classes)
    try:
        with torch.no_grad():
            x = G(z, y)
            logits = D(x, y) if isinstance(x, torch.Tensor) else None
    except NotImplementedError:
        return
    if not isinstance(x, torch.Tensor) or tuple(x.shape) != (2, 3, resolution, resolution):
        got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ModelConfigError(f"model._target_: G(z, y) gave {got} for 2 samples; it must give (2, 3, {resolution}, "
                               f"{resolution}) images in [-1, 1] (data.resolution={resolution})")
    if not isinstance(logits, torch.Tensor) or tuple(logits.shape) != (2,):
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ModelConfigError(f"model._target_: D(x, y) gave {got} for 2 images; it must give logits of shape (2,), "
                               f"one per image")
