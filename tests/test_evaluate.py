"""Evaluation: truncation, standing stats, the domain extractor, torch-fidelity metrics, the real-side
cache, run evaluation, truncation sweeps and interpolation sheets. Tiny data; about a minute on 2 CPUs."""
import csv
import json
import math
import shutil

import pytest
import torch
import yaml

import models
from bench import classifier as C
from bench import evaluate as E
from bench.data import SHAPES_CLASSES, make_shards

TINY_MODEL = {"family": "biggan", "ch": 8, "d_ch": 8, "z_dim": 32, "shared_dim": 16, "attn": [], "hier": True}
N_CLASSES = 10


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "shapes32"
    make_shards(out, source="shapes", resolution=32, num_samples=300, samples_per_shard=100, seed=0, progress=False)
    return out


@pytest.fixture(scope="module")
def clf(shards):
    """A quickly trained domain classifier, saved at the default place beside the shards."""
    return C.train_classifier(shards, epochs=8, max_seconds=60, width=16, holdout=0.2, progress=False)


def tiny_G(seed=0):
    torch.manual_seed(seed)
    G, _ = models.build(TINY_MODEL, 32, N_CLASSES)
    return G.eval().requires_grad_(False)


# ---- truncation ---------------------------------------------------------------------------------

@pytest.mark.parametrize("psi", [0.05, 0.5, 1.0, 2.0])
def test_truncated_normal_resample_bounds_and_variance(psi):
    z = E.truncated_normal((200_000,), psi, generator=torch.Generator().manual_seed(1))
    assert z.abs().max().item() <= psi
    want = E.truncnorm_variance(psi)
    assert abs(z.var().item() - want) < 0.02 * want, (z.var().item(), want)
    assert abs(z.mean().item()) < 0.01 * max(psi, 0.1)
    # not clipping: no pile-up of mass at the threshold
    assert (z.abs() > 0.999 * psi).float().mean().item() < 0.01


def test_truncation_clip_scale_and_off():
    shape, psi = (50_000,), 0.7
    base = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    clip = E.truncated_normal(shape, psi, "clip", generator=torch.Generator().manual_seed(3))
    scale = E.truncated_normal(shape, psi, "scale", generator=torch.Generator().manual_seed(3))
    off = E.truncated_normal(shape, None, generator=torch.Generator().manual_seed(3))
    assert torch.equal(clip, base.clamp(-psi, psi))
    at_edge = (clip.abs() == psi).float().mean().item()
    assert abs(at_edge - (1 - math.erf(psi / math.sqrt(2)))) < 0.01  # the tails pile up at +-psi
    assert torch.allclose(scale, base * psi)
    assert scale.abs().max().item() > psi  # scaling does not bound
    assert torch.equal(off, base)
    with pytest.raises(E.EvalError, match="trunc_mode"):
        E.truncated_normal(shape, psi, "squash")
    with pytest.raises(E.EvalError, match="eval.truncation"):
        E.truncated_normal(shape, -1.0)


# ---- standing statistics --------------------------------------------------------------------------

