"""Sampling a generator: latents (with truncation) and labels drawn in one pass, uint8 images, standing
statistics, class grids and interpolation sheets (docs/architecture.md, "Evaluation"). Training imports it for
its sample grids, so it stays light: torch, numpy and PIL only (no torch-fidelity, no classifier)."""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import nn

from bench import rundir
from bench.eval.errors import EvalError
from bench.metrics_registry import TRUNC_MODES

MAX_RESAMPLE_ROUNDS = 64  # truncated_normal: resampling rounds before the exact inverse-CDF fallback
UNCOND_ROWS = 8  # rows of an unconditional G's sample grid (one class: each row its own latents)
INTERP_MODES = ("lerp", "slerp")
INTERP_SPACES = ("z", "class")


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def grid_classes(n_classes: int, max_rows: int = 32) -> list[int]:
    """Classes shown as rows: all of them, or evenly spaced ones when there are many."""
    if n_classes <= max_rows:
        return list(range(n_classes))
    return [int(round(i * (n_classes - 1) / (max_rows - 1))) for i in range(max_rows)]


def sheet_rows(n_classes: int, max_rows: int = 32) -> list[int]:
    """The classes of a sample grid's rows: grid_classes, or for one class (unlabelled data, an unconditional G)
    that class UNCOND_ROWS times, which class_grid draws with other latents in every row."""
    return grid_classes(n_classes, max_rows) if n_classes > 1 else [0] * UNCOND_ROWS


@torch.no_grad()
def class_grid(G, z: torch.Tensor, classes: Sequence[int], batch: int = 64) -> np.ndarray:
    """Rows = classes, columns = the fixed latents z (C, z_dim). Returns (rows, cols, H, W, 3) uint8.
    A class in several rows (sheet_rows of unlabelled data) gets other latents in each repeat: z with its
    coordinates rolled by the repeat's number (the same distribution and truncation, fixed across calls)."""
    device = next(G.parameters()).device
    cols = z.shape[0]
    repeats: dict[int, int] = {}
    rows = []
    for c in classes:  # a row's latents: z, rolled by how often its class was shown above
        rows.append(torch.roll(z, shifts=repeats.get(c, 0), dims=1))
        repeats[c] = repeats.get(c, 0) + 1
    zz = torch.cat(rows).to(device)                                   # (rows * cols, z_dim)
    yy = torch.tensor(classes, device=device).repeat_interleave(cols)
    out = [to_uint8(G(zz[i : i + batch], yy[i : i + batch])) for i in range(0, zz.shape[0], batch)]
    imgs = np.concatenate(out)
    return imgs.reshape(len(classes), cols, *imgs.shape[1:])


