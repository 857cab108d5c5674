"""Evaluation: truncation, standing stats, the domain extractor, torch-fidelity metrics, the real-side
cache, run evaluation, truncation sweeps and interpolation sheets, and
the checkpoint `which=best` picks in a real run. Tiny data; a few minutes on 2 CPUs."""
import ast
import csv
import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from bench import models
from bench import metrics_registry as registry
from bench import rundir
from bench.data.shapes import SHAPES_CLASSES
from bench.data.shards import ShardSetSpec, make_shards, manifest_hash
from bench.eval import classifier as C
from bench.eval import metrics as M
from bench.eval import realcache as RC
from bench.eval import evalrecords as ER
from bench.eval import runs as R
from bench.eval import sampling as S
from bench.eval.classifier import ClassifierSettings
from bench.eval.errors import EvalError
from bench.eval.features import INCEPTION_FILE, ImageDataset
from bench.eval.metrics import EvalSettings, MetricSettings
from bench.eval.sampling import InterpSettings
from conftest import TINY

TINY_MODEL = {"family": "biggan", "ch": 8, "d_ch": 8, "z_dim": 32, "shared_dim": 16, "attn": [], "hier": True}
N_CLASSES = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "shapes32"
    make_shards(out, ShardSetSpec(source="shapes", resolution=32, num_samples=300, samples_per_shard=100, seed=0),
                progress=False)
    return out


@pytest.fixture(scope="module")
def clf(shards):
    """A quickly trained domain classifier, saved at the default place beside the shards. Its length is
    set by epochs, not by the clock (a busy machine would cut a short time budget), in fp32 (bf16 can be
    slow on CPUs that claim it)."""
    settings = ClassifierSettings(epochs=8, max_seconds=600, width=16, holdout=0.2, precision="fp32")
    return C.train_classifier(shards, settings=settings, progress=False)


def tiny_G(seed=0):
    torch.manual_seed(seed)
    G, _ = models.build(TINY_MODEL, 32, N_CLASSES)
    return G.eval().requires_grad_(False)


# ---- truncation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("psi", [0.05, 0.5, 1.0, 2.0])
def test_truncated_normal_resample_bounds_and_variance(psi):
    z = S.truncated_normal((200_000,), psi, generator=torch.Generator().manual_seed(1))
    assert z.abs().max().item() <= psi
    want = S.truncnorm_variance(psi)
    assert abs(z.var().item() - want) < 0.02 * want, (z.var().item(), want)
    assert abs(z.mean().item()) < 0.01 * max(psi, 0.1)
    # not clipping: no pile-up of mass at the threshold
    assert (z.abs() > 0.999 * psi).float().mean().item() < 0.01


def test_truncation_clip_scale_and_off():
    shape, psi = (50_000,), 0.7
    base = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    clip = S.truncated_normal(shape, psi, "clip", generator=torch.Generator().manual_seed(3))
    scale = S.truncated_normal(shape, psi, "scale", generator=torch.Generator().manual_seed(3))
    off = S.truncated_normal(shape, None, generator=torch.Generator().manual_seed(3))
    assert torch.equal(clip, base.clamp(-psi, psi))
    at_edge = (clip.abs() == psi).float().mean().item()
    assert abs(at_edge - (1 - math.erf(psi / math.sqrt(2)))) < 0.01  # the tails pile up at +-psi
    assert torch.allclose(scale, base * psi)
    assert scale.abs().max().item() > psi  # scaling does not bound
    assert torch.equal(off, base)
    with pytest.raises(EvalError, match="trunc_mode"):
        S.truncated_normal(shape, psi, "squash")
    with pytest.raises(EvalError, match="eval.truncation"):
        S.truncated_normal(shape, -1.0)


# ---- standing statistics --------------------------------------------------------------------------

def test_standing_stats_changes_only_batchnorm_buffers():
    G = tiny_G()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    bns = S.batchnorms(G)
    bn_names = {f"{name}.{b}" for name, m in G.named_modules() if m in bns
                for b in ("running_mean", "running_var", "num_batches_tracked")}
    momenta = [m.momentum for m in bns]
    assert len(bns) > 0 and any(k.endswith(".u") for k in before)  # SN buffers exist to be checked

    n = S.standing_stats(G, N_CLASSES, passes=3, batch_size=16, truncation=0.5,
                         generator=torch.Generator().manual_seed(0))
    assert n == len(bns)
    after = G.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed <= bn_names, changed - bn_names
    assert any(k.endswith("running_mean") for k in changed)
    assert all(int(m.num_batches_tracked) == 3 for m in bns)
    assert not G.training and not any(m.training for m in G.modules())
    assert [m.momentum for m in bns] == momenta
    for name, p in G.named_parameters():
        assert torch.equal(p, before[name]), name


