"""`bench eval stats data.shards=DIR out=ref.npz [n=N] [eval.*]`: write the real side's FID statistics
(bench.eval.refstats reads them; docs/architecture.md, "Evaluation"). Its own module: it uses the evaluation's
real side (features.real_images, streamed from the shards), extractor and cache (bench.eval.metrics), which itself
reads reference files through refstats."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from bench import rundir
from bench.args import Arg, integer
from bench.eval.errors import EvalError
from bench.eval.realcache import check_real_cache, real_cache_key, write_sidecar
from bench.eval.refstats import save_ref_stats


def write_ref_stats(shards_spec, out, settings, resolution: int, *, num_real: Optional[int] = None, device=None,
                    progress: bool = True) -> dict:
    """`bench eval stats`: mu and sigma (float64) of the FID features of `num_real` real images of the shards (None:
    all of them), with the extractor, weights, resize and batch size of `settings` (an EvalSettings) -- the same
    images, features and cache an evaluation of these shards with num_real images uses, so FID against the file
    equals FID against the shards. Writes `out` (npz) atomically; returns its metadata."""
    import dataclasses

    import torch

    from bench.data.shards import dataset_info, manifest_hash
    from bench.eval import metrics as M
    from bench.eval.features import (ProgressLine, extractor_settings, feature_extractor, features_of, real_images,
                                     register_sampler, resizer)
    from bench.eval.stats import feature_statistics

    if Path(str(out)).suffix.lower() != ".npz":
        raise EvalError(f"out={out}: reference statistics are written as FILE.npz")
    _, n_available, _ = dataset_info(shards_spec)
    n = int(num_real or n_available or 0)
    if n < 2:
        raise EvalError(f"data.shards={shards_spec}: cannot tell how many images it has (no manifest); give n=N")
    s = M._checked(dataclasses.replace(settings, num_real=n, num_samples=max(int(settings.num_samples), M.MIN_SAMPLES),
                                       ref_stats=None))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # the evaluation's real side (metrics._real_side's images), streamed: a full-ImageNet file never holds every image
    real, n_real = real_images(shards_spec, int(resolution), int(s.num_real), progress)
    real.resize = resizer(s.extractor, s.resize)
    weights_path, _ = M._classifier_files(s, shards_spec, int(resolution), progress)
    _, layers, _, fe_id = extractor_settings(s.extractor, weights_path, s.resize)
    key = real_cache_key(shards_spec, n_real, int(resolution), fe_id)
    cache_dir = Path(s.cache_dir) if s.cache_dir is not None else rundir.cache_root() / "eval"
    cache_dir.mkdir(parents=True, exist_ok=True)
    check_real_cache(cache_dir, key)
    register_sampler()
    ms = M.MetricSettings(extractor=s.extractor, weights_path=weights_path, batch_size=int(s.batch_size),
                          num_samples=n_real, num_real=n_real, cache_dir=cache_dir, input2_cache_name=f"real-{key}",
                          verbose=s.verbose)
    kw, layers, used = M.fidelity_kwargs(None, real, ms, device)  # the evaluation's layers: its cache files
    if progress:
        real.progress = ProgressLine("gan-bench eval stats: real features", n_real)
    with torch.cuda.device(device) if device.type == "cuda" else _null():
        feats, seconds = features_of(2, feature_extractor(kw, used), kw)
    mu, sigma = feature_statistics(feats[layers["fid"]])
    ident = {"shards": str(shards_spec), "manifest_hash": manifest_hash(shards_spec), "num_real": n_real,
             "resolution": int(resolution), "extractor": s.extractor, "extractor_id": fe_id, "resize": s.resize}
    write_sidecar(cache_dir, key, ident)
    save_ref_stats(out, mu, sigma, **ident)
    return {"out": str(out), "dim": int(mu.shape[0]), **ident, "features_s": round(seconds, 3)}


def _null():
    import contextlib

    return contextlib.nullcontext()


# `bench eval stats`' own keys, read by bench/args.py; data.* / eval.* pass through to the composed config
STATS_ARGS = {"out": Arg(lambda out: _npz(out), text=True), "n": integer(2)}
STATS_REQUIRED = {"out": "FILE.npz (where mu and sigma go)"}
STATS_PASSTHROUGH = ("data.*", "eval.*")


def _npz(out) -> str:
    if not str(out).lower().endswith(".npz"):
        raise EvalError(f"out={out}: reference statistics are written as FILE.npz")
    return str(out)


def stats_command(known: dict, overrides: list) -> dict:
    """`bench eval stats`: known = {out, n} (STATS_ARGS), overrides = data.* / eval.* overrides of the composed
    config. The images are read at data.resolution when given, else at the shards' own resolution (manifest.json):
    give the resolution of the generator the file is for (an evaluation reads the real side at G's resolution)."""
    from bench.config import check_data, compose, validate_eval
    from bench.data.shards import configured_shards, manifest_resolution, resolution_from_manifest
    from bench.eval.metrics import EvalSettings

    cfg = compose(list(overrides))
    check_data(cfg)
    validate_eval(cfg)
    shards = configured_shards(cfg.data)
    given = any(str(o).split("=", 1)[0] == "data.resolution" for o in overrides)  # else the shards' own (manifest)
    resolution = int(cfg.data.resolution if given and cfg.data.resolution else
                     (manifest_resolution(shards) or cfg.data.resolution or resolution_from_manifest(shards)))
    return write_ref_stats(shards, known["out"], EvalSettings.from_cfg(cfg), resolution, num_real=known.get("n"))
