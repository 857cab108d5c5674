"""Evaluation protocols (domain, biggan, clean): named sets of eval.* values that make numbers comparable with
the literature. Torch-free: the config check reads it. THE one place their values live (docs/architecture.md,
"Numbers that connect to the literature")."""
from __future__ import annotations

from bench.eval.errors import EvalError  # a leaf: torch-free

RESIZES = ("fidelity", "clean")   # eval.resize: torch-fidelity's own resize | clean-fid's PIL bicubic
DEFAULT_PROTOCOL = "domain"
STANDING_PASSES = 16              # BigGAN-PyTorch's --num_standing_accumulations default

_BIGGAN = {"extractor": "inception", "num_samples": 50000, "truncation": None, "standing_stats": STANDING_PASSES,
           "precision": "fp32", "resize": "fidelity"}
PROTOCOLS: dict[str, dict] = {
    "domain": {},
    "biggan": dict(_BIGGAN),
    "clean": {**_BIGGAN, "resize": "clean"},
}


def protocol_values(name) -> dict:
    """The eval.* values (without the eval. prefix) that protocol `name` fixes; EvalError for an unknown name."""
    if name is None:
        return {}
    if name not in PROTOCOLS:
        raise EvalError(f"eval.protocol={name!r}: choose one of {', '.join(PROTOCOLS)}")
    return dict(PROTOCOLS[name])


def fill_defaults(values: dict, defaults: dict) -> dict:
    """values (eval.* keys of a composed config) with the protocol's values (values['protocol']) in every key that
    is missing or still equal to its default in `defaults`."""
    out = dict(values)
    for key, value in protocol_values(out.get("protocol") or DEFAULT_PROTOCOL).items():
        if key not in out or out[key] == defaults.get(key):
            out[key] = value
    return out
