"""`bench inspect`: what a model config costs, before anything is trained (docs/architecture.md; the CLI's
dispatch is bench/cli.py)."""
from __future__ import annotations

import json

from bench.config import compose
from bench.errors import UsageError


def inspect_command(args: list[str]) -> int:
    """`bench inspect [overrides]`: JSON of G/D parameter counts, GFLOP per image of a D step and a G step, a
    reference implementation's counts where a family declares them, and the weak-scaling projection."""
    import torch
    from omegaconf import OmegaConf

    from bench import models
    from bench.config import prepare
    from bench.train.telemetry import step_flops

    cfg = prepare(compose(args))
    n_classes = cfg.model.n_classes or _dataset_classes(cfg)
    # On the meta device: shapes only, so a full-width 512 model costs no memory and no arithmetic; the FLOP
    # counter reads shapes, and counts what the same nets on the CPU count.
    meta = torch.device("meta")
    with meta:
        G, D = models.build(OmegaConf.to_container(cfg.model, resolve=True), cfg.data.resolution, n_classes)
    flops = step_flops(G, D, batch=2, n_classes=n_classes, device=meta)
    out = {
        "model": cfg.model.family,
        "resolution": cfg.data.resolution,
        "n_classes": n_classes,
        "conditional": getattr(G, "conditional", None),  # None: a user's own nets (bench/plugins.py) may not say
        "G_params": models.param_count(G),
        "D_params": models.param_count(D),
        "GFLOP_per_image": {"D_step": flops["D_step"] / 1e9, "G_step": flops["G_step"] / 1e9,
                            "total": (flops["D_step"] * cfg.train.d_steps + flops["G_step"]) / 1e9},
        "d_steps": cfg.train.d_steps,
        "flop_convention": "torch.utils.flop_counter, multiply-add = 2; D step = G forward (no_grad) + D "
                           "forward/backward on real and fake; G step = G and D forward, backward into G with "
                           "D frozen (no D weight gradients); regularisers excluded",
        "arch": OmegaConf.to_container(cfg.model, resolve=True),
    }
    ref = models.reference_params(cfg.model.family, cfg.data.resolution)
    if ref is not None:  # a reference implementation's counts (BigGAN-deep: BigGAN-PyTorch's), beside ours
        ours = {**out["arch"], "n_classes": n_classes, "depth": getattr(G, "depth", None)}
        same = all(ours.get(k) == (list(v) if isinstance(v, tuple) else v) for k, v in ref["settings"].items())
        out["reference_params"] = {**ref, "same_settings": same,
                                   **{f"{k}_diff_pct": 100 * (out[f"{k}_params"] - ref[k]) / ref[k] for k in "GD"}}
    # Multi-node on paper (bench/scaling.py): weak scaling of this model's real step at the per-device batch.
    from bench import scaling
    from bench.device import GPU_PEAK_TFLOPS

    t, c = cfg.train, cfg.cluster
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    dev, peak, precision = scaling.pick_device(gpu, GPU_PEAK_TFLOPS, t.precision)
    overlap, calls = scaling.sync_inputs(cfg.dist.grad_sync, cfg.dist.bucket_mb, 4 * out["D_params"],
                                         4 * out["G_params"], t.d_steps)
    base = scaling.ScalingInputs(
        flop_per_step=(flops["D_step"] * t.d_steps + flops["G_step"]) * t.batch_size * t.accumulate,
        peak_tflops=peak, grad_bytes=4 * (t.d_steps * out["D_params"] + out["G_params"]), calls=calls,
        overlap=overlap)
    out["scaling"] = {"batch_per_device": t.batch_size * t.accumulate, "flop_per_step_per_device": base.flop_per_step,
                      **scaling.assumptions(base, dev, precision),
                      **scaling.projection(base, (c.nodes, c.gpus_per_node or c.tasks_per_node, c.link_gbps),
                                            grid_per_node=c.gpus_per_node or 8)}
    print(json.dumps(out, indent=2))
    return 0


def _dataset_classes(cfg) -> int:
    from bench.data.shapes import SHAPES_CLASSES
    from bench.data.shards import resolve_shards

    if cfg.data.shards:
        _, manifest = resolve_shards(cfg.data.shards)
        if manifest:
            return len(manifest["class_names"])
        raise UsageError(f"data.shards={cfg.data.shards!r} has no manifest.json; set model.n_classes")
    return len(SHAPES_CLASSES)