# ---- the Inception extractor never downloads --------------------------------------------------------

def test_missing_inception_weights_is_a_clear_evalerror(monkeypatch, tmp_path, shards):
    import torch_fidelity
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    def no_download(*a, **k):
        raise AssertionError("tried to download the Inception weights")

    monkeypatch.setattr(inc, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch_fidelity, "calculate_metrics", no_download)
    G = tiny_G()
    for path in (None, tmp_path / "nowhere" / INCEPTION_FILE):
        with pytest.raises(EvalError) as err:
            M.evaluate_generator(G, EvalSettings(num_samples=20, extractor="inception", weights_path=path,
                                                 cache_dir=tmp_path / "cache"), shards_spec=shards, progress=False)
        msg = str(err.value)
        assert isinstance(err.value, ValueError) and "\n" not in msg
        assert INCEPTION_FILE in msg and "eval.weights_path=" in msg
    with pytest.raises(EvalError, match=INCEPTION_FILE):
        blank = torch.zeros(4, 3, 32, 32, dtype=torch.uint8)
        M.compute_metrics(ImageDataset(blank), ImageDataset(blank.clone()), MetricSettings(extractor="inception"))


# ---- metrics with the domain extractor ------------------------------------------------------------

def test_classifier_file(clf, shards):
    assert clf["path"] == str(shards / "classifier-r32.pt")
    model, meta = C.load_classifier(clf["path"])
    assert meta["class_names"] == SHAPES_CLASSES
    assert meta["resolution"] == 32 and meta["manifest_hash"] == manifest_hash(shards)
    assert 0.0 <= meta["accuracy"] <= 1.0 and meta["n_holdout"] == 60
    feats, logits = model(torch.zeros(5, 3, 32, 32, dtype=torch.uint8))
    assert feats.shape == (5, model.feature_dim) and logits.shape == (5, 10)


