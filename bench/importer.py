"""`bench import biggan-pytorch weights=G_ema.pth [g=G.pth] [d=D.pth] model=biggan_128|biggan_deep_128|biggan_deep_256
out=RUN_DIR [model.* / data.resolution overrides]`: BigGAN-PyTorch's state dicts as a gan-bench run directory.
The name mapping, the spectral-norm vectors and the run directory it writes: docs/architecture.md, "Importing
BigGAN-PyTorch weights"."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import re
import shutil
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from bench import models
from bench import rundir
from bench.args import TEXT
from bench.eval.errors import EvalError
from bench.eval.safeload import first_line, load_weights

SOURCES = ("biggan-pytorch",)
MODELS = ("biggan_128", "biggan_deep_128", "biggan_deep_256")
STEP = 0
_SN_SUFFIXES = ("u0", "sv0")


class ImportError_(EvalError):
    """A file that does not fit the model (one line: the keys, the file)."""


def their_to_ours(key: str, depth: int, nested: bool = False) -> str:
    """BigGAN-PyTorch's state-dict key -> gan-bench's (docs/architecture.md, "Importing BigGAN-PyTorch
    weights"); SN buffers keep their u0 / sv0 names. nested: BigGANdeep's D, whose blocks.<stage>.<j> holds the stage's `depth` blocks, then its attention."""
    m = re.match(r"^blocks\.(\d+)\.(\d+)\.(.*)$", key)
    if m and nested:
        s, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        key = f"blocks.{s * depth + j}.{rest}" if j < depth else f"attn.{s}.{rest}" if j == depth else key
    elif m:
        k, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
        key = f"blocks.{k}.{rest}" if j == 0 else f"attn.{k // depth}.{rest}" if j == 1 else key
    key = re.sub(r"^output_layer\.0\.gain$", "out_bn.weight", key)
    key = re.sub(r"^output_layer\.0\.stored_", "out_bn.running_", key)
    key = re.sub(r"^output_layer\.0\.", "out_bn.", key)
    key = re.sub(r"^output_layer\.2\.", "out_conv.", key)
    key = re.sub(r"^input_conv\.", "stem.", key)
    return re.sub(r"\.(bn\d)\.stored_(mean|var)$", r".\1.bn.running_\2", key)


def _sn_vectors(weight: torch.Tensor, u0: torch.Tensor, eps: float):
    """(u, v, sigma) of the one power iteration BigGAN-PyTorch's SN runs from u0 in eval mode, in float32."""
    w = weight.detach().float().reshape(weight.shape[0], -1)
    v = F.normalize(torch.matmul(u0.float().reshape(1, -1), w), eps=eps)
    u = F.normalize(torch.matmul(v, w.t()), eps=eps)
    sigma = torch.matmul(torch.matmul(v, w.t()), u.t()).squeeze()
    return u.reshape(-1), v.reshape(-1), sigma


def convert(theirs: dict, net: torch.nn.Module, depth: int, path, nested: bool = False) -> dict:
    """A state dict for `net` (gan-bench) from BigGAN-PyTorch's `theirs`; ImportError_ naming unknown / missing keys."""
    ours = net.state_dict()
    modules = dict(net.named_modules())
    out, unknown = {}, []
    for key, value in theirs.items():
        if not torch.is_tensor(value):
            unknown.append(key)
            continue
        name = their_to_ours(key, depth, nested)
        layer, _, leaf = name.rpartition(".")
        if leaf in _SN_SUFFIXES:
            module = modules.get(layer)
            if module is None or not getattr(module, "sn_enabled", False):
                unknown.append(key)
            elif leaf == "u0":
                u, v, sigma = _sn_vectors(theirs[f"{key[:-3]}.weight"], value, float(module.sn_eps))
                out.update({f"{layer}.u": u, f"{layer}.v": v, f"{layer}.sigma": sigma})
            continue
        if name not in ours:
            unknown.append(key)
            continue
        if tuple(value.shape) != tuple(ours[name].shape):
            raise ImportError_(f"{path}: {key} has shape {tuple(value.shape)}, {name} of model needs "
                               f"{tuple(ours[name].shape)}; check model= and the model.* / data.resolution overrides")
        out[name] = value.to(ours[name].dtype)
    fresh = ("num_batches_tracked", "sv_u", "sv_v")
    missing = [k for k in ours if k not in out and not k.endswith(fresh)]
    if unknown or missing:
        raise ImportError_(f"{path}: " + "; ".join(p for p in (
            f"{len(unknown)} keys with no gan-bench counterpart: {_names(unknown)}" if unknown else "",
            f"{len(missing)} gan-bench keys not in the file: {_names(missing)}" if missing else "") if p)
            + " (is model= the network the file holds, with the same widths, resolution and attention?)")
    for k in ours:
        if k.endswith(fresh):
            out[k] = ours[k]
    return out


def _names(keys, shown: int = 6) -> str:
    return ", ".join(keys[:shown]) + (f", ... ({len(keys) - shown} more)" if len(keys) > shown else "")


def _read(path) -> dict:
    p = Path(str(path)).expanduser()
    if not p.is_file():
        raise ImportError_(f"{path}: no such file")
    try:
        state = load_weights(p)
    except Exception as exc:  # noqa: BLE001 - torch raises many kinds for a damaged or hostile file
        raise ImportError_(f"{path}: unreadable as a state dict ({first_line(exc)})") from None
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not state:
        raise ImportError_(f"{path}: not a state dict (BigGAN-PyTorch's G_ema.pth / G.pth / D.pth)")
    return state


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def import_biggan_pytorch(weights, out, model: str, *, g=None, d=None, overrides=(), progress: bool = True) -> dict:
    """Write the run directory `out` from BigGAN-PyTorch's state dicts (docs/architecture.md, "Importing
    BigGAN-PyTorch weights"). Returns run.json's "imported_from" record."""
    from bench.config import compose

    if model not in MODELS:
        raise ImportError_(f"model={model!r}: choose one of {', '.join(MODELS)}")
    out = Path(str(out))
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ImportError_(f"out={out}: exists and is not an empty directory; give a new run directory")
    cfg = compose([f"model={model}", *overrides])
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    resolution = int(cfg.data.resolution)
    n_classes = int(model_cfg.get("n_classes") or 1000)
    G, D = models.build(model_cfg, resolution, n_classes)
    depth = int(getattr(G, "depth", None) or 1)
    state = {"G_ema": convert(_read(weights), G, depth, weights)}
    if g:
        state["G"] = convert(_read(g), G, depth, g)
    if d:
        state["D"] = convert(_read(d), D, depth, d, nested=depth > 1)  # BigGANdeep's D nests its stages
    G.load_state_dict(state["G_ema"])  # strict: every key ours, every shape right
    if d:
        D.load_state_dict(state["D"])
    files = {k: v for k, v in (("weights", weights), ("g", g), ("d", d)) if v}
    record = {"source": "biggan-pytorch", "model": model, "overrides": list(overrides), "resolution": resolution,
              "n_classes": n_classes, "time": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "files": {k: {"path": str(Path(str(v)).expanduser().resolve()), "sha256": _sha256(Path(str(v)).expanduser())}
                        for k, v in files.items()},
              "sampling": "EMA G in eval mode, as BigGAN-PyTorch's sample.py --use_ema --G_eval_mode"}
    state.update(step=STEP, config={"model": model_cfg, "data": {"resolution": resolution}}, imported_from=record)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        (tmp / rundir.CHECKPOINTS).mkdir(parents=True)
        OmegaConf.save(cfg, tmp / rundir.CONFIG)
        (tmp / rundir.RUN_JSON).write_text(json.dumps({"imported_from": record, "n_classes": n_classes,
                                                       "shards": None, "status": "imported"}, indent=2))
        torch.save(state, tmp / rundir.CHECKPOINTS / f"{rundir.CKPT_PREFIX}{STEP:07d}.pt")
        if out.is_dir():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if progress:
        print(f"bench import: {model} from {weights} -> {out} (G {models.param_count(G)} parameters"
              + (f", D {models.param_count(D)}" if d else "") + ")", file=sys.stderr, flush=True)
    return record


# `bench import biggan-pytorch`'s own keys (bench/args.py reads them in bench/cli.py); model.* / data.resolution pass
# through to the composed config
IMPORT_ARGS = {"weights": TEXT, "g": TEXT, "d": TEXT, "model": TEXT, "out": TEXT}
IMPORT_REQUIRED = {"weights": "G_ema.pth", "model": "|".join(MODELS), "out": "RUN_DIR"}
IMPORT_USAGE = ("usage: bench import biggan-pytorch weights=G_ema.pth [g=G.pth] [d=D.pth] "
                f"model={'|'.join(MODELS)} out=RUN_DIR [model.*=... data.resolution=...]")
IMPORT_PASSTHROUGH = ("model.*", "data.resolution")
