"""Metrics of a generator: IS / KID / precision-recall (torch-fidelity), FID in float64 and density / coverage
(bench.eval.stats), all from one extraction of the features, the domain classifier's class accuracy and, with
eval.intra_fid, intra-class FID. `EvalSettings`, `evaluate_generator`, `compute_metrics` and the real side's
feature cache (docs/architecture.md, "Evaluation")."""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from bench import metrics_registry as registry
from bench import rundir
from bench.config import EVAL_PRECISIONS, MIN_EVAL_SAMPLES
from bench.data.shards import dataset_info, manifest_hash
from bench.device import autocast, eval_precision, plain_autograd
from bench.eval.classifier import classifier_path as default_classifier_path
from bench.eval.classifier import load_classifier, train_classifier, unlabelled_message
from bench.eval.errors import ClassifierError, EvalError
from bench.eval.features import (ImageDataset, ProgressLine, Sampler, check_extractor, extract_features, extractor_settings,
                                 inception_weights, register_sampler)
from bench.eval.features import ShardImages, feature_extractor, features_of, real_images, resizer
from bench.eval.intra import IntraFID, summarise_intra
from bench.eval.protocols import DEFAULT_PROTOCOL, fill_defaults
from bench.eval.realcache import check_real_cache, real_cache_key, write_sidecar as _write_sidecar
from bench.eval.refstats import RefStats, reference_side
from bench.eval.intra_check import DEFAULT_MIN_PER_CLASS, UNLABELLED_SKIP, class_based
from bench.eval.sampling import check_psi, check_trunc_mode, eval_latents, standing_stats
from bench.eval.stats import DC_NEIGHBOURS, density_coverage, frechet_distance, t_interval

MIN_SAMPLES = max(MIN_EVAL_SAMPLES, DC_NEIGHBOURS + 1)  # density / coverage: the k-th of the other real samples


# ---------------------------------------------------------------------------------------------
# torch-fidelity
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class MetricSettings:
    """What compute_metrics computes, and how it asks torch-fidelity for the features."""
    extractor: str = "domain"           # domain | inception
    weights_path: Optional[str] = None  # domain: the classifier file; inception: the FID Inception weights
                                        # (a missing file is an EvalError: nothing is downloaded)
    metrics: tuple = ("isc", "fid", "kid", "prc", "dc")  # dc: density / coverage (on prc's features)
    batch_size: int = 64
    num_samples: Optional[int] = None   # images drawn when input1 is a generative model
    num_real: Optional[int] = None      # len(input2) when known (a cached input2 is not loaded to count it)
    cache_dir: Optional[str] = None     # torch-fidelity's feature cache (None: no caching)
    input2_cache_name: Optional[str] = None  # input2 is cached only under a name
    seed: int = 0
    verbose: bool = False               # torch-fidelity's own prints (progress bars, "Recall: ...")


def metrics_from_features(features1: dict, features2: dict, layers: dict, wanted, kw: dict,
                          ref: Optional[RefStats] = None) -> dict:
    """Every metric of the evaluated side's features against the reference side's, in one place
    (featuresdicts {layer: (N, D)} as torch-fidelity extracts them): IS, KID and precision / recall by
    torch-fidelity; the Frechet distance (float64, with its imaginary residue) and density / coverage
    (k = 5, on precision / recall's features) by bench.eval.stats. Returns eval/* keys and fid_imag_residue.
    With `ref` (eval.ref_stats), FID's real side is its mu / sigma and features2 is not read (None)."""
    from torch_fidelity.metric_isc import isc_featuresdict_to_metric
    from torch_fidelity.metric_kid import kid_featuresdict_to_metric
    from torch_fidelity.metric_prc import prc_featuresdict_to_metric

    raw = {}
    if "isc" in wanted:
        raw.update(isc_featuresdict_to_metric(features1, layers["isc"], **kw))
    if "kid" in wanted:
        raw.update(kid_featuresdict_to_metric(features1, features2, layers["kid"], **kw))
    if "prc" in wanted:
        raw.update(prc_featuresdict_to_metric(features1, features2, layers["prc"], **kw))
    out = {registry.FIDELITY_KEYS[k]: float(v) for k, v in raw.items() if k in registry.FIDELITY_KEYS}
    if "fid" in wanted and ref is not None:
        out["eval/FID"], out["fid_imag_residue"] = ref.frechet(features1[layers["fid"]])
    elif "fid" in wanted:
        out["eval/FID"], out["fid_imag_residue"] = frechet_distance(features1[layers["fid"]], features2[layers["fid"]])
    if "dc" in wanted:
        out["eval/density"], out["eval/coverage"] = density_coverage(features2[layers["prc"]], features1[layers["prc"]],
                                                                     DC_NEIGHBOURS)
    return out