def save_grid(images: np.ndarray, path: str | Path, row_labels: Sequence[str] | None = None, scale: int = 2) -> Path:
    """Save a (rows, cols, H, W, 3) uint8 array as one PNG, with a label column on the left. Atomic."""
    rows, cols, h, w, _ = images.shape
    h, w = h * scale, w * scale
    pad = 2
    label_w = 0
    font = ImageFont.load_default()
    if row_labels:
        label_w = max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(s, font=font)) for s in row_labels) + 8
    sheet = Image.new("RGB", (label_w + cols * (w + pad) + pad, rows * (h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r in range(rows):
        top = pad + r * (h + pad)
        if row_labels:
            draw.text((4, top + h // 2 - 5), row_labels[r], fill=(0, 0, 0), font=font)
        for c in range(cols):
            tile = Image.fromarray(images[r, c]).resize((w, h), Image.NEAREST)
            sheet.paste(tile, (label_w + pad + c * (w + pad), top))
    return rundir.atomic_write(path, write=lambda f: sheet.save(f, format="PNG"))


# ---------------------------------------------------------------------------------------------
# Truncation and standing statistics
# ---------------------------------------------------------------------------------------------

def truncnorm_variance(psi: float) -> float:
    """Variance of N(0, 1) truncated to [-psi, psi]: 1 - 2 psi phi(psi) / (2 Phi(psi) - 1)."""
    phi = math.exp(-0.5 * psi * psi) / math.sqrt(2.0 * math.pi)
    mass = math.erf(psi / math.sqrt(2.0))  # 2 Phi(psi) - 1
    return 1.0 - 2.0 * psi * phi / mass


def check_psi(psi) -> Optional[float]:
    """A truncation threshold as a positive float, or None for none (None, "", "none", "null", "off")."""
    if psi is None:
        return None
    if isinstance(psi, str) and psi.strip().lower() in ("", "none", "null", "off"):
        return None
    try:
        value = float(psi)
    except (TypeError, ValueError):
        raise EvalError(f"eval.truncation={psi!r}: use a positive number, or null for no truncation") from None
    if not (value > 0 and math.isfinite(value)):
        raise EvalError(f"eval.truncation={psi!r}: use a positive number, or null for no truncation")
    return value


def check_trunc_mode(mode: str) -> str:
    if mode not in TRUNC_MODES:
        raise EvalError(f"eval.trunc_mode={mode!r}: choose one of {', '.join(TRUNC_MODES)}")
    return mode


def truncated_normal(shape, psi: float | None = None, mode: str = "resample",
                     generator: torch.Generator | None = None, device=None,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Latents drawn from N(0, 1) with BigGAN's truncation trick at threshold `psi` (None = off).

    mode  resample  (default, BigGAN) values with |z| > psi are drawn again until none is left:
                    N(0, 1) truncated to [-psi, psi], variance `truncnorm_variance(psi)`
          clip      values are clamped to [-psi, psi] (the tails pile up at +-psi)
          scale     every value is multiplied by psi (N(0, psi^2), unbounded)
    """
    check_trunc_mode(mode)
    psi = check_psi(psi)
    if device is None:
        device = generator.device if generator is not None else "cpu"
    z = torch.randn(shape, generator=generator, device=device, dtype=dtype)
    if psi is None:
        return z
    if mode == "clip":
        return z.clamp_(-psi, psi)
    if mode == "scale":
        return z.mul_(psi)
    flat = z.view(-1)
    for _ in range(MAX_RESAMPLE_ROUNDS):
        bad = (flat.abs() > psi).nonzero().squeeze(1)  # host sync, once per round
        if bad.numel() == 0:
            return z
        flat[bad] = torch.randn(bad.numel(), generator=generator, device=device, dtype=dtype)
    # Tiny psi: acceptance 2 Phi(psi) - 1 is low; draw the few leftovers exactly by inverse CDF.
    bad = (flat.abs() > psi).nonzero().squeeze(1)
    if bad.numel():
        lo = float(torch.special.ndtr(torch.tensor(-psi, dtype=torch.float64)))
        u = torch.rand(bad.numel(), generator=generator, device=device, dtype=torch.float64)
        flat[bad] = torch.special.ndtri(lo + u * (1.0 - 2.0 * lo)).clamp_(-psi, psi).to(dtype)
    return z


def eval_latents(n: int, z_dim: int, n_classes: int, *, truncation: float | None = None,
                 trunc_mode: str = "resample", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(z (n, z_dim), y (n,)) of an evaluation: every latent (with its truncation resampling, which runs
    over all n * z_dim values at once), then every label, drawn on the CPU from one generator seeded with
    `seed`. The i-th sample's latent and label depend on neither the batch size nor the device."""
    gen = torch.Generator().manual_seed(int(seed))
    z = truncated_normal((int(n), int(z_dim)), truncation, trunc_mode, gen)
    y = torch.randint(0, int(n_classes), (int(n),), generator=gen)
    return z, y


@torch.no_grad()
def generate_uint8(G: nn.Module, z: torch.Tensor, y: torch.Tensor, autocast=None) -> torch.Tensor:
    """G(z, y) as uint8 (B, 3, R, R) images, rounded from [-1, 1]."""
    with (autocast or contextlib.nullcontext)():
        x = G(z, y)
    return ((x.float().clamp(-1, 1) + 1) * 127.5).round_().to(torch.uint8)


def sample_images(G: nn.Module, z: torch.Tensor, y: torch.Tensor, batch_size: int, autocast=None,
                  progress=None) -> torch.Tensor:
    """uint8 (N, 3, R, R) images (on the CPU) of the latents z and labels y, batch_size at a time on G's device.
    progress: None, or an object whose add(n) is called after each batch (bench.eval.features.ProgressLine)."""
    device = next(G.parameters()).device
    out = []
    for i in range(0, z.shape[0], int(batch_size)):
        out.append(generate_uint8(G, z[i:i + batch_size].to(device), y[i:i + batch_size].to(device), autocast).cpu())
        if progress is not None:
            progress.add(out[-1].shape[0])
    return torch.cat(out)


def batchnorms(G: nn.Module) -> list[nn.Module]:
    """G's BatchNorm modules that keep running statistics."""
    return [m for m in G.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


@torch.no_grad()
def standing_stats(G: nn.Module, n_classes: int, passes: int, *, batch_size: int = 64,
                   truncation: float | None = None, trunc_mode: str = "resample",
                   generator: torch.Generator | None = None, autocast=None) -> int:
    """Recompute G's BatchNorm running statistics in place from `passes` forward passes of
    `batch_size` latents at the given truncation (BigGAN-PyTorch's "standing statistics").

    Every BatchNorm's running stats are reset and accumulated as a cumulative average
    (momentum=None). Only the BatchNorm modules are in train mode during the passes, so nothing
    else changes: parameters, spectral-norm u / v / sigma and all other buffers stay as they were.
    Module modes and momenta are restored afterwards. Returns the number of BatchNorms updated.
    """
    bns = batchnorms(G)
    if passes <= 0 or not bns:
        return 0
    device = next(G.parameters()).device
    modes = [(m, m.training) for m in G.modules()]
    momenta = [(m, m.momentum) for m in bns]
    try:
        G.eval()
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative moving average over the passes
            m.train()
        for _ in range(int(passes)):
            z = truncated_normal((batch_size, G.z_dim), truncation, trunc_mode, generator, device)
            y = torch.randint(0, n_classes, (batch_size,), device=device, generator=generator)
            with (autocast or contextlib.nullcontext)():
                G(z, y)
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
        for m, training in modes:
            m.training = training
    return len(bns)


# ---------------------------------------------------------------------------------------------
# Interpolation sheets
# ---------------------------------------------------------------------------------------------

def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    return a + (b - a) * t


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation along the great circle between the directions of a and b (the
    vectors' own lengths are carried along); lerp where a and b are (anti)parallel."""
    an = a / a.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    bn = b / b.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    omega = (an * bn).sum(-1, keepdim=True).clamp(-1.0, 1.0).acos()
    so = omega.sin()
    safe = so.abs() > 1e-6
    so = torch.where(safe, so, torch.ones_like(so))
    s = torch.sin((1.0 - t) * omega) / so * a + torch.sin(t * omega) / so * b
    return torch.where(safe, s, lerp(a, b, t))


@dataclass(frozen=True)
class InterpSettings:
    """One interpolation sheet: `rows` rows of `steps` images.

    space "z"      row r keeps class r % n_classes and moves from latent z0 to z1
    space "class"  row r keeps its latent and moves from class r's embedding to class r+1's
                   (G.class_embedding(y), fed as class_vec)
    mode           "lerp" (straight line) or "slerp" (great circle)
    """
    mode: str = "lerp"
    space: str = "z"
    steps: int = 8                     # images per row
    rows: Optional[int] = None         # None: min(classes, 8)
    truncation: Optional[float] = None  # latents' truncation psi (None: off)
    trunc_mode: str = "resample"
    seed: int = 0                      # the latents' generator seed
    batch: int = 64                    # images per forward pass

    def __post_init__(self):
        if self.mode not in INTERP_MODES:
            raise EvalError(f"interpolation mode={self.mode!r}: choose lerp or slerp")
        if self.space not in INTERP_SPACES:
            raise EvalError(f"interpolation space={self.space!r}: choose z or class")


def _interp_inputs(G: nn.Module, s: InterpSettings, n: int, names: list[str], device):
    """(forward function of an index range, row labels) of the sheet's rows * steps images."""
    interp = lerp if s.mode == "lerp" else slerp
    rows = int(s.rows or min(n, 8))
    gen = torch.Generator().manual_seed(s.seed)
    t = torch.linspace(0.0, 1.0, s.steps, device=device)[None, :, None]      # (1, steps, 1)
    a = torch.arange(rows, device=device) % n
    if s.space == "z":
        z0 = truncated_normal((rows, G.z_dim), s.truncation, s.trunc_mode, gen).to(device)
        z1 = truncated_normal((rows, G.z_dim), s.truncation, s.trunc_mode, gen).to(device)
        zz = interp(z0[:, None], z1[:, None], t).flatten(0, 1)              # (rows * steps, z_dim)
        yy = a.repeat_interleave(s.steps)
        return (lambda i, j: G(zz[i:j], yy[i:j])), [names[int(c)] for c in a]
    b = (a + 1) % n
    z = truncated_normal((rows, G.z_dim), s.truncation, s.trunc_mode, gen).to(device)
    zz = z.repeat_interleave(s.steps, dim=0)
    ea, eb = G.class_embedding(a).float(), G.class_embedding(b).float()
    ee = interp(ea[:, None], eb[:, None], t).flatten(0, 1)                  # (rows * steps, E)
    labels = [f"{names[int(i)]} > {names[int(j)]}" for i, j in zip(a, b)]
    return (lambda i, j: G(zz[i:j], None, class_vec=ee[i:j])), labels


@torch.no_grad()
def interpolation_sheet(G: nn.Module, settings: InterpSettings = InterpSettings(), path=None, *,
                        n_classes: int | None = None, class_names: Sequence[str] | None = None) -> np.ndarray:
    """The interpolation sheet of `settings` (see InterpSettings): (rows, steps, H, W, 3) uint8, also
    saved as a PNG when `path` is given. Labels are drawn from [0, n_classes) (None: G.n_classes)."""
    device = next(G.parameters()).device
    n = int(n_classes or G.n_classes)
    names = list(class_names) if class_names else [str(i) for i in range(n)]
    run, labels = _interp_inputs(G, settings, n, names, device)
    total = len(labels) * settings.steps
    was_training = G.training
    G.eval()
    try:
        imgs = np.concatenate([to_uint8(run(i, i + settings.batch)) for i in range(0, total, settings.batch)])
    finally:
        G.train(was_training)
    imgs = imgs.reshape(len(labels), settings.steps, *imgs.shape[1:])
    if path is not None:
        save_grid(imgs, path, labels)
    return imgs


def write_sheets(run: dict, out_dir: Path, truncation=None, trunc_mode: str = "resample") -> list[Path]:
    """Class grid and the four interpolation sheets (lerp / slerp, z / class) of a loaded run (see
    bench.eval.runs.load_run): eval-<step>-classes.png, eval-<step>-interp-<space>-<mode>.png. An unconditional
    G (unlabelled data): its grid is UNCOND_ROWS rows of samples, and there is no class space to interpolate; nor
    is there one for a user's own G without a `class_embedding` (bench/plugins.py)."""
    G, names, step = run["G"], run["class_names"], run["step"]
    rows = sheet_rows(run["n_classes"])
    z = truncated_normal((8, G.z_dim), truncation, trunc_mode, torch.Generator().manual_seed(12345))
    paths = [save_grid(class_grid(G, z, rows), out_dir / f"eval-{step:07d}-classes.png",
                       [names[r] for r in rows])]
    class_space = getattr(G, "conditional", True) and callable(getattr(G, "class_embedding", None))
    for space in INTERP_SPACES if class_space else ("z",):
        for mode in INTERP_MODES:
            p = out_dir / f"eval-{step:07d}-interp-{space}-{mode}.png"
            interpolation_sheet(G, InterpSettings(mode=mode, space=space, truncation=truncation,
                                                  trunc_mode=trunc_mode),
                                p, n_classes=run["n_classes"], class_names=names)
            paths.append(p)
    return paths
