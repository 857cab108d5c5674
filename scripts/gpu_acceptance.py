"""GPU acceptance of the large-scale path (README, "GPU acceptance"; run through scripts/gpu-acceptance.sh).

On a CUDA machine: `bench inspect` and `bench throughput` of BigGAN-128 (ch 96) at batch 256 per GPU in
bf16 and at the largest batch that fits, fp16 with one GradScaler per net, a 100-step `bench train` on
shards it writes, and an evaluation through torch-fidelity on the GPU. It prints one table (img/s,
TFLOP/s, MFU against the peak, peak memory, step split) and writes it to <out>/acceptance.md with every
command's JSON beside it.

`--tiny` runs the same sequence at a tiny width on whatever device there is (the test suite does, on
CPU), so the script never goes stale on machines without a GPU.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # quick_classifier imports bench here, also from a checkout not installed
    sys.path.insert(0, str(ROOT))

BENCH = [sys.executable, "-m", "bench.cli"]


@dataclass
class Plan:
    """What one acceptance run measures."""
    model: list[str]                 # model overrides
    batch: int                       # per-device batch of the headline measurement
    precision: str                   # headline precision
    batch_ladder: list[int]          # batches tried upwards for "the largest that fits"
    fp16: bool                       # measure fp16 (needs a GPU)
    train_steps: int
    shard_args: list[str]            # bench data make-shards arguments
    eval_samples: int
    throughput: list[str] = field(default_factory=lambda: ["throughput.warmup=5", "throughput.steps=20",
                                                           "throughput.repeats=3"])
    own_shards_first: bool = False   # write the shards first and measure throughput on them (their classes and
    #   resolution) instead of the built-in set, whose first use trains a domain classifier throughput never reads
    throughput_data: list[str] = field(default_factory=list)  # data overrides of the throughput runs (set in main)
    quick_classifier: bool = False   # train the evaluation's domain classifier beforehand for one epoch (the tiny
    #   run checks that the evaluation runs, not the classifier's accuracy) instead of on first use (600+ steps)


def plan_for(tiny: bool, cuda: bool) -> Plan:
    if tiny:
        return Plan(model=["model=biggan", "model.ch=8", "model.d_ch=8", "model.z_dim=32", "model.shared_dim=16",
                           "data.num_workers=0"],
                    batch=4, precision="bf16" if cuda else "fp32", batch_ladder=[4, 8], fp16=cuda,
                    train_steps=4, shard_args=["data.resolution=32", "data.num_samples=240", "samples_per_shard=60"],
                    eval_samples=40, throughput=["throughput.warmup=1", "throughput.steps=2", "throughput.repeats=1"],
                    own_shards_first=True, quick_classifier=True)
    return Plan(model=["model=biggan_128", "model.ch=96", "model.d_ch=96", "data.num_workers=8"], batch=256,
                precision="bf16", batch_ladder=[256, 384, 512, 768, 1024, 1536, 2048], fp16=True, train_steps=100,
                shard_args=["data.resolution=128", "data.num_samples=20000", "samples_per_shard=500"],
                eval_samples=5000)


def run(args: list[str], out: Path, name: str, timeout: float = 3600) -> tuple[int, str]:
    """One bench command; its stdout goes to <out>/<name>.out, stderr to <name>.err. (rc, stdout)."""
    t0 = time.perf_counter()
    proc = subprocess.run(BENCH + args, capture_output=True, text=True, timeout=timeout)
    (out / f"{name}.out").write_text(proc.stdout)
    (out / f"{name}.err").write_text(proc.stderr)
    print(f"[{time.perf_counter() - t0:6.0f} s] bench {' '.join(args[:1])} {name}: exit {proc.returncode}", flush=True)
    return proc.returncode, proc.stdout


_MEASURED: dict[tuple, dict] = {}  # the arguments of each throughput measured so far -> its result


def throughput(p: Plan, out: Path, name: str, batch: int, precision: str, *extra: str) -> dict | None:
    args = ["throughput", *p.model, f"train.batch_size={batch}", f"train.precision={precision}", *p.throughput,
            *p.throughput_data, *extra]
    if tuple(args) in _MEASURED:  # the same command again (fp32 without TF32 is the headline on a CPU): its result
        result = _MEASURED[tuple(args)]
        print(f"[     0 s] bench throughput {name}: the same command as an earlier one; its result", flush=True)
    else:
        rc, stdout = run(args, out, name)
        if rc != 0:
            return None
        result = _MEASURED[tuple(args)] = json.loads(stdout)
    (out / f"{name}.json").write_text(json.dumps(result, indent=2))
    return result


def largest_batch(p: Plan, out: Path, headline: dict | None) -> dict | None:
    """The largest batch of the ladder (above the headline's) whose throughput runs; an out-of-memory
    ends the climb."""
    best = headline
    for batch in (b for b in p.batch_ladder if b > p.batch):
        r = throughput(p, out, f"throughput-{p.precision}-b{batch}", batch, p.precision)
        if r is None:
            err = (out / f"throughput-{p.precision}-b{batch}.err").read_text()
            if "out of memory" not in err.lower():
                print(f"batch {batch} failed for another reason than memory; see its .err file", flush=True)
            break
        best = r
    return best


def make_shards(p: Plan, out: Path, shards: Path) -> None:
    if not (shards / "manifest.json").exists():
        run(["data", "make-shards", "source=shapes", f"out={shards}", *p.shard_args], out, "make-shards")


def quick_classifier(shards: Path) -> None:
    """The domain classifier beside the shards, trained for one epoch of the default recipe (`bench train` finds it
    and evaluates with it instead of training one first)."""
    import dataclasses

    from bench.eval.classifier import DEFAULT_SETTINGS, train_classifier

    if not any(shards.glob("classifier-r*.pt")):
        t0 = time.perf_counter()
        train_classifier(shards, settings=dataclasses.replace(DEFAULT_SETTINGS, epochs=1, min_steps=0), progress=False)
        print(f"[{time.perf_counter() - t0:6.0f} s] the domain classifier (one epoch)", flush=True)


def row(case: str, r: dict | None) -> str:
    if r is None:
        return f"| {case} | - | - | failed | | | | |"
    split = " / ".join(f"{r.get(k, 0):.0f}" for k in ("data_ms", "D_ms", "G_ms", "reg_ms"))
    mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
    tflops = f"{r['tflops']:.2f}" if r.get("tflops") is not None else "-"
    return (f"| {case} | {r['batch_size']} | {r['precision']} | {r['img_per_s']:.1f} | {tflops} | {mfu} | "
            f"{r.get('peak_mem_gb', 0):.2f} | {split} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path, help="folder for the results (created)")
    ap.add_argument("--tiny", action="store_true", help="a tiny width on any device (the test suite's run)")
    a = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not a.tiny:
        print("no CUDA device: run with --tiny to check the script on CPU", file=sys.stderr)
        return 2
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    p = plan_for(a.tiny, cuda)
    device = torch.cuda.get_device_name(0) if cuda else "cpu"
    shards = out / "shards"
    if p.own_shards_first:
        make_shards(p, out, shards)
        p.throughput_data = [f"data.shards={shards}"]
    rc, _ = run(["inspect", *p.model], out, "inspect")
    headline = throughput(p, out, f"throughput-{p.precision}-b{p.batch}", p.batch, p.precision)
    biggest = largest_batch(p, out, headline)
    fp16 = throughput(p, out, f"throughput-fp16-b{p.batch}", p.batch, "fp16") if p.fp16 else None
    # the math switches (issue 25), each beside its baseline: Adam's loop instead of its fused kernel, and fp32
    # with and without TF32 tensor cores
    loop = throughput(p, out, f"throughput-{p.precision}-b{p.batch}-loop-adam", p.batch, p.precision,
                      "train.fused_optim=false")
    fp32 = throughput(p, out, f"throughput-fp32-b{p.batch}-tf32-off", p.batch, "fp32")
    tf32 = throughput(p, out, f"throughput-fp32-b{p.batch}-tf32-on", p.batch, "fp32", "train.tf32=true")
    # torch.compile of G and D: inductor on a GPU; without one, aot_eager traces the nets (inductor's CPU code
    # generation takes minutes, measured in the README instead)
    backend = "inductor" if cuda else "aot_eager"
    compiled = throughput(p, out, f"throughput-{p.precision}-b{p.batch}-compile", p.batch, p.precision,
                          "train.compile=default", f"train.compile_backend={backend}")
    make_shards(p, out, shards)
    if p.quick_classifier:
        quick_classifier(shards)
    run_dir = out / "train"
    train_rc, _ = run(["train", *p.model, f"data.shards={shards}", f"run.dir={run_dir}",
                       f"train.steps={p.train_steps}", f"train.batch_size={p.batch}",
                       f"train.precision={p.precision}", "eval.final=true", f"eval.num_samples={p.eval_samples}",
                       f"train.tick_every={max(1, p.train_steps // 10)}", "train.sample_every=0"], out, "train")
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else {}
    evals = [json.loads(line) for line in (run_dir / "evals.jsonl").read_text().splitlines()] \
        if (run_dir / "evals.jsonl").exists() else []
    lines = [f"# GPU acceptance on {device} ({'tiny width' if a.tiny else 'BigGAN-128, ch 96'})", "",
             "| case | batch/device | precision | img/s | TFLOP/s | MFU | peak mem GB | step split ms (data / D / G / reg) |",
             "|---|---|---|---|---|---|---|---|",
             row("headline", headline), row("largest batch that fits", biggest)]
    lines.append(row("fp16 (GradScaler per net)", fp16) if p.fp16 else "| fp16 | - | - | needs a GPU | | | | |")
    lines += [row("Adam's loop (train.fused_optim=false)", loop), row("fp32", fp32),
              row("fp32 + TF32 (train.tf32=true)", tf32),
              row(f"train.compile=default ({backend}" + (f"; first step {compiled['compile_s']:.0f} s, "
                                                         f"{compiled['compile_graph_breaks']} graph breaks)"
                                                         if compiled else ")"), compiled)]
    lines += ["", f"- bench inspect: exit {rc}",
              f"- bench train, {p.train_steps} steps: exit {train_rc}, status {summary.get('status')}, "
              f"{summary.get('img_per_s') or 0:.1f} img/s over the run",
              f"- evaluation (torch-fidelity, {p.eval_samples} samples): " +
              (", ".join(f"{k} {v:.3f}" for k, v in evals[-1].items() if k.startswith("eval/") and
                         isinstance(v, float)) if evals else "none")]
    table = "\n".join(lines) + "\n"
    (out / "acceptance.md").write_text(table)
    print(table)
    ok = headline is not None and train_rc == 0 and summary.get("status") == "completed" and bool(evals)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
