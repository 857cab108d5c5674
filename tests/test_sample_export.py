"""`bench sample`: the npz / PNG-directory outputs, the latents and labels of an evaluation, atomic writes and
one-line errors for bad input. A tiny untrained BigGAN; seconds on one CPU."""
import csv
import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from bench import models
from bench import rundir
from bench.cli import main
from bench.config import compose
from bench.eval import export
from bench.eval.sampling import eval_latents, sample_images
from conftest import TINY

N_CLASSES = 10


def make_run(root, shards, extra=()):
    """A run directory as bench train writes it (config.yaml, run.json, one checkpoint) with a random tiny G."""
    cfg = compose([f"data.shards={shards}", *TINY, "model.attn=[]", "eval.batch_size=4", "eval.precision=fp32", *extra])
    torch.manual_seed(0)
    G, D = models.build(OmegaConf.to_container(cfg.model, resolve=True), 32, N_CLASSES)
    run = root / "run"
    (run / rundir.CHECKPOINTS).mkdir(parents=True)
    OmegaConf.save(cfg, run / rundir.CONFIG)
    (run / rundir.RUN_JSON).write_text(json.dumps({"shards": str(shards), "n_classes": N_CLASSES}))
    torch.save({"G_ema": G.state_dict(), "step": 7,
                "config": {"model": OmegaConf.to_container(cfg.model), "data": {"resolution": 32}}},
               run / rundir.CHECKPOINTS / "ckpt-0000007.pt")
    return run, G.eval()


@pytest.fixture()
def run(tmp_path, tiny_shards):
    return make_run(tmp_path, tiny_shards)


def test_npz_holds_the_evaluations_latents_labels_and_images(run, tmp_path, capsys):
    run_dir, G = run
    out = tmp_path / "s.npz"
    assert main(["sample", f"run={run_dir}", "n=9", f"out={out}", "seed=3"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["n"] == 9 and info["step"] == 7 and info["seed"] == 3 and info["truncation"] is None
    a = export.load_npz(out)
    assert a["x"].shape == (9, 32, 32, 3) and a["x"].dtype == np.uint8
    assert a["z"].shape == (9, G.z_dim) and a["z"].dtype == np.float32
    assert a["y"].shape == (9,) and a["y"].dtype == np.int64
    z, y = eval_latents(9, G.z_dim, N_CLASSES, seed=3)  # exactly what `bench eval eval.seed=3` draws
    assert np.array_equal(a["z"], z.numpy()) and np.array_equal(a["y"], y.numpy())
    with torch.no_grad():  # and the images are G's own, rounded to uint8
        ref = ((G(z, y).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert np.abs(a["x"].astype(int) - ref.astype(int)).max() <= 1  # fp32 (eval.precision=fp32)
    assert np.array_equal(a["x"], sample_images(G, z, y, 4).permute(0, 2, 3, 1).numpy())


def test_class_psi_and_png_directory(run, tmp_path, capsys):
    run_dir, G = run
    assert main(["sample", f"run={run_dir}", "n=6", f"out={tmp_path / 'c.npz'}", "class=2", "psi=0.5"]) == 0
    a = export.load_npz(tmp_path / "c.npz")
    assert (a["y"] == 2).all() and np.abs(a["z"]).max() <= 0.5
    z, _ = eval_latents(6, G.z_dim, N_CLASSES, truncation=0.5, seed=0)
    assert np.array_equal(a["z"], z.numpy())  # class= fixes the labels only; the latents are the seed's

    out = tmp_path / "pngs"
    assert main(["sample", f"run={run_dir}", "n=6", f"out={out}", "psi=0.5", "class=2"]) == 0
    rows = list(csv.DictReader(open(out / "labels.csv")))
    assert [r["file"] for r in rows] == [f"{i:06d}.png" for i in range(6)] and {r["label"] for r in rows} == {"2"}
    for i, r in enumerate(rows):  # the PNGs are the same images as the npz (same seed, psi and class)
        assert np.array_equal(np.asarray(Image.open(out / r["file"])), a["x"][i])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".pngs.tmp")]


@pytest.mark.parametrize("args, words", [
    (["n=4", "foo=1"], "'foo=1' is not a valid argument"),
    (["n=0"], "n='0' is not valid; use an integer >= 1"),
    (["n=4", "class=10"], "class=10 is outside the run's classes 0..9"),
    (["n=4", "class=-1"], "class='-1' is not valid"),
    (["n=4", "OUT=x.png"], "is not a valid argument"),
    (["n=4", "eval.nope=1"], "is not an eval.* override"),
    (["n=4", "psi=-1"], "psi='-1'"),
])
def test_bad_input_is_one_line_and_exit_2(run, tmp_path, capsys, args, words):
    run_dir, _ = run
    if not any(a.startswith("out=") for a in args):
        args = [*args, f"out={tmp_path / 'o.npz'}"]
    assert main(["sample", f"run={run_dir}", *args]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("note:")]
    assert len(err) == 1 and err[0].startswith("error: ") and words in err[0], err
    assert not (tmp_path / "o.npz").exists()


def test_bad_out_paths(run, tmp_path, capsys):
    run_dir, _ = run
    assert main(["sample", f"run={run_dir}", "n=2", f"out={tmp_path / 'x.png'}"]) == 2
    assert "the extension '.png' is not written" in capsys.readouterr().err
    full = tmp_path / "full"
    full.mkdir()
    (full / "keep.txt").write_text("mine")
    assert main(["sample", f"run={run_dir}", "n=2", f"out={full}"]) == 2
    assert "exists and is not an empty directory" in capsys.readouterr().err
    assert sorted(p.name for p in full.iterdir()) == ["keep.txt"]
    assert main(["sample", f"run={run_dir}", "n=2"]) == 2
    assert "needs out=" in capsys.readouterr().err


def test_nothing_half_written_on_failure(run, tmp_path, monkeypatch):
    run_dir, _ = run
    real_save, calls = Image.Image.save, []

    def failing_save(self, fp, *a, **k):
        calls.append(fp)
        if len(calls) == 3:
            raise OSError("disk full (test)")
        return real_save(self, fp, *a, **k)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export.sample_run(run_dir, 5, tmp_path / "d", progress=False)
    assert len(calls) == 3 and sorted(p.name for p in tmp_path.iterdir()) == ["run"]

    def failing_savez(f, **arrays):
        f.write(b"PK partial")
        raise OSError("disk full (test)")

    monkeypatch.setattr(np, "savez", failing_savez)
    with pytest.raises(OSError, match="disk full"):
        export.sample_run(run_dir, 5, tmp_path / "s.npz", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_progress_line_for_long_jobs(run, tmp_path, capsys, monkeypatch):
    run_dir, _ = run
    monkeypatch.setattr(export, "PROGRESS_MIN", 4)
    assert main(["sample", f"run={run_dir}", "n=8", f"out={tmp_path / 'p.npz'}"]) == 0
    err = capsys.readouterr().err
    assert "gan-bench sample: p.npz: 8/8 images" in err and "bench sample: wrote 8 images" in err
