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
from conftest import TINY_NETS as TINY  # the experiments' own eval.final holds

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
    assert {"batch_scaling", "stability_ablation", "stability_ablation_modern", "truncation",
            "collapse"} <= set(EXPERIMENTS)


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
    if name in ("stability_ablation", "stability_ablation_modern", "batch_scaling", "truncation"):
        # these evaluate at the end: the quality reached is part of the study
        evals = [json.loads(l) for l in (run_dir / "evals.jsonl").read_text().splitlines()]
        assert evals[-1]["step"] == 3 and evals[-1]["extractor"] == "domain" and "eval/FID" in evals[-1]
    if name == "truncation":
        table = (run_dir / "truncation" / "truncation.csv").read_text().splitlines()
        assert table[0].startswith("psi,") and [l.split(",")[0] for l in table[1:]] == ["0.5", "1.0"]
    if name == "stability_ablation":
        assert "sigma_every: 10" in cfg


# ---- the modern-stabiliser ablation: one switch per cell of the `stabiliser` group --------------------------
MODERN = "+experiment=stability_ablation_modern"
STABILISERS = ("baseline", "diffaug", "ada", "lecam", "bcr", "zcr", "rpgan")
# what each cell changes from the baseline cell (every other key of the resolved config is the baseline's)
SWITCHES = {
    "baseline": {},
    "diffaug": {"aug.policy": ["color", "translation", "cutout"]},
    "ada": {"aug.policy": ["color", "translation", "cutout"], "aug.ada_target": 0.6},
    "lecam": {"reg.lecam": 0.3},
    "bcr": {"reg.bcr": [10.0, 10.0]},
    "zcr": {"reg.zcr": [5.0, 0.5, 0.03]},
    "rpgan": {"loss.name": "rpgan", "reg.r1_gamma": 0.05, "reg.r2_gamma": 0.05},
}


