"""Evaluation protocols: named sets of eval.* values that make numbers comparable with the literature
(docs/architecture.md, "Evaluation"). Torch-free: the config check reads it. THE one place their values live.

    domain  (default) the config's eval.* keys as they are: the domain extractor trained on the shards
    biggan  as BigGAN-PyTorch evaluates (sample.py / train.py with --use_ema --G_eval_mode): Inception pool3
            features (torch-fidelity's inception-v3-compat, the TF FID graph's weights), 50,000 samples,
            truncation off, the EMA G in eval mode after 16 standing-statistics passes, fp32, torch-fidelity's
            resize (TF1-style bilinear to 299). The real side is the training set: its moments from
            `bench eval stats` over the whole set (eval.ref_stats=FILE), or BigGAN-PyTorch's own
            I128_inception_moments.npz; without eval.ref_stats, num_real images of the shards.
    clean   the same with clean-fid's resize: PIL bicubic to 299 (eval.resize=clean, features.clean_resize)

How they combine with other settings: for `bench eval` / `bench truncation` / `bench sample`, the protocol's
values replace the run's config.yaml values, and the command line's eval.* overrides replace the protocol's
(runs.load_run). In a composed config (`bench train eval.protocol=biggan`) a protocol value fills every key that
still has its schema default. Every record names its protocol.
"""
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
