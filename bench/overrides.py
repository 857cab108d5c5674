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
    try:
        parsed = OverridesParser.create().parse_overrides([override])[0]
    except HydraException as exc:
        raise ConfigError(f"{key}={value!r} is not a sweep Hydra can read ({str(exc).splitlines()[0][:120]})") from None
    return [f"{key}={v}" for v in parsed.sweep_string_iterator()]


def is_sweep_value(value: str) -> bool:
    """Whether an override's value sweeps (a top-level comma, or one of Hydra's sweep functions)."""
    depth = 0
    for ch in value:
        depth += ch in "[({"
        depth -= ch in "])}"
        if ch == "," and depth == 0:
            return True
    return value.startswith(("range(", "choice(", "glob(", "interval("))
