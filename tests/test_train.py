"""End-to-end runs through the `bench train` command on tiny configs, resume, MFU, and bad input."""
import json
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from bench.cli import main
from conftest import TINY

REQUIRED_KEYS = {"step", "kimg", "time/wall_s", "throughput/img_per_s", "time/step_ms", "time/data_ms", "time/D_ms",
                 "time/G_ms", "loss/D", "loss/G", "D/real_logit_mean", "D/fake_logit_mean", "mem/peak_gb",
                 "batch/effective", "dist/world_size"}


def train(tmp_path, tiny_shards, *extra, name="run"):
    run_dir = tmp_path / name
    rc = main(["train", f"data.shards={tiny_shards}", f"run.dir={run_dir}", *TINY, *extra])
    return rc, run_dir


def metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("family", ["biggan", "sagan", "dcgan"])
def test_each_family_trains_and_writes_the_run_directory(tmp_path, tiny_shards, family):
    rc, run_dir = train(tmp_path, tiny_shards, f"model={family}", "model.ch=8", "model.d_ch=8",
                        "train.steps=3", "train.batch_size=4")
    assert rc == 0
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert REQUIRED_KEYS <= set(r), REQUIRED_KEYS - set(r)
        assert r["batch/effective"] == 4 and r["dist/world_size"] == 1
        assert all(v == v for v in r.values() if isinstance(v, float))  # no NaN
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 3 and summary["images_seen"] == 12
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["world_size"] == 1 and run["versions"]["torch"]
    assert (run_dir / "config.yaml").read_text().count(f"family: {family}") == 1
    assert list((run_dir / "checkpoints").glob("ckpt-*.pt"))
    assert list((run_dir / "tb").glob("events.out.tfevents.*"))
    grid = Image.open(run_dir / "samples" / "latest.png")
    # one row per class (10 shapes classes), 32 px tiles shown at 2x with 2 px padding
    assert grid.height == 10 * (64 + 2) + 2


@pytest.mark.parametrize("loss", ["hinge", "ns", "minimax", "wgan", "wgan_gp"])
def test_each_loss_trains(tmp_path, tiny_shards, loss):
    rc, run_dir = train(tmp_path, tiny_shards, f"loss={loss}", "train.steps=2", "train.batch_size=4",
                        "train.d_steps=2")
    assert rc == 0
    rows = metrics(run_dir)
    assert len(rows) == 2 and all(torch.isfinite(torch.tensor(r["loss/D"])) for r in rows)
    if loss == "wgan_gp":
        assert "loss/GP" in rows[-1]
    if loss == "wgan":  # weights clipped to [-0.01, 0.01] after every D step
        state = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=False)
        assert max(v.abs().max().item() for k, v in state["D"].items() if k.endswith("weight")) <= 0.01 + 1e-7


def test_accumulation_d_steps_and_r1(tmp_path, tiny_shards):
    rc, run_dir = train(tmp_path, tiny_shards, "train.steps=2", "train.batch_size=4", "train.accumulate=2",
                        "train.d_steps=2", "reg.r1_gamma=1", "reg.r1_every=2")
    assert rc == 0
    rows = metrics(run_dir)
    assert rows[-1]["batch/effective"] == 8 and rows[-1]["kimg"] == pytest.approx(0.016)
    assert rows[-1]["loss/R1"] > 0


