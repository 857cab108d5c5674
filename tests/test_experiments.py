"""The study configs in configs/experiment/: each composes and runs for a few steps; a narrowed
ablation grid runs as a real Hydra multirun; train.kimg; the sweep driver's own pieces."""
import json
import math
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench.cli import main
from bench.config import CONFIG_DIR
from bench.data.shards import ShardSetSpec, make_shards
from bench.eval.classifier import ClassifierSettings, train_classifier
from conftest import TINY

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
FAST_EVAL = ["eval.num_samples=40", "eval.batch_size=20", "eval.standing_stats=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards with a quickly trained domain classifier beside them (experiments evaluate with it)."""
    out = tmp_path_factory.mktemp("exp") / "shapes32"
    make_shards(out, ShardSetSpec(source="shapes", resolution=32, num_samples=240, samples_per_shard=60, seed=0),
                progress=False)
    train_classifier(out, settings=ClassifierSettings(epochs=4, max_seconds=30, width=16, holdout=0.2),
                     progress=False)
    return out


def test_every_study_config_is_here():
    assert {"batch_scaling", "stability_ablation", "truncation", "collapse"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_experiment_composes_and_runs_a_few_steps(tmp_path, shards, name):
    run_dir = tmp_path / name
    extra = ["train.steps=3", "train.batch_size=4", "train.kimg=null"]
    if name == "truncation":
        extra += ["eval.every=3", "eval.psi_sweep=[0.5,1.0]"]
    rc = main(["train", f"+experiment={name}", f"data.shards={shards}", f"run.dir={run_dir}", *TINY, *extra,
               *FAST_EVAL])
    assert rc == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] in ("completed", "collapsed") and summary["steps"] == 3
    cfg = (run_dir / "config.yaml").read_text()
    if name in ("stability_ablation", "batch_scaling", "truncation"):
        # these evaluate at the end: the quality reached is part of the study
        evals = [json.loads(l) for l in (run_dir / "evals.jsonl").read_text().splitlines()]
        assert evals[-1]["step"] == 3 and evals[-1]["extractor"] == "domain" and "eval/FID" in evals[-1]
    if name == "truncation":
        table = (run_dir / "truncation" / "truncation.csv").read_text().splitlines()
        assert table[0].startswith("psi,") and [l.split(",")[0] for l in table[1:]] == ["0.5", "1.0"]
    if name == "stability_ablation":
        assert "sigma_every: 10" in cfg


def test_kimg_sets_the_steps_from_the_effective_batch(tmp_path, shards):
    run_dir = tmp_path / "kimg"
    rc = main(["train", f"data.shards={shards}", f"run.dir={run_dir}", *TINY, "train.kimg=0.04",
               "train.batch_size=4", "train.accumulate=2"])
    assert rc == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == math.ceil(40 / 8) and summary["images_seen"] == 40


def test_narrowed_ablation_grid_runs_as_a_multirun(tmp_path, shards):
    sweep = tmp_path / "sweep"
    rc = main(["train", "-m", "+experiment=stability_ablation", f"data.shards={shards}", *TINY,
               "loss=hinge", "model.d_sn=true", "reg.r1_gamma=0", "reg.ortho_beta=0", "train.steps=2",
               "train.batch_size=4", *FAST_EVAL, f"hydra.sweep.dir={sweep}"])
    assert rc == 0
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert len(jobs) == 2 and all(j["state"] == "completed" for j in jobs)
    assert all(any(o.startswith("reg.sigma_clamp=") for o in j["overrides"]) for j in jobs)
    clamp = sorted(str(OmegaConf.load(Path(j["run_dir"]) / "config.yaml").reg.sigma_clamp) for j in jobs)
    assert clamp == ["None", "ratio:1.5"]
    assert len({j["run_dir"] for j in jobs}) == 2
    for j in jobs:
        assert json.loads((Path(j["run_dir"]) / "summary.json").read_text())["steps"] == 2


def test_node_sweep_without_slurm_is_a_clear_error(tmp_path, capsys):
    rc = main(["train", "-m", "+experiment=batch_scaling", f"hydra.sweep.dir={tmp_path / 's'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "cluster.nodes=1,2" in err and "submitit_slurm" in err
    assert not (tmp_path / "s" / "index").exists()


def _record_train(cfg, run_dir) -> int:
    """Stands in for bench.cli.run_training: the sweep driver's own work, without training."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    (Path(run_dir) / "batch.txt").write_text(str(cfg.train.batch_size))
    return 0 if cfg.train.batch_size != 6 else 3


def test_multirun_driver_indexes_every_job_and_leaves_sys_argv_alone(tmp_path, tiny_shards, monkeypatch):
    from bench import sweep

    monkeypatch.setattr(sys, "argv", ["pytest", "untouched"])
    rc = sweep.multirun([f"data.shards={tiny_shards}", "train.batch_size=2,4,6", f"hydra.sweep.dir={tmp_path / 'sw'}"],
                        train=_record_train)
    assert rc == 1  # one job failed (exit code 3): the others still finished and are indexed
    assert sys.argv == ["pytest", "untouched"]
    jobs = json.loads((tmp_path / "sw" / "sweep.json").read_text())["jobs"]
    assert [j["job_num"] for j in jobs] == [0, 1, 2]
    assert [j["state"] for j in jobs] == ["completed", "completed", "failed"]
    assert [(Path(j["run_dir"]) / "batch.txt").read_text() for j in jobs] == ["2", "4", "6"]
    assert all(j["overrides"] == [f"data.shards={tiny_shards}", f"train.batch_size={b}"]
               for j, b in zip(jobs, (2, 4, 6)))


@pytest.mark.parametrize("value, sweeps", [("1,2", True), ("[1,2]", False), ("range(3)", True),
                                           ("{a:1,b:2}", False), ("ratio:1.5", False), ("'x,y'", False),
                                           ('"a,b",c', True)])
def test_is_sweep_value(value, sweeps):
    from bench.overrides import is_sweep_value

    assert is_sweep_value(value) == sweeps


def test_sweep_values_are_hydras():
    from bench.overrides import grid, sweep_values

    assert sweep_values("train.batch_size=range(8,33,8)") == [f"train.batch_size={b}" for b in (8, 16, 24, 32)]
    assert sweep_values("run.name='x,y'") == ["run.name='x,y'"]  # quoted: one value
    # the command line's sweep replaces the experiment's, its fixed value removes it; glob() is left to Hydra
    assert grid(["a=1,2", "b=3", "model=glob(*)"], {"a": "5,6", "b": "7,8", "c": "x,y"}) == [
        ["a=1", "a=2"], ["c=x", "c=y"]]
