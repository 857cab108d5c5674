"""`bench inspect` and `bench data make-shards` as a user runs them."""
import json

import pytest

from bench.cli import main


def test_inspect_biggan_128_matches_the_paper(capsys):
    assert main(["inspect", "model=biggan_128"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["G_params"] == pytest.approx(70.4e6, rel=0.005)
    assert out["D_params"] == pytest.approx(88.0e6, rel=0.005)
    assert out["resolution"] == 128 and out["n_classes"] == 1000
    # About 365 GFLOP per image is often quoted for one D step plus one G step; that count keeps D's
    # weight gradients on in the G step. The trainer freezes D there (docs/architecture.md, "One
    # training step"), which saves ~21 GFLOP: 342.7 GFLOP.
    flops = out["GFLOP_per_image"]
    assert flops["D_step"] + flops["G_step"] == pytest.approx(342.7, rel=0.02)
    assert flops["D_step"] > flops["G_step"] > 0


def test_make_shards_command(tmp_path, capsys):
    out_dir = tmp_path / "s"
    assert main(["data", "make-shards", "source=shapes", f"out={out_dir}", "data.resolution=16",
                 "data.num_samples=100", "data.samples_per_shard=50"]) == 0
    manifest = json.loads((out_dir / "manifest.json").read_text())
    assert manifest["num_samples"] == 100 and manifest["resolution"] == 16 and len(manifest["shards"]) == 2
    assert all((out_dir / s).exists() for s in manifest["shards"])


@pytest.mark.parametrize("args, needle", [
    (["data", "make-shards", "source=shapes"], "out=DIR"),
    (["data", "make-shards", "source=lmdb", "out=/tmp/x"], "source='lmdb'"),
    (["data", "make-shards", "source=folder", "out=/tmp/x"], "folder=DIR"),
    (["data", "make-shards", "out=/tmp/x", "colour=red"], "unknown key 'colour'"),
    (["frobnicate"], "unknown command 'frobnicate'"),
])
def test_cli_usage_errors(capsys, args, needle):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1
