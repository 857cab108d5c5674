"""`bench inspect` and `bench data make-shards` as a user runs them."""
import json

import pytest

from bench.cli import main


def test_inspect_biggan_128_matches_the_paper(capsys):
    assert main(["inspect", "model=biggan_128", "model.init=N02"]) == 0  # the init does not change counts; ortho is slow to draw
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


def test_precision_auto_is_resolved_and_explicit_kept(monkeypatch):
    """train.precision defaults to auto; resolve (bench.config.prepare) writes what will run (config.yaml records it)."""
    import torch

    from bench import config as C
    from bench import device

    from bench.schema import TrainCfg

    assert TrainCfg().precision == "auto" and C.compose([]).train.precision == "auto"
    want = "bf16" if torch.cuda.is_available() or device.cpu_has_fast_bf16() else "fp32"
    assert C.validate(C.compose([])).train.precision == "auto"  # validate only checks
    assert C.prepare(C.compose([])).train.precision == want
    for fast, expected in ((True, "bf16"), (False, "bf16" if torch.cuda.is_available() else "fp32")):
        monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda fast=fast: fast)
        assert C.resolve_precision("auto") == expected
    for explicit in ("bf16", "fp32"):
        assert C.prepare(C.compose([f"train.precision={explicit}"])).train.precision == explicit
    with pytest.raises(C.ConfigError, match="train.precision='fp8'"):
        C.validate(C.compose(["train.precision=fp8"]))


def test_world_size_from_the_environment(monkeypatch, capsys):
    from bench.cli import _world_size

    monkeypatch.setenv("WORLD_SIZE", "3")
    assert _world_size() == 3
    monkeypatch.delenv("WORLD_SIZE")
    assert _world_size() == 1
    for bad in ("x", "0", "-2", "1.5"):
        monkeypatch.setenv("WORLD_SIZE", bad)
        assert main(["train", "run.dry_run=true"]) == 2
        err = capsys.readouterr().err
        assert f"WORLD_SIZE={bad!r}" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("argv", [
    ["eval", "run=/nowhere", "colour=red"],
    ["eval", "watch", "run=/nowhere", "colour=red"],
    ["eval", "stats", "out=r.npz", "colour=red"],
    ["eval", "train-classifier", "colour=red"],
    ["truncation", "run=/nowhere", "colour=red"],
    ["sample", "run=/nowhere", "n=2", "out=x.npz", "colour=red"],
    ["import", "biggan-pytorch", "weights=w.pth", "model=biggan_128", "out=o", "colour=red"],
    ["data", "make-shards", "out=/nowhere", "colour=red"],
    ["report", "/nowhere", "colour=red"],
])
def test_every_command_reads_its_arguments_through_the_one_grammar(capsys, argv):
    """bench/args.py: an unknown key is one line naming the command, the key, the value and the keys allowed,
    before anything is read or written."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    command = " ".join(a for a in argv[:2] if "=" not in a and not a.startswith("/"))
    assert len(err) == 1 and f"bench {command}: " in err[0], err
    assert "unknown key 'colour'" in err[0] and "'colour=red' is not a valid argument; valid keys: " in err[0]


def test_psi_lists_are_read_as_hydra_reads_them(tmp_path, monkeypatch):
    """`bench truncation psi=[0.5,1.0]` and `'psi=[0.5, 1.0]'` hand the same list to the sweep."""
    from omegaconf import OmegaConf

    from bench import config as C
    from bench.eval import runs

    run = tmp_path / "run"
    run.mkdir()
    OmegaConf.save(C.validate(C.compose([])), run / "config.yaml")
    seen = []
    monkeypatch.setattr(runs, "truncation_sweep", lambda run_dir, psis, **kw: seen.append((psis, kw)))
    for psi in ("psi=[0.5,1.0]", "psi=[0.5, 1.0]", "psi=[ 0.5 , 1 ]"):
        assert main(["truncation", f"run={run}", psi, "eval.num_samples=100"]) == 0
    assert [p for p, _ in seen] == [[0.5, 1.0]] * 3
    assert seen[0][1] == {"overrides_cfg": ["eval.num_samples=100"], "which": "best"}
