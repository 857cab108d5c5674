"""The trainer (docs/architecture.md, "One training step"): set-up, then a short `run()` that hands each concern
to its part: the phases of a G step to phases.PhaseRunner, checkpoints and rollbacks to state, records
to records, per-tick numbers to telemetry, evaluation to bench.eval. Only rank 0 writes records.
"""
from __future__ import annotations

import copy
import math
import os
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from bench import models
from bench import device as bdevice
from bench import metrics_registry as registry
from bench import rundir
from bench.config import ConfigError, effective_batch, reg_specs
from bench.data.loader import LoaderSettings, ShardLoader
from bench.data.shards import configured_shards, resolve_shards
from bench.train import telemetry
from bench.workers import resolve_workers
from bench.train.objectives import GANObjective, HistoricalAverage, make_optimizer
from bench.train.phases import Phase, PhaseRunner, WeightRegs, plan
from bench.faults import injected_fault
from bench.train.ranks import RankFailed, Ranks, is_comm_error, is_user_error, process_group_kwargs
from bench.train.loggers import LogSettings, check_backends
from bench.train.records import Records, gather_hosts, now, run_facts, save_samples, summary_of
from bench.train.state import (Checkpoints, Diverged, NonfiniteGuard, StopRequest, TrainingParts, all_finite,
                               agreed_load, config_changes, ema_update, param_checksum,
                               roll_back)
from bench.train.diversity import DiversityProbe
from bench.train.telemetry import Collector, Mfu, Stopwatch, TickClock
from bench.train.collapse import CollapseDetector
from bench.models import spectral

Batches = Callable[[], tuple]  # () -> (real images, labels) on the device