def test_fid_of_data_against_itself_is_zero_and_shift_is_positive(clf, shards):
    x, _ = C.load_images(shards, 32)
    settings = MetricSettings(extractor="domain", weights_path=clf["path"], metrics=("fid", "kid"))
    same = M.compute_metrics(ImageDataset(x), ImageDataset(x.clone()), settings)
    assert abs(same["eval/FID"]) < 1e-3
    inverted = M.compute_metrics(ImageDataset(255 - x), ImageDataset(x), settings)
    darker = M.compute_metrics(ImageDataset(x // 2), ImageDataset(x), settings)
    for shifted in (inverted, darker):
        assert shifted["eval/FID"] > 1.0 and shifted["eval/FID"] > 1000 * abs(same["eval/FID"])
        assert shifted["eval/KID"] > same["eval/KID"]


def test_evaluate_generator_end_to_end_and_real_cache(clf, shards, tmp_path, monkeypatch, capfd):
    reads = []
    from bench.eval import features as F

    real_restart = F.ShardImages._restart  # each pass over the real images (the stream) starts here
    monkeypatch.setattr(F.ShardImages, "_restart", lambda self: reads.append(self.n) or real_restart(self))
    G = tiny_G()
    state = {k: v.clone() for k, v in G.state_dict().items()}
    cache = tmp_path / "cache"
    settings = EvalSettings(num_samples=120, cache_dir=cache, batch_size=60)

    def evaluate(s):
        return M.evaluate_generator(G, s, shards_spec=shards, progress=False)

    m1 = evaluate(settings)
    for key in ("eval/IS", "eval/IS_std", "eval/FID", "eval/KID", "eval/KID_std", "eval/precision", "eval/recall",
                "eval/density", "eval/coverage", "eval/class_acc", "fid_imag_residue", *registry.COST_FIELDS):
        assert isinstance(m1[key], float) and math.isfinite(m1[key]), key
    assert 0.0 <= m1["eval/class_acc"] <= 1.0 and m1["eval/FID"] > 0
    assert m1["eval/density"] >= 0 and 0 <= m1["eval/coverage"] <= 1 and 0 <= m1["fid_imag_residue"] <= 1e-3
    assert all(m1[key] >= 0 for key in registry.COST_FIELDS)
    assert m1["extractor"] == "domain" and m1["num_samples"] == 120 and m1["num_real"] == 120
    assert reads == [120]
    cached = sorted(cache.glob("real-*"))
    assert cached and any(p.suffix == ".json" for p in cached)
    mtimes = {p: p.stat().st_mtime_ns for p in cached}

    m2 = evaluate(settings)  # real side from the cache: no shard read, no rewrite
    assert reads == [120]
    assert {p: p.stat().st_mtime_ns for p in sorted(cache.glob("real-*"))} == mtimes
    assert m2["eval/FID"] == pytest.approx(m1["eval/FID"], rel=1e-6)  # same seed, same samples
    assert (m2["eval/density"], m2["eval/coverage"]) == (m1["eval/density"], m1["eval/coverage"])

    m3 = evaluate(replace(settings, num_real=100))  # another N: another key
    assert reads == [120, 100] and m3["num_real"] == 100
    assert len(list(cache.glob("real-*.json"))) == 2
    assert RC.real_cache_key(shards, 100, 32, "x") != RC.real_cache_key(shards, 120, 32, "x")
    assert RC.real_cache_key(shards, 100, 32, "x") != RC.real_cache_key(shards, 100, 32, "y")

    m4 = evaluate(replace(settings, truncation=0.5, standing_stats=2))
    assert m4["truncation"] == 0.5 and m4["standing_stats"] == 2 and reads == [120, 100]
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in state.items())  # G itself untouched

    # A damaged real-statistics cache is rebuilt with a one-line warning; torch-fidelity's own prints
    # ("Recall: ...", its bars) stay out of the terminal, gan-bench's progress lines show.
    key_files = [p for p in cached if p.suffix == ".pt"]
    for p in key_files:
        p.write_bytes(b"garbage")
    capfd.readouterr()
    m5 = M.evaluate_generator(G, settings, shards_spec=shards, progress=True)
    out, err = capfd.readouterr()
    assert m5["eval/FID"] == pytest.approx(m1["eval/FID"], rel=1e-6) and reads == [120, 100, 120]
    assert err.count("warning: real-statistics cache") == len(key_files) and "Traceback" not in err
    assert "Recall" not in out + err and "Precision" not in out + err and "it/s" not in out + err
    assert "sampling + features: 120/120 images" in err and "real features" in err

    run = tmp_path / "run"
    rec = ER.append_eval(run, 40, m1, source="test")
    line = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert line == rec and line["step"] == 40 and line["extractor"] == "domain" and line["num_samples"] == 120
    assert "seconds" in line and line["source"] == "test"
    assert ER.append_eval(run, 41, {}) == {}  # ranks other than 0 get {} and write nothing
    assert len((run / "evals.jsonl").read_text().splitlines()) == 1


def test_eval_settings_from_cfg():
    from bench.schema import EvalCfg

    schema = OmegaConf.create({"eval": OmegaConf.structured(EvalCfg)})
    assert EvalSettings.from_cfg(schema) == EvalSettings()  # the config's defaults are these
    assert EvalSettings.from_cfg(OmegaConf.create({})) == EvalSettings()
    s = EvalSettings.from_cfg(OmegaConf.create({"eval": {"num_samples": "80", "truncation": 0.5, "batch_size": None,
                                                          "classifier_path": "/x/c.pt"}}))
    assert s == replace(EvalSettings(), num_samples=80, truncation=0.5, classifier_path="/x/c.pt")
    assert EvalSettings.from_cfg(OmegaConf.create({"eval": {"verbose": True}})).verbose is True
    assert EvalSettings.from_cfg(OmegaConf.create({"eval": {"repeats": "3"}})).repeats == 3
    assert EvalSettings().repeats == 1


def test_format_table_uses_the_registry_formats():
    table = ER.format_table({"eval/FID": 1.23456, "eval/KID": 0.00123456, "eval/IS": 2.0, "step": 5,
                            "source": "x", "eval/coverage": 0.5, "eval/density": 1.25, "cost/metrics_s": 0.5,
                            "fid_imag_residue": 0.0}, title="t")
    lines = table.splitlines()
    assert lines[0] == "t" and [l.split()[0] for l in lines[2:-1]] == [
        "eval/IS", "eval/FID", "eval/KID", "eval/density", "eval/coverage", "fid_imag_residue", "step",
        "cost/metrics_s"]
    assert "1.235" in table and "0.00123" in table and "2.0000" in table


def test_eval_imports_neither_training_nor_the_cli():
    """Training imports bench.eval, never the other way round; errors.py imports nothing from bench."""
    root = Path(R.__file__).parent
    for path in root.glob("*.py"):
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                imported.add(node.module)
            elif isinstance(node, ast.Import):
                imported.update(a.name for a in node.names)
        assert not {m for m in imported if m.startswith(("bench.train", "bench.cli", "bench.loop"))}, path
        if path.name == "errors.py":
            assert not {m for m in imported if m.split(".")[0] in ("bench", "models")}


# ---- runs: bench eval / bench truncation --------------------------------------------------------------

def make_run(root, shards, steps=(5,)):
    G, D = models.build(TINY_MODEL, 32, N_CLASSES)
    run = root / "run"
    (run / "checkpoints").mkdir(parents=True)
    cfg = {"model": {**TINY_MODEL, "n_classes": None}, "data": {"resolution": 32, "shards": str(shards)},
           "eval": {"num_samples": 80, "extractor": "domain", "batch_size": 40, "trunc_mode": "resample"}}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "run.json").write_text(json.dumps({"shards": str(shards), "n_classes": N_CLASSES}))
    for step in steps:
        torch.save({"G": G.state_dict(), "D": D.state_dict(), "G_ema": G.state_dict(), "config": cfg, "step": step},
                   run / "checkpoints" / f"ckpt-{step:07d}.pt")
    return run


