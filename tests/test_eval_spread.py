"""Training's evaluation spread over the ranks (bench/eval/spread.py): two real gloo processes give the numbers and
the feature rows of one process, a failure on one rank during its share ends every rank at once, and a real
two-node `bench train` on the local Slurm cluster writes the record `bench eval` (one process) gives for the same
checkpoint. Tiny data and generators; the spawned ranks run one math thread each (a shared 2-core machine)."""
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from bench import models
from bench import metrics_registry as registry
from bench import rundir
from bench.eval import classifier as C
from bench.eval import metrics as M
from bench.eval import sampling as S
from bench.eval.spread import share_rows
from conftest import ROOT, TINY, classified_shards

TINY_MODEL = {"family": "biggan", "ch": 8, "d_ch": 8, "z_dim": 32, "shared_dim": 16, "attn": [], "hier": True}
N_CLASSES = 10
# Two processes (other thread counts, other reduction orders) give float32 features that differ in the last bits;
# FID, a difference of large terms, then moves by ~1e-6 relative (0.5243325 against 0.5243336 on AVX-512 kernels).
# A real discrepancy (another image, another share) moves it by orders of magnitude more.
CROSS_PROCESS_REL, CROSS_PROCESS_ABS = 1e-5, 1e-5
# (N, batch): 5 batches, shares of 48 and 22 samples; repeats, standing stats, truncation and intra-FID on
SETTINGS = [dict(num_samples=70, batch_size=16, repeats=2, precision="fp32"),
            dict(num_samples=120, batch_size=32, standing_stats=2, truncation=0.7, intra_fid=True,
                 intra_min_per_class=2, precision="fp32", seed=5)]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Tiny shards with a quickly trained domain classifier beside them (epochs, not the clock, set its length)."""
    root = tmp_path_factory.mktemp("spread")
    shards = classified_shards(root)
    return root, shards


def tiny_G(seed=0):
    torch.manual_seed(seed)
    G, _ = models.build(TINY_MODEL, 32, N_CLASSES)
    return G.eval().requires_grad_(False)


def test_shares_are_whole_batches_in_index_order():
    for n, b, world in [(70, 16, 2), (64, 16, 2), (10, 16, 2), (1000, 64, 3), (5, 1, 4)]:
        rows = [share_rows(n, b, world, r) for r in range(world)]
        assert rows[0][0] == 0 and rows[-1][1] == n
        assert all(rows[r][1] == rows[r + 1][0] for r in range(world - 1))
        assert all(lo % b == 0 or lo == hi for lo, hi in rows)  # every batch is one of the one-rank run's batches
        batches = [-(-(hi - lo) // b) for lo, hi in rows]
        assert max(batches) - min(batches) <= 1  # as even as whole batches go
    assert [share_rows(70, 16, 2, r) for r in (0, 1)] == [(0, 48), (48, 70)]


# ---- two real gloo ranks ------------------------------------------------------------------------------

def _worker(rank: int, init_file: str, out_dir: str, shards: str, cache: str, fail_rank: int) -> None:
    import torch.distributed as dist

    from bench.eval.metrics import EvalSettings
    from bench.eval.spread import EvalJob, evaluate_on_ranks, gather_shares, joined
    from bench.train.ranks import Ranks

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    ranks = Ranks(2, rank, torch.device("cpu"), Path(out_dir), rank0_timeout_s=300)
    out = {"results": [], "features": None}
    for i, kw in enumerate(SETTINGS):
        G = tiny_G(0)
        if rank == 1:  # BatchNorm statistics are each rank's own in training: rank 0's must be the ones sampled
            for b in G.buffers():
                if b.dtype.is_floating_point:
                    b.add_(0.5)
        job = EvalJob(G, EvalSettings(**kw, cache_dir=cache), shards, N_CLASSES, "cpu", progress=False)
        t0 = time.perf_counter()
        rec = evaluate_on_ranks(job, ranks, f"evaluating {i}", lambda metrics: dict(metrics))
        out["results"].append({"rec": rec, "wall": time.perf_counter() - t0})
        if i == 0:
            local, gathered = gather_shares(job, ranks, "gathering the features")
            if rank == 0:
                out["features"] = joined([g[0] for g in gathered], kw["num_samples"])
    # a failure in rank `fail_rank`'s share: every rank raises at once, none waits in a collective
    job = EvalJob(tiny_G(0), EvalSettings(**SETTINGS[0], cache_dir=cache), shards, N_CLASSES, "cpu", progress=False)

    def boom():
        if rank == fail_rank:
            raise RuntimeError(f"boom on rank {rank}")

    t0 = time.perf_counter()
    try:
        evaluate_on_ranks(job, ranks, "evaluating with a fault", lambda m: m, before=boom)
        out["failure"] = None
    except Exception as exc:  # noqa: BLE001 - the test looks at which
        out["failure"] = (type(exc).__name__, str(exc), time.perf_counter() - t0)
    torch.save(out, f"{out_dir}/{rank}.pt")
    os._exit(0)  # skip gloo's teardown, which can abort when the peer exits first


def test_two_ranks_give_the_numbers_and_feature_rows_of_one(data, tmp_path, one_thread):
    import torch.multiprocessing as mp
    from torch_fidelity.utils import extract_featuresdict_from_input_id_cached

    from bench.eval.features import Sampler, feature_extractor, register_sampler

    _, shards = data
    cache = tmp_path / "cache"
    t0 = time.perf_counter()
    mp.start_processes(_worker, args=(str(tmp_path / "init"), str(tmp_path), str(shards), str(cache), 1), nprocs=2,
                       start_method="spawn")
    spawn_s = time.perf_counter() - t0
    outs = [torch.load(tmp_path / f"{r}.pt", weights_only=False) for r in (0, 1)]
    assert all(r["rec"] is None for r in outs[1]["results"])  # rank 0 alone holds the record
    for kw, res in zip(SETTINGS, outs[0]["results"]):
        two = res["rec"]
        t1 = time.perf_counter()
        one = M.evaluate_generator(tiny_G(0), M.EvalSettings(**kw, cache_dir=cache), shards_spec=shards,
                                   n_classes=N_CLASSES, device="cpu", progress=False)
        print(f"\nN={kw['num_samples']}: 2 ranks {res['wall']:.2f} s, 1 rank {time.perf_counter() - t1:.2f} s")
        assert two["eval_ranks"] == 2 and "eval_ranks" not in one
        metrics = [k for k in registry.EVAL_METRICS if one.get(k) is not None]
        assert {"eval/FID", "eval/KID", "eval/IS", "eval/precision", "eval/recall", "eval/density",
                "eval/coverage", "eval/class_acc"} <= set(metrics)
        assert kw.get("intra_fid") is None or "eval/intra_FID" in metrics
        for k in metrics:
            assert two[k] == pytest.approx(one[k], rel=CROSS_PROCESS_REL, abs=CROSS_PROCESS_ABS), k
            if kw.get("repeats", 1) > 1:
                assert two["repeat_values"][k] == pytest.approx(one["repeat_values"][k], rel=CROSS_PROCESS_REL,
                                                                 abs=CROSS_PROCESS_ABS), k
        for k in ("num_samples", "num_real", "extractor", "truncation", "trunc_mode", "standing_stats", "repeats",
                  registry.INTRA_FIELDS[1]):
            assert two.get(k) == one.get(k), k
        assert math.isfinite(two["eval/FID"]) and two["eval/FID"] > 0
        for k in registry.COST_FIELDS:
            assert two[k] >= 0 and math.isfinite(two[k]), k
        assert two["seconds"] > 0
    # the gathered feature rows are those of torch-fidelity over all N samples in one go, bit for bit
    kw = SETTINGS[0]
    G, n = tiny_G(0), kw["num_samples"]
    z, y = S.eval_latents(n, G.z_dim, N_CLASSES, seed=0)
    register_sampler()
    clf_file = str(C.classifier_path(shards, 32))
    fk, _, used = M.fidelity_kwargs(Sampler(G, z, y, autocast=None), None, M.MetricSettings(
        extractor="domain", weights_path=clf_file, batch_size=kw["batch_size"], num_samples=n, num_real=n),
        torch.device("cpu"))
    want = extract_featuresdict_from_input_id_cached(1, feature_extractor(fk, used), **fk)
    got = outs[0]["features"]
    assert set(got) == set(want) and all(got[k].shape[0] == n for k in got)
    for k in want:
        assert torch.equal(got[k], want[k]), k
    # the failure on rank 1 reached both ranks at once
    f0, f1 = outs[0]["failure"], outs[1]["failure"]
    assert f1[0] == "RuntimeError" and "boom on rank 1" in f1[1]
    assert f0[0] == "RankFailed" and "rank 1 failed while evaluating with a fault" in f0[1] and "boom" in f0[1], f0
    assert f0[2] < 60 and f1[2] < 60
    print(f"spawned ranks: {spawn_s:.1f} s in all")


def _two_bench_ranks(run_dir: Path, shards: Path, fault: str, *extra: str) -> list[tuple[int, str, float]]:
    """Two ranks of one `bench train`, started as a launcher would (RANK, WORLD_SIZE, MASTER_*): (rc, stderr, s)."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    procs, t0 = [], time.monotonic()
    for rank in (0, 1):
        env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", OMP_NUM_THREADS="1", GAN_BENCH_FAULT=fault, PYTHONPATH=str(ROOT))
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "bench.cli", "train", *TINY, "train.tick_every=2", "train.sample_every=0",
             "train.precision=fp32", "train.batch_size=4", f"data.shards={shards}", f"run.dir={run_dir}", *extra],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for proc in procs:
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a rank did not exit")
        out.append((proc.returncode, err, time.monotonic() - t0))
    return out