def _flat(cfg) -> dict:
    def walk(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v
    return dict(walk(OmegaConf.to_container(cfg, resolve=True)))


def test_modern_ablation_grid_is_one_switch_per_cell():
    """The experiment's grid: `stabiliser` x `train.seed` (one seed unless the command line gives more); every
    cell composes, validates, and differs from the baseline in its own switch only; limited data by default."""
    from bench.config import compose, validate
    from bench.overrides import check_grid, grid
    from bench.sweep import sweeper_params

    params = sweeper_params([MODERN])
    assert params == {"stabiliser": ",".join(STABILISERS), "train.seed": "0"}
    axes = grid([MODERN], params)
    assert axes == [[f"stabiliser={s}" for s in STABILISERS]]  # train.seed "0": fixed, not an axis
    seeded = grid([MODERN, "train.seed=0,1,2"], params)
    assert seeded == [[f"stabiliser={s}" for s in STABILISERS], [f"train.seed={i}" for i in range(3)]]
    assert grid([MODERN, "stabiliser=ada,lecam"], params) == [["stabiliser=ada", "stabiliser=lecam"]]
    check_grid([MODERN], seeded)  # every swept value validates, as before a sweep is submitted

    cells = {s: _flat(validate(compose([MODERN, f"stabiliser={s}"]))) for s in STABILISERS}
    base = cells["baseline"]
    assert base["loss.name"] == "hinge" and base["model.d_sn"] is True and base["aug.policy"] == []
    assert base["data.name"] == "shapes" and base["data.shards"] == "" and base["data.num_samples"] == 1000
    assert base["eval.final"] is True and base["eval.extractor"] == "domain" and base["train.seed"] == 0
    assert _flat(validate(compose([MODERN]))) == base  # no stabiliser= on the command line: the baseline
    for name, switch in SWITCHES.items():
        changed = {k: v for k, v in cells[name].items() if v != base[k]}
        assert changed == switch, name


def _record_cell(cfg, run_dir) -> int:
    """Stands in for bench.cli.run_training: records the switches the job was given."""
    Path(run_dir).mkdir(parents=True, exist_ok=True)
    seen = {"loss.name": cfg.loss.name, "aug.policy": list(cfg.aug.policy), "aug.ada_target": cfg.aug.ada_target,
            "reg.lecam": cfg.reg.lecam, "reg.bcr": list(cfg.reg.bcr), "reg.zcr": list(cfg.reg.zcr),
            "train.seed": cfg.train.seed, "data.num_samples": cfg.data.num_samples}
    (Path(run_dir) / "cell.json").write_text(json.dumps(seen))
    return 0


def test_modern_ablation_sweeps_every_stabiliser_and_seed(tmp_path, tiny_shards):
    """Hydra's own sweep of the experiment's grid, with `train.seed=0,1`: 7 stabilisers x 2 seeds, one job
    and one run directory each, every job given its cell's switch (the sweep driver without training)."""
    from bench import sweep

    sw = tmp_path / "sw"
    rc = sweep.multirun([MODERN, f"data.shards={tiny_shards}", "eval.final=false", "train.seed=0,1",
                         f"hydra.sweep.dir={sw}"], train=_record_cell)
    assert rc == 0
    jobs = json.loads((sw / "sweep.json").read_text())["jobs"]
    cells = [(dict(o.split("=", 1) for o in j["overrides"]), json.loads((Path(j["run_dir"]) / "cell.json").read_text()))
             for j in jobs]
    assert sorted((o["stabiliser"], o["train.seed"]) for o, _ in cells) == sorted(
        (s, str(i)) for s in STABILISERS for i in (0, 1))
    assert len({j["run_dir"] for j in jobs}) == 14 and all(Path(j["run_dir"]).name.startswith("ablation-modern")
                                                           for j in jobs)
    for o, seen in cells:
        assert seen["train.seed"] == int(o["train.seed"]) and seen["data.num_samples"] == 1000
        expected = {"loss.name": "hinge", "aug.policy": [], "aug.ada_target": None, "reg.lecam": 0.0,
                    "reg.bcr": [0.0, 0.0], "reg.zcr": [0.0, 0.0, 0.03]}
        expected.update({k: v for k, v in SWITCHES[o["stabiliser"]].items() if k in expected})
        assert {k: seen[k] for k in expected} == expected, o


def test_narrowed_modern_grid_trains_and_reports_ada_p(tmp_path, shards):
    """Two real cells of the experiment (ADA, RpGAN) as a Hydra multirun, then `bench report` on the sweep:
    the ADA run records p every tick, the RpGAN run does not, and the report draws p for the one ADA run."""
    from bench.report import collect, plots

    sweep = tmp_path / "sweep"
    rc = main(["train", "-m", MODERN, f"data.shards={shards}", *TINY, "stabiliser=ada,rpgan", "train.steps=2",
               "train.batch_size=4", "aug.ada_interval=1", *FAST_EVAL, f"hydra.sweep.dir={sweep}"])
    assert rc == 0
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    assert sorted(o for j in jobs for o in j["overrides"] if o.startswith("stabiliser=")) == [
        "stabiliser=ada", "stabiliser=rpgan"]
    for j in jobs:
        run = Path(j["run_dir"])
        ticks = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        cfg = OmegaConf.load(run / "config.yaml")
        assert j["state"] == "completed" and [t["step"] for t in ticks] == [1, 2]
        assert all(("aug/p" in t) == (cfg.aug.ada_target is not None) for t in ticks)
        assert cfg.loss.name == ("rpgan" if "stabiliser=rpgan" in j["overrides"] else "hinge")
    out = tmp_path / "report"
    assert main(["report", str(sweep), f"out={out}"]) == 0
    assert (out / "ada_p.png").stat().st_size > 10_000 and "![ada_p.png](ada_p.png)" in (out / "report.md").read_text()
    (series,) = plots.ada_series(collect.discover(sweep))  # one line: the ADA run's two ticks
    assert len(series.ps) == 2 and series.x_key == "kimg" and series.target == 0.6


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