def test_best_rule_filters_extractor_truncation_and_bench_eval(shards, tmp_path):
    """which=best ranks only training evaluations, untruncated, made with the run's own extractor, by
    eval.best_metric (rundir.best_eval), and takes the best that still has a checkpoint."""
    run = make_run(tmp_path, shards, steps=(5, 10, 15, 20))

    def best(*overrides):
        loaded = R.load_run(run, list(overrides), which="best")
        return loaded["step"], loaded["chosen"]

    assert best() == (20, "last (step 20)")  # nothing recorded: the last one
    evals = [{"step": 5, "eval/FID": 3.0, "eval/IS": 2.0, "extractor": "domain"},
             {"step": 10, "eval/FID": 2.0, "eval/IS": 1.0, "extractor": "domain"},
             {"step": 15, "eval/FID": 1.0, "eval/IS": 9.0, "extractor": "inception"},   # another extractor
             {"step": 20, "eval/FID": 0.5, "eval/IS": 9.0, "extractor": "domain", "truncation": 0.5},
             {"step": 15, "eval/FID": 0.1, "eval/IS": 9.0, "extractor": "domain", "source": "bench eval"},
             {"step": 25, "eval/FID": 1.5, "extractor": "domain"}]  # better, but its checkpoint is gone
    (run / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    assert best() == (10, "best by eval/FID in evals.jsonl (step 10)")
    assert best("eval.best_metric=eval/IS") == (5, "best by eval/IS in evals.jsonl (step 5)")
    assert best("eval.extractor=inception")[0] == 10  # ranked by the extractor the run trained with
    assert R.load_run(run, which="last")["step"] == 20
    assert R.load_run(run, which=5)["step"] == 5

    # summary.json's best (the trainer's shape) wins for its own metric and extractor only
    summary = {"best": {"metric": "eval/FID", "value": 2.5, "step": 15}}
    (run / "summary.json").write_text(json.dumps(summary))
    assert best() == (15, "best (summary.json, step 15)")
    assert best("eval.best_metric=eval/IS")[0] == 5
    summary["best"]["extractor"] = "inception"
    (run / "summary.json").write_text(json.dumps(summary))
    assert best()[0] == 10

    shutil.copy(run / "checkpoints" / "ckpt-0000015.pt", run / "checkpoints" / "best.pt")
    loaded = R.load_run(run, which="best")
    assert loaded["step"] == 15 and loaded["checkpoint"].name == "best.pt"
    assert loaded["n_classes"] == N_CLASSES and loaded["class_names"] == SHAPES_CLASSES
    with pytest.raises(EvalError, match="config.yaml"):
        R.load_run(tmp_path / "nothing")


def test_best_checkpoint_choice(clf, shards, tmp_path):
    """A real run: which=best is the step the run itself recorded as best, whether it is read from
    checkpoints/best.pt, summary.json or evals.jsonl."""
    from bench.cli import main

    run = tmp_path / "trained"
    rc = main(["train", f"data.shards={shards}", f"run.dir={run}", *TINY, "train.steps=6", "train.batch_size=4",
               "eval.every=2", "eval.num_samples=40", "eval.batch_size=20", "train.ckpt_every=2",
               "train.ckpt_keep=10", "train.sample_every=0", "telemetry.mfu=false"])
    assert rc == 0
    summary = rundir.read_json(run / rundir.SUMMARY)
    evals = rundir.read_jsonl(run / rundir.EVALS).rows
    recorded = summary["best"]
    assert [r["step"] for r in evals] == [2, 4, 6] and recorded["metric"] == "eval/FID"
    assert recorded["step"] == min(evals, key=lambda r: r["eval/FID"])["step"]
    assert {s for s, _ in rundir.list_checkpoints(run / rundir.CHECKPOINTS)} >= {2, 4, 6}

    loaded = R.load_run(run, which="best")
    assert loaded["checkpoint"].name == rundir.BEST_CKPT and loaded["step"] == recorded["step"]
    # best.pt was kept by FID: asked for another metric, which=best ranks the evaluations by that one
    by_kid = min(evals, key=lambda r: r["eval/KID"])["step"]
    kid = R.load_run(run, overrides=["eval.best_metric=eval/KID"], which="best")
    assert kid["chosen"] == f"best by eval/KID in evals.jsonl (step {by_kid})" and kid["step"] == by_kid
    (run / rundir.CHECKPOINTS / rundir.BEST_CKPT).unlink()
    assert R.load_run(run, which="best")["chosen"] == f"best (summary.json, step {recorded['step']})"
    # a better `bench eval` record does not count; without summary.json, evals.jsonl gives the same step
    ER.append_eval(run, 6, {"eval/FID": 0.0, "extractor": "domain"}, source=rundir.SOURCE_BENCH_EVAL)
    (run / rundir.SUMMARY).unlink()
    assert R.load_run(run, which="best")["chosen"] == f"best by eval/FID in evals.jsonl (step {recorded['step']})"


def test_eval_run_and_truncation_sweep(clf, shards, tmp_path, capsys):
    run = make_run(tmp_path, shards)
    overrides = {"eval": {"cache_dir": str(tmp_path / "cache")}}
    rec = R.eval_run(run, overrides, which="best", progress=False)  # no best recorded: falls back to last
    out = capsys.readouterr().out
    assert "eval/FID" in out and "ckpt-0000005.pt" in out
    line = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert line["source"] == "bench eval" and line["step"] == 5 and line["num_samples"] == 80
    assert line["extractor"] == "domain" and line == rec
    assert (run / "samples" / "eval-0000005-classes.png").is_file()
    assert (run / "samples" / "eval-0000005-interp-class-slerp.png").is_file()

    overrides["eval"].update(extractor="domain", num_samples=60)
    rows = R.truncation_sweep(run, [0.5, None], overrides, progress=False)
    assert [r["psi"] for r in rows] == [0.5, None]
    tdir = run / "truncation"
    with open(tdir / "truncation.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["psi"] for r in table] == ["0.5", "off"]
    assert {"psi", "IS", "FID", "KID", "precision", "recall", "density", "coverage", "class_acc"} <= set(table[0])
    assert all(float(r["FID"]) > 0 for r in table)
    records = json.loads((tdir / "sweep.json").read_text())["records"]
    for row, record in zip(table, records):  # the CSV carries the records' values
        for col in ("FID", "precision", "density", "coverage"):
            assert float(row[col]) == pytest.approx(record[f"eval/{col}"], rel=1e-12), col
    for name in ("is_vs_fid.png", "precision_recall.png", "density_coverage.png", "samples-psi0.5.png",
                 "samples-psioff.png"):
        assert (tdir / name).stat().st_size > 100, name


def test_interpolation_sheets(tmp_path):
    G = tiny_G()
    for mode in ("lerp", "slerp"):
        sheet = S.interpolation_sheet(G, InterpSettings(mode=mode, space="class", steps=5, rows=3),
                                      tmp_path / f"c-{mode}.png")
        assert sheet.shape == (3, 5, 32, 32, 3) and sheet.dtype.name == "uint8"
        assert (tmp_path / f"c-{mode}.png").is_file()
        # the ends of a class row are the two classes themselves (same latent)
        gen = torch.Generator().manual_seed(0)
        z = S.truncated_normal((3, G.z_dim), None, generator=gen)
        with torch.no_grad():
            first = S.to_uint8(G(z, torch.tensor([0, 1, 2])))
            last = S.to_uint8(G(z, torch.tensor([1, 2, 3])))
        assert abs(sheet[:, 0].astype(int) - first.astype(int)).max() <= 1
        assert abs(sheet[:, -1].astype(int) - last.astype(int)).max() <= 1
        zs = S.interpolation_sheet(G, InterpSettings(mode=mode, space="z", steps=4, rows=2))
        assert zs.shape == (2, 4, 32, 32, 3)
        assert not (zs[:, 0] == zs[:, -1]).all()
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = S.slerp(a, b, torch.tensor([[0.5]]))
    assert torch.allclose(mid.norm(), torch.tensor(1.0)) and torch.allclose(mid, torch.tensor([[0.7071, 0.7071]]),
                                                                              atol=1e-4)
    with pytest.raises(EvalError, match="space"):
        InterpSettings(space="w")


# ---- untrusted and damaged files ----------------------------------------------------------------

class _Hostile:
    """Unpickling this would create `marker` (a directory): proof that code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.makedirs, (self.marker,))


def test_hostile_pickles_run_no_code(shards, tmp_path):
    """The domain classifier file and a checkpoint given as which= are read with weights_only=True: a
    pickle whose __reduce__ would write a marker is refused with one EvalError, and writes nothing."""
    from bench.eval.errors import ClassifierError

    marker = tmp_path / "PWNED"
    evil_clf = tmp_path / "classifier-evil.pt"
    torch.save({"state_dict": {}, "class_names": ["a"], "resolution": 32, "width": 16, "x": _Hostile(marker)},
               evil_clf)
    with pytest.raises(ClassifierError, match="unreadable"):
        C.load_classifier(evil_clf)
    with pytest.raises(EvalError, match="unreadable"):
        M.ensure_classifier(shards, 32, evil_clf, train_if_missing=False, progress=False)
    assert not marker.exists()

    run = make_run(tmp_path, shards)
    evil_ckpt = run / "checkpoints" / "evil.pt"
    torch.save({"G_ema": {}, "x": _Hostile(marker)}, evil_ckpt)
    for which in (str(evil_ckpt), "evil.pt"):
        with pytest.raises(EvalError, match="unreadable"):
            R.load_run(run, which=which)
    assert not marker.exists()
    # which= outside the run's own checkpoints/ is refused before anything is read
    for which in (str(run / "config.yaml"), "../run.json", str(tmp_path / "classifier-evil.pt")):
        with pytest.raises(EvalError, match="not allowed"):
            R.load_run(run, which=which)


def test_a_real_runs_checkpoint_loads_with_weights_only(shards, tmp_path):
    """A checkpoint written by bench train (RNG states and all) reads with weights_only=True (NumPy
    arrays admitted: no code runs), and gives the EMA generator."""
    from bench.cli import main

    run = tmp_path / "real"
    rc = main(["train", f"data.shards={shards}", f"run.dir={run}", *TINY, "train.steps=2", "train.batch_size=4",
               "train.ckpt_every=2", "train.sample_every=0", "telemetry.mfu=false", "telemetry.sigma_every=0"])
    assert rc == 0
    (_, path), = rundir.list_checkpoints(run / rundir.CHECKPOINTS)
    state = R.read_checkpoint(path)
    assert "G_ema" in state and state["step"] == 2
    assert R.load_run(run, which="last")["step"] == 2


def test_corrupt_checkpoints_fall_back_to_the_previous_complete_one(shards, tmp_path, capsys):
    run = make_run(tmp_path, shards, steps=(5, 10, 15))
    ckpts = run / "checkpoints"
    (ckpts / "ckpt-0000015.pt").write_bytes(b"garbage, not a zip file")
    loaded = R.load_run(run, which="last")
    err = capsys.readouterr().err
    assert loaded["step"] == 10 and "fallback" in loaded["chosen"]
    assert "ckpt-0000015.pt" in err and "ckpt-0000010.pt" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1

    (ckpts / rundir.BEST_CKPT).write_bytes(b"\x00" * 100)  # a damaged best.pt: the newest complete one
    assert R.load_run(run, which="best")["step"] == 10
    assert "best.pt" in capsys.readouterr().err
    with pytest.raises(EvalError, match="unreadable"):  # an explicit step does not fall back
        R.load_run(run, which="15")
    for step in (5, 10):
        (ckpts / f"ckpt-{step:07d}.pt").write_bytes(b"")
    with pytest.raises(EvalError, match="unreadable"):  # none left
        R.load_run(run, which="last")


def test_untrusted_shard_specs_from_run_files_are_refused(shards, tmp_path):
    run = make_run(tmp_path, shards)
    for spec in ("pipe:curl -s http://example.com/x.tar", "https://example.com/shards-{000..009}.tar",
                 "s3://bucket/shards", "gs://bucket/x"):
        (run / "run.json").write_text(json.dumps({"shards": spec, "n_classes": N_CLASSES}))
        with pytest.raises(EvalError, match="pipe: command or remote URL"):
            R.load_run(run, which="last")
    (run / "run.json").write_text(json.dumps({"n_classes": N_CLASSES}))  # then config.yaml's data.shards
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["shards"] = "pipe:cat /etc/passwd"
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with pytest.raises(EvalError, match="config.yaml"):
        R.load_run(run, which="last")
    assert R.load_run(run, {"data": {"shards": str(shards)}}, which="last")["shards"] == str(shards)


def test_corrupt_classifier_is_rebuilt_with_one_warning(clf, shards, tmp_path, monkeypatch, capsys):
    good = Path(clf["path"])
    bad = tmp_path / "clf.pt"
    bad.write_bytes(b"not a torch file")
    trained = []

    def fake_train(spec, out, resolution, progress):
        trained.append(out)
        shutil.copy(good, out)
    monkeypatch.setattr(M, "train_classifier", fake_train)
    assert M.ensure_classifier(shards, 32, bad, progress=False) == bad
    err = capsys.readouterr().err
    assert trained == [bad] and "unreadable" in err and "rebuilding" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1
    assert C.load_classifier(bad)[1]["resolution"] == 32


def test_real_statistics_cache_is_checked_before_torch_fidelity_reads_it(tmp_path, capsys):
    import numpy as np

    cache, key = tmp_path / "cache", "abc123"
    cache.mkdir()
    marker = tmp_path / "PWNED"
    torch.save({"mu": np.zeros(3), "sigma": np.eye(3)}, cache / f"real-{key}-stat.pt")
    torch.save(torch.zeros(4, 3), cache / f"real-{key}-features.pt")
    (cache / f"real-{key}-fid.pt").write_bytes(b"garbage")
    torch.save({"x": _Hostile(marker)}, cache / f"real-{key}-prc.pt")
    torch.save(torch.zeros(1), cache / "real-otherkey-x.pt")
    (cache / "real-otherkey-bad.pt").write_bytes(b"garbage")  # another key: not this evaluation's business
    RC.check_real_cache(cache, key)
    err = capsys.readouterr().err
    assert sorted(p.name for p in cache.iterdir()) == [f"real-{key}-features.pt", f"real-{key}-stat.pt",
                                                       "real-otherkey-bad.pt", "real-otherkey-x.pt"]
    assert err.count("warning: real-statistics cache") == 2 and "Traceback" not in err
    assert not marker.exists()


def test_corrupt_cpu_peak_cache_is_remeasured_with_one_warning(tmp_path, monkeypatch, capsys):
    from bench import device as bdevice

    monkeypatch.setenv("GAN_BENCH_CACHE", str(tmp_path))
    monkeypatch.setattr(bdevice, "measure_cpu_peak", lambda precision: {"peak": 1.5, "matmul": 1.5, "conv": 1.0})
    path = tmp_path / "cpu_peak.json"
    path.write_text("{ not json")
    peak, source = bdevice.peak_tflops(torch.device("cpu"), "fp32")
    err = capsys.readouterr().err
    assert peak == 1.5 and "matmul" in source
    assert "cpu_peak.json" in err and len([line for line in err.splitlines() if line.strip()]) == 1
    assert json.loads(path.read_text())  # rewritten, readable
    path.write_text(json.dumps({"some-key": "not a dict", "v2|x": {"peak": "nan"}}))  # wrong shapes: remeasured
    assert bdevice.peak_tflops(torch.device("cpu"), "fp32")[0] == 1.5
    assert bdevice.peak_tflops(torch.device("cpu"), "fp32")[0] == 1.5  # now from the cache
    assert capsys.readouterr().err == ""
