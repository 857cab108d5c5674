"""The training loop: phases (D steps, G step) as data, accumulation, EMA, AMP, checkpoints, ticks.

One G step = `train.d_steps` D phases + 1 G phase; each phase runs `train.accumulate` micro-batches,
each inside ONE `accelerator.accumulate(G, D)` context, then one optimiser step. Nets are not wrapped
in DDP: after a phase's micro-batches the gradients of the stepped net are all-reduced once (a flat
buffer), which keeps the G phase (D frozen) and the D phase (G under no_grad) free of DDP pitfalls.
Only rank 0 writes records.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

import models
from models import spectral
from bench import data as bdata
from bench import telemetry
from bench.config import ConfigError, parse_sigma_clamp
from bench.evaluate import class_grid, grid_classes, save_grid
from bench.objectives import GANObjective, HistoricalAverage

CKPT_PREFIX = "ckpt-"


class Diverged(RuntimeError):
    """Non-finite steps persisted through every allowed rollback."""


@dataclass(frozen=True)
class Phase:
    name: str  # "D" or "G": the net whose optimiser steps
    index: int  # D phase index within the G step (for lazy regularisation)


def phases_for(d_steps: int) -> list[Phase]:
    return [Phase("D", i) for i in range(d_steps)] + [Phase("G", 0)]


# ---- small utilities --------------------------------------------------------------------------------
def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_torch_save(obj, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def git_sha() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
        return out.stdout.strip() or None
    except Exception:
        return None


def cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "amx_bf16" in flags or "avx512_bf16" in flags


def use_channels_last(cfg: DictConfig, device: torch.device) -> bool:
    choice = str(cfg.train.channels_last).lower()
    if choice in ("true", "false"):
        return choice == "true"
    if device.type == "cuda":
        return True
    return cfg.train.precision == "bf16" and cpu_has_fast_bf16()


def autocast_factory(precision: str, device: torch.device):
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, net: torch.nn.Module, decay: float) -> None:
    """ema <- decay * ema + (1 - decay) * net for parameters; buffers are copied."""
    ep, np_ = list(ema.parameters()), list(net.parameters())
    if decay <= 0.0:
        torch._foreach_copy_(ep, np_)
    else:
        torch._foreach_lerp_(ep, np_, 1.0 - decay)
    for be, bn in zip(ema.buffers(), net.buffers()):
        be.copy_(bn)


# ---- checkpoints ------------------------------------------------------------------------------------
def list_checkpoints(ckpt_dir: Path) -> list[tuple[int, Path]]:
    out = []
    if ckpt_dir.is_dir():
        for p in ckpt_dir.glob(f"{CKPT_PREFIX}*.pt"):
            try:
                out.append((int(p.stem[len(CKPT_PREFIX):]), p))
            except ValueError:
                continue
    return sorted(out)


def load_newest_checkpoint(ckpt_dir: Path) -> tuple[dict, Path] | tuple[None, None]:
    """Newest checkpoint that loads; a corrupt one is reported and skipped."""
    for step, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return torch.load(path, map_location="cpu", weights_only=False), path
        except Exception as exc:  # truncated or corrupt file: fall back to the previous one
            print(f"warning: checkpoint {path} is unreadable ({exc.__class__.__name__}); trying an older one",
                  file=sys.stderr)
    return None, None


class Records:
    """Rank 0's run directory: config.yaml, run.json, metrics.jsonl, summary.json, tb/."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.dir = run_dir
        self.enabled = enabled
        self.metrics_path = run_dir / "metrics.jsonl"
        self.tb = None
        self._metrics = None

    def open(self, resume_step: int) -> None:
        if not self.enabled:
            return
        for sub in ("checkpoints", "samples", "tb"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True)
        self.truncate_after(self.metrics_path, resume_step)
        # a summary from before a resume no longer describes the run (a report would show it finished
        # while it trains again); the run writes a new one when it ends
        (self.dir / "summary.json").unlink(missing_ok=True)
        # evaluations made during training after the checkpoint are redone; `bench eval` records stay
        self.truncate_after(self.dir / "evals.jsonl", resume_step, keep=lambda r: r.get("source") == "bench eval")
        self._metrics = open(self.metrics_path, "a")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(self.dir / "tb"), purge_step=resume_step + 1 if resume_step else None)
        except Exception as exc:  # tensorboard missing or broken: the JSONL records are the contract
            print(f"warning: TensorBoard disabled ({exc})", file=sys.stderr)

    @staticmethod
    def truncate_after(path: Path, step: int, keep=lambda rec: False) -> None:
        """Drop JSONL lines after the resumed step, so a resumed run never duplicates a record."""
        if not path.exists():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a half-written last line from a killed process
            if rec.get("step", 0) <= step or keep(rec):
                kept.append(line)
        atomic_write_text(path, "".join(l + "\n" for l in kept))

    def write_json(self, name: str, obj: dict) -> None:
        if self.enabled:
            atomic_write_text(self.dir / name, json.dumps(obj, indent=2, default=str) + "\n")

    def read_json(self, name: str) -> dict:
        p = self.dir / name
        return json.loads(p.read_text()) if p.exists() else {}

    def metrics(self, row: dict) -> None:
        if not self.enabled:
            return
        self._metrics.write(json.dumps(row) + "\n")
        self._metrics.flush()
        if self.tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self._metrics:
            self._metrics.close()
        if self.tb is not None:
            self.tb.close()


