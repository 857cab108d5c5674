"""Reference statistics (`bench eval stats`, eval.ref_stats), the evaluation protocols (eval.protocol) and the clean
resize. Tiny data, the domain extractor; about a minute on one CPU."""
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bench import rundir
from bench.cli import main
from bench.eval import features as F
from bench.eval import refstats
from bench.eval import runs as R
from bench.eval.errors import EvalError
from bench.eval.metrics import EvalSettings
from bench.eval.stats import frechet_from_statistics
from conftest import classified_shards
from test_sample_export import make_run

N_REAL = 300
DIM = 32  # the domain classifier of classified_shards: width 8, 4 x 8 features


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return classified_shards(tmp_path_factory.mktemp("refstats"), num_samples=N_REAL)


@pytest.fixture()
def run(tmp_path, shards):
    return make_run(tmp_path, shards, extra=("eval.num_samples=60", "eval.batch_size=30"))[0]


def last_record(run_dir):
    return rundir.read_jsonl(run_dir / rundir.EVALS).rows[-1]


def test_fid_against_the_stats_file_equals_fid_against_the_shards(run, shards, tmp_path, capsys):
    ref = tmp_path / "ref.npz"
    assert main(["eval", "stats", f"data.shards={shards}", f"out={ref}", "data.resolution=32"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["num_real"] == N_REAL and info["extractor"] == "domain" and info["dim"] == DIM
    f = np.load(ref, allow_pickle=False)
    assert f["mu"].dtype == np.float64 and f["sigma"].shape == (DIM, DIM) and int(f["num_real"]) == N_REAL

    assert main(["eval", f"run={run}", f"eval.num_real={N_REAL}", "which=last"]) == 0
    from_shards = last_record(run)
    capsys.readouterr()
    assert main(["eval", f"run={run}", f"eval.ref_stats={ref}", "which=last"]) == 0
    err = capsys.readouterr().err
    from_file = last_record(run)
    rel = abs(from_file["eval/FID"] - from_shards["eval/FID"]) / from_shards["eval/FID"]
    print(f"FID shards {from_shards['eval/FID']!r} file {from_file['eval/FID']!r} relative difference {rel:.3g}")
    assert rel <= 1e-6
    assert from_file["ref_stats"] == str(ref) and from_file["num_real"] == N_REAL
    # the generated side only: IS and class_acc as before; the metrics that need real features are skipped, said once
    assert from_file["eval/IS"] == pytest.approx(from_shards["eval/IS"], rel=1e-9)
    assert from_file["eval/class_acc"] == from_shards["eval/class_acc"]
    for name in ("eval/KID", "eval/precision", "eval/recall", "eval/density", "eval/coverage"):
        assert name in from_shards and name not in from_file
    assert err.count("KID, precision/recall, density/coverage need the real features themselves and are skipped") == 1


def test_biggan_pytorch_and_ttur_layout_is_read(run, tmp_path):
    """Only mu and sigma (float32 here, as TTUR's files): FID is the Frechet distance against them."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(400, DIM))
    mu, sigma = a.mean(0).astype(np.float32), np.cov(a, rowvar=False).astype(np.float32)
    path = tmp_path / "I128_inception_moments.npz"
    np.savez(path, mu=mu, sigma=sigma)
    stats = refstats.load_ref_stats(path, dim=DIM, extractor="domain")
    assert stats.layout == "mu/sigma" and stats.num_real is None and stats.mu.dtype == np.float64
    rec = R.eval_run(run, [f"eval.ref_stats={path}"], which="last", progress=False, sheets=False, show=False)
    assert rec["num_real"] is None and np.isfinite(rec["eval/FID"]) and rec["eval/FID"] > 0


@pytest.mark.parametrize("arrays, words", [
    ({"mu": np.zeros(2048), "sigma": np.eye(2048)}, "its statistics have 2048 feature dimensions, but the domain "
                                                    "extractor's FID features have 32"),
    ({"m": np.zeros(3)}, "has no mu and sigma arrays (has: m)"),
    ({"mu": np.zeros(DIM), "sigma": np.eye(DIM - 1)}, "mu has 32 dimensions but sigma is (31, 31)"),
])
def test_bad_stats_files_are_one_line(run, tmp_path, capsys, arrays, words):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    assert main(["eval", f"run={run}", f"eval.ref_stats={path}", "which=last"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and words in err[0] and str(path) in err[0], err


def test_stats_file_of_another_extractor_is_refused(tmp_path):
    path = refstats.save_ref_stats(tmp_path / "r.npz", np.zeros(DIM), np.eye(DIM), extractor="inception",
                                   extractor_id="inception:x", num_real=10)
    with pytest.raises(EvalError, match="made with eval.extractor=inception, this evaluation uses eval.extractor=domain"):
        refstats.load_ref_stats(path, dim=DIM, extractor="domain")
    path = refstats.save_ref_stats(tmp_path / "r64.npz", np.zeros(DIM), np.eye(DIM), extractor="domain",
                                   extractor_id="domain:x", num_real=10, resolution=64)
    with pytest.raises(EvalError, match="made from images at 64x64, this generator makes 32x32; write it with "
                                        "`bench eval stats ... data.resolution=32`"):
        refstats.load_ref_stats(path, dim=DIM, extractor="domain", resolution=32)
    assert refstats.load_ref_stats(path, dim=DIM, extractor="domain", resolution=64).num_real == 10


def test_stats_command_bad_input(shards, tmp_path, capsys):
    assert main(["eval", "stats", f"data.shards={shards}", f"out={tmp_path / 'r.txt'}"]) == 2
    assert "written as FILE.npz" in capsys.readouterr().err
    assert main(["eval", "stats", f"data.shards={shards}"]) == 2
    assert "needs out=FILE.npz" in capsys.readouterr().err
    assert main(["eval", "stats", f"data.shards={shards}", f"out={tmp_path / 'r.npz'}", "eval.protocol=nope"]) == 2
    assert "eval.protocol='nope' is not valid; choose one of: domain, biggan, clean" in capsys.readouterr().err
    assert not (tmp_path / "r.npz").exists()


# ---- protocols --------------------------------------------------------------------------------------------------

def test_protocol_fills_its_keys_and_the_command_line_wins(run):
    s = EvalSettings.from_cfg(OmegaConf.create({"eval": {"protocol": "biggan"}}))
    assert (s.extractor, s.num_samples, s.truncation, s.standing_stats, s.precision, s.resize) == (
        "inception", 50000, None, 16, "fp32", "fidelity")
    assert EvalSettings.from_cfg(OmegaConf.create({"eval": {"protocol": "clean"}})).resize == "clean"
    assert EvalSettings.from_cfg(OmegaConf.create({"eval": {}})) == EvalSettings()  # domain: nothing changes
    # a run's own config.yaml (num_samples=60) gives way to the protocol; the command line's overrides do not
    cfg = R.load_run(run, ["eval.protocol=biggan", "eval.num_samples=1000"], which="last")["cfg"]
    s = EvalSettings.from_cfg(cfg)
    assert (s.num_samples, s.extractor, s.standing_stats, s.truncation) == (1000, "inception", 16, None)
    cfg = R.load_run(run, ["eval.protocol=biggan"], which="last")["cfg"]
    assert EvalSettings.from_cfg(cfg).num_samples == 50000


def test_missing_inception_weights_names_the_file_and_torch_fidelitys_place(run, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    assert main(["eval", f"run={run}", "eval.protocol=clean", "which=last"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    where = tmp_path / "hub" / "checkpoints" / F.INCEPTION_HUB_FILE
    assert len(err) == 1 and F.INCEPTION_FILE in err[0] and str(where) in err[0] and "eval.weights_path" in err[0]
    where.parent.mkdir(parents=True)
    where.write_bytes(b"x")  # torch-fidelity's own copy is used when eval.weights_path is not set
    assert F.inception_weights(None) == where


def test_clean_resize_is_pil_bicubic_on_uint8():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (3, 3, 32, 32), generator=g, dtype=torch.uint8)
    out = F.clean_resize(x)
    assert out.shape == (3, 3, 299, 299) and out.dtype == torch.uint8
    for i in range(3):
        ref = np.asarray(Image.fromarray(x[i].permute(1, 2, 0).numpy()).resize((299, 299), Image.BICUBIC))
        assert np.array_equal(out[i].permute(1, 2, 0).numpy(), ref)
    assert F.clean_resize(out) is out  # already 299: unchanged
    # it differs from torch-fidelity's own bilinear resize, which it replaces
    from torch_fidelity.interpolate_compat_tensorflow import interpolate_bilinear_2d_like_tensorflow1x

    bilinear = interpolate_bilinear_2d_like_tensorflow1x(x.float(), size=(299, 299), align_corners=False)
    assert (bilinear - out.float()).abs().mean() > 1.0
    # and a 299 x 299 input passes torch-fidelity's resize unchanged, so the extractor sees the clean images
    same = interpolate_bilinear_2d_like_tensorflow1x(out.float(), size=(299, 299), align_corners=False)
    assert torch.equal(same, out.float())
    with pytest.raises(EvalError, match="eval.resize=clean resizes to Inception's 299"):
        F.resizer("domain", "clean")


def test_clean_resize_reaches_both_sides_and_the_cache_key(tmp_path):
    """eval.resize=clean: the real ImageDataset and the Sampler hand 299 x 299 clean-resized images to the extractor,
    and the extractor's identity (so the real-feature cache key) differs from the default resize's."""
    from bench import models

    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    real = F.ImageDataset(x)
    real.resize = F.resizer("inception", "clean")
    assert real[1].shape == (3, 299, 299) and torch.equal(real[1], F.clean_resize(x[1:2])[0])
    torch.manual_seed(0)
    G, _ = models.build({"family": "biggan", "ch": 8, "d_ch": 8, "z_dim": 32, "shared_dim": 16, "attn": []}, 32, 10)
    sampler = F.Sampler(G.eval(), torch.randn(2, 32), torch.tensor([1, 2]), autocast=None)
    sampler.resize = F.clean_resize
    out = sampler(torch.zeros(2, 32))
    assert out.shape == (2, 3, 299, 299) and out.dtype == torch.uint8
    weights = tmp_path / F.INCEPTION_FILE
    weights.write_bytes(b"x")
    ids = {r: F.extractor_settings("inception", weights, r)[3] for r in ("fidelity", "clean")}
    assert ids["clean"] == ids["fidelity"] + ":resize-clean"