def _tensors(path):
    s = torch.load(path, weights_only=False)
    return {f"{net}.{k}": v for net in ("G", "D", "G_ema") for k, v in s[net].items()}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_resume_matches_uninterrupted_run(tmp_path, tiny_shards, precision):
    common = ["train.batch_size=4", "train.ckpt_every=2", "train.deterministic=true", f"train.precision={precision}",
              "train.d_steps=2", "reg.r1_gamma=1"]
    rc, straight = train(tmp_path, tiny_shards, "train.steps=4", *common, name="straight")
    assert rc == 0
    rc, resumed = train(tmp_path, tiny_shards, "train.steps=2", *common, name="resumed")
    assert rc == 0
    rc, resumed = train(tmp_path, tiny_shards, "train.steps=4", *common, name="resumed")
    assert rc == 0
    a = _tensors(straight / "checkpoints" / "ckpt-0000004.pt")
    b = _tensors(resumed / "checkpoints" / "ckpt-0000004.pt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    assert [r["step"] for r in metrics(resumed)] == [1, 2, 3, 4]  # appended, not duplicated
    run = json.loads((resumed / "run.json").read_text())
    assert run["resumes"][0]["step"] == 2


def test_a_resumed_run_reads_as_running_until_it_ends(tmp_path, tiny_shards, monkeypatch):
    """Continuing a finished run (higher train.steps) removes its old summary.json while it trains, so
    `bench report` shows it running, not completed at the old step; the new summary has the new steps."""
    from bench.config import compose, validate
    from bench.report import render
    from bench.train import loop

    run_dir = tmp_path / "cont"
    rc, _ = train(tmp_path, tiny_shards, "train.steps=2", "train.batch_size=4", name="cont")
    assert rc == 0 and json.loads((run_dir / "summary.json").read_text())["steps"] == 2
    seen = []

    step = loop.train_step

    def watched_step(*args):
        if not seen:
            (r,) = render.build_report(run_dir, tmp_path / "rep")["runs"]
            seen.append(((run_dir / "summary.json").exists(), r.status))
        step(*args)

    monkeypatch.setattr(loop, "train_step", watched_step)
    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=4", "train.batch_size=4"]))
    summary = loop.train(*loop.setup(cfg, run_dir, quiet=True))
    assert seen == [(False, "running")]
    assert summary["steps"] == 4 and json.loads((run_dir / "summary.json").read_text())["steps"] == 4


def test_checkpoint_round_trip(tmp_path, tiny_shards):
    from bench.config import compose, validate
    from bench.train import loop

    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=1", "train.batch_size=4"]))
    run, t1 = loop.setup(cfg, tmp_path / "rt", quiet=True)
    loop.train(run, t1)
    ckpt = sorted((tmp_path / "rt" / "checkpoints").glob("*.pt"))[-1]
    _, t2 = loop.setup(cfg, tmp_path / "other", quiet=True)
    t2.load_state_dict(torch.load(ckpt, weights_only=False))
    for a, b in ((t1.G, t2.G), (t1.D, t2.D), (t1.G_ema, t2.G_ema)):
        for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items()):
            assert ka == kb
            torch.testing.assert_close(va, vb, rtol=0, atol=0)
    sa, sb = t1.opt["D"].state_dict()["state"], t2.opt["D"].state_dict()["state"]
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k]["exp_avg"], sb[k]["exp_avg"]) for k in sa)
    assert t2.step == 1 and t2.zgen.get_state().equal(t1.zgen.get_state())


def test_corrupt_newest_checkpoint_falls_back(tmp_path, tiny_shards):
    args = ["train.batch_size=4", "train.ckpt_every=1", "train.ckpt_keep=3"]
    rc, run_dir = train(tmp_path, tiny_shards, "train.steps=2", *args)
    assert rc == 0
    newest = run_dir / "checkpoints" / "ckpt-0000002.pt"
    newest.write_bytes(newest.read_bytes()[:100])  # a write cut short
    rc, run_dir = train(tmp_path, tiny_shards, "train.steps=3", *args)
    assert rc == 0
    assert [r["step"] for r in metrics(run_dir)] == [1, 2, 3]


