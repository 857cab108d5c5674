"""`bench sample run=DIR n=N [psi=] [class=] [which=] [seed=] out=FILE.npz|DIR`: images of a run's EMA G, with the
latents and labels that made them, drawn as an evaluation draws them; written whole or not at all
(docs/architecture.md, "Evaluation")."""
from __future__ import annotations

import copy
import csv
import io
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

from bench import rundir
from bench.args import PSI, TEXT, WHICH, Arg, integer
from bench.device import autocast, eval_precision
from bench.eval.errors import EvalError
from bench.eval.features import ProgressLine
from bench.eval.metrics import EvalSettings
from bench.eval.sampling import check_psi, eval_latents, sample_images, standing_stats

NPZ = ".npz"
PROGRESS_MIN = 1000  # a progress line on stderr for jobs of at least this many images


def out_kind(out) -> str:
    """'npz' for FILE.npz, 'dir' for a path without an extension; an EvalError for anything else."""
    p = Path(str(out))
    if not str(out).strip():
        raise EvalError("out='': give FILE.npz or a directory for PNG files")
    if p.suffix.lower() == NPZ:
        return "npz"
    if p.suffix == "" or p.is_dir():
        if p.exists() and (not p.is_dir() or any(p.iterdir())):
            raise EvalError(f"out={out}: exists and is not an empty directory; give a new directory (PNG files + "
                            f"labels.csv) or FILE.npz")
        return "dir"
    raise EvalError(f"out={out}: the extension {p.suffix!r} is not written; give FILE.npz (x, z, y arrays) or a "
                    f"directory without an extension (PNG files + labels.csv)")


def parse_int(key: str, value, minimum: int) -> int:
    text = str(value).strip()
    if not text.lstrip("-").isdigit() or int(text) < minimum:
        raise EvalError(f"{key}={value!r} is not valid; use an integer >= {minimum}")
    return int(text)


# `bench sample`'s own keys, read by bench/args.py (eval.* / data.shards pass through to the run's config)
SAMPLE_ARGS = {"run": TEXT, "n": integer(1), "psi": PSI, "class": integer(0), "which": WHICH, "seed": integer(0),
               "out": Arg(lambda out: out_kind(out) and str(out), text=True)}  # FILE.npz or a new / empty DIR
SAMPLE_REQUIRED = {"run": "DIR (a run directory written by bench train)", "n": "N (images to write)",
                   "out": "FILE.npz or out=DIR (PNG files + labels.csv)"}


def draw(n: int, z_dim: int, n_classes: int, *, psi=None, trunc_mode: str = "resample", seed: int = 0,
         label=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (n, z_dim) float32, y (n,) int64): an evaluation's latents and labels (eval_latents); label fixes
    every y to one class."""
    z, y = eval_latents(n, z_dim, n_classes, truncation=psi, trunc_mode=trunc_mode, seed=seed)
    if label is not None:
        y = torch.full_like(y, int(label))
    return z.float(), y.long()


def sample_run(run_dir, n, out, *, psi=None, label=None, which: str = "best", seed=None, overrides=None,
               device=None, progress: bool = True) -> dict:
    """Write n images of the run's EMA G to `out` (FILE.npz or a directory); returns a summary dict.

    psi: truncation (None: the run's eval.truncation; "off": none); seed: None = the run's eval.seed;
    label: one class for every image (None: uniform labels as in an evaluation); overrides: eval.* /
    data.shards strings as for `bench eval`."""
    from bench.eval.runs import load_run

    kind = out_kind(out)
    n = parse_int("n", n, 1)
    run = load_run(Path(run_dir), overrides, which, device)
    G, n_classes, names = run["G"], run["n_classes"], run["class_names"]
    s = EvalSettings.from_cfg(run["cfg"])
    psi = s.truncation if psi is None else psi
    psi = check_psi(psi)
    seed = int(s.seed) if seed is None else parse_int("seed", seed, 0)
    if label is not None:
        label = parse_int("class", label, 0)
        if label >= n_classes:
            raise EvalError(f"class={label} is outside the run's classes 0..{n_classes - 1}")
    dev = run["device"]
    amp = autocast(eval_precision(s.precision, dev), dev)
    if int(s.standing_stats or 0) > 0:  # as bench.eval.metrics.eval_copy: a copy, its own generator (seed + 1)
        G = copy.deepcopy(G)
        standing_stats(G, n_classes, int(s.standing_stats), batch_size=int(s.batch_size), truncation=psi,
                       trunc_mode=s.trunc_mode, autocast=amp,
                       generator=torch.Generator(device=dev).manual_seed(seed + 1))
        G.eval()
    z, y = draw(n, G.z_dim, n_classes, psi=psi, trunc_mode=s.trunc_mode, seed=seed, label=label)
    line = ProgressLine(f"gan-bench sample: {Path(str(out)).name}", n) if progress and n >= PROGRESS_MIN else None
    x = sample_images(G, z, y, int(s.batch_size), amp, progress=line).permute(0, 2, 3, 1).contiguous().numpy()
    if kind == "npz":
        write_npz(out, x, z.numpy(), y.numpy())
    else:
        write_png_dir(out, x, y.numpy(), names)
    info = {"out": str(out), "n": n, "resolution": int(x.shape[1]), "step": run["step"], "checkpoint":
            str(run["checkpoint"]), "chosen": run["chosen"], "truncation": psi,
            "trunc_mode": s.trunc_mode if psi is not None else None, "seed": seed, "class": label,
            "standing_stats": int(s.standing_stats or 0)}
    if progress:
        print_summary(info)
    return info


def write_npz(path, x: np.ndarray, z: np.ndarray, y: np.ndarray) -> Path:
    """x uint8 (N, H, W, 3), z float32, y int64 as one .npz, atomically."""
    return rundir.atomic_write(path, write=lambda f: np.savez(f, x=x.astype(np.uint8), z=z.astype(np.float32),
                                                              y=y.astype(np.int64)))


def write_png_dir(out, x: np.ndarray, y: np.ndarray, names) -> Path:
    """One PNG per image and labels.csv, in a temp directory beside `out`, renamed to `out` when complete."""
    from PIL import Image

    out = Path(str(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        width = max(6, len(str(len(x) - 1)))
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["index", "file", "label", "class_name"])
        for i, img in enumerate(x):
            name = f"{i:0{width}d}.png"
            Image.fromarray(img).save(tmp / name, format="PNG")
            w.writerow([i, name, int(y[i]), names[int(y[i])] if int(y[i]) < len(names) else str(int(y[i]))])
        (tmp / "labels.csv").write_text(buf.getvalue())
        if out.is_dir():  # empty (out_kind checked): rename replaces an empty directory
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    rundir.fsync_dir(out.parent)
    return out


def load_npz(path) -> dict:
    """The arrays of a `bench sample` npz (x, z, y), read without pickles."""
    with np.load(path, allow_pickle=False) as f:
        return {k: f[k] for k in f.files}


def print_summary(info: dict) -> None:
    print(f"bench sample: wrote {info['n']} images ({info['resolution']}x{info['resolution']}) of {info['chosen']} "
          f"to {info['out']}", file=sys.stderr, flush=True)
