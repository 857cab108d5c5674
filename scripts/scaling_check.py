"""Check bench/scaling.py's formula against a real 2-rank run on this machine (CPU, gloo, localhost).

    python scripts/scaling_check.py [--batch 8] [--steps 5] [--repeats 3] [overrides ...]

It measures
  (a) the gloo all-reduce between 2 local processes: the latency (a 1-float message) and the bandwidth
      (messages of the model's gradient size), fitted to the 2-rank ring T(B) = 2 alpha + B / beta;
  (b) the single-rank step time of a tiny model with `bench throughput` (1 thread);
  (c) the 2-rank step time of the same model (two `bench throughput` processes joined by RANK /
      WORLD_SIZE / MASTER_ADDR / MASTER_PORT, 1 thread each, the same per-rank batch: weak scaling);
  (d) two unjoined single-rank runs at once: what sharing the cores costs without any communication;
      (b), (c) and (d) run in turn `--rounds` times and the fastest of each is kept.
The all-reduce times are the fastest of `--reps` calls per size (a busy neighbour only slows a call).
It then feeds the model T_compute = (b) (through the MFU that the measurement implies), the gradient bytes
4 x (d_steps x D + G params), one node of 2 "GPUs" whose intra-node bandwidth and per-hop latency are
(a), and prints the predicted efficiency T_compute / (T_compute + T_comm) beside the measured (b) / (c) and
(d) / (c) (the latter leaves out the contention for cores, which the formula does not model).

The numbers are noisy: on a shared machine the two ranks compete for cores with each other and with
anything else running, which the formula does not model (it assumes every rank has its own device).
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import scaling  # noqa: E402

BENCH = [sys.executable, "-m", "bench.cli"]
TINY = ["model=biggan", "model.ch=8", "model.d_ch=8", "model.z_dim=32", "model.shared_dim=16", "data.num_workers=0",
        "data.shuffle_buffer=50", "train.sample_cols=2", "ema.start=0", "train.precision=fp32"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _allreduce_rank(rank: int, init: str, sizes: list[int], reps: int, queue) -> None:
    """One of the 2 ranks: the times of `reps` all-reduces of each size (bytes of float32)."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=2)
    out = {}
    for size in sizes:
        x = torch.ones(max(1, size // 4))
        for _ in range(3):  # warm the connection and the buffers
            dist.all_reduce(x)
        times = []
        for _ in range(reps):
            dist.barrier()
            t0 = time.perf_counter()
            dist.all_reduce(x)
            times.append(time.perf_counter() - t0)
        out[size] = times
    if rank == 0:
        queue.put(out)
    dist.barrier()
    dist.destroy_process_group()


def measure_allreduce(sizes: list[int], reps: int = 20, stat=statistics.median) -> dict[int, float]:
    """{bytes: seconds of one all-reduce} between 2 local processes (gloo, file:// init): `stat` (the
    median; `min` is the figure a busy neighbour disturbs least) of `reps` timed calls per size."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        procs = [ctx.Process(target=_allreduce_rank, args=(r, init, sizes, reps, queue)) for r in (0, 1)]
        for p in procs:
            p.start()
        result = queue.get(timeout=600)
        for p in procs:
            p.join(timeout=60)
    return {size: stat(times) for size, times in result.items()}


def fit_ring(small: tuple[int, float], big: tuple[int, float]) -> tuple[float, float]:
    """(latency per hop in s, bandwidth in B/s) of a 2-rank ring, T(B) = 2 alpha + B / beta (2(p-1)/p = 1),
    from a tiny message (the latency) and a large one (the bandwidth)."""
    alpha = small[1] / 2
    beta = (big[0] - small[0]) / max(big[1] - small[1], 1e-9)
    return alpha, beta


def _throughput(args: list[str], world: int, joined: bool = True) -> dict:
    """Rank 0's `bench throughput` JSON, with `world` processes of 1 thread each on this machine; with
    `joined` false, `world` independent single-rank runs at once (the cores' contention without any
    communication) and the slower one's JSON."""
    port, procs = _free_port(), []
    for rank in range(world):
        env = dict(os.environ, OMP_NUM_THREADS="1")
        if world > 1 and joined:
            env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                       WORLD_SIZE=str(world))
        procs.append(subprocess.Popen([*BENCH, "throughput", *args], cwd=ROOT, env=env, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE))
    outs = [p.communicate(timeout=1200) for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise SystemExit(f"bench throughput (world {world}) failed: {err.strip().splitlines()[-1:]}")
    return max((json.loads(out) for out, _ in outs), key=lambda r: r["step_ms"]) if not joined \
        else json.loads(outs[0][0])


def _inspect(args: list[str]) -> dict:
    proc = subprocess.run([*BENCH, "inspect", *args], cwd=ROOT, capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def run_check(overrides: list[str], reps: int = 20, rounds: int = 2) -> dict:
    info = _inspect(overrides)
    d_steps = info["d_steps"]
    grad_bytes = 4 * (d_steps * info["D_params"] + info["G_params"])
    sizes = [4, 4 * info["G_params"], 4 * info["D_params"], grad_bytes]
    t_ar = measure_allreduce(sizes, reps=reps, stat=min)  # the fastest call: the least disturbed
    alpha, beta = fit_ring((4, t_ar[4]), (grad_bytes, t_ar[grad_bytes]))
    # 1 rank and 2 ranks in turn, `rounds` times; the fastest of each (a neighbour only slows a run down)
    # and two unjoined single-rank runs at once: the step time that core contention alone gives
    runs = [(_throughput(overrides, 1), _throughput(overrides, 2), _throughput(overrides, 2, joined=False))
            for _ in range(rounds)]
    one, two, pair = (min((r[i] for r in runs), key=lambda r: r["step_ms"]) for i in range(3))
    t1, t2, tp = one["step_ms"] / 1e3, two["step_ms"] / 1e3, pair["step_ms"] / 1e3
    flop = one["GFLOP_per_step"] * 1e9
    x = scaling.ScalingInputs(flop_per_step=flop, peak_tflops=one["peak_tflops"], grad_bytes=grad_bytes,
                              nodes=1, gpus_per_node=2, mfu=flop / (t1 * one["peak_tflops"] * 1e12),
                              intra_gbytes_per_s=beta / 1e9, latency_s=alpha, calls=2 * (d_steps + 1))
    # the all-reduces one step really makes, each measured: d_steps x D, G, and 2 x (d_steps + 1) flags
    measured_comm = d_steps * t_ar[4 * info["D_params"]] + t_ar[4 * info["G_params"]] + (d_steps + 1) * t_ar[4]
    return {"G_params": info["G_params"], "D_params": info["D_params"], "d_steps": d_steps,
            "grad_bytes_per_step": grad_bytes, "allreduce_s": {str(k): v for k, v in t_ar.items()},
            "loopback_latency_us_per_hop": alpha * 1e6, "loopback_GB_per_s": beta / 1e9,
            "t_step_1rank_ms": t1 * 1e3, "t_step_2rank_ms": t2 * 1e3,
            "t_step_2x1rank_unjoined_ms": tp * 1e3,
            "t_step_rounds_ms": [[r[i]["step_ms"] for i in range(3)] for r in runs], "mfu_1rank": x.mfu,
            "t_compute_ms": scaling.t_compute(x) * 1e3, "t_comm_predicted_ms": scaling.t_comm(x) * 1e3,
            "t_comm_measured_allreduces_ms": measured_comm * 1e3,
            "efficiency_predicted": scaling.efficiency(x), "efficiency_measured": t1 / t2,
            "efficiency_measured_vs_contended": tp / t2, "loopback_allreduce_stat": "min of reps",
            "step_overhead_2rank_ms": (t2 - t1) * 1e3}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=8, help="per-rank batch")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per window")
    ap.add_argument("--repeats", type=int, default=3, help="timed windows (the median is used)")
    ap.add_argument("--reps", type=int, default=20, help="all-reduces timed per message size")
    ap.add_argument("--rounds", type=int, default=2, help="1-rank / 2-rank measurements in turn (fastest kept)")
    ap.add_argument("overrides", nargs="*", help="more bench overrides (e.g. model.ch=16)")
    a = ap.parse_args(argv)
    overrides = [*TINY, f"train.batch_size={a.batch}", "throughput.warmup=2", f"throughput.steps={a.steps}",
                 f"throughput.repeats={a.repeats}", *a.overrides]
    r = run_check(overrides, reps=a.reps, rounds=a.rounds)
    print(json.dumps(r, indent=2))
    print(f"loopback gloo all-reduce: {r['loopback_GB_per_s']:.3f} GB/s, {r['loopback_latency_us_per_hop']:.1f} us "
          f"per hop | gradient {r['grad_bytes_per_step'] / 1e6:.3f} MB/step | T_compute {r['t_compute_ms']:.1f} ms, "
          f"T_comm predicted {r['t_comm_predicted_ms']:.2f} ms (its all-reduces measured: "
          f"{r['t_comm_measured_allreduces_ms']:.2f} ms) | 2-rank efficiency predicted "
          f"{r['efficiency_predicted']:.3f}, measured {r['efficiency_measured']:.3f} "
          f"({r['t_step_1rank_ms']:.1f} -> {r['t_step_2rank_ms']:.1f} ms/step); against two unjoined ranks "
          f"sharing the cores ({r['t_step_2x1rank_unjoined_ms']:.1f} ms/step): "
          f"{r['efficiency_measured_vs_contended']:.3f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
