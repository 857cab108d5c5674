"""Bad input at the command line: every case is a real `python -m bench.cli` subprocess that must exit 2
with ONE stderr line naming the key and the bad value, no traceback, and nothing written (no run
directory, no shards, no report, no new file in an existing run). Validation happens before any data is
written or any model is built, so each case takes only the interpreter's start-up time.
"""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from omegaconf import OmegaConf

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    name: str
    argv: tuple            # after `bench`; {run} = the fake run dir, {root} = the run root, {out} = an output dir
    key: str               # must appear in the error line
    value: str             # must appear in the error line
    env: dict = field(default_factory=dict, hash=False)


def _train(key_value: str, *more: str, key=None, value=None, env=None) -> Case:
    k, v = key_value.split("=", 1)
    return Case(f"train:{key_value}", ("train", key_value, *more, "run.root={root}"), key or k, value or v,
                env or {})


CASES = [
    # bench train: the cases seen on the old code
    _train("train.global_batch=0"),
    _train("train.global_batch=-8"),
    _train("telemetry.collapse_window=-1"),
    _train("loss.clip=-0.01"),
    _train("cluster.cpus_per_task=0"),
    _train("dist.timeout_s=0"),
    _train("dist.rank0_timeout_s=-1"),
    _train("cluster.link_gbps=0"),
    _train("eval.repeats=0"),
    # a sweep: every swept value is checked before any job is submitted
    Case("train:-m batch", ("train", "-m", "train.batch_size=4,-1", "run.root={root}"), "train.batch_size", "-1"),
    Case("train:-m experiment", ("train", "-m", "+experiment=stability_ablation", "reg.r1_gamma=0,-1", "run.root={root}"),
         "reg.r1_gamma", "-1"),
    _train("eval.batch_size=0"),
    _train("eval.num_samples=2"),
    _train("loss.gp_lambda=-10", "loss=wgan_gp"),
    _train("telemetry.sigma_k=0"),
    _train("train.eps=-1"),
    Case("train:WORLD_SIZE=x", ("train", "run.root={root}"), "WORLD_SIZE", "x", {"WORLD_SIZE": "x"}),
    Case("train:WORLD_SIZE=0", ("train", "run.root={root}"), "WORLD_SIZE", "0", {"WORLD_SIZE": "0"}),
    # bench train: the other range keys
    _train("train.global_batch=30", "train.accumulate=4"),
    _train("train.precision=fp8"),
    _train("train.steps=0"),
    _train("eval.every=-5"),
    _train("eval.num_real=3"),
    _train("eval.standing_stats=-1"),
    _train("eval.truncation=0"),
    _train("eval.psi_sweep=[0.5,-1]", value="-1"),
    _train("eval.precision=fp16"),
    _train("eval.num_samples=abc"),
    _train("telemetry.sigma_every=-1"),
    _train("telemetry.collapse_loss_gap=0"),
    _train("telemetry.collapse_sigma_factor=0.5"),
    _train("telemetry.collapse_fid_factor=-1"),
    _train("telemetry.collapse_warmup=-2"),
    _train("cluster.nodes=0"),
    _train("cluster.gpus_per_node=-1"),
    _train("cluster.tasks_per_node=0"),
    _train("cluster.mem=lots"),
    _train("cluster.time=-5"),
    _train("cluster.max_requeue=-1"),
    _train("cluster.array_parallelism=0"),
    _train("loss.feature_matching=-1"),
    _train("data.resolution=8"),
    _train("data.samples_per_shard=0"),
    _train("data.num_workers=-1"),
    _train("ema.decay=1.5"),
    # bench eval on an existing run
    Case("eval:num_samples=abc", ("eval", "run={run}", "eval.num_samples=abc"), "eval.num_samples", "abc"),
    Case("eval:batch_size=0", ("eval", "run={run}", "eval.batch_size=0"), "eval.batch_size", "0"),
    Case("eval:num_real=1", ("eval", "run={run}", "eval.num_real=1"), "eval.num_real", "1"),
    Case("eval:truncation=-1", ("eval", "run={run}", "eval.truncation=-1"), "eval.truncation", "-1"),
    Case("eval:extractor=vgg", ("eval", "run={run}", "eval.extractor=vgg"), "eval.extractor", "vgg"),
    Case("eval:which=-3", ("eval", "run={run}", "which=-3"), "which", "-3"),
    Case("eval:which=outside", ("eval", "run={run}", "which={run}/config.yaml"), "which", "config.yaml"),
    Case("eval:run=missing", ("eval", "run={root}/nope"), "run", "nope"),
    Case("eval:unknown key", ("eval", "run={run}", "train.steps=5"), "train.steps", "5"),
    # bench truncation
    Case("truncation:psi=abc", ("truncation", "run={run}", "psi=[0.5,abc]"), "psi", "abc"),
    Case("truncation:psi=-1", ("truncation", "run={run}", "psi=[-1]"), "psi", "-1"),
    Case("truncation:num_samples=0", ("truncation", "run={run}", "psi=[1.0]", "eval.num_samples=0"),
         "eval.num_samples", "0"),
    Case("truncation:trunc_mode", ("truncation", "run={run}", "eval.trunc_mode=cut"), "eval.trunc_mode", "cut"),
    # bench data make-shards
    Case("data:resolution=8", ("data", "make-shards", "out={out}", "data.resolution=8"), "data.resolution", "8"),
    Case("data:num_samples=0", ("data", "make-shards", "out={out}", "data.num_samples=0"), "data.num_samples", "0"),
    Case("data:samples_per_shard=abc", ("data", "make-shards", "out={out}", "samples_per_shard=abc"),
         "samples_per_shard", "abc"),
    Case("data:source=web", ("data", "make-shards", "out={out}", "source=web"), "source", "web"),
    Case("data:seed=-1", ("data", "make-shards", "out={out}", "seed=-1"), "seed", "-1"),
    # bench report
    Case("report:missing dir", ("report", "{root}/nothing-here"), "nothing-here", "nothing-here"),
    Case("report:unknown key", ("report", "{run}", "colour=red", "out={out}"), "colour", "red"),
    # bench throughput
    Case("throughput:steps=0", ("throughput", "throughput.steps=0"), "throughput.steps", "0"),
    Case("throughput:data=web", ("throughput", "throughput.data=web"), "throughput.data", "web"),
    Case("throughput:global_batch=-8", ("throughput", "train.global_batch=-8"), "train.global_batch", "-8"),
    Case("throughput:WORLD_SIZE", ("throughput",), "WORLD_SIZE", "abc", {"WORLD_SIZE": "abc"}),
    # a sweep: Hydra's range() is expanded, and every combination is checked before the first runs
    Case("throughput:-m range", ("throughput", "-m", "train.batch_size=range(0,5,2)"), "train.batch_size", "0"),
    Case("throughput:-m bad sweep", ("throughput", "-m", "train.batch_size=range(0,"), "train.batch_size", "range(0,"),
]


