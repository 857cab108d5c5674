"""THE argument grammar of every `bench` command: `parse_kv` and a table {key: Arg} beside the code the values
are for; values read as Hydra reads an override value; every bad argument ONE UsageError line (exit 2).
Torch-free, and Hydra is imported only when a value is parsed (docs/architecture.md, "The rooms")."""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional

from bench.errors import UsageError

ANY = ("*",)  # passthrough: every argument is a Hydra override (bench train / throughput / inspect)
_TRUE, _FALSE = ("true", "yes", "1"), ("false", "no", "0")


class BadValue(ValueError):
    """Raised by an Arg's convert: `reason` says what is allowed ("use an integer >= 1")."""


@dataclass(frozen=True)
class Arg:
    """One key of a command. convert(value) gets the value as Hydra parsed it and returns the command's value,
    or raises BadValue(what is allowed). text=True (a path, a name): the value is the string as written where
    Hydra would make it a number or a boolean, and where Hydra's grammar refuses it (`~`, parentheses,
    non-ASCII letters) the text is taken as written."""
    convert: Callable[[Any], Any]
    text: bool = False


def _text(value) -> str:
    return str(value)


def _integer(lo: int, hi: Optional[int]) -> Callable[[Any], int]:
    def convert(value) -> int:
        if isinstance(value, str) and value.strip().lstrip("-").isdigit():
            value = int(value.strip())
        if isinstance(value, bool) or not isinstance(value, int) or value < lo or (hi is not None and value > hi):
            raise BadValue(f"use an integer in {lo}..{hi}" if hi is not None else f"use an integer >= {lo}")
        return value
    return convert


def _seconds(strict: bool) -> Callable[[Any], float]:
    def convert(value) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (
            value > 0 if strict else value >= 0)
        if not ok:
            raise BadValue(f"use a number of seconds {'> 0' if strict else '>= 0'}")
        return float(value)
    return convert


def _flag(value) -> bool:
    word = str(value).strip().lower()
    if word not in _TRUE + _FALSE:
        raise BadValue("use true or false")
    return word in _TRUE


def _choice(options: tuple) -> Callable[[Any], str]:
    def convert(value) -> str:
        if not isinstance(value, str) or value not in options:
            raise BadValue(f"choose one of: {', '.join(options)}")
        return value
    return convert


def _which(value) -> str:
    text = str(value).strip()
    if not text:
        raise BadValue("use best, last, a checkpoint step or a file in the run's checkpoints/")
    if text.lstrip("-").isdigit() and int(text) < 0:
        raise BadValue("a checkpoint step is >= 0; use best, last, a step or a file in the run's checkpoints/")
    return text


def _psi_value(item):
    """A truncation threshold: a positive finite number, or None for off / none / null."""
    if item is None or (isinstance(item, str) and item.strip().lower() in ("off", "none", "null")):
        return None
    if isinstance(item, (int, float)) and not isinstance(item, bool) and item > 0 and math.isfinite(item):
        return float(item)
    raise BadValue(f"{item!r} is not a positive number or off")


def _psi(value):
    try:
        psi = _psi_value(value)
    except BadValue:
        raise BadValue("give a positive number, or off for no truncation") from None
    return "off" if psi is None else psi


def _psi_list(value) -> list:
    items = value if isinstance(value, list) else [value]
    if not items:
        raise BadValue("give the truncation values to sweep, e.g. 'psi=[0.25,0.5,1.0]'")
    try:
        return [_psi_value(p) for p in items]
    except BadValue as exc:
        raise BadValue(f"{exc}; give positive numbers (or off), e.g. 'psi=[0.25,0.5,1.0]'") from None


TEXT = Arg(_text, text=True)            # a path or a name, as written
WHICH = Arg(_which, text=True)          # best | last | a checkpoint step >= 0 | a file in the run's checkpoints/
FLAG = Arg(_flag)                       # true / false (yes / no, 1 / 0)
PSI = Arg(_psi)                         # one truncation: a positive number, or off -> "off"
PSI_LIST = Arg(_psi_list)               # truncations to sweep: [0.25,0.5,off] -> [0.25, 0.5, None]


def integer(lo: int, hi: Optional[int] = None) -> Arg:
    return Arg(_integer(lo, hi))


