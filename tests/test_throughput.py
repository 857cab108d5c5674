"""`bench throughput`: the JSON a user reads, checked against independent arithmetic (no timing targets)."""
import json

import pytest

from bench import device
from bench.cli import main
from conftest import TINY

TINY_T = [a for a in TINY if not a.startswith("train.tick_every")]


def run_throughput(capsys, *args):
    assert main(["throughput", *TINY_T, "train.batch_size=4", "throughput.warmup=1", "throughput.steps=2",
                 *args]) == 0
    cap = capsys.readouterr()
    return json.loads(cap.out), cap.err


def test_throughput_reports_rates_split_flops_and_mfu(capsys):
    out, err = run_throughput(capsys, "throughput.repeats=3")
    assert out["batch_size"] == 4 and out["steps"] == 2 and out["precision"] in ("bf16", "fp32")
    # img/s and ms/step from the median window's own seconds
    assert out["img_per_s"] == pytest.approx(out["steps"] * 4 / out["seconds"], rel=1e-3)
    assert out["step_ms"] == pytest.approx(1000 * out["seconds"] / out["steps"], rel=1e-3)
    assert len(out["img_per_s_windows"]) == 3
    assert out["img_per_s"] == pytest.approx(sorted(out["img_per_s_windows"])[1], rel=1e-3)
    for k in ("data_ms", "D_ms", "G_ms", "reg_ms", "telemetry_ms"):
        assert out[k] >= 0
    assert out["D_ms"] + out["G_ms"] <= out["step_ms"] * 1.05
    # TFLOP/s = FLOP per step x steps / seconds; MFU = TFLOP/s / peak
    assert out["tflops"] == pytest.approx(out["GFLOP_per_step"] * 1e9 * out["steps"] / out["seconds"] / 1e12, rel=1e-3)
    assert out["mfu"] == pytest.approx(out["tflops"] / out["peak_tflops"], rel=1e-6)
    assert out["peak_source"].startswith(f"measured {out['precision']}") and out["peak_tflops"] > 0
    assert out["peak_mem_gb"] > 0
    assert "img/s" in err and "TFLOP/s" in err  # the terminal line


def test_throughput_on_a_cold_cache_trains_no_classifier(capsys, tmp_path, monkeypatch):
    """Throughput times training steps only: on the built-in set's first use (whose eval.final=auto evaluates), and
    with the diversity probe asked for, it writes the shards but trains no domain classifier that nothing reads."""
    monkeypatch.setenv("GAN_BENCH_CACHE", str(tmp_path / "cache"))
    builtin = [a for a in TINY_T if not a.startswith(("data.", "eval.final"))]
    assert main(["throughput", *builtin, "data.num_samples=200", "data.samples_per_shard=50", "train.batch_size=4",
                 "throughput.warmup=1", "throughput.steps=1", "throughput.repeats=1", "throughput.data=shards",
                 "telemetry.diversity_every=2", "eval.every=2"]) == 0
    cap = capsys.readouterr()
    assert json.loads(cap.out)["steps"] == 1
    assert list((tmp_path / "cache").rglob("manifest.json"))  # the built-in shards were written and read
    assert not list((tmp_path / "cache").rglob("classifier-*.pt")) and "classifier" not in cap.err


def test_flop_count_matches_inspect(capsys):
    """GFLOP per step = (D step x d_steps + G step) x batch x accumulate, with the per-image counts
    that `bench inspect` prints for the same config."""
    out, _ = run_throughput(capsys, "throughput.repeats=1", "train.d_steps=2", "train.accumulate=2")
    assert main(["inspect", *TINY_T, "train.d_steps=2"]) == 0
    per_img = json.loads(capsys.readouterr().out)["GFLOP_per_image"]
    assert out["GFLOP_per_step"] == pytest.approx((per_img["D_step"] * 2 + per_img["G_step"]) * 4 * 2, rel=1e-6)


def test_sweep_gives_one_result_per_combination(capsys):
    out, err = run_throughput(capsys, "-m", "train.precision=bf16,fp32", "throughput.repeats=1")
    assert [r["precision"] for r in out] == ["bf16", "fp32"]
    # auto: channels_last for bf16 on a CPU with fast bf16 (AVX512-BF16 or AMX), never for fp32 on a CPU
    assert [r["channels_last"] for r in out] == [device.cpu_has_fast_bf16(), False]
    assert err.count(" img/s | ") == 2  # one result line per point (a contention warning may add its own line)


def test_cpu_peak_is_cached_and_keeps_the_best(tmp_path, monkeypatch):
    import torch

    monkeypatch.setenv("GAN_BENCH_CACHE", str(tmp_path))
    peak, source = device.peak_tflops(torch.device("cpu"), "fp32")
    cache = json.loads((tmp_path / "cpu_peak.json").read_text())
    (entry,) = cache.values()
    assert peak == entry["peak"] == max(entry["matmul"], entry["conv"]) and "fp32" in source
    # a later, lower measurement never lowers the cached peak
    entry["peak"] = entry["conv"] = peak * 100
    (tmp_path / "cpu_peak.json").write_text(json.dumps({next(iter(cache)): entry}))
    again, _ = device.peak_tflops(torch.device("cpu"), "fp32", remeasure=True)
    assert again == pytest.approx(peak * 100)


def test_profile_writes_op_table_and_trace_per_sweep_point(capsys, tmp_path):
    out, err = run_throughput(capsys, "-m", "train.precision=bf16,fp32", "throughput.repeats=1",
                              f"throughput.profile={tmp_path}/prof")
    for i, r in enumerate(out):
        d = tmp_path / "prof" / str(i)
        assert r["profile"]["dir"] == str(d)
        table = (d / "ops.txt").read_text()
        assert "aten::" in table and "Input Shapes" in table  # by op, then by op and shape
        trace = json.loads((d / "trace.json").read_text())
        assert any("convolution" in e.get("name", "") for e in trace["traceEvents"])
        shares = r["profile"]["top_ops"]
        assert 0 < r["profile"]["conv_share"] <= 1 and all(0 <= v <= 1 for v in shares.values())
        assert sum(shares.values()) <= 1 + 1e-6
    assert err.count("profile (2 steps)") == 2


# A training process: the trainer's modules are imported (as in `bench train`) before the malloc
# settings are made; the heap then has the layout training runs with.
FAULTS = """
import resource, torch
import bench.train.loop
from bench.device import keep_freed_memory
print(keep_freed_memory())
def faults():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        x = torch.ones(16 * 2**20)  # 64 MiB: over glibc's largest mmap threshold
        del x
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults()
print(faults())
"""


@pytest.mark.parametrize("mode", ["tuned", "default"])
def test_freed_memory_is_kept_unless_opted_out(mode):
    """Five 64 MiB tensors in a row: with freed memory kept, the pages are touched once and reused (few
    page faults); with GAN_BENCH_MALLOC=default glibc maps and unmaps each one (16k faults per tensor)."""
    import os
    import platform
    import subprocess
    import sys

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("not a glibc system")
    env = dict(os.environ, GAN_BENCH_MALLOC=mode)
    out = subprocess.run([sys.executable, "-c", FAULTS], env=env, capture_output=True, text=True, check=True).stdout
    took, faults = out.split()
    pages = 5 * 64 * 2**20 // os.sysconf("SC_PAGE_SIZE")
    if mode == "tuned":
        assert took == "True" and int(faults) < pages // 10
    else:
        assert took == "False" and int(faults) > pages // 2