def test_a_rank_failing_in_its_share_of_a_training_evaluation_ends_every_rank(data, tmp_path):
    """GAN_BENCH_FAULT=1:2:eval: rank 1 raises in its share of step 2's evaluation; both ranks exit at once (far
    within dist.timeout_s and dist.rank0_timeout_s), and the summary names rank 1's error."""
    _, shards = data
    run_dir = tmp_path / "r"
    (rc0, err0, s0), (rc1, err1, s1) = _two_bench_ranks(
        run_dir, shards, "1:2:eval", "train.steps=2", "dist.timeout_s=300", "dist.rank0_timeout_s=300",
        "eval.final=true", "eval.num_samples=40", "eval.batch_size=10", f"eval.cache_dir={tmp_path / 'cache'}")
    assert rc0 == 3 and rc1 == 3, (err0[-2000:], err1[-2000:])
    assert "injected fault" in err1 and "during eval" in err1
    assert "rank 1 failed while evaluating step 2 (sampling and features)" in err0, err0[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "failed" and "injected fault" in summary["error"], summary
    assert not (run_dir / rundir.EVALS).exists() or not (run_dir / rundir.EVALS).read_text().strip()
    assert max(s0, s1) < 300  # nobody waited out a timeout


# ---- the real local Slurm cluster -------------------------------------------------------------------------

EVAL = ["eval.final=true", "eval.every=0", "eval.num_samples=80", "eval.batch_size=16", "eval.precision=fp32",
        "eval.repeats=2"]


def _bench(args, cwd, env=None, timeout=900):
    proc = subprocess.run([sys.executable, "-m", "bench.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=env)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.mark.slurm
def test_a_two_node_training_evaluation_equals_bench_eval_of_its_checkpoint(slurm_cluster, tmp_path, data):
    """The spread evaluation at the last step of a real 2-node run is that of the step's checkpoint in one
    process: the checkpoint is written before the evaluation, and every rank samples rank 0's EMA G."""
    _, shards = data
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    _bench(["train", "hydra/launcher=submitit_slurm", "cluster=local", "cluster.nodes=2", "cluster.tasks_per_node=1",
            "train.steps=4", "train.batch_size=4", "train.tick_every=2", "train.sample_every=0", *TINY, *EVAL,
            f"eval.cache_dir={cache}", f"run.dir={run_dir}", f"run.root={tmp_path}", f"data.shards={shards}"],
           cwd=tmp_path)
    run = json.loads((run_dir / "run.json").read_text())
    assert run["status"] == "completed" and run["world_size"] == 2 and sorted(run["hosts"]) == ["n1", "n2"]
    (trained,) = rundir.read_jsonl(run_dir / rundir.EVALS).rows
    assert trained["step"] == 4 and trained["eval_ranks"] == 2
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    _bench(["eval", f"run={run_dir}", "which=last", *EVAL[2:], f"eval.cache_dir={cache}"], cwd=tmp_path, env=env)
    again = rundir.read_jsonl(run_dir / rundir.EVALS).rows[-1]
    assert again["source"] == rundir.SOURCE_BENCH_EVAL and again["step"] == 4 and "eval_ranks" not in again
    metrics = [k for k in registry.EVAL_METRICS if again.get(k) is not None]
    assert "eval/FID" in metrics and "eval/class_acc" in metrics
    for k in metrics:
        assert trained[k] == pytest.approx(again[k], rel=CROSS_PROCESS_REL, abs=CROSS_PROCESS_ABS), k
    assert set(trained["repeat_values"]) == set(again["repeat_values"])
    for k, values in again["repeat_values"].items():
        assert trained["repeat_values"][k] == pytest.approx(values, rel=CROSS_PROCESS_REL,
                                                            abs=CROSS_PROCESS_ABS), k