def test_training_records_mfu(tmp_path, tiny_shards):
    """perf/tflops is the FLOP count of one step that `bench inspect` prints for the same config, over
    the tick's step time; perf/mfu is perf/tflops over the device's peak (the cached CPU measurement)."""
    from bench import device

    args = [f"data.shards={tiny_shards}", *TINY, "train.batch_size=4", "train.d_steps=2", "train.accumulate=2"]
    assert main(["train", f"run.dir={tmp_path / 'mfu'}", *args, "train.steps=2"]) == 0
    proc = subprocess.run([sys.executable, "-m", "bench.cli", "inspect", *args], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    per_img = json.loads(proc.stdout)["GFLOP_per_image"]
    flop_per_step = (per_img["D_step"] * 2 + per_img["G_step"]) * 1e9 * 4 * 2  # x d_steps; x batch x accumulate
    precision = json.loads((tmp_path / "mfu" / "run.json").read_text())["precision"]
    peak, _ = device.peak_tflops(torch.device("cpu"), precision)  # what training looked up (the test cache)
    rows = metrics(tmp_path / "mfu")
    assert len(rows) == 2
    for r in rows:
        # tflops = FLOP per step x steps / tick seconds and step_ms = tick seconds / steps, so their
        # product is the FLOP count per step
        assert r["perf/tflops"] * 1e12 * r["time/step_ms"] / 1e3 == pytest.approx(flop_per_step, rel=1e-9)
        assert r["perf/mfu"] == pytest.approx(r["perf/tflops"] / peak, rel=1e-9)
        assert 0 < r["perf/mfu"] < 1


def test_best_checkpoint_follows_the_one_rule(tmp_path):
    """After an evaluation, checkpoints/best.pt is written when rundir.best_eval says this step is the
    run's best: training evaluations only, the run's extractor, untruncated, the earliest of equal values."""
    from omegaconf import OmegaConf

    from bench.train.state import Checkpoints

    ckpts = Checkpoints(tmp_path, keep=2, is_main=True)
    ev = OmegaConf.create({"best_metric": "eval/FID", "extractor": "domain"})
    best = tmp_path / "checkpoints" / "best.pt"
    evals = []

    def evaluated(step, fid, **extra):
        evals.append({"step": step, "eval/FID": fid, "extractor": "domain", "truncation": None, **extra})
        return ckpts.keep_if_best(step, evals, ev, lambda best: {"step": step, "best": best})

    assert evaluated(10, 50.0) == {"metric": "eval/FID", "value": 50.0, "step": 10, "extractor": "domain"}
    assert torch.load(best)["step"] == 10 and torch.load(best)["best"]["step"] == 10  # knows its evaluation
    assert evaluated(20, 50.0) is None  # equal: the earlier one stays the best
    assert evaluated(25, 1.0, source="bench eval") is None  # `bench eval`'s records do not compete
    assert evaluated(26, 1.0, truncation=0.5) is None  # nor truncated ones
    assert evaluated(27, 1.0, extractor="inception") is None  # nor another extractor's
    assert torch.load(best)["step"] == 10
    assert evaluated(30, 40.0)["step"] == 30 and torch.load(best)["step"] == 30


@pytest.mark.parametrize("override, needle", [
    ("model=foo", "model='foo' is not available; choose one of: biggan"),
    ("loss=bar", "loss='bar' is not available; choose one of:"),
    ("data=baz", "data='baz' is not available; choose one of: folder, shapes"),
    ("data.resolution=48", "data.resolution=48"),
    ("model.attn=[48]", "model.attn"),
    ("train.global_batch=10", "train.global_batch=10"),
    ("data.shards=/nonexistent/shards", "/nonexistent/shards"),
    ("train.precision=fp8", "train.precision='fp8' is not valid; choose one of: "),
    ("train.batch_size=abc", "train.batch_size"),
])
def test_bad_input_is_one_clear_line(tmp_path, capsys, override, needle):
    # model=biggan first: attention at 48 px is BigGAN's to refuse (a DCGAN has none); a case's own model= wins
    rc = main(["train", "model=biggan", override, "train.accumulate=3", f"run.dir={tmp_path / 'bad'}", "train.steps=1"])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("error: ")
    assert needle in err, err
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_default_shards_are_created_on_first_use(tmp_path, capfd, _isolated_cache):
    rc = main(["train", f"run.dir={tmp_path / 'd'}", *TINY, "data.num_samples=120", "train.steps=1",
               "train.batch_size=4"])
    assert rc == 0
    out = capfd.readouterr()
    assert str(_isolated_cache) in out.err + out.out
    assert list(_isolated_cache.glob("shapes-*/manifest.json"))


def test_the_main_job_ends_with_its_quality_line(tmp_path, capfd, monkeypatch, quick_classifier):
    """eval.final=auto: on the built-in set a run evaluates its final EMA G (training the domain classifier on first
    use) and its summary ends with class accuracy beside chance and FID, as summary.json's `quality` keeps them; on
    the user's own shards it does not (their classifier would be trained first)."""
    monkeypatch.setenv("GAN_BENCH_CACHE", str(tmp_path / "cache"))  # a cold start: shards and classifier made now
    tiny = [o for o in TINY if not o.startswith("eval.final=")]
    run = tmp_path / "main"
    assert main(["train", f"run.dir={run}", *tiny, "data.num_samples=200", "data.samples_per_shard=50",
                 "train.steps=2", "train.batch_size=4", "eval.num_samples=60", "eval.batch_size=30",
                 "train.precision=fp32"]) == 0
    out = capfd.readouterr().out
    summary = json.loads((run / "summary.json").read_text())
    q = summary["quality"]
    assert q["step"] == 2 and q["num_samples"] == 60 and q["extractor"] == "domain" and q["chance"] == 0.1
    evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [2] and evals[0]["eval/FID"] == q["FID"]
    assert evals[0]["eval/class_acc"] == q["class_acc"]
    row = next(line for line in out.splitlines() if line.startswith("quality"))
    assert f"class accuracy {q['class_acc']:.3f} (chance 0.100), FID {q['FID']:.1f}" in row
    assert "(domain features, 60 samples of the EMA G at step 2)" in row
    from omegaconf import OmegaConf

    assert OmegaConf.load(run / "config.yaml").eval.final is True  # auto resolved, as it ran

    shards = tmp_path / "cache" / next(p.name for p in (tmp_path / "cache").glob("shapes-*"))
    own = tmp_path / "own"
    assert main(["train", f"run.dir={own}", *tiny, f"data.shards={shards}", "train.steps=2",
                 "train.batch_size=4", "train.precision=fp32"]) == 0
    assert "quality" not in capfd.readouterr().out and not (own / "evals.jsonl").exists()
    assert json.loads((own / "summary.json").read_text())["quality"] == {}


def test_console_script_runs(tmp_path, tiny_shards):
    exe = shutil.which("bench") or [sys.executable, "-m", "bench.cli"]
    cmd = ([exe] if isinstance(exe, str) else exe) + ["train", f"data.shards={tiny_shards}", f"run.dir={tmp_path / 'c'}",
                                                      *TINY, "train.steps=2", "train.batch_size=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "step      2/2" in proc.stdout and "run directory" in proc.stdout


def test_the_default_config_is_the_main_jobs_recipe():
    """No overrides: the DCGAN with SN in D and its recipe (configs/model/dcgan_sn.yaml); model=biggan keeps
    train.*'s BigGAN defaults; eval.final=auto is on for the built-in set with the domain extractor only."""
    from bench.config import compose, prepare

    main_job = prepare(compose([]))
    assert (main_job.model.family, main_job.model.ch, main_job.model.d_sn, main_job.model.g_sn) == ("dcgan", 32, True,
                                                                                                     False)
    assert (main_job.train.g_lr, main_job.train.d_lr, list(main_job.train.betas), main_job.train.steps) == \
        (1e-3, 1e-3, [0.5, 0.999], 2000)
    assert main_job.eval.final is True and main_job.loss.name == "hinge"
    big = prepare(compose(["model=biggan"]))
    assert (big.model.family, big.train.g_lr, big.train.d_lr, list(big.train.betas), big.train.steps) == \
        ("biggan", 2e-4, 4e-4, [0.0, 0.999], 300)
    assert prepare(compose(["eval.extractor=inception"])).eval.final is False  # Inception needs its weights file


def test_a_run_recorded_before_a_key_was_renamed_still_loads(tmp_path):
    """config.yaml of a run from before telemetry.collapse_class_progress / _window were renamed: check_schema maps
    them (bench eval, sample, truncation and eval watch read old runs)."""
    from omegaconf import OmegaConf

    from bench.config import check_schema, compose

    cfg = OmegaConf.to_container(compose([]))
    cfg["telemetry"]["collapse_class_progress"] = cfg["telemetry"].pop("collapse_progress")
    cfg["telemetry"]["collapse_class_window"] = 120
    del cfg["telemetry"]["collapse_progress_window"]
    merged = check_schema(OmegaConf.create(cfg))
    assert merged.telemetry.collapse_progress == 0.1 and merged.telemetry.collapse_progress_window == 120
    assert "collapse_class_window" not in merged.telemetry
