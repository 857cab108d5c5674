"""Reading command-line overrides the way Hydra does: whether a value sweeps, and the values a sweep
stands for (a,b,c / range(...) / choice(...)). `bench train -m` and `bench throughput -m` share these.
"""
from __future__ import annotations

from bench.config import ConfigError


def sweep_values(override: str) -> list[str]:
    """The values `key=<sweep>` stands for, read by Hydra's own override parser (a, b, c / range(...) /
    choice(...)), each as the override string; one element for a plain override."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    key, _, value = override.partition("=")
    if not is_sweep_value(value):
        return [override]
    if value.startswith("glob("):
        raise ConfigError(f"{key}={value}: glob() sweeps are expanded by Hydra when `bench train -m` launches; "
                          "list the values here (a,b,c)")
    try:
        parsed = OverridesParser.create().parse_overrides([override])[0]
    except HydraException as exc:
        raise ConfigError(f"{key}={value!r} is not a sweep Hydra can read ({str(exc).splitlines()[0][:120]})") from None
    return [f"{key}={v}" for v in parsed.sweep_string_iterator()]


def is_sweep_value(value: str) -> bool:
    """Whether an override's value sweeps (a comma outside brackets and quotes, or one of Hydra's sweep
    functions): `a=1,2` sweeps, `a='x,y'` and `a=[1,2]` do not."""
    depth, quote = 0, None
    for ch in value:
        if quote:
            quote = None if ch == quote else quote
            continue
        if ch in "'\"":
            quote = ch
            continue
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            return True
    return value.startswith(("range(", "choice(", "glob(", "interval("))


def grid(args: list[str], experiment_params: dict) -> list[list[str]]:
    """A sweep's swept keys, each as its list of single overrides: an experiment's hydra.sweeper.params,
    where the command line's sweeps replace them and its fixed values remove them, as in Hydra."""
    swept = {k: f"{k}={v}" for k, v in experiment_params.items()
             if is_sweep_value(str(v)) and not str(v).startswith("glob(")}
    for a in args:
        k, _, v = a.partition("=")
        if k.startswith("hydra"):
            continue
        if is_sweep_value(v) and not v.startswith("glob("):  # glob(): Hydra expands it at launch
            swept[k] = a
        else:
            swept.pop(k, None)
    return [sweep_values(o) for o in swept.values()]


def check_grid(fixed: list[str], axes: list[list[str]]) -> None:
    """Validate every swept value (each with the fixed overrides) before any job is submitted: a bad
    value is one line here, not a failed job later. Values are checked one at a time, not every
    combination (a grid of 96 cells has 16 values); a clash between two swept values still fails its
    own jobs only."""
    from bench.config import check_schema, compose, validate

    for override in (o for axis in axes for o in axis):
        cfg = check_schema(compose(fixed + [override]))
        try:
            validate(cfg, world_size=int(cfg.cluster.nodes) * int(cfg.cluster.tasks_per_node))
        except ConfigError as exc:
            raise ConfigError(f"{exc} (a value of the sweep: {override})") from None
