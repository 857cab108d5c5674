"""The study configs in configs/experiment/: each composes and runs for a few steps; a narrowed
ablation grid runs as a real Hydra multirun; train.kimg; perf/mfu in the records."""
import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from bench import classifier as C
from bench.cli import main
from bench.config import CONFIG_DIR
from bench.data import make_shards
from conftest import TINY

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIG_DIR) / "experiment").glob("*.yaml"))
FAST_EVAL = ["eval.num_samples=40", "eval.batch_size=20", "eval.standing_stats=0"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Shards with a quickly trained domain classifier beside them (experiments evaluate with it)."""
    out = tmp_path_factory.mktemp("exp") / "shapes32"
    make_shards(out, source="shapes", resolution=32, num_samples=240, samples_per_shard=60, seed=0, progress=False)
    C.train_classifier(out, epochs=4, max_seconds=30, width=16, holdout=0.2, progress=False)
    return out


def rows(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


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


def test_training_records_mfu(tmp_path, shards):
    run_dir = tmp_path / "mfu"
    assert main(["train", f"data.shards={shards}", f"run.dir={run_dir}", *TINY, "train.steps=2",
                 "train.batch_size=4"]) == 0
    for r in rows(run_dir):
        assert r["perf/tflops"] > 0 and 0 < r["perf/mfu"] < 1
        # MFU is achieved TFLOP/s over the peak, from one FLOP count per step
        assert r["perf/tflops"] * 1e12 * r["time/step_ms"] / 1e3 == pytest.approx(
            rows(run_dir)[0]["perf/tflops"] * 1e12 * rows(run_dir)[0]["time/step_ms"] / 1e3, rel=1e-6)


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