def fidelity_kwargs(input1, input2, s: MetricSettings, device: torch.device) -> tuple[dict, dict, list]:
    """(torch-fidelity's settings `kw` for input1 against input2, the feature layer per metric, the layers the
    metrics use). n1 is len(input1), or s.num_samples for a generative model; n2 s.num_real, else len(input2)."""
    fe_name, layers, fe_weights, _ = extractor_settings(s.extractor, s.weights_path)
    n1 = len(input1) if isinstance(input1, torch.utils.data.Dataset) else int(s.num_samples)
    n2 = int(s.num_real) if s.num_real is not None else len(input2)
    wanted = tuple(s.metrics)
    kw = dict(
        input1=input1, input2=input2,
        isc="isc" in wanted, fid="fid" in wanted, kid="kid" in wanted, prc="prc" in wanted,
        feature_extractor=fe_name, feature_extractor_weights_path=fe_weights,
        **{f"feature_layer_{m}": layers[m] for m in ("isc", "fid", "kid", "prc")},
        batch_size=int(s.batch_size), cuda=device.type == "cuda", verbose=bool(s.verbose),
        save_cpu_ram=True,  # no DataLoader worker processes; PRC in blocks
        rng_seed=int(s.seed), isc_splits=max(1, min(10, n1 // 2)), kid_subset_size=min(1000, n1, n2),
        cache=s.cache_dir is not None, cache_root=str(s.cache_dir) if s.cache_dir is not None else None,
    )
    if not isinstance(input1, torch.utils.data.Dataset):
        kw["input1_model_num_samples"] = n1
    if s.input2_cache_name:
        kw["input2_cache_name"] = s.input2_cache_name
    used = [layers[m] for m in ("isc", "fid", "kid", "prc") if m in wanted] + ([layers["prc"]] if "dc" in wanted else [])
    return kw, layers, used


def compute_metrics(input1, input2, settings: MetricSettings = MetricSettings(), *, device="cpu",
                    progress: bool = False, intra=None, ref: Optional[RefStats] = None) -> dict:
    """settings.metrics of input1 against input2 with gan-bench's settings: torch-fidelity extracts the
    features once (metrics_from_features computes every metric from them); returns eval/* keys,
    fid_imag_residue and the cost/* timings (per 1k evaluated images; cost/metrics_s in all).

    input1   the evaluated side (precision = fraction of input1 inside input2's manifold): an
             ImageDataset of uint8 images, or a generative model (then settings.num_samples is needed;
             its `seconds`, when it has them, are reported as sampling and taken out of the features')
    input2   the reference side (real images), an ImageDataset
    intra    None, or a function of (input1's, input2's FID features) -> more record fields (intra-class FID:
             bench.eval.intra.IntraFID.bind)
    ref      None, or FID's real side as moments (eval.ref_stats): input2 unread, only FID (against ref) and IS
    """
    s = settings
    register_sampler()
    device = torch.device(device)
    s, intra = (ref.restrict(s), None) if ref is not None else (s, intra)
    kw, layers, used = fidelity_kwargs(input1, input2, s, device)
    n1 = len(input1) if isinstance(input1, torch.utils.data.Dataset) else int(s.num_samples)
    wanted = tuple(s.metrics)
    ctx = torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
    with ctx:
        if ref is None:
            features1, features2, t1, t2 = extract_features(kw, used)
        else:  # only the generated side's features: the real side is ref's moments
            (features1, t1), features2, t2 = features_of(1, feature_extractor(kw, used), kw), None, 0.0
    t0 = time.perf_counter()
    out = metrics_from_features(features1, features2, layers, wanted, kw, ref=ref)
    if intra is not None:
        out.update(intra(features1[layers["fid"]], features2[layers["fid"]]))
    sample_s = float(getattr(input1, "seconds", 0.0))
    out.update({"cost/sample_s_per_1k": round(1000.0 * sample_s / n1, 4),
                "cost/features_s_per_1k": round(1000.0 * (t1 - sample_s) / n1, 4),
                "cost/real_features_s": round(t2, 3),
                "cost/metrics_s": round(time.perf_counter() - t0, 3)})
    return out


# ---------------------------------------------------------------------------------------------
# Evaluating a generator
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EvalSettings:
    """How a generator is evaluated: the config's eval.* keys (EvalSettings.from_cfg), with their
    defaults written here once; override with dataclasses.replace."""
    num_samples: int = 5000            # generated images
    extractor: str = "domain"          # domain | inception (see bench.metrics_registry.EXTRACTORS)
    weights_path: Optional[str] = None  # extractor=inception: the user's FID Inception weights file
    batch_size: int = 64
    standing_stats: int = 0            # M > 0: recompute G's BatchNorm statistics from M batches first (a copy)
    truncation: Optional[float] = None  # latents' truncation psi (None: off)
    trunc_mode: str = "resample"       # resample | clip | scale
    precision: str = "auto"            # auto (bf16 autocast on CUDA or CPUs with fast bf16) | bf16 | fp32
    num_real: Optional[int] = None     # real images (None: num_samples, capped at the dataset size)
    cache_dir: Optional[str] = None    # real-side feature cache (None: <cache root>/eval)
    classifier_path: Optional[str] = None  # domain classifier file (None: beside the shards)
    seed: int = 0                      # latents and labels (sample set i of `repeats`: seed + i)
    repeats: int = 1                   # independent sample sets per evaluation; the record's value is their mean
    intra_fid: bool = False            # also intra-class FID (bench.eval.intra) from the same features
    intra_min_per_class: int = DEFAULT_MIN_PER_CLASS  # intra_fid: samples per class asked of each side
    train_classifier: bool = True      # train the domain classifier when it is missing
    protocol: str = DEFAULT_PROTOCOL   # domain | biggan | clean (bench.eval.protocols: fills the keys it fixes)
    resize: str = "fidelity"           # fidelity (torch-fidelity's resize) | clean (PIL bicubic to 299, clean-fid's)
    ref_stats: Optional[str] = None    # FID's real side from this npz (mu, sigma) instead of the shards' features
    verbose: bool = False              # also torch-fidelity's own prints (progress bars, "Recall: ...")

    @classmethod
    def from_cfg(cls, cfg) -> "EvalSettings":
        """The settings of a config's eval.* keys; a missing or null key keeps the default here."""
        from omegaconf import OmegaConf

        values = {}
        for f in dataclasses.fields(cls):
            value = OmegaConf.select(cfg, f"eval.{f.name}", default=None)
            if value is None:
                continue
            if isinstance(f.default, (int, str)) and not isinstance(f.default, bool):
                value = type(f.default)(value)
            elif isinstance(f.default, bool):
                value = bool(value)
            values[f.name] = value
        # eval.protocol's values in the keys still at their defaults (bench.eval.protocols)
        return cls(**fill_defaults(values, {f.name: f.default for f in dataclasses.fields(cls)}))


def ensure_classifier(shards_spec, resolution: int, path=None, *, train_if_missing: bool = True,
                      progress: bool = True) -> Path:
    """The domain classifier file for these shards at this resolution: `path`, else the default
    <shard dir>/classifier-r{res}.pt. Trained (about 1.5 min for 10k 32x32 images on 2 CPU cores)
    when missing, or when the default file was trained on other shards or at another resolution.
    A one-class (unlabelled) set has none of its own: without a usable `path`, an EvalError that says
    what to use instead (classifier.unlabelled_message), before anything is read."""
    p = Path(os.path.expanduser(str(path))) if path else default_classifier_path(shards_spec, resolution)
    reason = "is missing"
    meta = None
    if p.is_file():
        try:
            _, meta = load_classifier(p)
        except ClassifierError as exc:
            print(f"warning: {exc}; rebuilding it", file=sys.stderr, flush=True)
            reason = "is unreadable"
    if meta is not None:
        same_data = meta.get("manifest_hash") == manifest_hash(shards_spec)
        if int(meta["resolution"]) == int(resolution) and (same_data or path):
            if not same_data:
                print(f"warning: domain classifier {p} was trained on other shards ({meta.get('shards')})",
                      file=sys.stderr, flush=True)
            return p
        reason = "was trained on other shards" if not same_data else f"is for resolution {meta['resolution']}"
    class_names = dataset_info(shards_spec)[0]
    if class_names is not None and not class_based(len(class_names)):
        raise EvalError(unlabelled_message(shards_spec, resolution))
    if not train_if_missing:
        raise EvalError(f"eval.extractor=domain: the domain classifier {p} {reason}; train it with "
                        f"`bench eval train-classifier data.shards={shards_spec}`")
    if progress:
        print(f"gan-bench eval: the domain classifier {p} {reason}; training it now (once per shard set)",
              file=sys.stderr, flush=True)
    with plain_autograd():  # a caller's no_grad / inference_mode / autocast must not reach the training
        train_classifier(shards_spec, out=p, resolution=int(resolution), progress=progress)
    return p


def _is_rank0() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _checked(s: EvalSettings) -> EvalSettings:
    """The settings with truncation as a float or None; an EvalError before any work if one is wrong."""
    check_extractor(s.extractor)
    if int(s.num_samples) < MIN_SAMPLES:
        raise EvalError(f"eval.num_samples={s.num_samples}: use at least {MIN_SAMPLES} (KID / precision-recall / "
                        f"density-coverage need neighbours)")
    check_trunc_mode(s.trunc_mode)
    if not isinstance(s.repeats, int) or isinstance(s.repeats, bool) or s.repeats < 1:
        raise EvalError(f"eval.repeats={s.repeats!r}: use an integer >= 1")
    if s.precision not in EVAL_PRECISIONS:
        raise EvalError(f"eval.precision={s.precision!r}: choose {', '.join(EVAL_PRECISIONS[:-1])} or "
                        f"{EVAL_PRECISIONS[-1]}")
    if s.extractor == "inception":
        inception_weights(s.weights_path)
    return dataclasses.replace(s, truncation=check_psi(s.truncation))


def _classifier_files(s: EvalSettings, shards_spec, resolution: int, progress: bool):
    """(extractor weights file, domain classifier file or None). The domain classifier is the extractor
    for extractor=domain, and the judge of class_acc whenever one for these shards exists."""
    if s.extractor == "domain":
        clf_file = ensure_classifier(shards_spec, resolution, s.classifier_path, train_if_missing=s.train_classifier,
                                     progress=progress)
        return clf_file, clf_file
    try:
        clf_file = ensure_classifier(shards_spec, resolution, s.classifier_path, train_if_missing=False,
                                     progress=False)
    except EvalError:
        clf_file = None
    return s.weights_path, clf_file


def _real_side(s: EvalSettings, shards_spec, resolution: int, progress: bool) -> tuple[ShardImages, int, ShardImages]:
    """The real images, streamed from the shards one batch at a time and read only if their features are not
    cached (bench.eval.features.ShardImages), their count, and the same stream as the labels' source (intra-FID)."""
    real, n_real = real_images(shards_spec, resolution, int(s.num_real or s.num_samples), progress)
    return real, n_real, real


@dataclass(frozen=True)
class _RealSide:
    """What every sample set of one evaluation shares: the real images and where their features are cached,
    the extractor's weights, the class_acc judge, the autocast and the device."""
    images: ImageDataset
    count: int
    cache_dir: Path
    cache_name: str
    weights_path: Optional[str]
    clf: Optional[nn.Module]
    amp: object
    device: torch.device
    intra: Optional[IntraFID] = None  # eval.intra_fid
    ref: Optional[RefStats] = None    # eval.ref_stats: FID's real side as mu / sigma (images is then empty)
    resize: object = None             # eval.resize=clean: features.clean_resize on both sides


def _one_sample_set(Gs: nn.Module, s: EvalSettings, seed: int, n_classes: int, real: _RealSide,
                    progress: bool) -> dict:
    """The metrics of one sample set of Gs (latents and labels from `seed`) against the real side."""
    # Every latent and label first, in one pass: the i-th sample is the same whatever eval.batch_size.
    z, y = eval_latents(int(s.num_samples), Gs.z_dim, n_classes, truncation=s.truncation, trunc_mode=s.trunc_mode,
                        seed=seed)
    sampler = Sampler(Gs, z, y, autocast=real.amp, classifier=real.clf)
    sampler.resize = real.resize  # eval.resize=clean (after class_acc, which reads G's own resolution)
    if progress and not s.verbose:
        what = "" if int(s.repeats) == 1 else f" (sample set {seed - int(s.seed) + 1} of {s.repeats})"
        sampler.progress = ProgressLine(f"gan-bench eval: sampling + features{what}", int(s.num_samples))
        real.images.progress = ProgressLine("gan-bench eval: real features (cached afterwards)", real.count)
    with plain_autograd(grad=False):  # features (and the real side's cache) never in a caller's autocast
        out = compute_metrics(sampler, real.images, MetricSettings(
            extractor=s.extractor, weights_path=real.weights_path, batch_size=s.batch_size,
            num_samples=int(s.num_samples), num_real=real.count, cache_dir=real.cache_dir,
            input2_cache_name=real.cache_name, seed=seed, verbose=s.verbose), device=real.device, progress=progress,
            intra=real.intra.bind(y) if real.intra is not None else None, ref=real.ref)
    if sampler.cursor != int(s.num_samples):
        raise EvalError(f"sampler: torch-fidelity drew {sampler.cursor} of eval.num_samples={s.num_samples} samples")
    if sampler.count:
        out["eval/class_acc"] = sampler.class_acc()
    return out


def summarise_repeats(per_repeat: list[dict], seed: int) -> dict:
    """One record of K sample sets' results: every metric all of them have as the mean of the K values, with
    eval/<metric>_ci95 = [lo, hi] (bench.eval.stats.t_interval over the K values), repeat_values =
    {metric: [K values]}, repeats = K and repeat_seeds; fid_imag_residue the largest; cost/* per 1k images
    the mean, the others summed (the real features are computed once, then read from the cache)."""
    k = len(per_repeat)
    out: dict = {}
    values = {}
    for name in registry.EVAL_METRICS:
        vals = [r.get(name) for r in per_repeat]
        if all(isinstance(v, (int, float)) and math.isfinite(v) for v in vals):
            values[name] = [float(v) for v in vals]
            out[name] = float(sum(values[name]) / k)
            out[f"{name}{registry.CI_SUFFIX}"] = list(t_interval(values[name]))
    residues = [r["fid_imag_residue"] for r in per_repeat if r.get("fid_imag_residue") is not None]
    if residues:
        out["fid_imag_residue"] = max(residues)
    for name in registry.COST_FIELDS:
        vals = [r[name] for r in per_repeat if r.get(name) is not None]
        if vals:
            out[name] = round(sum(vals) / len(vals) if name.endswith("_per_1k") else sum(vals), 4)
    out.update(summarise_intra(per_repeat))
    out.update(repeats=k, repeat_seeds=[seed + i for i in range(k)], repeat_values=values)
    return out


def evaluate_generator(G: nn.Module, settings: EvalSettings, *, shards_spec, n_classes: int | None = None,
                       device=None, progress: bool = True) -> dict:
    """IS / FID / KID / precision-recall / density-coverage (and class_acc) of generator G against the shards, as
    `settings` says. Rank 0 only: other ranks return {} at once (training's evaluation spread over the ranks:
    bench.eval.spread). G is not modified (standing stats run on a copy).

    G            a gan-bench generator (G.z_dim, G.resolution, G(z, y))
    shards_spec  the real data (shard directory / pattern)
    n_classes    labels are drawn uniformly from [0, n_classes); None = the dataset's classes
    device       where sampling and features run (None = G's device; another one: a copy of G)

    Returns flat keys: the eval/* metrics (eval/class_acc when a domain classifier is available; eval/intra_FID
    and bench.metrics_registry.INTRA_FIELDS with eval.intra_fid), fid_imag_residue, extractor, num_samples, num_real, truncation, trunc_mode, standing_stats, cost/*,
    seconds.
    """
    if not _is_rank0():
        return {}
    t0 = time.time()
    e = eval_setup(G, settings, shards_spec, n_classes, device, progress)
    was_training = G.training
    try:
        Gs = eval_copy(G, e)
        per_repeat = [_one_sample_set(Gs, e.s, int(e.s.seed) + i, e.n_classes, e.side, progress)
                      for i in range(int(e.s.repeats))]
    finally:
        G.train(was_training)
    return finish_record(per_repeat, e, t0)


@dataclass(frozen=True)
class EvalSetup:
    """One evaluation, set up (eval_setup): checked settings, the class count, the real side, its cache key, the
    cache sidecar's fields (extractor_id: the extractor's identity) and the domain classifier file (or None)."""
    s: EvalSettings
    n_classes: int
    side: _RealSide
    key: str
    ident: dict
    clf_file: Optional[Path]


def eval_setup(G: nn.Module, settings: EvalSettings, shards_spec, n_classes=None, device=None,
               progress: bool = True) -> EvalSetup:
    """Everything evaluate_generator does before sampling (bench.eval.spread's rank 0 too): the checks, the domain
    classifier (trained when missing), the real side and its cache, the autocast."""
    s = _checked(settings)
    device = torch.device(device) if device is not None else next(G.parameters()).device
    resolution = int(getattr(G, "resolution"))
    if s.ref_stats:
        return _ref_setup(G, s, shards_spec, n_classes, device, resolution, progress)
    class_names, _, _ = dataset_info(shards_spec)
    n_classes = int(n_classes or (len(class_names) if class_names else G.n_classes))
    real, n_real, loader = _real_side(s, shards_spec, resolution, progress)
    real.resize = resizer(s.extractor, s.resize)
    names = IntraFID.check(s, class_names, n_classes, n_real, G.z_dim) if s.intra_fid else None  # before slow work
    weights_path, clf_file = _classifier_files(s, shards_spec, resolution, progress)
    fe_name, _, _, fe_id = extractor_settings(s.extractor, weights_path, s.resize)
    clf_file = _class_judge(clf_file, n_classes)
    clf = load_classifier(clf_file, device)[0] if clf_file is not None else None
    key = real_cache_key(shards_spec, n_real, resolution, fe_id)
    cache_dir = Path(s.cache_dir) if s.cache_dir is not None else rundir.cache_root() / "eval"
    cache_dir.mkdir(parents=True, exist_ok=True)
    check_real_cache(cache_dir, key)
    if progress:
        psi = f", truncation {s.truncation} ({s.trunc_mode})" if s.truncation is not None else ""
        print(f"gan-bench eval: {s.extractor} features ({fe_name}), {s.num_samples} generated vs {n_real} real "
              f"images{psi}", file=sys.stderr, flush=True)
    amp = autocast(eval_precision(s.precision, device), device)
    intra = IntraFID(names, loader, cache_dir / f"real-{key}-labels.json", n_real) if names else None
    side = _RealSide(real, n_real, cache_dir, f"real-{key}", weights_path, clf, amp, device, intra,
                     resize=real.resize)
    return EvalSetup(s, n_classes, side, key, {
        "shards": str(shards_spec), "manifest_hash": manifest_hash(shards_spec), "num_real": n_real,
        "resolution": resolution, "extractor": s.extractor, "extractor_id": fe_id}, clf_file)


def _class_judge(clf_file: Optional[Path], n_classes: int) -> Optional[Path]:
    """The class_acc judge: the domain classifier file, or None for one class (an unconditional G has no class to
    be judged on; a given eval.classifier_path may still be the extractor), said once in UNLABELLED_SKIP."""
    if class_based(n_classes):
        return clf_file
    print(UNLABELLED_SKIP, file=sys.stderr, flush=True)
    return None


def _ref_setup(G: nn.Module, s: EvalSettings, shards_spec, n_classes, device, resolution: int,
               progress: bool) -> EvalSetup:
    """eval_setup with eval.ref_stats (bench.eval.refstats.reference_side): FID's real side is the file's moments."""
    names = dataset_info(shards_spec)[0] if shards_spec else None
    n_classes = int(n_classes or (len(names) if names else G.n_classes))
    weights_path, clf_file, ref, fe_id = reference_side(s, shards_spec, resolution, _classifier_files, progress)
    clf_file = _class_judge(clf_file, n_classes)
    clf = load_classifier(clf_file, device)[0] if clf_file is not None else None
    amp = autocast(eval_precision(s.precision, device), device)
    side = _RealSide(ImageDataset(torch.zeros((0, 3, 1, 1), dtype=torch.uint8)), int(ref.num_real or 0), None, "",
                     weights_path, clf, amp, device, None, ref=ref, resize=resizer(s.extractor, s.resize))
    return EvalSetup(s, n_classes, side, "", {"ref_stats": ref.path, "extractor_id": fe_id}, clf_file)


def eval_copy(G: nn.Module, e: EvalSetup) -> nn.Module:
    """G in eval mode, as the evaluation samples it: a copy where G would change (standing stats rewrite BatchNorm
    buffers; another device moves it). The caller restores G's mode."""
    s, device = e.s, e.side.device
    copy_G = int(s.standing_stats or 0) > 0 or device != next(G.parameters()).device
    Gs = copy.deepcopy(G).to(device) if copy_G else G
    Gs.eval()
    if Gs is not G:  # standing stats: their own generator (seed + 1), not the evaluation's latents
        standing_stats(Gs, e.n_classes, int(s.standing_stats or 0), batch_size=int(s.batch_size),
                       truncation=s.truncation, trunc_mode=s.trunc_mode, autocast=e.side.amp,
                       generator=torch.Generator(device=device).manual_seed(int(s.seed) + 1))
    return Gs


def finish_record(per_repeat: list[dict], e: EvalSetup, t0: float) -> dict:
    """The record of the sample sets' results (summarise_repeats for several) with the settings and the seconds
    since t0 (time.time()); writes the real cache's sidecar."""
    s = e.s
    out = per_repeat[0] if len(per_repeat) == 1 else summarise_repeats(per_repeat, int(s.seed))
    if e.side.ref is None:
        _write_sidecar(e.side.cache_dir, e.key, e.ident)
    else:
        out.update(ref_stats=e.side.ref.path)
    if s.protocol != DEFAULT_PROTOCOL or s.resize != "fidelity":
        out.update(protocol=s.protocol, resize=s.resize)
    out.update(extractor=s.extractor, num_samples=int(s.num_samples), num_real=e.side.count or None, truncation=s.truncation,
               trunc_mode=s.trunc_mode if s.truncation is not None else None, standing_stats=int(s.standing_stats or 0),
               seconds=round(time.time() - t0, 3))
    return out