def _listing(path: Path) -> set:
    return {str(p.relative_to(path)) for p in path.rglob("*")} if path.exists() else set()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory):
    """Every case run once, four at a time (each is an interpreter start-up plus config composition)."""
    from bench.config import compose, validate

    base = tmp_path_factory.mktemp("bad-input")
    run = base / "fake-run"  # a run directory as bench train leaves it, minus the training
    (run / "checkpoints").mkdir(parents=True)
    OmegaConf.save(validate(compose([])), run / "config.yaml")
    before = _listing(run)

    def one(i_case):
        i, case = i_case
        root, out = base / f"root-{i}", base / f"out-{i}"
        argv = [a.format(run=run, root=root, out=out) for a in case.argv]
        env = {k: v for k, v in os.environ.items() if k != "WORLD_SIZE"} | case.env
        env["GAN_BENCH_CACHE"] = str(base / "cache")
        proc = subprocess.run([sys.executable, "-m", "bench.cli", *argv], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=300)
        return case.name, (proc, root, out)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(pool.map(one, enumerate(CASES)))
    return {"results": results, "run": run, "run_before": before, "cache": base / "cache"}


def test_there_are_enough_cases():
    assert len(CASES) >= 40
    assert len({c.name for c in CASES}) == len(CASES)
    assert {c.argv[0] for c in CASES} >= {"train", "eval", "truncation", "data", "report", "throughput"}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input_is_one_line_and_exit_2(case, outcomes):
    proc, root, out = outcomes["results"][case.name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr
    assert len(lines) == 1, proc.stderr
    assert case.key in lines[0] and case.value in lines[0], lines[0]
    assert not root.exists(), f"{root} was created"
    assert not out.exists(), f"{out} was created"
    assert _listing(outcomes["run"]) == outcomes["run_before"], "the existing run directory changed"
