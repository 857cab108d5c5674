"""Reading files gan-bench did not necessarily write itself (a run's checkpoints, the domain classifier,
the real-statistics cache) without running code from them: torch.load with weights_only=True, which
unpickles only tensors, plain containers and numbers. NumPy arrays (a checkpoint's NumPy RNG state,
torch-fidelity's FID statistics) are admitted too: rebuilding an array runs no code of the file's
choosing. See docs/architecture.md, "Evaluation".
"""
from __future__ import annotations

import numpy as np
import torch


def _numpy_globals() -> list:
    kinds = [np.ndarray, np.dtype]
    core = getattr(np, "_core", None) or np.core
    kinds.append(core.multiarray._reconstruct)
    dtypes = getattr(np, "dtypes", None)
    if dtypes is not None:
        kinds += [getattr(dtypes, n) for n in dir(dtypes) if n.endswith("DType") and n[0].isupper()
                  and getattr(dtypes, n).__module__.startswith("numpy")]
    return kinds


def load_weights(source, map_location="cpu"):
    """torch.load(source, weights_only=True) that also admits NumPy arrays. Raises whatever torch raises
    for a damaged or hostile file (callers turn it into one line)."""
    with torch.serialization.safe_globals(_numpy_globals()):
        return torch.load(source, map_location=map_location, weights_only=True)


def first_line(exc: BaseException, limit: int = 160) -> str:
    """`Type: first line of the message` of an exception, short enough for one terminal line."""
    text = str(exc).strip()
    line = text.splitlines()[0][:limit] if text else ""
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