def test_standing_stats_changes_only_batchnorm_buffers():
    G = tiny_G()
    before = {k: v.clone() for k, v in G.state_dict().items()}
    bns = E._batchnorms(G)
    bn_names = {f"{name}.{b}" for name, m in G.named_modules() if m in bns
                for b in ("running_mean", "running_var", "num_batches_tracked")}
    momenta = [m.momentum for m in bns]
    assert len(bns) > 0 and any(k.endswith(".u") for k in before)  # SN buffers exist to be checked

    n = E.standing_stats(G, N_CLASSES, passes=3, batch_size=16, truncation=0.5,
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
    for path in (None, tmp_path / "nowhere" / E.INCEPTION_FILE):
        with pytest.raises(E.EvalError) as err:
            E.evaluate_generator(G, shards_spec=shards, num_samples=20, extractor="inception", weights_path=path,
                                 cache_dir=tmp_path / "cache", progress=False)
        msg = str(err.value)
        assert isinstance(err.value, ValueError) and "\n" not in msg
        assert E.INCEPTION_FILE in msg and "eval.weights_path=" in msg
    with pytest.raises(E.EvalError, match=E.INCEPTION_FILE):
        E.compute_metrics(E.ImageDataset(torch.zeros(4, 3, 32, 32, dtype=torch.uint8)),
                          E.ImageDataset(torch.zeros(4, 3, 32, 32, dtype=torch.uint8)), extractor="inception")


# ---- metrics with the domain extractor ------------------------------------------------------------

def test_classifier_file(clf, shards):
    assert clf["path"] == str(shards / "classifier-r32.pt")
    model, meta = C.load_classifier(clf["path"])
    assert meta["class_names"] == SHAPES_CLASSES
    assert meta["resolution"] == 32 and meta["manifest_hash"] == C.manifest_hash(shards)
    assert 0.0 <= meta["accuracy"] <= 1.0 and meta["n_holdout"] == 60
    feats, logits = model(torch.zeros(5, 3, 32, 32, dtype=torch.uint8))
    assert feats.shape == (5, model.feature_dim) and logits.shape == (5, 10)


def test_fid_of_data_against_itself_is_zero_and_shift_is_positive(clf, shards):
    x, _ = C.load_images(shards, 32)
    kw = dict(extractor="domain", weights_path=clf["path"], metrics=("fid", "kid"))
    same = E.compute_metrics(E.ImageDataset(x), E.ImageDataset(x.clone()), **kw)
    assert abs(same["eval/FID"]) < 1e-3
    inverted = E.compute_metrics(E.ImageDataset(255 - x), E.ImageDataset(x), **kw)
    darker = E.compute_metrics(E.ImageDataset(x // 2), E.ImageDataset(x), **kw)
    for shifted in (inverted, darker):
        assert shifted["eval/FID"] > 1.0 and shifted["eval/FID"] > 1000 * abs(same["eval/FID"])
        assert shifted["eval/KID"] > same["eval/KID"]


def test_evaluate_generator_end_to_end_and_real_cache(clf, shards, tmp_path, monkeypatch):
    reads = []
    real_load = C.load_images
    monkeypatch.setattr(C, "load_images", lambda *a, **k: reads.append(k.get("limit")) or real_load(*a, **k))
    G = tiny_G()
    state = {k: v.clone() for k, v in G.state_dict().items()}
    cache = tmp_path / "cache"
    kw = dict(shards_spec=shards, num_samples=120, cache_dir=cache, progress=False, batch_size=60)

    m1 = E.evaluate_generator(G, **kw)
    for key in ("eval/IS", "eval/IS_std", "eval/FID", "eval/KID", "eval/KID_std", "eval/precision", "eval/recall",
                "eval/class_acc"):
        assert isinstance(m1[key], float) and math.isfinite(m1[key]), key
    assert 0.0 <= m1["eval/class_acc"] <= 1.0 and m1["eval/FID"] > 0
    assert m1["extractor"] == "domain" and m1["num_samples"] == 120 and m1["num_real"] == 120
    assert reads == [120]
    cached = sorted(cache.glob("real-*"))
    assert cached and any(p.suffix == ".json" for p in cached)
    mtimes = {p: p.stat().st_mtime_ns for p in cached}

    m2 = E.evaluate_generator(G, **kw)  # real side from the cache: no shard read, no rewrite
    assert reads == [120]
    assert {p: p.stat().st_mtime_ns for p in sorted(cache.glob("real-*"))} == mtimes
    assert m2["eval/FID"] == pytest.approx(m1["eval/FID"], rel=1e-6)  # same seed, same samples

    m3 = E.evaluate_generator(G, **{**kw, "num_real": 100})  # another N: another key
    assert reads == [120, 100] and m3["num_real"] == 100
    assert len(list(cache.glob("real-*.json"))) == 2
    assert E.real_cache_key(shards, 100, 32, "x") != E.real_cache_key(shards, 120, 32, "x")
    assert E.real_cache_key(shards, 100, 32, "x") != E.real_cache_key(shards, 100, 32, "y")

    m4 = E.evaluate_generator(G, **kw, truncation=0.5, standing_stats=2)
    assert m4["truncation"] == 0.5 and m4["standing_stats"] == 2 and reads == [120, 100]
    assert all(torch.equal(v, G.state_dict()[k]) for k, v in state.items())  # G itself untouched

    run = tmp_path / "run"
    rec = E.append_eval(run, 40, m1, source="test")
    line = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert line == rec and line["step"] == 40 and line["extractor"] == "domain" and line["num_samples"] == 120
    assert "seconds" in line and line["source"] == "test"
    assert E.append_eval(run, 41, {}) == {}  # ranks other than 0 get {} and write nothing
    assert len((run / "evals.jsonl").read_text().splitlines()) == 1


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


def test_best_checkpoint_choice(shards, tmp_path):
    run = make_run(tmp_path, shards, steps=(5, 10, 15))
    assert E.load_run(run, which="best")["step"] == 15  # nothing recorded: the last one
    evals = [{"step": 5, "eval/FID": 3.0}, {"step": 10, "eval/FID": 2.0, "eval/IS": 1.0},
             {"step": 10, "eval/FID": 1.0, "source": "bench eval"}, {"step": 20, "eval/FID": 0.5}]
    (run / "evals.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    assert E.load_run(run, which="best")["step"] == 10  # lowest FID among training evals with a checkpoint
    assert E.load_run(run, ["eval.best_metric=eval/IS"], which="best")["step"] == 10
    assert E.load_run(run, which="last")["step"] == 15
    assert E.load_run(run, which=5)["step"] == 5
    (run / "summary.json").write_text(json.dumps({"best": {"step": 5, "eval/FID": 3.0}}))
    assert E.load_run(run, which="best")["step"] == 5
    shutil.copy(run / "checkpoints" / "ckpt-0000015.pt", run / "checkpoints" / "best.pt")
    loaded = E.load_run(run, which="best")
    assert loaded["step"] == 15 and loaded["checkpoint"].name == "best.pt"
    assert loaded["n_classes"] == N_CLASSES and loaded["class_names"] == SHAPES_CLASSES
    with pytest.raises(E.EvalError, match="config.yaml"):
        E.load_run(tmp_path / "nothing")


def test_eval_run_and_truncation_sweep(clf, shards, tmp_path, capsys):
    run = make_run(tmp_path, shards)
    overrides = {"eval": {"cache_dir": str(tmp_path / "cache")}}
    rec = E.eval_run(run, overrides, which="best", progress=False)  # no best recorded: falls back to last
    out = capsys.readouterr().out
    assert "eval/FID" in out and "ckpt-0000005.pt" in out
    line = json.loads((run / "evals.jsonl").read_text().splitlines()[-1])
    assert line["source"] == "bench eval" and line["step"] == 5 and line["num_samples"] == 80
    assert line["extractor"] == "domain" and line == rec
    assert (run / "samples" / "eval-0000005-classes.png").is_file()
    assert (run / "samples" / "eval-0000005-interp-class-slerp.png").is_file()

    rows = E.truncation_sweep(run, [0.5, None], extractor="domain", num_samples=60, overrides_cfg=overrides,
                              progress=False)
    assert [r["psi"] for r in rows] == [0.5, None]
    tdir = run / "truncation"
    with open(tdir / "truncation.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["psi"] for r in table] == ["0.5", "off"]
    assert {"psi", "IS", "FID", "KID", "precision", "recall", "class_acc"} <= set(table[0])
    assert all(float(r["FID"]) > 0 for r in table)
    for name in ("is_vs_fid.png", "precision_recall.png", "samples-psi0.5.png", "samples-psioff.png"):
        assert (tdir / name).stat().st_size > 100, name


def test_interpolation_sheets(tmp_path):
    G = tiny_G()
    for mode in ("lerp", "slerp"):
        sheet = E.interpolation_sheet(G, mode=mode, space="class", steps=5, rows=3, path=tmp_path / f"c-{mode}.png")
        assert sheet.shape == (3, 5, 32, 32, 3) and sheet.dtype.name == "uint8"
        assert (tmp_path / f"c-{mode}.png").is_file()
        # the ends of a class row are the two classes themselves (same latent)
        gen = torch.Generator().manual_seed(0)
        z = E.truncated_normal((3, G.z_dim), None, generator=gen)
        with torch.no_grad():
            first = E.to_uint8(G(z, torch.tensor([0, 1, 2])))
            last = E.to_uint8(G(z, torch.tensor([1, 2, 3])))
        assert abs(sheet[:, 0].astype(int) - first.astype(int)).max() <= 1
        assert abs(sheet[:, -1].astype(int) - last.astype(int)).max() <= 1
        zs = E.interpolation_sheet(G, mode=mode, space="z", steps=4, rows=2)
        assert zs.shape == (2, 4, 32, 32, 3)
        assert not (zs[:, 0] == zs[:, -1]).all()
    a, b = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    mid = E._slerp(a, b, torch.tensor([[0.5]]))
    assert torch.allclose(mid.norm(), torch.tensor(1.0)) and torch.allclose(mid, torch.tensor([[0.7071, 0.7071]]),
                                                                              atol=1e-4)
    with pytest.raises(E.EvalError):
        E.interpolation_sheet(G, space="w")