class Trainer:
    """`stop`: a StopRequest whose handlers the caller installed before set-up (the CLI does, so a signal
    during set-up and resume stops cleanly); otherwise `run()` installs them."""

    def __init__(self, cfg: DictConfig, run_dir: Path, accelerator=None, quiet: bool = False,
                 stop: Optional[StopRequest] = None):
        self.cfg, self.run_dir, self.quiet = cfg, Path(run_dir), quiet
        self.warned_contention = False  # the one line saying a tick ran beside another CPU-bound process
        self.ticks_since_start = 0
        self.stop = stop or StopRequest()
        check_backends(cfg.log.backends if cfg.get("log") else ())  # a missing package: one line, before any work
        self._setup_processes(accelerator)
        t = cfg.train
        bdevice.configure_process(self.device, t.deterministic, t.tf32, t.cudnn_benchmark)
        bdevice.seed_all(t.seed)  # identical model init on every rank
        self._setup_data()
        self._setup_models()
        self._check_evaluation()  # bad evaluation settings: one line before any slow work
        self._prepare_classifier()
        self._setup_training()
        self.records = Records(self.run_dir, self.is_main, run_facts(self), LogSettings.from_cfg(cfg, self.run_dir))
        self.checkpoints = Checkpoints(self.run_dir, t.ckpt_keep, self.is_main)
        self._flops: Optional[float] = None  # FLOP per optimiser step, counted once (flop_per_step)
        self.mfu = Mfu(self.device, t.precision, self.flop_per_step if cfg.telemetry.mfu else None)
        # progress, and what a checkpoint restores
        self.step, self.images_seen, self.train_seconds, self.data_skipped = 0, 0, 0.0, 0
        self.best: Optional[dict] = None  # {"metric", "value", "step", "extractor"} of the best evaluation
        # the data stream (restart_data)
        self.loader: Optional[ShardLoader] = None
        self.data_iter = None
        self._skipped_base = 0
        # how the run ends
        self.error: Optional[str] = None  # a failed run's first error (summary.json "error")
        self.hosts: list = []  # every rank's host, gathered when the records start
        self.trained = False  # whether this process trained a step
        self.last_row: dict = {}
        self.last_eval: dict = {}  # the metrics of this process's latest evaluation (rank 0)
        self.config_changes: dict = {}  # {key: [old, new]} against the resumed checkpoint's config

    # ---- set-up -------------------------------------------------------------------------------------
    def _setup_processes(self, accelerator) -> None:
        from accelerate import Accelerator

        self.acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(),
                                              gradient_accumulation_steps=self.cfg.train.accumulate,
                                              kwargs_handlers=process_group_kwargs(self.cfg.dist.timeout_s))
        self.device = self.acc.device
        self.world = self.acc.num_processes
        self.rank = self.acc.process_index
        env_world = int(os.environ.get("WORLD_SIZE", "1"))
        if self.world != env_world:
            raise RuntimeError(f"accelerate sees {self.world} processes but WORLD_SIZE={env_world}; "
                               "build the Accelerator after exporting the distributed environment")
        self.is_main = self.acc.is_main_process
        self.ranks = Ranks(self.world, self.rank, self.device, self.run_dir, self.cfg.dist.rank0_timeout_s)
        self.eff_batch = effective_batch(self.cfg.train, self.world)

    def _setup_data(self) -> None:
        """The built-in dataset is written on first use (rank 0 writes, the others wait)."""
        cfg = self.cfg
        if not cfg.data.shards:
            self.ranks.rank0("writing the built-in dataset", lambda: configured_shards(cfg.data))
        self.shards_spec = configured_shards(cfg.data)
        self.shards, manifest = resolve_shards(self.shards_spec)
        class_names = list(manifest["class_names"]) if manifest else None
        n_data_classes = len(class_names) if class_names else None
        n_classes = cfg.model.n_classes or n_data_classes
        if n_classes is None:
            raise ConfigError(f"data.shards={self.shards_spec!r} has no manifest.json with class names; "
                              "set model.n_classes")
        if n_data_classes and n_classes < n_data_classes:
            raise ConfigError(f"model.n_classes={n_classes} is below the dataset's {n_data_classes} classes")
        self.n_classes = n_classes
        self.class_names = class_names or [str(i) for i in range(n_classes)]
        self.n_data_classes = n_data_classes or n_classes

    def _prepare_classifier(self) -> None:
        """Train the domain classifier now, before the first step, when the run will need it and it is missing:
        the diversity probe, or evaluation with the domain extractor (eval.async: its watcher's). Built on first
        use instead, it would be trained inside a measurement (its no_grad) and cost a step's time."""
        cfg = self.cfg
        evaluates = bool(cfg.eval.every) or bool(cfg.eval.final)
        needed = cfg.telemetry.diversity_every > 0 or (evaluates and cfg.eval.extractor == "domain")
        if not needed:
            return
        from bench.eval.metrics import ensure_classifier

        self.ranks.rank0("training the domain classifier", lambda: ensure_classifier(
            self.shards_spec, cfg.data.resolution, cfg.eval.classifier_path, train_if_missing=True,
            progress=not self.quiet))

    def _setup_models(self) -> None:
        cfg, t = self.cfg, self.cfg.train
        G, D = models.build(OmegaConf.to_container(cfg.model, resolve=True), cfg.data.resolution, self.n_classes)
        self.channels_last = bdevice.channels_last(t.channels_last, t.precision, self.device)
        self.fmt = torch.channels_last if self.channels_last else torch.contiguous_format
        self.G = G.to(self.device, memory_format=self.fmt)
        self.D = D.to(self.device, memory_format=self.fmt)
        self.G_ema = copy.deepcopy(self.G).eval().requires_grad_(False)
        self.nets = {"G": self.G, "D": self.D}
        self.autocast = bdevice.autocast(t.precision, self.device)

    def _check_evaluation(self) -> None:
        """Intra-FID's drawn labels checked before the first step (they follow from eval.seed alone): a class left
        with fewer than 2 samples would otherwise fail the run at its first evaluation."""
        ev = self.cfg.eval
        if not ((ev.every or ev.final) and ev.intra_fid):
            return
        from bench.data.shards import dataset_info
        from bench.eval.intra import IntraFID
        from bench.eval.metrics import EvalSettings

        s = EvalSettings.from_cfg(self.cfg)
        _, n_available, _ = dataset_info(self.shards_spec)
        n_real = int(s.num_real or s.num_samples)
        IntraFID.check(s, self.class_names, self.n_data_classes, min(n_real, int(n_available or n_real)), self.G.z_dim)

    def _setup_training(self) -> None:
        """Optimisers, the objective, the phases, latent RNG, and the stability machinery."""
        cfg, t, reg = self.cfg, self.cfg.train, self.cfg.reg
        self.opt = {"G": make_optimizer(t, self.G.parameters(), t.g_lr, self.device),
                    "D": make_optimizer(t, self.D.parameters(), t.d_lr, self.device)}
        self.scaler = {k: torch.amp.GradScaler("cuda") for k in self.nets} if t.precision == "fp16" else None
        # RNG for latents and labels (per rank), and a fixed latent set for sample grids.
        self.zgen = torch.Generator(device=self.device)
        self.zgen.manual_seed(t.seed * 1000 + self.rank + 1)
        self.fixed_z = torch.randn(t.sample_cols, self.G.z_dim, generator=torch.Generator().manual_seed(12345))
        self.objective = GANObjective(cfg, self.G, self.D, autocast=self.autocast, gen=self.zgen)
        # Weight-only regularisers and the sigma0 clamp (the shared class embedding is excluded).
        shared = getattr(self.G, "shared", None)
        mods = {"G": [m for _, m in spectral.weight_modules(self.G, exclude=[shared] if shared is not None else [])],
                "D": [m for _, m in spectral.weight_modules(self.D)]}
        self.specs = reg_specs(reg)
        self.hist_avg = ({k: HistoricalAverage(n.parameters(), reg.hist_avg) for k, n in self.nets.items()}
                         if reg.hist_avg > 0 else None)
        self.weight_regs = WeightRegs(reg, self.specs, mods, self.hist_avg)
        self.phases = self._build_phases()
        self.runner = PhaseRunner(accumulate=t.accumulate, batch_size=t.batch_size,
                                  latents=self._latents, device=self.device, world=self.world,
                                  on_nonfinite=self._nonfinite_step, any_rank=self.ranks.any,
                                  grad_sync=cfg.dist.grad_sync, bucket_mb=cfg.dist.bucket_mb)
        self.guard = NonfiniteGuard(t.nonfinite_rollback, t.max_rollbacks)
        tc = cfg.telemetry
        loss_gap = math.inf if self.objective.loss.gap_unbounded else tc.collapse_loss_gap
        self.collapse = CollapseDetector.from_cfg(tc, loss_gap, relativistic=self.objective.loss.relativistic)
        self.diversity = DiversityProbe.from_trainer(self)  # stability/diversity (bench/train/diversity.py)
        self.parts = TrainingParts({"G": self.G, "D": self.D, "G_ema": self.G_ema}, self.opt, self.scaler,
                                   self.zgen, self.collapse, self.hist_avg, self.guard, self.objective)

    def _build_phases(self) -> list[Phase]:
        wr, scaler = self.weight_regs, self.scaler or {}
        d = Phase("D", self.D, self.opt["D"], scaler.get("D"), self.objective.d_phase, reads_data=True,
                  regularisers=wr.regularisers("D"),
                  post_step=tuple(self.objective.after_d_step()) + wr.post_step("D"))
        g = Phase("G", self.G, self.opt["G"], scaler.get("G"), self.objective.g_phase,
                  reads_data=self.objective.loss.relativistic,  # rpgan pairs each fake with a real
                  frozen=(self.D,),  # D is frozen during the G step
                  regularisers=wr.regularisers("G"), post_step=wr.post_step("G"))
        return plan(d, g, self.cfg.train.d_steps)

    # ---- data and latents -----------------------------------------------------------------------------
    def restart_data(self) -> None:
        """(Re)start the data stream, seeded by (seed, step): an uninterrupted run and a resumed one
        see the same batches after every checkpoint."""
        cfg = self.cfg
        self.close_data()
        settings = LoaderSettings(rank=self.rank, world_size=self.world,
                                  num_workers=resolve_workers(cfg.data.num_workers),
                                  shuffle_buffer=cfg.data.shuffle_buffer,
                                  seed=cfg.train.seed * 1_000_003 + self.step, resampled=True,
                                  mirror=bool(cfg.data.mirror))
        self.loader = ShardLoader(self.shards, cfg.train.batch_size, cfg.data.resolution, settings)
        self._skipped_base = self.data_skipped
        self.data_iter = iter(self.loader)

    def close_data(self) -> None:
        self.data_iter = None
        if self.loader is not None:
            self.loader.close()  # stop the decode workers now, not at garbage collection
        self.loader = None

    def next_batch(self):
        """The training batch source: the next batch of the shard stream, on the device."""
        x, y = next(self.data_iter)
        self.data_skipped = self._skipped_base + self.loader.skipped
        return x.to(self.device, memory_format=self.fmt, non_blocking=True), y.to(self.device)

    def _latents(self, n: int):
        z = torch.randn(n, self.G.z_dim, device=self.device, generator=self.zgen)
        y = torch.randint(0, self.n_data_classes, (n,), device=self.device, generator=self.zgen)
        return z, y

    # ---- the run ------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Resume, train to train.steps (or a stop request), and write the summary. Rank 0 holds the run
        directory's lock (rundir.RunLock) for the whole run: a second writer gets RunLocked (on every
        rank, through the agreement of ranks.Ranks.rank0)."""
        own_handlers = not self.stop.installed
        self.stop.install()
        lock = None
        try:
            lock = self.ranks.rank0("taking the run directory's lock", rundir.RunLock(self.run_dir).acquire)
            return self._run()
        finally:
            if own_handlers:
                self.stop.restore()
            if lock is not None:
                lock.release()

    def _run(self) -> dict:
        start_step = self.maybe_resume()
        if start_step >= self.cfg.train.steps:
            return self._already_complete(start_step)
        self._start_records(start_step)
        status = rundir.FAILED
        try:
            self._loop()
            status = self._end_status()
        except Diverged as exc:
            status = self._diverged(exc)
        except KeyboardInterrupt:  # a second Ctrl-C: leave now, without another collective
            status, self.ranks.broken = rundir.INTERRUPTED, self.world > 1
            raise
        except Exception as exc:  # this rank failed, or a peer did: recorded, every rank exits non-zero
            self._failed(exc)
            if is_user_error(exc):
                raise  # bad input: one line from the CLI, exit 2 (after the summary below)
        finally:
            self.close_data()
            summary = self._finish(status)
        if status == rundir.INTERRUPTED and self.stop.signal == signal.SIGUSR2 and self.is_main:
            from bench import launch

            launch.requeue_self(int(self.cfg.cluster.max_requeue))
        return summary

    def _loop(self) -> None:
        t = self.cfg.train
        watch = Stopwatch(self.device)
        collector = Collector(self.device, self.ranks.all_reduce if self.world > 1 else None)
        # FLOP count and device peak for perf/mfu, outside the timed ticks (a first CPU-peak measurement
        # takes a while: the others wait under dist.rank0_timeout_s)
        self.ranks.rank0("counting FLOPs and measuring the device peak", self.mfu.budget)
        self.restart_data()
        clock = TickClock(self.train_seconds)
        self._announce()
        self.stop.agree(self.ranks.any)
        if self.stop.requested:  # a signal during set-up or resume: stop before the first step
            return
        with collector:
            while self.step < t.steps:  # a stop request ends it only once every rank agreed (stop.agree)
                cpu0, wall0 = time.process_time(), time.perf_counter()
                self.train_step(watch, self.next_batch)
                clock.count_step(time.process_time() - cpu0, time.perf_counter() - wall0)
                self.trained = True
                clock.steps += 1
                if self.diversity.due(self.step):  # before the tick that reports it; not training: kept out of img/s
                    clock.set_aside(self.diversity.report(self.ranks, self.G_ema))
                self.stop.agree(self.ranks.any)
                interrupted = self.stop.requested
                last = self.step >= t.steps or interrupted
                # A tick line is written at tick boundaries and at the final step, not when a signal cuts a
                # tick short: a resumed run then has exactly the lines of an uninterrupted one.
                if self.step % t.tick_every == 0 or self.step >= t.steps:  # ticks stay on multiples of tick_every
                    self._tick(collector, watch.take(), clock)
                    last = last or self.stop.on_collapse  # a signal during the tick waits for the next agree
                # Checkpoints, sample grids and evaluations are not training: their time is kept out of
                # the tick's img/s and step-time split (it still counts in summary.json's wall time).
                watch.stop()
                aside_t0 = time.perf_counter()
                self._between_steps(clock, last, interrupted)
                clock.set_aside(time.perf_counter() - aside_t0)
                if last:
                    break
            self.train_seconds = clock.wall()

    def train_step(self, watch: Stopwatch, batches: Batches) -> None:
        """One G step: the D phases and the G phase, the EMA update, and the sigma telemetry."""
        cfg, t = self.cfg, self.cfg.train
        injected_fault(self.rank, self.step + 1)  # the fault tests' hook (bench.faults); nothing unless asked
        for phase in self.phases:
            self.runner.run(phase, watch, batches, self.step * t.d_steps + phase.index)
        for key, value in self.runner.comm_record().items():  # time/allreduce_ms, ... (several ranks only)
            telemetry.report(key, value)
        if self.guard.end_of_step():
            roll_back(self)
        watch.start("reg")
        decay = cfg.ema.decay if self.step >= cfg.ema.start else 0.0
        ema_update(self.G_ema, self.G, decay)
        self.step += 1
        self.images_seen += self.eff_batch
        if cfg.telemetry.sigma_every and self.step % cfg.telemetry.sigma_every == 0:
            watch.start("telemetry")
            for name, net in self.nets.items():
                telemetry.report_sigmas(name, net, k=cfg.telemetry.sigma_k)
        watch.stop()

    def _between_steps(self, clock: TickClock, last: bool, interrupted: bool) -> None:
        """Checkpoint, sample grid and evaluation when they are due."""
        t, ev = self.cfg.train, self.cfg.eval
        if (t.ckpt_every and self.step % t.ckpt_every == 0) or last:
            self.train_seconds = clock.wall()
            self.save_checkpoint()
            if not last:
                self.restart_data()  # keeps resumed runs on the same data stream
        if not interrupted and ((t.sample_every and self.step % t.sample_every == 0) or last):
            self.save_samples()
        if not interrupted and not ev.get("async") and (  # eval.async: `bench eval watch` evaluates beside training
                (ev.every and self.step % ev.every == 0) or (last and (ev.every or ev.final))):
            self.run_eval()

    def _announce(self) -> None:
        if self.is_main and not self.quiet:
            from bench.data.shards import data_facts, describe_size

            cfg, t = self.cfg, self.cfg.train
            facts = data_facts(self.shards_spec, cfg.data.mirror)
            kind = "" if facts["data_labelled"] is not False else ", unlabelled: unconditional nets"
            print(f"training {cfg.model.family} at {cfg.data.resolution}x{cfg.data.resolution} on {self.shards_spec} "
                  f"({describe_size(facts)}{kind}) | "
                  f"{self.world} process(es) x batch {t.batch_size} x accumulate {t.accumulate} = {self.eff_batch} | "
                  f"{t.precision}{' channels_last' * self.channels_last} | run dir {self.run_dir}", flush=True)

    # ---- ticks --------------------------------------------------------------------------------------
    def _tick(self, collector: Collector, times: dict, clock: TickClock) -> None:
        t = self.cfg.train
        tick_s, steps, wall_s = clock.lap()
        util = clock.cpu_utilisation(torch.get_num_threads())
        if self.device.type == "cpu" and math.isfinite(util):
            collector.add(registry.CPU_UTIL, util)
        stats = collector.tick()  # one all-reduce across ranks
        row = {"step": self.step, "kimg": self.images_seen / 1000.0, "time/wall_s": wall_s,
               "throughput/img_per_s": steps * self.eff_batch / tick_s, "time/step_ms": 1000.0 * tick_s / steps}
        for name in telemetry.TIMED_SECTIONS:
            row[f"time/{name}_ms"] = 1000.0 * times.get(name, 0.0) / steps
        row["mem/peak_gb"] = bdevice.peak_memory_gb(self.device)
        if self.is_main:
            clock.set_aside(self.mfu.add_to(row, steps, tick_s))  # a peak re-measurement is not training
        row.update({"batch/effective": self.eff_batch, "batch/per_device": t.batch_size,
                    "dist/world_size": self.world, "data/skipped_total": self.data_skipped})
        row.update(stats)
        row["stability/nonfinite_total"] = self.guard.total
        reason = self.collapse.update(row)
        row["stability/collapse"] = 1.0 if reason else 0.0
        flags = self.collapse.take_flags()
        if self.is_main and not self.quiet:
            for _, _, why, _ in flags:  # each rule once, when it first fires (stability/collapse: every tick it holds)
                print(f"collapse detected at step {self.step}: {why}", flush=True)
        # an FID-flagged collapse is known on rank 0 only: every rank must stop at the same step
        if self.ranks.any(self.collapse.collapse_step is not None and self.cfg.telemetry.stop_on_collapse):
            self.stop.collapse()
        self.last_row = row
        util = row.get(registry.CPU_UTIL, 1.0)
        self.ticks_since_start += 1  # the first tick after a start or resume also waits for the first batches
        if (util < registry.CONTENDED and self.ticks_since_start > 1 and self.is_main and not self.quiet
                and not self.warned_contention):
            self.warned_contention = True  # once per run: the records keep every tick's perf/cpu_util
            print(f"warning: at step {self.step} this run's training steps got {util:.0%} of the CPU time of its "
                  f"{torch.get_num_threads()} thread(s) (perf/cpu_util): another CPU-bound process, or its own "
                  f"data workers, probably shares the cores, so its img/s are not clean figures", flush=True)

        def write() -> None:
            self.records.metrics(row)
            self.records.flags(self.step, flags)

        self.ranks.rank0(f"writing the metrics of step {self.step}", write)
        if self.is_main and not self.quiet:
            print(telemetry.tick_line(row, t.steps, eta_s=(t.steps - self.step) * tick_s / steps), flush=True)

    def flop_per_step(self) -> float:
        """FLOP of one optimiser step of this process ((D x d_steps + G) x batch x accumulate), counted once."""
        if self._flops is None:
            t = self.cfg.train
            f = telemetry.step_flops(copy.deepcopy(self.G), copy.deepcopy(self.D), batch=2,
                                     n_classes=self.n_data_classes, device=self.device)
            self._flops = (f["D_step"] * t.d_steps + f["G_step"]) * t.batch_size * t.accumulate
        return self._flops

    # ---- non-finite steps ---------------------------------------------------------------------------
    def _nonfinite_step(self, name: str) -> None:
        self.guard.skipped(self.step + 1)
        if self.is_main and not self.quiet:
            print(f"warning: non-finite loss or gradient in the {name} step at step {self.step + 1}; "
                  "its update was skipped", file=sys.stderr, flush=True)

    # ---- checkpoints --------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"step": self.step, "images_seen": self.images_seen, "train_seconds": self.train_seconds,
                "data_skipped": self.data_skipped, **self.parts.state_dict(),
                "config": OmegaConf.to_container(self.cfg, resolve=True), "best": self.best}

    def load_state_dict(self, s: dict) -> None:
        self.parts.load_state_dict(s)
        self.step = int(s["step"])
        self.images_seen = int(s["images_seen"])
        self.train_seconds = float(s["train_seconds"])
        self.data_skipped = int(s.get("data_skipped", 0))
        self.best = s.get("best")

    def save_checkpoint(self) -> Optional[Path]:
        if not all_finite(self.G, self.D):
            print(f"warning: weights are non-finite at step {self.step}; checkpoint not written (the last good "
                  "one is kept for rollback)", file=sys.stderr, flush=True)
            return None
        def save() -> Path:
            injected_fault(self.rank, self.step, "checkpoint")
            return self.checkpoints.save(self.step, self.state_dict)

        return self.ranks.rank0(f"saving the checkpoint of step {self.step}", save)

    def maybe_resume(self) -> int:
        """Rank 0 picks the newest checkpoint that reads and names it to the others (broadcast), so every
        rank resumes from the same step; a rank that cannot read it fails the resume on every rank."""
        state, path = agreed_load(self.ranks, "reading the newest checkpoint", self.checkpoints.for_resume)
        if path is None:
            return 0
        self.config_changes = config_changes(state.get("config"), OmegaConf.to_container(self.cfg, resolve=True))
        try:
            self.load_state_dict(state)
        except (RuntimeError, KeyError, ValueError) as exc:  # nets or optimisers of another shape
            raise ConfigError(f"cannot resume from {path}: it does not fit this config ({exc.__class__.__name__}: "
                              f"{str(exc).strip().splitlines()[0][:160]})") from None
        if not self.quiet and self.is_main:
            print(f"resuming from {path} at step {self.step}", flush=True)
        return self.step

    # ---- evaluation and samples ---------------------------------------------------------------------
    def run_eval(self) -> Optional[dict]:
        """Rank 0 evaluates the EMA G, appends to evals.jsonl, keeps checkpoints/best.pt for
        eval.best_metric (rundir.best_eval decides), and feeds FID to the collapse detector; with several
        ranks each samples and extracts features for its share first (bench.eval.spread)."""
        from bench.eval.metrics import EvalSettings, append_eval
        from bench.eval.spread import EvalJob, evaluate_on_ranks

        t0 = time.perf_counter()

        def evaluate(metrics: dict) -> dict:  # rank 0, with the metrics
            rec = append_eval(self.run_dir, self.step, metrics)
            self.last_eval = {"step": self.step, **metrics}  # summary.json's quality: the final step's
            self.records.evaluation(self.step, metrics)
            self.best = self.checkpoints.keep_if_best(self.step, self.records.training_evals(), self.cfg.eval,
                                                      lambda best: {**self.state_dict(), "best": best}) or self.best
            if registry.FID in metrics:
                self.collapse.update_fid(self.step, metrics[registry.FID])
            self.collapse.update_eval(self.step, metrics, self.n_data_classes)
            flags = self.collapse.take_flags()
            for _, _, why, _ in flags if not self.quiet else ():  # each rule once, when it first fires
                print(f"collapse detected at step {self.step}: {why}", flush=True)
            self.records.flags(self.step, flags)
            if not self.quiet:
                print(telemetry.eval_line(self.step, metrics, time.perf_counter() - t0), flush=True)
            return rec

        job = EvalJob(self.G_ema, EvalSettings.from_cfg(self.cfg), self.shards_spec, self.n_data_classes, self.device,
                      progress=not self.quiet)
        return evaluate_on_ranks(job, self.ranks, f"evaluating step {self.step}", evaluate,
                                 before=lambda: injected_fault(self.rank, self.step, "eval"))  # the fault tests' hook

    def save_samples(self) -> Optional[Path]:
        def write() -> Path:
            path = save_samples(self.run_dir, self.step, self.G_ema, self.fixed_z, self.class_names,
                                self.n_data_classes)
            self.records.samples(self.step, path)  # the same grid, to the loggers
            return path

        return self.ranks.rank0(f"writing the samples of step {self.step}", write)

    # ---- records ------------------------------------------------------------------------------------
    def _start_records(self, start_step: int) -> None:
        self.hosts = gather_hosts(self.world)  # a collective: every rank

        def start() -> None:
            self.records.open(start_step)  # drops the records past the checkpoint
            self.best = self.checkpoints.reconcile_best(self.records.training_evals(), self.cfg.eval, start_step)
            self.records.write_config(OmegaConf.to_yaml(self.cfg), start_step, self.config_changes)
            self.records.start(start_step, self.hosts, self.config_changes)

        self.ranks.rank0("writing the run's records", start)

    def _already_complete(self, start_step: int) -> dict:
        if self.is_main and not self.quiet:
            print(f"run {self.run_dir} is already complete at step {start_step} (train.steps="
                  f"{self.cfg.train.steps}); nothing to do. Raise train.steps to continue it.", flush=True)
        return self.records.read_json(rundir.SUMMARY)

    def _end_status(self) -> str:
        if self.is_main and self.stop.message(self.step, self.trained):
            print(self.stop.message(self.step, self.trained), file=sys.stderr, flush=True)
        return self.stop.status()

    def _failed(self, exc: Exception) -> None:
        """This rank failed or learnt that another did (ranks.Ranks.failed); rank 0 names the first error."""
        self.error = self.ranks.failed(exc)
        if not isinstance(exc, RankFailed) and not is_comm_error(exc) and not is_user_error(exc):
            traceback.print_exc()
        if self.is_main:
            self.error = self.ranks.first_error(exc)
            print(f"error: run failed at step {self.step}: {self.error}", file=sys.stderr, flush=True)

    def _diverged(self, exc: Diverged) -> str:
        self.error = str(exc)
        # A run that diverged has collapsed, whether or not a telemetry signal fired first.
        self.collapse.flag(self.guard.first_step or self.step,
                           f"non-finite: training diverged ({self.guard.total} skipped updates)")
        self.records.flags(self.step, self.collapse.take_flags())  # rank 0's loggers; no collective here
        return rundir.DIVERGED

    def _finish(self, status: str) -> dict:
        """summary.json and run.json's end; after a failure, no collective (rank 0's checksum, the start's hosts)."""
        checksum = param_checksum(self.G, self.D)
        checksums, hosts = [checksum], self.hosts
        if self.world > 1 and not self.ranks.broken:
            checksums, hosts = [None] * self.world, gather_hosts(self.world)
            torch.distributed.all_gather_object(checksums, checksum)
        summary = summary_of(self, status, checksums)
        self.records.write_json(rundir.SUMMARY, summary)
        self.records.write_run(status, hosts, {"end_time": now()})
        self.records.close(status)
        return summary
