"""The run's loggers (bench/train/loggers.py, log.backends): short real trainings on tiny shards whose TensorBoard
events (read with tensorboard's EventAccumulator), MLflow file store (read with MLflow's own client) and W&B offline
run (its .wandb record log, read here) hold the ticks' scalars, each evaluation's eval/* values, sigma0 per layer,
ADA's p, the sample grid written to samples/ and the collapse detector's flag, equal to what metrics.jsonl,
evals.jsonl, samples/ and summary.json say; bad backends are one line before training; a backend that fails
mid-run is dropped with one warning while the others go on."""
import glob
import html
import io
import json
import shutil
import struct
import sys
import time

import numpy as np
import pytest
from PIL import Image

from bench import rundir
from bench.cli import main
from bench.config import LOG_BACKENDS, ConfigError, compose, override_hash, validate
from bench.data.shards import ShardSetSpec, make_shards
from bench.train import loggers as L
from bench.train.records import COLLAPSE_TEXT, SIGMA0
from conftest import TINY

STEPS, SAMPLE_EVERY, EVAL_EVERY, TICK = 20, 10, 10, 5


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Tiny shards and a domain classifier beside them (two epochs: the test compares logged numbers with the
    records, not their quality)."""
    from bench.eval import classifier as C

    out = tmp_path_factory.mktemp("logs") / "shapes32"
    make_shards(out, ShardSetSpec(source="shapes", resolution=32, num_samples=300, samples_per_shard=100, seed=0),
                progress=False)
    C.train_classifier(out, settings=C.ClassifierSettings(epochs=2, width=16, holdout=0.2, precision="fp32"),
                       progress=False)
    return out


def train_args(shards, run_dir, cache, *extra, steps=STEPS):
    """A tiny fp32 run: ticks every TICK steps, sigma telemetry on each tick, samples and evaluations every 10 steps,
    and a collapse rule made to fire after step 5 (|D's mean logit| > 0.001: the flag's text is what is tested)."""
    tiny = [o for o in TINY if not o.startswith("train.tick_every")]
    return ["train", f"data.shards={shards}", f"run.dir={run_dir}", *tiny, f"train.steps={steps}",
            f"train.tick_every={TICK}", f"train.sample_every={SAMPLE_EVERY}", f"eval.every={EVAL_EVERY}",
            "eval.num_samples=40", "eval.batch_size=20", f"eval.cache_dir={cache}", f"telemetry.sigma_every={TICK}",
            "train.precision=fp32", "telemetry.mfu=false", "telemetry.collapse_warmup=5",
            "telemetry.collapse_logit_scale=0.001", *extra]


def records(run_dir):
    ticks = rundir.read_jsonl(run_dir / rundir.METRICS).rows
    evals = rundir.read_jsonl(run_dir / rundir.EVALS).rows
    return ticks, evals, rundir.read_json(run_dir / rundir.SUMMARY)


def png(path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def sigma0_of(row: dict) -> dict:
    return {SIGMA0 + k[len("sigma/"):-len("/s0")]: v for k, v in row.items()
            if k.startswith("sigma/") and k.endswith("/s0")}


def eval_values(rec: dict) -> dict:
    return {k: v for k, v in rec.items() if k.startswith("eval/") and isinstance(v, float)}


# ---- TensorBoard -----------------------------------------------------------------------------------

def test_tensorboard_shows_the_run(shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    rc = main(train_args(shards, run, tmp_path / "cache", "aug.policy=[color]", "aug.ada_target=0.6"))
    assert rc == 0
    ticks, evals, summary = records(run)
    ea = EventAccumulator(str(run / rundir.TB), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()
    tags = ea.Tags()

    def scalar(tag):
        return {e.step: e.value for e in ea.Scalars(tag)}

    # every tick's scalars, as metrics.jsonl has them (float32 in the event file)
    assert [r["step"] for r in ticks] == [5, 10, 15, 20]
    for key in ("loss/D", "loss/G", "throughput/img_per_s", "aug/p"):
        assert scalar(key) == pytest.approx({r["step"]: r[key] for r in ticks}, rel=1e-6), key
    # eval/* at each evaluation, equal to evals.jsonl
    assert [r["step"] for r in evals] == [10, 20]
    wanted = {k for r in evals for k in eval_values(r)}
    assert {"eval/FID", "eval/KID", "eval/precision", "eval/recall", "eval/class_acc"} <= wanted
    for key in wanted:
        assert scalar(key) == pytest.approx({r["step"]: r[key] for r in evals if key in r}, rel=1e-6), key
    # sigma0 per layer of both nets, at every tick that measured it
    expected = {}
    for r in ticks:
        for k, v in sigma0_of(r).items():
            expected.setdefault(k, {})[r["step"]] = v
    assert any(k.startswith("sigma0/D/") for k in expected) and any(k.startswith("sigma0/G/") for k in expected)
    assert {t for t in tags["scalars"] if t.startswith(SIGMA0)} == set(expected)
    for k, by_step in expected.items():
        assert scalar(k) == pytest.approx(by_step, rel=1e-6), k
    # the sample grid at each train.sample_every: the PNG written to samples/, pixel for pixel
    images = ea.Images("samples")
    assert [e.step for e in images] == [10, 20]
    for e in images:
        shown = np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB"))
        np.testing.assert_array_equal(shown, png(run / rundir.SAMPLES / f"step-{e.step:07d}.png"))
    # the collapse flag as text: its rule and reason, at the flagged step
    step, reason = summary["collapse_step"], summary["collapse_reason"]
    assert step is not None and reason.startswith("logit_scale:")
    texts = ea.Tensors(f"{COLLAPSE_TEXT}/text_summary")
    shown = [(e.step, e.tensor_proto.string_val[0].decode()) for e in texts]
    assert shown[0][0] == step and "rule `logit_scale`" in shown[0][1] and reason in shown[0][1]
    assert "collapse flagged" in shown[0][1]


# ---- MLflow and W&B -----------------------------------------------------------------------------------

def test_mlflow_file_store_holds_the_run_and_its_resume(shards, tmp_path):
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    run, cache = tmp_path / "run", tmp_path / "cache"
    assert main(train_args(shards, run, cache, "log.backends=[mlflow]", steps=10)) == 0
    assert main(train_args(shards, run, cache, "log.backends=[mlflow]", steps=STEPS)) == 0  # resumed at 10
    ticks, evals, summary = records(run)
    assert not (run / rundir.TB).exists()  # only the chosen backends write
    client = MlflowClient(tracking_uri=(run / L.MLFLOW_DIR).resolve().as_uri())
    exp = client.get_experiment_by_name("gan-bench")
    (found,) = client.search_runs([exp.experiment_id])  # the resume continued the same MLflow run
    rid = found.info.run_id
    assert found.info.status == "FINISHED" and found.info.run_name == run.name
    assert found.data.params["train.steps"] == "10"  # params from its creation; the resumed config beside them

    def history(key):
        return {m.step: m.value for m in client.get_metric_history(rid, key)}

    assert history("loss/D") == pytest.approx({r["step"]: r["loss/D"] for r in ticks})
    assert history("eval/FID") == pytest.approx({r["step"]: r["eval/FID"] for r in evals})
    for k, v in sigma0_of(ticks[-1]).items():
        assert history(k)[ticks[-1]["step"]] == pytest.approx(v), k
    artifacts = {a.path for a in client.list_artifacts(rid)}
    assert {"config.yaml", "config-0000010.yaml", "images", "text"} <= artifacts
    store = run / L.MLFLOW_DIR / exp.experiment_id / rid / "artifacts"
    assert "steps: 20" in (store / "config-0000010.yaml").read_text()
    for step in (10, 20):
        (image,) = glob.glob(str(store / "images" / f"samples+step+{step}+*.png"))
        np.testing.assert_array_equal(png(image), png(run / rundir.SAMPLES / f"step-{step:07d}.png"))
    flag = store / "text" / COLLAPSE_TEXT / f"step-{summary['collapse_step']:07d}.md"
    assert summary["collapse_reason"] in flag.read_text()


def wandb_records(path) -> list:
    """The records of a W&B .wandb file (LevelDB's log format: 32 KiB blocks of records, each a 7-byte header
    (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and its bytes; the file starts with a 7-byte
    header of its own), parsed as wandb's protobuf Records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block = open(path, "rb").read(), 32768
    pos, parts, out = 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + n > len(data):  # a record still being written
            break
        chunk, pos = data[pos + 7:pos + 7 + n], pos + 7 + n
        if kind in (1, 2):
            parts = chunk
        elif kind in (3, 4):
            parts += chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(parts)
            out.append(rec)
    return out


def test_wandb_offline_run_under_the_run_dir(shards, tmp_path):
    pytest.importorskip("wandb")
    run = tmp_path / "run"
    assert main(train_args(shards, run, tmp_path / "cache", "log.backends=[tb,wandb]")) == 0
    ticks, evals, summary = records(run)
    (offline,) = glob.glob(str(run / L.WANDB_DIR / "offline-run-*"))
    (log,) = glob.glob(f"{offline}/run-*.wandb")
    # wandb's finish() returns before its service has written the last block of the log: wait for its exit record
    deadline = time.monotonic() + 120
    while not (recs := wandb_records(log)) or recs[-1].WhichOneof("record_type") != "exit":
        assert time.monotonic() < deadline, "the W&B run log never got its exit record"
        time.sleep(0.5)
    history = {}
    for rec in recs:
        if rec.WhichOneof("record_type") == "history":
            row = {(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item}
            history[row["_step"]] = row
    for r in ticks:
        assert history[r["step"]]["loss/D"] == pytest.approx(r["loss/D"])
        for k, v in sigma0_of(r).items():
            assert history[r["step"]][k] == pytest.approx(v), k
    for r in evals:
        for k, v in eval_values(r).items():
            assert history[r["step"]][k] == pytest.approx(v), k
    for step in (10, 20):
        image = history[step]["samples/path"]
        np.testing.assert_array_equal(png(f"{offline}/files/{image}"),
                                      png(run / rundir.SAMPLES / f"step-{step:07d}.png"))
    flag = history[summary["collapse_step"]][f"{COLLAPSE_TEXT}/path"]
    assert html.escape(summary["collapse_reason"]) in open(f"{offline}/files/{flag}").read()
    assert (run / rundir.TB).is_dir()  # tb alongside


# ---- bad choices ------------------------------------------------------------------------------------

def test_an_unknown_or_repeated_backend_is_one_line(shards, tmp_path, capsys):
    for value, words in (("[tb,nope]", ("'nope' is not a logging backend", "tb, mlflow, wandb")),
                         ("[tb,tb]", ("names a backend twice",))):
        run = tmp_path / value.strip("[]").replace(",", "-")
        assert main(train_args(shards, run, tmp_path / "cache", f"log.backends={value}")) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "log.backends=" in err and all(w in err for w in words), err
        assert not run.exists()  # nothing written
    # a single name and a quoted list read as lists; [] is no logger
    assert list(validate(compose(["log.backends=wandb"])).log.backends) == ["wandb"]
    assert list(validate(compose(["log.backends='tb,mlflow'"])).log.backends) == ["tb", "mlflow"]
    assert list(validate(compose(["log.backends=[]"])).log.backends) == []
    assert L.BACKENDS.keys() == L.PACKAGES.keys() and tuple(L.BACKENDS) == LOG_BACKENDS
    # where a run is mirrored is not part of its identity (its generated directory name)
    assert override_hash(["train.steps=5", "log.backends=[tb,wandb]"]) == override_hash(["train.steps=5"])


def test_a_missing_package_names_the_extra_before_training(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # how Python marks a module that cannot be imported
    with pytest.raises(ImportError):
        import wandb  # noqa: F401
    run = tmp_path / "run"
    assert main(train_args(shards, run, tmp_path / "cache", "log.backends=[tb,wandb]")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "pip install 'gan-bench[wandb]'" in err and "log.backends" in err, err
    assert not (run / rundir.METRICS).exists() and not (run / rundir.CHECKPOINTS).exists()
    with pytest.raises(ConfigError, match=r"gan-bench\[wandb\]"):
        L.check_backends(["wandb"])


# ---- a backend failing mid-run ------------------------------------------------------------------------

def test_a_backend_that_fails_mid_run_is_dropped_with_one_warning(tmp_path, capsys):
    pytest.importorskip("mlflow")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = L.RunLoggers.open(tmp_path, 0, L.LogSettings(backends=("mlflow", "tb"), run_name="x"))
    assert logs.names == ["mlflow", "tb"]
    logs.scalars(1, {"loss/D": 1.0})
    shutil.rmtree(tmp_path / L.MLFLOW_DIR)  # the store vanishes under the run (a full or unmounted disk)
    logs.scalars(2, {"loss/D": 2.0})
    logs.image(2, "samples", np.zeros((4, 6, 3), np.uint8))
    logs.text(2, COLLAPSE_TEXT, "still logged")
    logs.close(rundir.COMPLETED)
    err = capsys.readouterr().err
    assert err.count("warning: the mlflow logger failed") == 1 and "off for the rest of this run" in err, err
    assert logs.active == []
    ea = EventAccumulator(str(tmp_path / rundir.TB), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    ea.Reload()  # the other backend got everything
    assert [(e.step, e.value) for e in ea.Scalars("loss/D")] == [(1, 1.0), (2, 2.0)]
    assert [e.step for e in ea.Images("samples")] == [2]
    with pytest.raises(ValueError, match="uint8"):  # the interface's image is uint8 (H, W, 3)
        L.RunLoggers([]).image(0, "x", np.zeros((3, 4, 4), np.float32))