def seconds(strict: bool = False) -> Arg:
    """A number of seconds: > 0 when strict, else >= 0."""
    return Arg(_seconds(strict))


def choice(*options: str) -> Arg:
    return Arg(_choice(tuple(options)))


@lru_cache(maxsize=1)
def _parser():
    from hydra.core.override_parser.overrides_parser import OverridesParser

    return OverridesParser.create()


def hydra_value(key: str, text: str):
    """The value of `key=text` as Hydra reads an override's value (lists, quoting, numbers, booleans, null;
    a sweep as its sweep object). A text Hydra's grammar refuses raises hydra.errors.HydraException."""
    return _parser().parse_override(f"{key}={text}").value()


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _convert(command: str, key: str, text: str, arg: Arg):
    from hydra.core.override_parser.types import Sweep
    from hydra.errors import HydraException

    bad = f"bench {command}: {key}={text!r} is not valid"
    try:
        value = hydra_value(key, text)
    except HydraException as exc:
        if not arg.text:
            raise UsageError(f"{bad}: {_one_line(exc)} (Hydra's override grammar; quote the value)") from None
        value = text.strip()
    if isinstance(value, Sweep):
        raise UsageError(f"{bad}; give one value, not a sweep (quote a comma: {key}='a,b')")
    if arg.text:
        if isinstance(value, (list, dict)):
            raise UsageError(f"{bad}; give one value, not a {type(value).__name__}")
        if not isinstance(value, str):  # 1e3, 007, true, null: the text as written
            value = text.strip()
    try:
        return arg.convert(value)
    except BadValue as exc:
        raise UsageError(f"{bad}; {exc}") from None


def _matches(key: str, patterns: Iterable[str]) -> bool:
    return any(key == p or (p.endswith(".*") and key.startswith(p[:-1])) for p in patterns)


def parse_kv(args: Iterable[str], allowed: Mapping[str, Arg], command: str, *, passthrough: Iterable[str] = (),
             aliases: Optional[Mapping[str, str]] = None, required: Optional[Mapping[str, str]] = None,
             positional: Optional[str] = None, flags: Iterable[str] = ()) -> tuple[dict, list[str]]:
    """A command's arguments -> (known, overrides).

    allowed: {key: Arg}, the command's own keys (in the order its errors list them); known[key] is the
    converted value of each one given (the last one wins, as in Hydra), under its canonical key.
    passthrough: the config keys handed back unchanged as Hydra overrides: exact keys ("data.shards"), a
    group's keys ("eval.*"), or ANY (every argument that is not a flag: Hydra's own grammar, groups, +/~).
    aliases: {other spelling: key}. required: {key: what to give} ("DIR (a run directory ...)").
    positional: the name under which bare words (and existing paths, even with an "=") are listed in known;
    without it a bare word is an error. flags: bare words that are switches (known[flag] = True).
    Bad input raises one UsageError line naming the command, the key, the value and the keys allowed."""
    aliases, required, flags = dict(aliases or {}), dict(required or {}), tuple(flags)
    passthrough = tuple(passthrough)
    valid = ", ".join([*allowed, *(p for p in passthrough if p != "*")]) or "none"
    known: dict = {}
    overrides: list[str] = []
    given: dict[str, tuple[str, str]] = {}
    for a in args:
        a = str(a)
        if a in flags:
            known[a] = True
        elif passthrough == ANY:
            overrides.append(a)
        elif positional is not None and ("=" not in a or Path(a).expanduser().exists()):
            known.setdefault(positional, []).append(a)
        elif "=" not in a:
            raise UsageError(f"bench {command}: {a!r} is not key=value; valid keys: {valid}")
        else:
            written, text = a.split("=", 1)
            key = aliases.get(written, written)
            if key in allowed:
                given[key] = (written, text)
            elif _matches(written, passthrough):
                overrides.append(a)
            else:
                raise UsageError(f"bench {command}: unknown argument (unknown key {written!r}): {a!r} is not a valid "
                                 f"argument; valid keys: {valid}")
    for key, what in required.items():
        if key not in given:
            raise UsageError(f"bench {command} needs {key}={what}")
    for key, (written, text) in given.items():
        known[key] = _convert(command, written, text, allowed[key])
    return known, overrides
