"""Sampling from a trained G: class-conditional sample sheets (more evaluation lives here later)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B,3,H,W) in [-1,1] -> (B,H,W,3) uint8."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().cpu().numpy()


def grid_classes(n_classes: int, max_rows: int = 32) -> list[int]:
    """Classes shown as rows: all of them, or evenly spaced ones when there are many."""
    if n_classes <= max_rows:
        return list(range(n_classes))
    return [int(round(i * (n_classes - 1) / (max_rows - 1))) for i in range(max_rows)]


@torch.no_grad()
def class_grid(G, z: torch.Tensor, classes: Sequence[int], batch: int = 64) -> np.ndarray:
    """Rows = classes, columns = the fixed latents z (C, z_dim). Returns (rows, cols, H, W, 3) uint8."""
    device = next(G.parameters()).device
    cols = z.shape[0]
    zz = z.to(device).repeat(len(classes), 1)
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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    sheet.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path