# ---- the trainer ------------------------------------------------------------------------------------
def keep_freed_memory() -> bool:
    """Keep freed memory in the process instead of handing it back to the OS (glibc malloc only).

    PyTorch's CPU allocator is plain malloc. glibc serves blocks over its mmap threshold (at most 32 MiB)
    with fresh mmaps and unmaps them on free, and trims the heap top past its trim threshold, so every
    step's big activations are page-faulted in again: on this 2-core machine fp32 BigGAN at batch 64 spent
    half its wall time in the kernel (43 s of system time in an 83 s `bench throughput`) and ran at 28
    img/s, 43 img/s with memory kept. The process keeps its peak footprint instead, which a training run
    reaches in its first step anyway. Set GAN_BENCH_MALLOC=default to leave malloc alone."""
    if os.environ.get("GAN_BENCH_MALLOC", "") == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl): nothing to tune
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    ok = libc.mallopt(m_mmap_threshold, 1 << 30) == 1
    return libc.mallopt(m_trim_threshold, 1 << 30) == 1 and ok


class Trainer:
    def __init__(self, cfg: DictConfig, run_dir: Path, accelerator=None, quiet: bool = False):
        from accelerate import Accelerator

        self.cfg = cfg
        self.run_dir = Path(run_dir)
        self.quiet = quiet
        use_cuda = torch.cuda.is_available()
        self.acc = accelerator or Accelerator(cpu=not use_cuda, gradient_accumulation_steps=cfg.train.accumulate)
        self.device = self.acc.device
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world != env_world:
            raise RuntimeError(f"accelerate sees {self.world} processes but WORLD_SIZE={env_world}; "
                               "build the Accelerator after exporting the distributed environment")
        self.is_main = self.acc.is_main_process
        self.records = Records(self.run_dir, self.is_main)
        self.stop_requested = False

        t = cfg.train
        if t.deterministic:
            torch.use_deterministic_algorithms(True, warn_only=True)
        if self.device.type == "cpu":
            # Denormal floats (a diverging or dying net's activations) run 10-100x slower on x86;
            # flushing them to zero costs nothing in accuracy that a GAN step could notice.
            torch.set_flush_denormal(True)
            keep_freed_memory()
        seed_all(t.seed)  # identical model init on every rank

        # Data: the built-in dataset is written on first use (rank 0 writes, the others wait).
        if not cfg.data.shards:
            if self.is_main:
                bdata.configured_shards(cfg.data)
            self.acc.wait_for_everyone()
        shards_spec = bdata.configured_shards(cfg.data)
        self.shards, manifest = bdata.resolve_shards(shards_spec)
        self.shards_spec = shards_spec
        self.class_names = list(manifest["class_names"]) if manifest else None
        n_data_classes = len(self.class_names) if self.class_names else None
        n_classes = cfg.model.n_classes or n_data_classes
        if n_classes is None:
            raise ConfigError(f"data.shards={shards_spec!r} has no manifest.json with class names; "
                              "set model.n_classes")
        if n_data_classes and n_classes < n_data_classes:
            raise ConfigError(f"model.n_classes={n_classes} is below the dataset's {n_data_classes} classes")
        self.n_classes = n_classes
        if not self.class_names:
            self.class_names = [str(i) for i in range(n_classes)]
        self.n_data_classes = n_data_classes or n_classes

        # Models.
        G, D = models.build(OmegaConf.to_container(cfg.model, resolve=True), cfg.data.resolution, n_classes)
        self.channels_last = use_channels_last(cfg, self.device)
        fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.G = G.to(self.device, memory_format=fmt)
        self.D = D.to(self.device, memory_format=fmt)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.fmt = fmt
        self.autocast = autocast_factory(t.precision, self.device)

        def make_opt(params, lr):
            if t.optimizer == "rmsprop":
                return torch.optim.RMSprop(params, lr=lr, eps=t.eps)
            return torch.optim.Adam(params, lr=lr, betas=tuple(t.betas), eps=t.eps)

        self.opt = {"G": make_opt(self.G.parameters(), t.g_lr), "D": make_opt(self.D.parameters(), t.d_lr)}
        self.nets = {"G": self.G, "D": self.D}
        self.scaler = {k: torch.amp.GradScaler("cuda") for k in self.nets} if t.precision == "fp16" else None
        self.objective = GANObjective(cfg, self.G, self.D, backward=self._backward, autocast=self.autocast)
        self._scaler_key = None

        # RNG for latents and labels (per rank), and a fixed latent set for sample grids.
        self.zgen = torch.Generator(device=self.device)
        self.zgen.manual_seed(t.seed * 1000 + self.rank + 1)
        g = torch.Generator().manual_seed(12345)
        self.fixed_z = torch.randn(t.sample_cols, G.z_dim, generator=g)

        self.step = 0
        self.images_seen = 0
        self.train_seconds = 0.0
        self.data_skipped = 0
        self.loader = None
        self.data_iter = None

        # Stability: weight-only regularisers, the sigma0 clamp, and collapse detection.
        shared = getattr(self.G, "shared", None)
        self.reg_mods = {"G": [m for _, m in spectral.weight_modules(self.G, exclude=[shared] if shared is not None
                                                                    else [])],
                         "D": [m for _, m in spectral.weight_modules(self.D)]}
        self.sigma_clamp = parse_sigma_clamp(cfg.reg.sigma_clamp)
        self.hist_avg = ({k: HistoricalAverage(n.parameters(), cfg.reg.hist_avg) for k, n in self.nets.items()}
                         if cfg.reg.hist_avg > 0 else None)
        tc = cfg.telemetry
        # Wasserstein critic values are unbounded distance estimates: their G-D gap says nothing about
        # divergence, so that signal is off for loss=wgan / wgan_gp (sigma, non-finite and FID stay on).
        loss_gap = float("inf") if cfg.loss.name in ("wgan", "wgan_gp") else tc.collapse_loss_gap
        self.collapse = telemetry.CollapseDetector(tc.collapse_sigma_factor, tc.collapse_window,
                                                   loss_gap, tc.collapse_fid_factor, tc.collapse_warmup)
        self.best = None  # {"metric", "value", "step"} of the best evaluation so far
        self.consecutive_nonfinite = 0
        self.step_had_nonfinite = False
        self.nonfinite_total = 0
        self.first_nonfinite_step = None  # the collapse step of a run that ends diverged
        self.rollbacks = 0
        self._flops = None  # FLOP per optimiser step, counted once (flop_per_step)
        self._peak = None  # peak TFLOP/s for perf/mfu, looked up once (_flop_budget)
        self._peak_rechecked = False
        self._tick_aside = 0.0  # seconds of the current tick spent re-measuring the peak

    # -- helpers --
    def _backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.cfg.train.accumulate
        if self.scaler is not None:
            loss = self.scaler[self._scaler_key].scale(loss)
        loss.backward()

    def _sync_grads(self, net: torch.nn.Module) -> None:
        """Average gradients over ranks: one all-reduce of a flat buffer."""
        if self.world == 1:
            return
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        flat = torch._utils._flatten_dense_tensors(grads)
        torch.distributed.all_reduce(flat)
        flat /= self.world
        for g, s in zip(grads, torch._utils._unflatten_dense_tensors(flat, grads)):
            g.copy_(s)

    def _restart_data(self) -> None:
        """(Re)start the data stream, seeded by (seed, step): an uninterrupted run and a resumed one
        see the same batches after every checkpoint."""
        self.data_iter = None
        if self.loader is not None:
            self.loader.close()  # stop the old decode workers now, not at garbage collection
        self.loader = bdata.ShardLoader(
            self.shards, self.cfg.train.batch_size, self.cfg.data.resolution, rank=self.rank,
            world_size=self.world, num_workers=self.cfg.data.num_workers,
            shuffle_buffer=self.cfg.data.shuffle_buffer, seed=self.cfg.train.seed * 1_000_003 + self.step,
            resampled=True)
        self._skipped_base = self.data_skipped
        self.data_iter = iter(self.loader)

    def _next_batch(self):
        x, y = next(self.data_iter)
        self.data_skipped = self._skipped_base + self.loader.skipped
        return x.to(self.device, memory_format=self.fmt, non_blocking=True), y.to(self.device)

    def _latents(self, n: int):
        z = torch.randn(n, self.G.z_dim, device=self.device, generator=self.zgen)
        y = torch.randint(0, self.n_data_classes, (n,), device=self.device, generator=self.zgen)
        return z, y

    # -- checkpoints --
    def state_dict(self) -> dict:
        return {
            "step": self.step, "images_seen": self.images_seen, "train_seconds": self.train_seconds,
            "data_skipped": self.data_skipped,
            "G": self.G.state_dict(), "D": self.D.state_dict(), "G_ema": self.G_ema.state_dict(),
            "opt_G": self.opt["G"].state_dict(), "opt_D": self.opt["D"].state_dict(),
            "scaler": {k: s.state_dict() for k, s in self.scaler.items()} if self.scaler else None,
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "zgen": self.zgen.get_state(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "config": OmegaConf.to_container(self.cfg, resolve=True),
            "collapse": self.collapse.state_dict(),
            "hist_avg": {k: h.state_dict() for k, h in self.hist_avg.items()} if self.hist_avg else None,
            "nonfinite_total": self.nonfinite_total, "rollbacks": self.rollbacks, "best": self.best,
        }

    def load_state_dict(self, s: dict) -> None:
        self.G.load_state_dict(s["G"])
        self.D.load_state_dict(s["D"])
        self.G_ema.load_state_dict(s["G_ema"])
        self.opt["G"].load_state_dict(s["opt_G"])
        self.opt["D"].load_state_dict(s["opt_D"])
        if self.scaler and s.get("scaler"):
            for k, sd in s["scaler"].items():
                self.scaler[k].load_state_dict(sd)
        rng = s["rng"]
        torch.set_rng_state(rng["torch"])
        np.random.set_state(rng["numpy"])
        random.setstate(rng["python"])
        self.zgen.set_state(rng["zgen"])
        if rng.get("cuda") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        self.step = int(s["step"])
        self.images_seen = int(s["images_seen"])
        self.train_seconds = float(s["train_seconds"])
        self.data_skipped = int(s.get("data_skipped", 0))
        if s.get("collapse"):
            self.collapse.load_state_dict(s["collapse"])
        if self.hist_avg and s.get("hist_avg"):
            for k, h in self.hist_avg.items():
                h.load_state_dict(s["hist_avg"][k])
        self.nonfinite_total = int(s.get("nonfinite_total", 0))
        self.best = s.get("best")
        self.rollbacks = int(s.get("rollbacks", 0))

    def save_checkpoint(self) -> Path | None:
        path = None
        finite = all(bool(torch.isfinite(p).all()) for p in self.G.parameters()) and \
            all(bool(torch.isfinite(p).all()) for p in self.D.parameters())
        if not finite:
            print(f"warning: weights are non-finite at step {self.step}; checkpoint not written (the last good "
                  "one is kept for rollback)", file=sys.stderr, flush=True)
            return None
        if self.is_main:
            ckpt_dir = self.run_dir / "checkpoints"
            ckpt_dir.mkdir(parents=True, exist_ok=True)
            path = ckpt_dir / f"{CKPT_PREFIX}{self.step:07d}.pt"
            atomic_torch_save(self.state_dict(), path)
            for _, old in list_checkpoints(ckpt_dir)[: -self.cfg.train.ckpt_keep]:
                old.unlink(missing_ok=True)
        self.acc.wait_for_everyone()
        return path

    def maybe_resume(self) -> int:
        state, path = load_newest_checkpoint(self.run_dir / "checkpoints")
        if state is None:
            return 0
        self.load_state_dict(state)
        if not self.quiet and self.is_main:
            print(f"resuming from {path} at step {self.step}", flush=True)
        return self.step

    # -- evaluation --
    def run_eval(self) -> dict | None:
        """Rank 0 evaluates the EMA G (torch-fidelity), appends to evals.jsonl, keeps checkpoints/best.pt
        for eval.best_metric, and feeds FID to the collapse detector; the other ranks wait."""
        from bench.evaluate import LOWER_IS_BETTER, append_eval, eval_settings, evaluate_generator

        rec = None
        if self.is_main:
            t0 = time.perf_counter()
            metrics = evaluate_generator(self.G_ema, shards_spec=self.shards_spec, n_classes=self.n_data_classes,
                                         device=self.device, progress=not self.quiet, **eval_settings(self.cfg))
            rec = append_eval(self.run_dir, self.step, metrics)
            name = self.cfg.eval.best_metric
            value = metrics.get(name)
            if value is not None and value == value:
                better = (self.best is None or (value < self.best["value"] if name in LOWER_IS_BETTER
                                                else value > self.best["value"]))
                if better:
                    self.best = {"metric": name, "value": value, "step": self.step}
                    ckpt_dir = self.run_dir / "checkpoints"
                    ckpt_dir.mkdir(parents=True, exist_ok=True)
                    atomic_torch_save(self.state_dict(), ckpt_dir / "best.pt")
            if "eval/FID" in metrics:
                reason = self.collapse.update_fid(self.step, metrics["eval/FID"])
                if reason and not self.quiet:
                    print(f"collapse detected at step {self.step}: {reason}", flush=True)
            if not self.quiet:
                shown = " ".join(f"{k.split('/')[1]} {v:.3f}" for k, v in metrics.items()
                                 if k.startswith("eval/") and isinstance(v, float))
                print(f"eval at step {self.step} ({metrics.get('extractor')}, {metrics.get('num_samples')} samples, "
                      f"{time.perf_counter() - t0:.0f} s): {shown}", flush=True)
        self.acc.wait_for_everyone()
        return rec

    # -- samples --
    def save_samples(self) -> Path | None:
        if not self.is_main:
            return None
        rows = grid_classes(self.n_data_classes)
        imgs = class_grid(self.G_ema, self.fixed_z.to(self.device), rows)
        labels = [self.class_names[r] if r < len(self.class_names) else str(r) for r in rows]
        path = save_grid(imgs, self.run_dir / "samples" / f"step-{self.step:07d}.png", labels)
        save_grid(imgs, self.run_dir / "samples" / "latest.png", labels)
        return path

    # -- records --
    def _run_info(self, status: str, extra: dict | None = None) -> dict:
        import accelerate
        import hydra
        import webdataset

        info = self.records.read_json("run.json")
        host = os.environ.get("SLURMD_NODENAME") or socket.gethostname()  # Slurm's node name where there is one
        hosts = [host]
        if self.world > 1:
            hosts = [None] * self.world
            torch.distributed.all_gather_object(hosts, host)
        t = self.cfg.train
        info.update({
            "status": status,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "accelerate": accelerate.__version__, "hydra": hydra.__version__,
                         "webdataset": getattr(webdataset, "__version__", "?")},
            "git_sha": git_sha(),
            "hosts": hosts, "num_nodes": len(set(hosts)),
            "world_size": self.world,
            "device": str(self.device) if self.device.type != "cuda" else torch.cuda.get_device_name(self.device),
            "precision": t.precision, "channels_last": self.channels_last,
            "batch_size": t.batch_size, "accumulate": t.accumulate,
            "effective_batch": t.batch_size * self.world * t.accumulate,
            "shards": self.shards_spec, "n_classes": self.n_classes,
            "G_params": models.param_count(self.G), "D_params": models.param_count(self.D),
            "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        })
        info.setdefault("start_time", datetime.now(timezone.utc).isoformat())
        info["updated_time"] = datetime.now(timezone.utc).isoformat()
        if extra:
            info.update(extra)
        return info

    # -- the loop --
    def _install_signal_handlers(self):
        """SIGTERM (preemption, scancel, scontrol requeue), SIGUSR1, and SIGUSR2 (Slurm's warning before
        the time limit) make the run checkpoint at the end of the current step and stop. After SIGUSR2
        the job also requeues itself (see run())."""
        def request_stop(signum, frame):
            self.stop_requested = True
            self.stop_signal = signum

        old = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2):
            try:
                old[sig] = signal.signal(sig, request_stop)
            except ValueError:  # not the main thread
                pass
        return old

    def run(self) -> dict:
        cfg, t = self.cfg, self.cfg.train
        start_step = self.maybe_resume()
        if start_step >= t.steps:
            summary = self.records.read_json("summary.json")
            if self.is_main and not self.quiet:
                print(f"run {self.run_dir} is already complete at step {start_step} (train.steps={t.steps}); "
                      "nothing to do. Raise train.steps to continue it.", flush=True)
            return summary
        self.records.open(start_step)
        if self.is_main:
            atomic_write_text(self.run_dir / "config.yaml", OmegaConf.to_yaml(cfg))
            prev = self.records.read_json("run.json")
            resumes = prev.get("resumes", [])
            if start_step:
                resumes.append({"step": start_step, "time": datetime.now(timezone.utc).isoformat()})
            self.records.write_json("run.json", self._run_info("running", {"resumes": resumes}))
        else:
            self._run_info("running")  # joins the hostname gather
        old_handlers = self._install_signal_handlers()
        status = "failed"
        try:
            self._loop(start_step)
            status = "completed"
            if getattr(self, "stopped_on_collapse", False):
                status = "collapsed"
            elif self.stop_requested:
                status = "interrupted"
        except Diverged as exc:
            status = "diverged"
            self.diverged_message = str(exc)
            # A run that diverged has collapsed, whether or not a telemetry signal fired first.
            self.collapse.flag(self.first_nonfinite_step or self.step,
                               f"non-finite: training diverged ({self.nonfinite_total} skipped updates)")
        except KeyboardInterrupt:
            status = "interrupted"
            raise
        finally:
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            self.data_iter = None
            if self.loader is not None:
                self.loader.close()
            self.loader = None
            summary = self._finish(status)
        if status == "interrupted" and getattr(self, "stop_signal", None) == signal.SIGUSR2 and self.is_main:
            from bench import launch

            launch.requeue_self(int(self.cfg.cluster.max_requeue))
        return summary

    def _loop(self, start_step: int) -> None:
        cfg, t = self.cfg, self.cfg.train
        eff_batch = t.batch_size * self.world * t.accumulate
        plan = phases_for(t.d_steps)
        watch = telemetry.Stopwatch(self.device)
        reduce_fn = None
        if self.world > 1:
            def reduce_fn(x):
                torch.distributed.all_reduce(x)
                return x
        collector = telemetry.Collector(self.device, reduce_fn)
        if self.is_main:
            self._flop_budget()  # FLOP count and device peak for perf/mfu, outside the timed ticks
        self._restart_data()
        tick_t0 = time.perf_counter()
        tick_steps = 0
        run_t0 = time.perf_counter() - self.train_seconds
        if self.is_main and not self.quiet:
            print(f"training {cfg.model.family} at {cfg.data.resolution}x{cfg.data.resolution} on "
                  f"{self.shards_spec} | {self.world} process(es) x batch {t.batch_size} x accumulate "
                  f"{t.accumulate} = {eff_batch} | {t.precision}{' channels_last' if self.channels_last else ''}"
                  f" | run dir {self.run_dir}", flush=True)

        with collector:
            while self.step < t.steps and not self.stop_requested:
                self._train_step(plan, watch)
                tick_steps += 1
                if self.world > 1:  # every rank must stop at the same step: agree on the flag
                    flag = torch.tensor([float(self.stop_requested)], device=self.device)
                    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
                    self.stop_requested = bool(flag.item())

                interrupted = self.stop_requested
                last = self.step >= t.steps or interrupted
                # A tick line is written at tick boundaries and at the final step, not when a signal cuts a
                # tick short: a resumed run then has exactly the lines of an uninterrupted one.
                if self.step % t.tick_every == 0 or self.step >= t.steps:  # ticks stay on multiples of tick_every
                    now = time.perf_counter()
                    self._tick(collector, watch.take(), now - tick_t0, tick_steps, eff_batch, now - run_t0)
                    tick_t0, tick_steps = now + self._tick_aside, 0
                    self._tick_aside = 0.0
                    last = last or self.stop_requested  # stop_on_collapse
                ckpt_due = t.ckpt_every and self.step % t.ckpt_every == 0
                # Checkpoints, sample grids and evaluations are not training: their time is kept out of
                # the tick's img/s and step-time split (it still counts in summary.json's wall time).
                watch.stop()
                aside_t0 = time.perf_counter()
                if ckpt_due or last:
                    self.train_seconds = time.perf_counter() - run_t0
                    self.save_checkpoint()
                    if not last:
                        self._restart_data()  # keeps resumed runs on the same data stream
                if (t.sample_every and self.step % t.sample_every == 0) or last:
                    self.save_samples()
                if (cfg.eval.every and self.step % cfg.eval.every == 0) or \
                        (last and not interrupted and (cfg.eval.every or cfg.eval.final)):
                    self.run_eval()
                tick_t0 += time.perf_counter() - aside_t0
            self.train_seconds = time.perf_counter() - run_t0

    def _train_step(self, plan: list[Phase], watch) -> None:
        """One G step: the D phases and the G phase, the EMA update, and the sigma telemetry."""
        cfg, t = self.cfg, self.cfg.train
        for phase in plan:
            self._run_phase(phase, watch, self.step * t.d_steps + phase.index)
        self._end_of_step_nonfinite_check()
        watch.start("reg")
        decay = cfg.ema.decay if self.step >= cfg.ema.start else 0.0
        ema_update(self.G_ema, self.G, decay)
        self.step += 1
        self.images_seen += t.batch_size * self.world * t.accumulate
        if cfg.telemetry.sigma_every and self.step % cfg.telemetry.sigma_every == 0:
            watch.start("telemetry")
            for name, net in self.nets.items():
                telemetry.report_sigmas(name, net, k=cfg.telemetry.sigma_k)
        watch.stop()

    def benchmark(self, warmup: int, steps: int, fake_data: bool = True) -> dict:
        """Burn in, then time `steps` G steps of the real training step (no records, no checkpoints)."""
        t = self.cfg.train
        plan = phases_for(t.d_steps)
        watch = telemetry.Stopwatch(self.device)
        if fake_data:
            res = self.cfg.data.resolution
            gen = torch.Generator(device=self.device).manual_seed(0)
            real = torch.rand(t.batch_size, 3, res, res, device=self.device, generator=gen).mul_(2).sub_(1)
            real = real.to(memory_format=self.fmt)
            labels = torch.randint(0, self.n_data_classes, (t.batch_size,), device=self.device, generator=gen)
            self._next_batch = lambda: (real, labels)
        else:
            self._restart_data()
        collector = telemetry.Collector(self.device)
        with collector:
            for _ in range(warmup):
                self._train_step(plan, watch)
            collector.tick()
            watch.take()
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(self.device)
            t0 = time.perf_counter()
            for _ in range(steps):
                self._train_step(plan, watch)
            if self.device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            times = watch.take()
            collector.tick()
        if self.loader is not None:
            self.loader.close()
        eff = t.batch_size * self.world * t.accumulate
        return {"steps": steps, "seconds": elapsed, "img_per_s": steps * eff / elapsed,
                "step_ms": 1000 * elapsed / steps,
                **{f"{k}_ms": 1000 * times.get(k, 0.0) / steps for k in ("data", "D", "G", "reg", "telemetry")},
                "peak_mem_gb": telemetry.peak_memory_gb(self.device)}

    def _run_phase(self, phase: Phase, watch, d_step: int) -> None:
        """One optimiser step of one net: micro-batches, gradient all-reduce, weight-only regularisers,
        the non-finite check, the step, and post-step weight operations (clipping, sigma0 clamp)."""
        t = self.cfg.train
        net, opt = self.nets[phase.name], self.opt[phase.name]
        if phase.name == "G":
            self.D.requires_grad_(False)  # freeze D during the G step
        self._scaler_key = phase.name
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(t.accumulate):
            if phase.name == "D":
                watch.start("data")
                real, y_real = self._next_batch()
            watch.start(phase.name)
            z, y_fake = self._latents(t.batch_size)
            with self.acc.accumulate(self.G, self.D):
                if phase.name == "D":
                    loss_sum += self.objective.d_phase(real, y_real, z, y_fake, d_step, gen=self.zgen)
                else:
                    loss_sum += self.objective.g_phase(z, y_fake)
        if phase.name == "G":
            self.D.requires_grad_(True)
        if self.scaler is not None:
            self.scaler[phase.name].unscale_(opt)
        self._sync_grads(net)
        watch.start("reg")
        self._weight_regularisers(phase.name)
        gnorm = telemetry.grad_norm(net.parameters())
        telemetry.report(f"grad/{phase.name}_norm", gnorm)
        # Host sync (one per phase): a non-finite loss or gradient skips the step.
        if not bool(torch.isfinite(loss_sum + gnorm.to(loss_sum.device))):
            opt.zero_grad(set_to_none=True)
            self._nonfinite_step(phase.name)
            return
        if self.scaler is not None:
            self.scaler[phase.name].step(opt)
            self.scaler[phase.name].update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            if phase.name == "D" and self.cfg.loss.name == "wgan":
                clip = float(self.cfg.loss.clip)
                torch._foreach_clamp_min_(list(self.D.parameters()), -clip)
                torch._foreach_clamp_max_(list(self.D.parameters()), clip)
            if self.sigma_clamp and phase.name in self.cfg.reg.sigma_clamp_nets:
                kind, value = self.sigma_clamp
                spectral.sigma0_clamp_(self.reg_mods[phase.name], **({"clamp": value} if kind == "fixed"
                                                                       else {"ratio": value}))

    def _weight_regularisers(self, name: str) -> None:
        """Penalties that depend on the weights only: identical on every rank, so they are added after
        the gradient all-reduce, once per optimiser step."""
        reg = self.cfg.reg
        if reg.ortho_beta > 0 and name in reg.ortho_nets:
            spectral.ortho_grad_(self.reg_mods[name], reg.ortho_beta, full=reg.ortho_full)
        if reg.sigma_penalty > 0 and name in reg.sigma_penalty_nets:
            kind, value = parse_sigma_clamp(reg.sigma_target)
            pen = reg.sigma_penalty * spectral.sigma0_penalty(
                self.reg_mods[name], **({"target": value} if kind == "fixed" else {"ratio": value}))
            pen.backward()
            telemetry.report(f"loss/sigma_{name}", pen.detach())
        if self.hist_avg is not None:
            telemetry.report(f"loss/hist_avg_{name}", self.hist_avg[name].add_grad_())

    def _nonfinite_step(self, name: str) -> None:
        self.nonfinite_total += 1
        self.step_had_nonfinite = True
        if self.first_nonfinite_step is None:
            self.first_nonfinite_step = self.step + 1
        if self.is_main and not self.quiet:
            print(f"warning: non-finite loss or gradient in the {name} step at step {self.step + 1}; "
                  "its update was skipped", file=sys.stderr, flush=True)

    def _end_of_step_nonfinite_check(self) -> None:
        """N G steps in a row with a skipped update -> roll back to the last good checkpoint."""
        if not self.step_had_nonfinite:
            self.consecutive_nonfinite = 0
            return
        self.step_had_nonfinite = False
        self.consecutive_nonfinite += 1
        n = self.cfg.train.nonfinite_rollback
        if n and self.consecutive_nonfinite >= n:
            self._rollback()

    def _rollback(self) -> None:
        """Reload nets, EMA and optimisers from the newest complete checkpoint, keep counting forward
        (no record is rewritten), and take a different random path."""
        self.rollbacks += 1
        self.consecutive_nonfinite = 0
        if self.rollbacks > self.cfg.train.max_rollbacks:
            raise Diverged(f"training diverged: non-finite steps persisted after {self.cfg.train.max_rollbacks} "
                           "rollbacks (train.max_rollbacks); lower the learning rates or add regularisation")
        state, path = load_newest_checkpoint(self.run_dir / "checkpoints")
        if state is None:
            raise Diverged("training diverged before the first checkpoint (non-finite steps); nothing to roll "
                           "back to: lower the learning rates or set train.ckpt_every lower")
        keep = (self.step, self.images_seen, self.train_seconds, self.data_skipped, self.nonfinite_total,
                self.rollbacks, self.best, self.collapse.collapse_step, self.collapse.reason)
        self.load_state_dict(state)
        # the counters and a collapse already flagged stay: the rollback recovers, it does not undo history
        (self.step, self.images_seen, self.train_seconds, self.data_skipped, self.nonfinite_total,
         self.rollbacks, self.best, self.collapse.collapse_step, self.collapse.reason) = keep
        self.zgen.manual_seed(self.cfg.train.seed * 1000 + self.rank + 1 + 7919 * self.rollbacks)
        telemetry.report("stability/rollbacks", float(self.rollbacks))
        if self.is_main and not self.quiet:
            print(f"warning: rolled back to {path} after {self.cfg.train.nonfinite_rollback} non-finite steps "
                  f"(rollback {self.rollbacks}/{self.cfg.train.max_rollbacks})", file=sys.stderr, flush=True)

    def _tick(self, collector, times: dict, tick_s: float, steps: int, eff_batch: int, wall_s: float) -> None:
        t = self.cfg.train
        stats = collector.tick()  # one all-reduce across ranks
        row = {
            "step": self.step,
            "kimg": self.images_seen / 1000.0,
            "time/wall_s": wall_s,
            "throughput/img_per_s": steps * eff_batch / tick_s,
            "time/step_ms": 1000.0 * tick_s / steps,
        }
        for name in ("data", "D", "G", "reg", "telemetry"):
            row[f"time/{name}_ms"] = 1000.0 * times.get(name, 0.0) / steps
        row["mem/peak_gb"] = telemetry.peak_memory_gb(self.device)
        flop_per_step, peak = self._flop_budget() if self.is_main else (None, 0.0)
        if flop_per_step:
            row["perf/tflops"] = flop_per_step * steps / tick_s / 1e12  # per process
            if row["perf/tflops"] > peak and not self._peak_rechecked:
                # above the cached peak: that figure was measured on a busy machine; measure again
                self._peak_rechecked = True
                t0 = time.perf_counter()
                peak, _ = telemetry.peak_tflops(self.device, t.precision, remeasure=True)
                self._tick_aside = time.perf_counter() - t0  # kept out of the next tick's timing
                self._peak = peak
            row["perf/mfu"] = row["perf/tflops"] / peak if peak == peak and peak > 0 else float("nan")
        row["batch/effective"] = eff_batch
        row["batch/per_device"] = t.batch_size
        row["dist/world_size"] = self.world
        row["data/skipped_total"] = self.data_skipped
        row.update(stats)
        row["stability/nonfinite_total"] = self.nonfinite_total
        reason = self.collapse.update(row)
        row["stability/collapse"] = 1.0 if reason else 0.0
        if reason and self.is_main and not self.quiet:
            print(f"collapse detected at step {self.step}: {reason}", flush=True)
        if self.collapse.collapse_step is not None and self.cfg.telemetry.stop_on_collapse:
            self.stop_requested = True
            self.stopped_on_collapse = True
        self.last_row = row
        self.records.metrics(row)
        if self.is_main and not self.quiet:
            eta = (t.steps - self.step) * tick_s / steps
            losses = " ".join(f"{k.split('/')[1]} {row[k]:.3f}" for k in ("loss/D", "loss/G", "loss/R1", "loss/GP")
                              if k in row)
            print(f"step {self.step:>6d}/{t.steps} | {row['throughput/img_per_s']:7.1f} img/s | "
                  f"{row['time/step_ms']:7.1f} ms/step | {losses} | ETA {telemetry.format_eta(eta)}", flush=True)

    def flop_per_step(self) -> float:
        """FLOP of one optimiser step of this process ((D step x d_steps + G step) x batch x accumulate),
        counted once with torch.utils.flop_counter on copies of G and D (`bench throughput` uses it too)."""
        if self._flops is None:
            t = self.cfg.train
            f = telemetry.step_flops(copy.deepcopy(self.G), copy.deepcopy(self.D), batch=2,
                                     n_classes=self.n_data_classes, device=self.device)
            self._flops = (f["D_step"] * t.d_steps + f["G_step"]) * t.batch_size * t.accumulate
        return self._flops

    def _flop_budget(self) -> tuple[float | None, float]:
        """(flop_per_step, peak TFLOP/s of the device: the GPU table or the cached CPU measurement) for
        perf/mfu, worked out once; (None, nan) with telemetry.mfu=false or a model the counter cannot trace."""
        if self._peak is None:
            self._peak = float("nan")
            if self.cfg.telemetry.mfu:
                try:
                    self.flop_per_step()
                    self._peak, _ = telemetry.peak_tflops(self.device, self.cfg.train.precision)
                except Exception as exc:  # MFU is telemetry: a model the counter cannot trace still trains
                    print(f"warning: FLOP count failed ({exc.__class__.__name__}: {exc}); no perf/mfu",
                          file=sys.stderr)
        return (self._flops if self._peak == self._peak else None), self._peak

    def param_checksum(self) -> str:
        """A digest of every G and D parameter's bytes: equal on every rank when training is in sync."""
        import hashlib

        h = hashlib.sha1()
        for net in (self.G, self.D):
            for p in net.parameters():
                h.update(p.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def _finish(self, status: str) -> dict:
        t = self.cfg.train
        checksums = [self.param_checksum()]
        if self.world > 1:
            checksums = [None] * self.world
            torch.distributed.all_gather_object(checksums, self.param_checksum())
        row = getattr(self, "last_row", {})
        summary = {
            "status": status,
            "steps": self.step,
            "target_steps": t.steps,
            "images_seen": self.images_seen,
            "kimg": self.images_seen / 1000.0,
            "train_seconds": self.train_seconds,
            "img_per_s": self.images_seen / self.train_seconds if self.train_seconds else None,
            "effective_batch": t.batch_size * self.world * t.accumulate,
            "world_size": self.world,
            "final": {k: v for k, v in row.items() if k.startswith(("loss/", "D/"))},
            "best": self.best or {},
            "collapse_step": self.collapse.collapse_step,
            "collapse_reason": self.collapse.reason,
            "nonfinite_skipped": self.nonfinite_total,
            "rollbacks": self.rollbacks,
            "data_skipped": self.data_skipped,
            "param_checksums": checksums,
            "run_dir": str(self.run_dir),
        }
        if getattr(self, "diverged_message", None):
            summary["error"] = self.diverged_message
        if self.is_main:
            self.records.write_json("summary.json", summary)
            self.records.write_json("run.json", self._run_info(status, {"end_time": datetime.now(timezone.utc)
                                                                         .isoformat()}))
            self.records.close()
        elif self.world > 1:
            self._run_info(status)
        return summary


def print_summary(summary: dict, run_dir: Path) -> None:
    rows = [
        ("status", summary.get("status")),
        ("steps", f"{summary.get('steps')}/{summary.get('target_steps')}"),
        ("images seen", summary.get("images_seen")),
        ("throughput", f"{summary['img_per_s']:.1f} img/s" if summary.get("img_per_s") else "-"),
        ("train time", telemetry.format_eta(summary.get("train_seconds") or 0)),
        ("effective batch", summary.get("effective_batch")),
    ]
    rows += [(k, f"{v:.4f}") for k, v in summary.get("final", {}).items()]
    if summary.get("data_skipped"):
        rows.append(("corrupt samples skipped", summary["data_skipped"]))
    w = max(len(k) for k, _ in rows)
    print("\n" + "-" * (w + 24))
    for k, v in rows:
        print(f"{k:<{w}}  {v}")
    print("-" * (w + 24))
    print(f"run directory : {run_dir}")
    for name, what in (("config.yaml", "resolved config"), ("metrics.jsonl", "one line per tick"),
                       ("summary.json", "final summary"), ("samples/latest.png", "EMA samples, one row per class"),
                       ("checkpoints/", "resumable state"), ("tb/", "TensorBoard: tensorboard --logdir " + str(run_dir / "tb"))):
        print(f"  {name:<20} {what}")
