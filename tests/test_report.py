"""`bench report`: tables and plots from real run directories (a 2x2 sweep of short tiny runs with
evaluations, sigma telemetry and collapse flags, plus a truncation curve), unfinished runs, bad input.
Every number in the tables is re-derived here from the run files. About 30 s on 2 CPUs."""
import csv
import json
import os
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from bench.cli import main
from bench.report import collect, render, tables
from bench.report.plots import _matrix_axes
from conftest import TINY

BENCH = [sys.executable, "-m", "bench.cli"]
# One math thread per process: on a 2-core machine shared with other work, torch's default of one busy-waiting
# thread per core made these tiny runs 8x slower (71 s instead of 9 s for the sweep).
def env():
    """Read at call time: conftest's session fixture points GAN_BENCH_CACHE at a temp folder first."""
    assert "GAN_BENCH_CACHE" in os.environ
    return {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SWEEP_PLOTS = ("throughput.png", "losses.png", "sigma.png", "evals.png", "truncation.png", "ablation.png")
SWEEP_TABLES = ("report.md", "runs.csv", "scaling.csv", "evals.csv", "truncation.csv", "ablation.csv")
PSI = [0.5, 1.0]


def bench(args, timeout=300):
    proc = subprocess.run(BENCH + args, capture_output=True, text=True, timeout=timeout, env=env())
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def read_jsonl(path):
    return [json.loads(l) for l in Path(path).read_text().splitlines() if l.strip()]


def num(cell):
    return None if cell == "" else float(cell)


def assert_png(path, min_side=300):
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= min_side and height >= min_side / 2, (path, width, height)
    assert len(data) > 10_000, (path, len(data))  # axes, lines and text, not an empty canvas
    with Image.open(path) as im:
        im.verify()


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A real 2x2 sweep through Hydra's basic launcher: batch 4 / 8 x collapse loss gap 0.01 (every tick after
    the 2-step warm-up is flagged) / 50; 6 steps, sigma every 2 steps, evaluations at steps 3 and 6 with the
    domain extractor; then a truncation curve of one run."""
    root = tmp_path_factory.mktemp("report")
    shards = root / "shapes32"
    # shards and a small domain classifier beside them (the evaluations' feature extractor)
    code = ("import sys; from bench.data.shards import ShardSetSpec, make_shards; "
            "from bench.eval.classifier import ClassifierSettings, train_classifier; "
            "make_shards(sys.argv[1], ShardSetSpec(source='shapes', resolution=32, num_samples=240, "
            "samples_per_shard=60, seed=0), progress=False); "
            "train_classifier(sys.argv[1], settings=ClassifierSettings(epochs=2, max_seconds=20, width=8, "
            "holdout=0.2), progress=False)")
    proc = subprocess.run([sys.executable, "-c", code, str(shards)], capture_output=True, text=True, timeout=300,
                          env=env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep_dir = root / "sweep"
    bench(["train", "-m", "train.batch_size=4,8", "telemetry.collapse_loss_gap=0.01,50", f"data.shards={shards}",
           f"hydra.sweep.dir={sweep_dir}", *TINY, "train.steps=6", "telemetry.collapse_warmup=2",
           "telemetry.sigma_every=2", "eval.every=3", "eval.num_samples=40", "eval.batch_size=40",
           "train.sample_every=0", "train.ckpt_every=0"])
    jobs = json.loads((sweep_dir / "sweep.json").read_text())["jobs"]
    assert len(jobs) == 4 and all(j["state"] == "completed" for j in jobs)
    trunc_run = Path(jobs[-1]["run_dir"])  # batch 8, gap 50
    bench(["truncation", f"run={trunc_run}", f"psi=[{','.join(map(str, PSI))}]", "eval.num_samples=40",
           "eval.batch_size=40"])
    return sweep_dir


def test_import_pulls_in_neither_torch_nor_matplotlib():
    code = ("import sys, bench.report, bench.report.collect, bench.report.tables, bench.report.plots, "
            "bench.report.render, bench.report.groups; "
            "print(sorted(m for m in ('torch', 'matplotlib', 'hydra', 'omegaconf') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_sweep_report_writes_every_table_and_plot(sweep, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["report", str(sweep), f"out={out}"]) == 0
    printed = capsys.readouterr().out
    for name in SWEEP_TABLES:
        assert (out / name).is_file() and (out / name).stat().st_size > 100, name
    for name in SWEEP_PLOTS:
        assert_png(out / name)
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert str(out) in printed and "report.md" in printed and "batch_size=8 collapse_loss_gap=50" in printed
    md = (out / "report.md").read_text()
    for name in SWEEP_PLOTS:
        assert f"![{name}]({name})" in md
    assert "Swept (index overrides): `train.batch_size`, `telemetry.collapse_loss_gap`" in md
    assert "not written" not in md and "Not finished" not in md
    assert not list(sweep.glob("report"))  # out= was honoured: nothing in the sweep itself

    # the default output folder is DIR/report
    assert main(["report", str(sweep)]) == 0
    assert (sweep / "report" / "report.md").is_file()


def test_tables_match_the_run_files(sweep, tmp_path):
    out = tmp_path / "out"
    assert main(["report", str(sweep), f"out={out}"]) == 0
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    rows = read_csv(out / "runs.csv")
    assert [r["dir"] for r in rows] == [j["run_dir"] for j in jobs]
    for job, row in zip(jobs, rows):
        run = Path(job["run_dir"])
        summary = json.loads((run / "summary.json").read_text())
        ticks = read_jsonl(run / "metrics.jsonl")
        overrides = dict(o.split("=", 1) for o in job["overrides"])
        assert row["run"] == f"batch_size={overrides['train.batch_size']} " \
                             f"collapse_loss_gap={overrides['telemetry.collapse_loss_gap']}"
        assert row["swept:train.batch_size"] == overrides["train.batch_size"]
        assert row["status"] == summary["status"] == "completed" and row["finished"] == "yes"
        assert int(row["steps"]) == summary["steps"] == 6 and int(row["target_steps"]) == 6
        assert int(row["effective_batch"]) == summary["effective_batch"] == int(overrides["train.batch_size"])
        assert int(row["world_size"]) == summary["world_size"] == 1
        assert num(row["img_per_s_overall"]) == pytest.approx(summary["img_per_s"], rel=1e-12)
        steady = [t["throughput/img_per_s"] for t in ticks][1:]  # first tick is warm-up
        assert num(row["img_per_s"]) == pytest.approx(statistics.median(steady), rel=1e-12)
        assert num(row["step_ms"]) == pytest.approx(statistics.median([t["time/step_ms"] for t in ticks][1:]))
        assert num(row["peak_mem_gb"]) == pytest.approx(max(t["mem/peak_gb"] for t in ticks))
        assert num(row["loss_D"]) == pytest.approx(ticks[-1]["loss/D"], rel=1e-12)
        assert num(row["loss_G"]) == pytest.approx(ticks[-1]["loss/G"], rel=1e-12)
        assert row["best_metric"] == summary["best"]["metric"] == "eval/FID"
        assert num(row["best_value"]) == pytest.approx(summary["best"]["value"], rel=1e-12)
        assert int(row["best_step"]) == summary["best"]["step"] and row["best_extractor"] == "domain"
        assert int(row["evals"]) == len(read_jsonl(run / "evals.jsonl")) == 2
        assert (int(row["collapse_step"]) if row["collapse_step"] else None) == summary["collapse_step"]
        assert int(row["collapse_ticks"]) == sum(t.get("stability/collapse") == 1 for t in ticks)
        if overrides["telemetry.collapse_loss_gap"] == "0.01":
            assert summary["collapse_step"] == 3 and row["collapse_reason"].startswith("divergence")

    # scaling: all runs are world size 1, so each run's ideal is the median img/s of the runs with its
    # per-device batch and accumulation; efficiency = actual / ideal
    scaling = read_csv(out / "scaling.csv")
    for s in scaling:
        ideal = statistics.median(num(r["img_per_s"]) for r in rows if r["effective_batch"] == s["effective_batch"])
        assert num(s["ideal_img_per_s"]) == pytest.approx(ideal)
        assert num(s["efficiency"]) == pytest.approx(num(s["img_per_s"]) / ideal)
    assert sorted(s["run"] for s in scaling) == sorted(r["run"] for r in rows)

    # evals: every record, with its extractor
    evals = read_csv(out / "evals.csv")
    want = [e for j in jobs for e in read_jsonl(Path(j["run_dir"]) / "evals.jsonl")]
    assert len(evals) == len(want) == 8
    assert {e["extractor"] for e in evals} == {"domain"}
    assert sorted(num(e["eval/FID"]) for e in evals) == pytest.approx(sorted(e["eval/FID"] for e in want))
    # density / coverage and the record's diagnostics travel from evals.jsonl to evals.csv like precision / recall
    by_key = {(e["dir"], int(e["step"])): e for e in evals}
    for j in jobs:
        for rec in read_jsonl(Path(j["run_dir"]) / "evals.jsonl"):
            row = by_key[(j["run_dir"], rec["step"])]
            for key in ("eval/precision", "eval/recall", "eval/density", "eval/coverage", "fid_imag_residue",
                        "cost/sample_s_per_1k", "cost/features_s_per_1k", "cost/metrics_s"):
                assert num(row[key]) == pytest.approx(rec[key], rel=1e-12, abs=1e-15), key
    md = (out / "report.md").read_text()
    assert "| density | coverage |" in md  # the best-evaluation and truncation tables' columns

    # truncation: the one run's curve, psi as written
    trunc = read_csv(out / "truncation.csv")
    src = read_csv(Path(jobs[-1]["run_dir"]) / "truncation" / "truncation.csv")
    assert [num(t["psi"]) for t in trunc] == PSI == [float(t["psi"]) for t in src]
    assert [num(t["FID"]) for t in trunc] == pytest.approx([float(t["FID"]) for t in src])
    for col in ("density", "coverage"):
        assert [num(t[col]) for t in trunc] == pytest.approx([float(t[col]) for t in src]), col
        assert all(num(t[col]) >= 0 for t in trunc)
    assert {t["run"] for t in trunc} == {rows[-1]["run"]}

    # ablation: one row per run; the headline is the best FID; collapse step and img/s as in runs.csv
    abl = read_csv(out / "ablation.csv")
    assert [a["run"] for a in abl] == [r["run"] for r in rows]
    for a, r in zip(abl, rows):
        assert a["metric"] == "best eval/FID [domain]"
        assert (a["value"], a["collapse_step"], a["img_per_s"]) == (r["best_value"], r["collapse_step"], r["img_per_s"])
        assert a["train.batch_size"] == r["swept:train.batch_size"]
    # one seed per configuration: the best cell by mean, every other one untested (one run has no seed spread
    # to test against): no p-value, no paired difference, no power table without a seed-to-seed SD
    fids = {a["run"]: float(a["value"]) for a in abl if a["value"]}
    best = min(fids, key=fids.get)
    for a in abl:
        if a["run"] in fids:
            assert a["vs_best"] == ("best" if a["run"] == best else "n=1, untested"), a
        assert (a["p"], a["p_holm"], a["test"], a["paired_n"]) == ("", "", "", ""), a
    matrix = md.split("## Ablation matrix", 1)[1]
    assert "| vs best | test | p | p (Holm) | n |" in matrix and "Seeds needed" not in matrix
    assert "Paired differences" not in matrix and "Where the variance comes from" not in matrix


def test_unfinished_runs_are_marked_and_read(sweep, tmp_path, capsys):
    """A copy of the sweep as if it were still running: no sweep.json (only index/), one run still going
    (no summary, a half-written last metrics line), one killed (no summary), one job that failed before it
    had a run directory."""
    live = tmp_path / "sweep"
    shutil.copytree(sweep, live, ignore=shutil.ignore_patterns("*.pt", "tb", "report", ".submitit"))
    (live / "sweep.json").unlink()
    index = sorted((live / "index").glob("*.json"), key=lambda p: int(p.stem))
    entries = [json.loads(p.read_text()) for p in index]
    running = live / Path(entries[0]["run_dir"]).name
    killed = live / Path(entries[1]["run_dir"]).name
    for run in (running, killed):
        (run / "summary.json").unlink()
    with open(running / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "kimg": 0.028, "loss/D": 1.')  # the writer is mid-line
    info = json.loads((running / "run.json").read_text())
    (running / "run.json").write_text(json.dumps(dict(info, status="running")))
    (index[0]).write_text(json.dumps(dict(entries[0], state="running")))
    failed_overrides = [o if not o.startswith("train.batch_size=") else "train.batch_size=3"
                        for o in entries[0]["overrides"]]
    (live / "index" / "9.json").write_text(json.dumps({"overrides": failed_overrides, "state": "failed",
                                                       "run_dir": None, "error": "ConfigError: boom", "job_num": 9}))

    assert main(["report", str(live)]) == 0
    printed = capsys.readouterr().out
    out = live / "report"
    rows = {r["dir"]: r for r in read_csv(out / "runs.csv")}
    assert len(rows) == 5
    r_run, r_kill = rows[str(running)], rows[str(killed)]
    assert (r_run["status"], r_run["finished"]) == ("running", "no")
    assert (r_kill["status"], r_kill["finished"]) == ("unfinished", "no")
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["error"] == "ConfigError: boom" and failed[0]["steps"] == ""
    assert failed[0]["run"] == "batch_size=3 collapse_loss_gap=0.01"
    ticks = read_jsonl((sweep / running.name) / "metrics.jsonl")  # the complete lines
    assert int(r_run["skipped_lines"]) == 1 and int(r_run["steps"]) == ticks[-1]["step"] == 6
    assert num(r_run["loss_D"]) == pytest.approx(ticks[-1]["loss/D"])
    assert r_run["img_per_s_overall"] == ""  # no summary yet
    assert num(r_run["img_per_s"]) == pytest.approx(statistics.median(t["throughput/img_per_s"] for t in ticks[1:]))
    # best and collapse come from evals.jsonl / the collapse flags when there is no summary
    evals = read_jsonl(running / "evals.jsonl")
    assert num(r_run["best_value"]) == pytest.approx(min(e["eval/FID"] for e in evals))
    flagged = [t["step"] for t in ticks if t.get("stability/collapse") == 1]
    assert r_run["collapse_step"] == (str(flagged[0]) if flagged else "")
    md = (out / "report.md").read_text()
    assert "**Not finished**" in md and "(running)" in md and "(unfinished)" in md and "(failed)" in md
    assert "half-written" in md and "ConfigError: boom" in md
    assert "not finished" in printed
    for name in SWEEP_PLOTS:
        assert_png(out / name)
    assert "`stalled`" not in md

    # The running job dies with its node: nothing is written for two hours -> "stalled", still unfinished.
    old = time.time() - 7200
    for d in (running, running / "checkpoints", running / "samples"):
        for f in (d.iterdir() if d.is_dir() else []):
            os.utime(f, (old, old))
    assert main(["report", str(live)]) == 0
    rows = {r["dir"]: r for r in read_csv(out / "runs.csv")}
    assert (rows[str(running)]["status"], rows[str(running)]["finished"]) == ("stalled", "no")
    md = (out / "report.md").read_text()
    assert "(stalled)" in md and "`stalled`: marked running" in md
    # a report of the run alone is written into the run's folder: that is no sign of life
    for _ in range(2):
        assert main(["report", str(running)]) == 0
        (row,) = read_csv(running / "report" / "runs.csv")
        assert row["status"] == "stalled"


def test_single_run_and_a_folder_of_runs(sweep, tmp_path):
    jobs = json.loads((sweep / "sweep.json").read_text())["jobs"]
    run = tmp_path / "one"
    shutil.copytree(jobs[-1]["run_dir"], run, ignore=shutil.ignore_patterns("*.pt", "tb"))
    assert main(["report", str(run)]) == 0
    out = run / "report"
    for name in ("losses.png", "sigma.png", "evals.png", "truncation.png"):
        assert_png(out / name)
    for name in ("throughput.png", "ablation.png"):  # one run: nothing to scale, nothing to compare
        assert not (out / name).exists()
    md = (out / "report.md").read_text()
    assert "_throughput.png not written: only one effective batch size (8)" in md
    assert "`ablation.png`: one run" in md
    assert read_csv(out / "runs.csv")[0]["run"] == "one"

    # a plain folder of runs, no sweep index: the swept key comes from diffing config.yaml
    folder = tmp_path / "runs"
    for j in jobs:
        if j["overrides"].count("telemetry.collapse_loss_gap=50"):
            shutil.copytree(j["run_dir"], folder / "nested" / Path(j["run_dir"]).name,
                            ignore=shutil.ignore_patterns("*.pt", "tb"))
    (folder / "notes").mkdir()
    assert main(["report", str(folder)]) == 0
    rows = read_csv(folder / "report" / "runs.csv")
    assert sorted(r["run"] for r in rows) == ["batch_size=4", "batch_size=8"]
    assert "Swept (config.yaml diff): `train.batch_size`" in (folder / "report" / "report.md").read_text()
    assert_png(folder / "report" / "throughput.png")
    assert_png(folder / "report" / "ablation.png")


def test_a_failing_plot_leaves_no_partial_file(sweep, tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    out = tmp_path / "out"
    assert main(["report", str(sweep), f"out={out}"]) == 0
    real_savefig = Figure.savefig

    def half_then_fail(self, fname, *a, **k):
        if "sigma" in str(getattr(fname, "name", fname)):  # the open temp file rundir.atomic_write hands over
            fname.write(PNG_SIGNATURE + b"half")
            raise OSError(28, "No space left on device")
        return real_savefig(self, fname, *a, **k)

    monkeypatch.setattr(Figure, "savefig", half_then_fail)
    assert main(["report", str(sweep), f"out={out}"]) == 0
    err = capsys.readouterr().err
    assert "warning: sigma.png not written" in err
    assert not (out / "sigma.png").exists()  # neither the half file nor the previous report's plot
    assert not [p.name for p in out.iterdir() if ".tmp" in p.name]
    assert "`sigma.png`: failed: OSError" in (out / "report.md").read_text()
    for name in set(SWEEP_PLOTS) - {"sigma.png"}:
        assert_png(out / name)


def test_bad_dir_is_one_error_line_and_exit_2(tmp_path, capsys):
    missing = tmp_path / "no-such-sweep"
    empty = tmp_path / "empty"
    (empty / "sub" / "deeper").mkdir(parents=True)
    (empty / "sub" / "notes.txt").write_text("not a run")
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    for args, words in (([str(missing)], [str(missing), "does not exist", "run directory"]),
                        ([str(empty)], [str(empty), "no run directories", "run.json"]),
                        ([str(a_file)], [str(a_file), "not a directory"]),
                        ([], ["missing DIR"]),
                        ([str(empty), "colour=red"], ["unknown argument", "colour=red"])):
        assert main(["report", *args]) == 2, args
        cap = capsys.readouterr()
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), cap.err
        assert all(w in lines[0] for w in words), (lines[0], words)
        assert "Traceback" not in cap.err + cap.out
    assert not (empty / "report").exists()
    # the console entry point too (no traceback, exit code 2)
    proc = subprocess.run(BENCH + ["report", str(missing)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and str(missing) in proc.stderr
    assert "Traceback" not in proc.stderr


def test_scaling_table_and_labels_from_synthetic_rows():
    rows = [{"run": n, "status": "completed", "finished": True, "effective_batch": b, "world_size": w,
             "batch_size": b // w, "accumulate": 1, "img_per_s": ips, "img_per_s_per_device": ips / w,
             "step_ms": None, "mfu": None, "peak_mem_gb": None}
            for n, b, w, ips in (("a", 8, 1, 100.0), ("b", 16, 2, 180.0), ("c", 32, 4, 320.0), ("d", 16, 1, 150.0))]
    table = tables.scaling_table(rows)
    assert [t["run"] for t in table] == ["a", "d", "b", "c"]
    # b and c run a's per-device batch on 2 and 4 ranks; d is its own reference (batch 16 on one rank)
    assert [t["ideal_img_per_s"] for t in table] == [100.0, 150.0, 200.0, 400.0]
    assert [t["efficiency"] for t in table] == pytest.approx([1.0, 1.0, 0.9, 0.8])

    # choosing a model group changes many config keys the same way: only the first one labels the runs
    runs = [collect.Run(path=Path(f"/r/{i}"), name=str(i),
                       config={"model.family": fam, "model.attn": attn, "train.batch_size": b, "run.dir": f"/r/{i}"})
            for i, (fam, attn, b) in enumerate((("biggan", "[16]", 8), ("sagan", "[8]", 8), ("sagan", "[8]", 16)))]
    keys, source = tables.swept_keys(runs)
    assert (keys, source) == (["model.family", "train.batch_size"], "config.yaml diff")
    tables.assign_labels(runs, keys)
    assert [r.label for r in runs] == ["family=biggan batch_size=8", "family=sagan batch_size=8",
                                       "family=sagan batch_size=16"]


def test_ablation_matrix_axes_are_balanced_for_a_five_key_grid():
    """The stability_ablation grid (3 x 2 x 4 x 2 x 2 = 96 cells) is laid out as 12 rows x 8 columns,
    every cell once; two keys keep rows = first key, columns = second."""
    import itertools
    import math

    values = {"loss": ["hinge", "ns", "wgan_gp"], "model.d_sn": [True, False], "reg.r1_gamma": [0, 0.1, 1, 10],
              "reg.ortho_beta": [0, 1e-4], "reg.sigma_clamp": [None, "ratio:1.5"]}
    keys = list(values)
    abl = [dict(zip(keys, combo)) for combo in itertools.product(*values.values())]
    rows, cols = _matrix_axes(abl, keys)
    assert sorted(rows + cols) == sorted(keys)
    n_rows, n_cols = (math.prod(len(values[k]) for k in ks) for ks in (rows, cols))
    assert (n_rows, n_cols) == (12, 8)
    assert _matrix_axes(abl, ["loss", "model.d_sn"]) == (["loss"], ["model.d_sn"])


def test_two_sweeps_with_the_same_run_folders_keep_apart(sweep, tmp_path):
    """Run folder names hash the overrides, so two sweeps of one grid share them: a report over both
    still gives every run its own label (plots look runs up by label)."""
    both = tmp_path / "both"
    for name in ("first", "second"):
        shutil.copytree(sweep, both / name, ignore=shutil.ignore_patterns("*.pt", "tb", "report", ".submitit"))
    assert main(["report", str(both)]) == 0
    rows = read_csv(both / "report" / "runs.csv")
    assert len(rows) == 2 * len(render.build_report(sweep, tmp_path / "one")["runs"])
    labels = [r["run"] for r in rows]
    assert len(set(labels)) == len(labels)
    assert any("first/" in l for l in labels) and any("second/" in l for l in labels)


def test_one_best_rule_follows_the_runs_best_metric():
    """runs.csv's best and report.md's best-evaluation table both come from rundir.best_eval with the run's
    eval.best_metric and extractor: not always the lowest FID, and never a `bench eval` record."""
    evals = [{"step": 2, "extractor": "domain", "eval/FID": 5.0, "eval/IS": 1.5, "num_samples": 40},
             {"step": 4, "extractor": "domain", "eval/FID": 3.0, "eval/IS": 1.2, "num_samples": 40},
             {"step": 4, "extractor": "domain", "eval/FID": 1.0, "eval/IS": 9.0, "num_samples": 40,
              "source": "bench eval"},
             {"step": 4, "extractor": "inception", "eval/FID": 7.0, "eval/IS": 2.0, "num_samples": 40}]
    run = collect.Run(path=Path("/r/a"), name="a", label="a", evals=evals,
                      config={"eval.best_metric": "eval/IS", "eval.extractor": "domain"})
    row = tables.run_row(run)
    assert (row["best_metric"], row["best_value"], row["best_step"], row["best_extractor"]) == \
        ("eval/IS", 1.5, 2, "domain")
    by_ext = {r[1]: r for r in tables.best_eval_rows([run], tables.eval_records([run]))}
    assert by_ext["domain"][2:6] == ["IS", 40, 2, 2]  # by, samples, step, competing evaluations
    assert by_ext["inception"][4] == 4
    run.config = {"eval.extractor": "domain"}  # default eval.best_metric: FID, lower is better
    assert tables.best_eval(run)["step"] == 4 and tables.best_eval(run)["value"] == 3.0


def test_report_touches_only_the_files_it_wrote(sweep, tmp_path, capsys):
    from bench.report.tables import LEDGER

    out = tmp_path / "mine"
    out.mkdir()
    user = {"report.md": "my own notes", "runs.csv": "my,own\n1,2\n", "notes.txt": "keep"}
    for name, text in user.items():
        (out / name).write_text(text)
    assert main(["report", str(sweep), f"out={out}"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and str(out / "report.md") in lines[0] and "not written by `bench report`" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == sorted(user)  # refused before writing anything
    assert all((out / n).read_text() == t for n, t in user.items())

    (out / "report.md").unlink()
    (out / "runs.csv").unlink()
    assert main(["report", str(sweep), f"out={out}"]) == 0
    listed = set(json.loads((out / LEDGER).read_text())["written"])
    assert {"report.md", "runs.csv", "sigma.png"} <= listed and "notes.txt" not in listed
    assert (out / "notes.txt").read_text() == "keep"

    # a stale output the ledger lists is removed; a same-named file it does not list is refused, untouched
    (out / "sigma-7.png").write_bytes(PNG_SIGNATURE + b"an earlier report's plot")
    (out / LEDGER).write_text(json.dumps({"written": sorted(listed | {"sigma-7.png"})}))
    assert main(["report", str(sweep), f"out={out}"]) == 0
    assert not (out / "sigma-7.png").exists() and (out / "notes.txt").read_text() == "keep"
    (out / "ablation-old.png").write_bytes(b"user")  # not one of our names: never looked at
    (out / "sigma-9.png").write_bytes(b"the user's own figure")
    capsys.readouterr()
    assert main(["report", str(sweep), f"out={out}"]) == 2
    assert "sigma-9.png" in capsys.readouterr().err
    assert (out / "sigma-9.png").read_bytes() == b"the user's own figure"
    assert (out / "ablation-old.png").read_bytes() == b"user"


# ---- ADA's p (ada_p.png) from fabricated run directories ----------------------------------------------------

def ada_run(root: Path, name: str, seed: int, policy: list, target, ps: list | None) -> Path:
    """A finished run directory as training leaves it, written through bench.rundir: config.yaml, run.json,
    metrics.jsonl (with `aug/p` per tick when `ps` is given), summary.json, evals.jsonl."""
    import yaml

    from bench import rundir

    d = root / name
    d.mkdir(parents=True)
    cfg = {"train": {"seed": seed, "batch_size": 16, "steps": 30}, "aug": {"policy": policy, "ada_target": target},
           "eval": {"extractor": "domain", "best_metric": "eval/FID"}, "run": {"name": name, "dir": str(d)}}
    rundir.atomic_write(d / rundir.CONFIG, yaml.safe_dump(cfg))
    rundir.write_json(d / rundir.RUN_JSON, {"status": "completed", "world_size": 1, "batch_size": 16})
    for i in range(3):
        row = {"step": 10 * (i + 1), "kimg": 0.16 * (i + 1), "loss/D": 1.0, "loss/G": 0.5,
               "throughput/img_per_s": 100.0}
        if ps is not None:
            row["aug/p"] = ps[i]
        rundir.append_jsonl(d / rundir.METRICS, row)
    rundir.write_json(d / rundir.SUMMARY, {"status": "completed", "steps": 30, "collapse_step": None})
    rundir.append_jsonl(d / rundir.EVALS, {"step": 30, "eval/FID": 50.0 + seed, "extractor": "domain",
                                           "num_samples": 40})
    return d


ADA_P = {0: [0.0, 0.004, 0.012], 1: [0.0, 0.002, 0.001]}  # seed -> p per tick


def test_ada_p_plot_has_one_line_per_ada_run(tmp_path, monkeypatch):
    from bench.report import plots

    root = tmp_path / "runs"
    ops = ["color", "translation", "cutout"]
    for seed, ps in ADA_P.items():
        ada_run(root, f"ada-s{seed}", seed, ops, 0.6, ps)
    ada_run(root, "diffaug-s0", 0, ops, None, None)
    ada_run(root, "baseline-s0", 0, [], None, None)
    figures = {}
    original = tables.Writer.figure
    monkeypatch.setattr(tables.Writer, "figure", lambda w, name, fig: figures.setdefault(name, fig) and original(w, name, fig))
    out = tmp_path / "out"
    assert main(["report", str(root), f"out={out}"]) == 0
    assert_png(out / "ada_p.png")
    md = (out / "report.md").read_text()
    assert "## ADA augmentation probability" in md and "![ada_p.png](ada_p.png)" in md
    assert "ada_p.png" in json.loads((out / tables.LEDGER).read_text())["written"]
    # the drawn figure: one labelled line per ADA run, p against kimg as written, the two seeds of the one ADA
    # configuration in its one colour, told apart by line style
    (ax,) = figures["ada_p.png"].axes
    lines = [l for l in ax.get_lines() if not l.get_label().startswith("_")]
    assert len(lines) == 2
    by_seed = {int(l.get_label().split("seed=")[1].split()[0]): l for l in lines}
    assert set(by_seed) == {0, 1}
    for seed, line in by_seed.items():
        assert list(line.get_ydata()) == pytest.approx(ADA_P[seed])
        assert list(line.get_xdata()) == pytest.approx([0.16, 0.32, 0.48])
        assert "target r_t 0.6" in line.get_label()
    assert by_seed[0].get_color() == by_seed[1].get_color()
    assert by_seed[0].get_linestyle() != by_seed[1].get_linestyle()
    assert ax.get_xlabel().startswith("kimg")
    series = plots.ada_series(collect.discover(root))
    assert sorted(s.xs[-1] for s in series) == pytest.approx([0.48, 0.48]) and len(series) == 2

    # the same folder without the ADA runs: no figure, no section, nothing listed as not written; the stale
    # ada_p.png of the first report is removed (the ledger lists it as ours)
    for seed in ADA_P:
        shutil.rmtree(root / f"ada-s{seed}")
    figures.clear()
    assert main(["report", str(root), f"out={out}"]) == 0
    assert "ada_p.png" not in figures and not (out / "ada_p.png").exists()
    md = (out / "report.md").read_text()
    assert "ada_p.png" not in md and "ADA augmentation" not in md
    assert (out / "losses.png").is_file()  # the rest of the report is still there


def test_runs_measured_under_contention_are_marked(tmp_path):
    """A run with ticks under CONTENDED (perf/cpu_util) gets † beside its img/s and a line saying which share of
    its ticks, how low, and the median img/s of its clean ticks; a neighbour for part of a run marks it too. The
    first tick after a start or resume (perf/start_tick: it waits for its first batches) is not counted. runs.csv
    keeps cpu_util (median over ticks, first dropped), contended, contended_share, img_per_s_clean."""
    from bench import metrics_registry as registry
    from bench import rundir

    root = tmp_path / "runs"
    runs = {"clean": [0.5, 0.97, 0.95, 0.96, 0.94], "shared": [0.9, 0.41, 0.45, 0.5, 0.44],
            "partly": [0.9, 0.95, 0.93, 0.48, 0.51],  # a neighbour started in its last two ticks
            "resumed": [0.5, 0.97, 0.95, 0.45, 0.96]}  # a resume before tick 4: its first tick waited for data
    for name, utils in runs.items():
        d = ada_run(root, name, 0, [], None, None)
        (d / rundir.METRICS).unlink()
        for i, u in enumerate(utils):
            ips = 100.0 - i if u >= registry.CONTENDED else 20.0 + i
            row = {"step": 10 * (i + 1), "kimg": 0.16 * (i + 1), "loss/D": 1.0, "loss/G": 0.5,
                   "throughput/img_per_s": ips, registry.CPU_UTIL: u}
            if name == "resumed" and i in (0, 3):
                row[registry.START_TICK] = 1.0
            rundir.append_jsonl(d / rundir.METRICS, row)
    assert main(["report", str(root)]) == 0
    rows = {r["run"]: r for r in read_csv(root / "report" / "runs.csv")}
    assert float(rows["shared"]["cpu_util"]) == pytest.approx(0.445) and rows["shared"]["contended"] == "yes"
    assert float(rows["shared"]["contended_share"]) == 1.0 and rows["shared"]["img_per_s_clean"] in ("", "—")
    assert float(rows["clean"]["cpu_util"]) == pytest.approx(0.955) and rows["clean"]["contended"] in ("no", "")
    # partly: steady ticks 2-5 (first dropped); 2 of 4 contended; clean ticks' img/s 99, 98 -> 98.5
    assert rows["partly"]["contended"] == "yes" and float(rows["partly"]["contended_share"]) == 0.5
    assert int(rows["partly"]["contended_ticks"]) == 2 and int(rows["partly"]["util_ticks"]) == 4
    assert float(rows["partly"]["img_per_s_clean"]) == pytest.approx(98.5)
    assert float(rows["partly"]["cpu_util_lowest"]) == pytest.approx(0.48)
    # resumed: ticks 1 and 4 are start ticks; ticks 2, 3, 5 counted, none contended
    assert rows["resumed"]["contended"] in ("no", "") and int(rows["resumed"]["util_ticks"]) == 3
    md = (root / "report" / "report.md").read_text()
    line = {n: next(x for x in md.splitlines() if x.startswith(f"| {n} ")) for n in runs}
    assert "†" in line["shared"] and "†" in line["partly"]
    assert "†" not in line["clean"] and "†" not in line["resumed"]
    assert "† 2 run(s) with ticks measured under contention" in md
    assert "- partly: 2 of 4 ticks (50%), the lowest at 48%" in md and "the median img/s of its other 2 is 98.5" in md
    assert "- shared: 4 of 4 ticks (100%), the lowest at 41%" in md and "no tick was clean" in md
