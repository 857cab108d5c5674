"""The training loop (docs/architecture.md, "One training step"): `setup()` builds a `Run` (what stays fixed) and
its `TrainState` (what a checkpoint restores); `train()` resumes and trains to train.steps, top to bottom;
`train_step()` is one G step. Only rank 0 writes records.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import signal
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig, OmegaConf

from bench import models
from bench import device as bdevice
from bench import metrics_registry as registry
from bench import rundir
from bench.config import ConfigError, effective_batch, reg_specs, resolve
from bench.data.loader import LoaderSettings, ShardLoader
from bench.data.shards import configured_shards, resolve_shards
from bench.faults import injected_fault
from bench.models import spectral
from bench.train import telemetry
from bench.train.collapse import CollapseDetector
from bench.train.diversity import DiversityProbe
from bench.train.gradsync import CommStats, GradSync, step_record
from bench.train.loggers import LogSettings, check_backends
from bench.train.objectives import GANObjective, HistoricalAverage, MicroBatch, ObjectiveSettings, make_optimizer
from bench.train.phases import Phase, WeightRegs, plan
from bench.train.ranks import RankFailed, Ranks, is_comm_error, is_user_error, process_group_kwargs
from bench.train.records import Records, gather_hosts, now, run_facts, save_samples as write_grid, summary_of
from bench.train.state import (Checkpoints, Diverged, NonfiniteGuard, StopRequest, TrainState, agreed_load,
                               all_finite, config_changes, ema_update, param_checksum)
from bench.train.telemetry import Collector, Mfu, Stopwatch, TickClock
from bench.workers import resolve_workers


@dataclass
class Run:
    """What one training process is built from and talks to; fixed for the run, except the few notes at the end
    that summary.json reads. What changes with every step, and a checkpoint restores, is the TrainState."""
    cfg: DictConfig
    run_dir: Path
    quiet: bool
    stop: StopRequest
    acc: object  # the accelerate.Accelerator that made the process group and picked the device
    ranks: Ranks  # agreement, rank-0 work and failures across ranks
    eff_batch: int  # images per optimiser step over all ranks
    shards_spec: str  # data.shards as configured ("" = the built-in set, written on first use)
    shards: list  # the shard files
    class_names: list
    n_classes: int  # the nets' classes (model.n_classes, else the data's)
    n_data_classes: int  # the classes labels are drawn from
    channels_last: bool
    autocast: object  # () -> the precision's autocast context
    phases: list  # Phase: d_steps D phases, then G
    syncs: dict  # "G", "D" -> GradSync (gradient all-reduce; nothing in one process)
    fixed_z: torch.Tensor  # the latents of every sample grid
    records: Records
    checkpoints: Checkpoints
    mfu: Mfu
    diversity: DiversityProbe
    # what this process learns while it runs (summary.json, the once-only warning); not checkpointed
    error: Optional[str] = None  # a failed run's first error
    hosts: list = field(default_factory=list)  # every rank's host, gathered when the records start
    trained: bool = False  # whether this process trained a step
    last_row: dict = field(default_factory=dict)  # the latest tick record
    last_eval: dict = field(default_factory=dict)  # the latest evaluation's metrics (rank 0)
    config_changes: dict = field(default_factory=dict)  # {key: [old, new]} against the resumed checkpoint
    ticks_since_start: int = 0
    warned_contention: bool = False
    compile_record: dict = field(default_factory=dict)  # train.compile's first step (compile_facts)

    @property
    def device(self) -> torch.device:
        return self.acc.device

    @property
    def world(self) -> int:
        return self.ranks.world

    @property
    def rank(self) -> int:
        return self.ranks.rank

    @property
    def is_main(self) -> bool:
        return self.ranks.is_main

    @property
    def fmt(self) -> torch.memory_format:
        return torch.channels_last if self.channels_last else torch.contiguous_format

    def say(self, line: str, err: bool = False) -> None:
        """A terminal line from rank 0 (nothing when quiet)."""
        if self.is_main and not self.quiet:
            print(line, file=sys.stderr if err else sys.stdout, flush=True)


# ---- set-up -----------------------------------------------------------------------------------------------
def setup(cfg: DictConfig, run_dir: Path, *, stop: Optional[StopRequest] = None, quiet: bool = False,
          accelerator=None) -> tuple[Run, TrainState]:
    """The process group, the data, the nets, the optimisers, the objective and the phases, before the first
    step. `stop`: a StopRequest whose handlers the caller installed (the CLI does, so a signal during set-up and
    resume stops cleanly); otherwise `train()` installs them."""
    from accelerate import Accelerator

    run_dir, t = Path(run_dir), cfg.train
    check_backends(cfg.log.backends if cfg.get("log") else ())  # a missing package: one line, before any work
    acc = accelerator or Accelerator(cpu=not torch.cuda.is_available(),  # makes the process group, picks the device
                                     kwargs_handlers=process_group_kwargs(cfg.dist.timeout_s))
    env_world = int(os.environ.get("WORLD_SIZE", "1"))
    if acc.num_processes != env_world:
        raise RuntimeError(f"accelerate sees {acc.num_processes} processes but WORLD_SIZE={env_world}; "
                           "build the Accelerator after exporting the distributed environment")
    device, world, rank = acc.device, acc.num_processes, acc.process_index
    resolve(cfg, world)  # precision=auto, global_batch, kimg, eval.final: derived here (a no-op when done before)
    ranks = Ranks(world, rank, device, run_dir, cfg.dist.rank0_timeout_s)
    bdevice.configure_process(device, t.deterministic, t.tf32, t.cudnn_benchmark)
    bdevice.seed_all(t.seed)  # identical model init on every rank

    # The data: the built-in set is written on first use (rank 0 writes, the others wait).
    if not cfg.data.shards:
        ranks.rank0("writing the built-in dataset", lambda: configured_shards(cfg.data))
    shards_spec = configured_shards(cfg.data)
    shards, manifest = resolve_shards(shards_spec)
    class_names = list(manifest["class_names"]) if manifest else None
    n_data_classes = len(class_names) if class_names else None
    n_classes = cfg.model.n_classes or n_data_classes
    if n_classes is None:
        raise ConfigError(f"data.shards={shards_spec!r} has no manifest.json with class names; set model.n_classes")
    if n_data_classes and n_classes < n_data_classes:
        raise ConfigError(f"model.n_classes={n_classes} is below the dataset's {n_data_classes} classes")
    n_data_classes = n_data_classes or n_classes

    # The nets, their EMA, and the precision.
    G, D = models.build(OmegaConf.to_container(cfg.model, resolve=True), cfg.data.resolution, n_classes)
    channels_last = bdevice.channels_last(t.channels_last, t.precision, device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    G, D = G.to(device, memory_format=fmt), D.to(device, memory_format=fmt)
    G_ema = copy.deepcopy(G).eval().requires_grad_(False)  # never compiled: it samples, at other batch sizes
    autocast = bdevice.autocast(t.precision, device)
    _check_evaluation(cfg, shards_spec, class_names or [str(i) for i in range(n_classes)], n_data_classes, G.z_dim)
    _prepare_classifier(cfg, shards_spec, ranks, quiet)

    # Optimisers, the objective (its RNG draws the latents and labels too), the regularisers and the phases.
    opt = {"G": make_optimizer(t, G.parameters(), t.g_lr, device), "D": make_optimizer(t, D.parameters(), t.d_lr, device)}
    scaler = {k: torch.amp.GradScaler("cuda") for k in ("G", "D")} if t.precision == "fp16" else None
    zgen = torch.Generator(device=device)
    zgen.manual_seed(t.seed * 1000 + rank + 1)
    settings = ObjectiveSettings.from_cfg(cfg)  # loss.*, reg.*, aug.* typed once; reg.* also for the weight regs
    objective = GANObjective(settings, G, D, autocast=autocast, gen=zgen)
    shared = getattr(G, "shared", None)  # the shared class embedding takes no weight regulariser or clamp
    mods = {"G": [m for _, m in spectral.weight_modules(G, exclude=[shared] if shared is not None else [])],
            "D": [m for _, m in spectral.weight_modules(D)]}
    reg = settings.reg
    hist_avg = ({k: HistoricalAverage(n.parameters(), reg.hist_avg) for k, n in (("G", G), ("D", D))}
                if reg.hist_avg > 0 else None)
    regs = WeightRegs(reg, reg_specs(reg), mods, hist_avg)
    s = scaler or {}
    d_phase = Phase("D", D, opt["D"], s.get("D"), objective.d_phase, reads_data=True, regularisers=regs.regularisers("D"),
                    post_step=tuple(objective.after_d_step()) + regs.post_step("D"))
    g_phase = Phase("G", G, opt["G"], s.get("G"), objective.g_phase,
                    reads_data=objective.loss.relativistic,  # rpgan pairs each fake with a real
                    frozen=(D,), regularisers=regs.regularisers("G"), post_step=regs.post_step("G"))
    tc = cfg.telemetry
    loss_gap = math.inf if objective.loss.gap_unbounded else tc.collapse_loss_gap
    state = TrainState(G, D, G_ema, opt, scaler, zgen, objective,
                       CollapseDetector.from_cfg(tc, loss_gap, relativistic=objective.loss.relativistic),
                       NonfiniteGuard(t.nonfinite_rollback, t.max_rollbacks), hist_avg)
    run = Run(cfg, run_dir, quiet, stop or StopRequest(), acc, ranks, effective_batch(t, world), shards_spec, shards,
              class_names or [str(i) for i in range(n_classes)], n_classes, n_data_classes, channels_last, autocast,
              phases=plan(d_phase, g_phase, t.d_steps),
              syncs={k: GradSync(net, world, cfg.dist.grad_sync, cfg.dist.bucket_mb, rank)
                     for k, net in (("D", D), ("G", G))},
              fixed_z=torch.randn(t.sample_cols, G.z_dim, generator=torch.Generator().manual_seed(12345)),
              records=None, checkpoints=Checkpoints(run_dir, t.ckpt_keep, ranks.is_main), mfu=None, diversity=None)
    if compiled(cfg):  # in place: the same parameters, state dicts and checkpoints; compiles at the first step
        from torch._dynamo.utils import counters

        counters.clear()  # run.json's graphs and graph breaks are this run's (bench throughput -m: one process)
        mode = str(t.compile).lower()
        for net in (G, D):
            net.compile(backend=t.compile_backend, **({"mode": mode} if t.compile_backend == "inductor"
                                                      and mode != "default" else {}))
    run.records = Records(run_dir, ranks.is_main, run_facts(run, state), LogSettings.from_cfg(cfg, run_dir))
    run.mfu = Mfu(device, t.precision, (lambda: flop_per_step(run, state)) if tc.mfu else None)
    run.diversity = DiversityProbe.from_run(run)  # stability/diversity (bench/train/diversity.py)
    return run, state


def _check_evaluation(cfg, shards_spec: str, class_names: list, n_data_classes: int, z_dim: int) -> None:
    """Intra-FID's drawn labels checked before the first step (they follow from eval.seed alone): a class left
    with fewer than 2 samples would otherwise fail the run at its first evaluation."""
    ev = cfg.eval
    if not ((ev.every or ev.final) and ev.intra_fid):
        return
    from bench.data.shards import dataset_info
    from bench.eval.intra import IntraFID
    from bench.eval.metrics import EvalSettings

    s = EvalSettings.from_cfg(cfg)
    _, n_available, _ = dataset_info(shards_spec)
    n_real = int(s.num_real or s.num_samples)
    IntraFID.check(s, class_names, n_data_classes, min(n_real, int(n_available or n_real)), z_dim)


def _prepare_classifier(cfg, shards_spec: str, ranks: Ranks, quiet: bool) -> None:
    """Train the domain classifier now, before the first step, when the run will need it and it is missing:
    the diversity probe, or evaluation with the domain extractor (eval.async: its watcher's). Built on first
    use instead, it would be trained inside a measurement (its no_grad) and cost a step's time."""
    evaluates = bool(cfg.eval.every) or bool(cfg.eval.final)
    if not (cfg.telemetry.diversity_every > 0 or (evaluates and cfg.eval.extractor == "domain")):
        return
    from bench.eval.metrics import ensure_classifier

    ranks.rank0("training the domain classifier", lambda: ensure_classifier(
        shards_spec, cfg.data.resolution, cfg.eval.classifier_path, train_if_missing=True, progress=not quiet))


def compiled(cfg) -> bool:
    return str(cfg.train.compile).lower() != "false"


def compile_facts(first_step_s: float) -> dict:
    """run.json's record of train.compile: the first step's seconds (compiling included) and dynamo's graphs and
    graph breaks since set-up."""
    from torch._dynamo.utils import counters

    return {"compile_s": round(first_step_s, 2), "compile_graphs": int(counters["stats"].get("unique_graphs", 0)),
            "compile_graph_breaks": int(sum(counters["graph_break"].values()))}


def flop_per_step(run: Run, state: TrainState) -> float:
    """FLOP of one optimiser step of this process ((D x d_steps + G) x batch x accumulate)."""
    t = run.cfg.train
    f = telemetry.step_flops(copy.deepcopy(state.G), copy.deepcopy(state.D), batch=2, n_classes=run.n_data_classes,
                             device=run.device)
    return (f["D_step"] * t.d_steps + f["G_step"]) * t.batch_size * t.accumulate


# ---- data -------------------------------------------------------------------------------------------------
class DataStream:
    """The training batches: the shard stream, seeded by (train.seed, step), so that an uninterrupted run and a
    resumed one see the same batches after every checkpoint; restarted at each checkpoint."""

    def __init__(self, run: Run):
        self.run, self.loader, self.it, self.skipped_before = run, None, None, 0

    def restart(self, state: TrainState) -> None:
        cfg = self.run.cfg
        self.close()
        settings = LoaderSettings(rank=self.run.rank, world_size=self.run.world,
                                  num_workers=resolve_workers(cfg.data.num_workers), shuffle_buffer=cfg.data.shuffle_buffer,
                                  seed=cfg.train.seed * 1_000_003 + state.step, resampled=True, mirror=bool(cfg.data.mirror))
        self.loader = ShardLoader(self.run.shards, cfg.train.batch_size, cfg.data.resolution, settings)
        self.skipped_before = state.data_skipped
        self.it = iter(self.loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(real images, labels) on the device."""
        x, y = next(self.it)
        return x.to(self.run.device, memory_format=self.run.fmt, non_blocking=True), y.to(self.run.device)

    @property
    def skipped(self) -> int:
        """Unreadable samples skipped over the run."""
        return self.skipped_before + (self.loader.skipped if self.loader is not None else 0)

    def close(self) -> None:
        self.it = None
        if self.loader is not None:
            self.loader.close()  # stop the decode workers now, not at garbage collection
        self.loader = None


# ---- one G step -------------------------------------------------------------------------------------------
def train_step(run: Run, state: TrainState, data, watch: Stopwatch) -> Optional[bool]:
    """One G step: train.d_steps D phases and the G phase, each over train.accumulate micro-batches; then the
    EMA. `data.next()` -> (real, labels) on the device (a DataStream, or throughput's fixed fake batch).
    Returns the stop request every rank agreed on through the gradient all-reduce (None: not agreed here, in
    one process or without gradient buckets; the caller asks run.ranks.any)."""
    cfg, t = run.cfg, run.cfg.train
    injected_fault(run.rank, state.step + 1)  # the fault tests' hook (bench.faults); nothing unless asked
    comm = CommStats()
    agreements = []  # each phase's Agreed (None: nothing to carry it, in one process or without buckets)
    for phase in run.phases:
        sync = run.syncs[phase.name]
        sync.begin()  # gradients zero, as views into the all-reduce buckets
        reg_index = state.step * t.d_steps + phase.index  # lazy regularisers count D steps over the run

        def backward(loss: torch.Tensor, scaler=phase.scaler) -> None:
            loss = loss / t.accumulate  # the mean over micro-batches
            sync.note_loss(loss)  # a non-finite loss travels with the gradients to every rank
            (scaler.scale(loss) if scaler is not None else loss).backward()

        for net in phase.frozen:  # D takes no weight gradients in the G phase
            net.requires_grad_(False)
        loss_sum = torch.zeros((), device=run.device)
        for i in range(t.accumulate):
            real = y_real = None
            if phase.reads_data:
                watch.start("data")
                real, y_real = data.next()
            watch.start(phase.name)
            z = torch.randn(t.batch_size, state.G.z_dim, device=run.device, generator=state.zgen)
            y_fake = torch.randint(0, run.n_data_classes, (t.batch_size,), device=run.device, generator=state.zgen)
            if i == t.accumulate - 1:
                sync.arm(stop=run.stop.asked)  # the last micro-batch's backward all-reduces each bucket as it completes
            loss_sum += phase.step(MicroBatch(real, y_real, z, y_fake, reg_index), backward)
        for net in phase.frozen:
            net.requires_grad_(True)
        agreed = sync.finish()  # (fp16: the scaled gradients; every rank then unscales the same mean)
        agreements.append(agreed)
        if phase.scaler is not None:
            phase.scaler.unscale_(phase.opt)
        watch.start("reg")
        for regulariser in phase.regularisers:  # weight-only penalties: the same on every rank, after the sync
            regulariser()
        gnorm = telemetry.grad_norm(phase.net.parameters())
        telemetry.report(f"grad/{phase.name}_norm", gnorm)
        # Host sync (one per phase): a non-finite loss or gradient skips the update, on every rank or none, or
        # their weights would part. The averaged gradients, hence their norm, are the same on every rank, and the
        # losses' count came with them (Agreed); without it, one all-reduce agrees on this rank's own loss.
        if agreed is not None:
            nonfinite = agreed.nonfinite or not bool(torch.isfinite(gnorm))
        else:
            nonfinite = run.ranks.any(not bool(torch.isfinite(loss_sum + gnorm.to(loss_sum.device))))
        if nonfinite:
            phase.opt.zero_grad(set_to_none=True)
            if phase.scaler is not None:
                phase.scaler.update()  # backs the scale off; without it the next unscale_ raises
            state.guard.skipped(state.step + 1)
            run.say(f"warning: non-finite loss or gradient in the {phase.name} step at step {state.step + 1}; "
                    "its update was skipped", err=True)
            continue
        if phase.scaler is not None:
            phase.scaler.step(phase.opt)
            phase.scaler.update()
        else:
            phase.opt.step()
        phase.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for hook in phase.post_step:  # the sigma0 clamp, LeCam's anchors, WGAN's clip
                hook()
    if run.world > 1:  # the gradient communication of the step's phases: time/allreduce_ms, ...
        for sync in run.syncs.values():
            comm.add(sync.take_stats())
        for key, value in step_record(comm).items():
            telemetry.report(key, value)
    if state.guard.end_of_step():
        roll_back(run, state)
    watch.start("reg")
    ema_update(state.G_ema, state.G, cfg.ema.decay if state.step >= cfg.ema.start else 0.0)
    state.step += 1
    state.images_seen += run.eff_batch
    if cfg.telemetry.sigma_every and state.step % cfg.telemetry.sigma_every == 0:
        watch.start("telemetry")
        for name, net in state.nets.items():
            telemetry.report_sigmas(name, net, k=cfg.telemetry.sigma_k)
    watch.stop()
    if any(a is None for a in agreements):
        return None
    return any(a.stop for a in agreements)


def roll_back(run: Run, state: TrainState) -> None:
    """Non-finite steps persisted (NonfiniteGuard): reload from the newest complete checkpoint, keep counting
    forward (no record is rewritten), and take a different random path."""
    t = run.cfg.train
    n = state.guard.start_rollback()
    saved, path = agreed_load(run.ranks, "reading the checkpoint to roll back to", run.checkpoints.for_rollback)
    state.roll_back(saved, seed=t.seed * 1000 + run.rank + 1 + 7919 * n)
    telemetry.report("stability/rollbacks", float(n))
    run.say(f"warning: rolled back to {path} after {t.nonfinite_rollback} non-finite steps "
            f"(rollback {n}/{t.max_rollbacks})", err=True)


# ---- the run ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def holding(run: Run):
    """For the whole run: the stop handlers (unless the caller installed them already) and rank 0's lock on the run
    directory (a second writer gets RunLocked, on every rank)."""
    own_handlers = not run.stop.installed
    run.stop.install()
    lock = None
    try:
        lock = run.ranks.rank0("taking the run directory's lock", rundir.RunLock(run.run_dir).acquire)
        yield
    finally:
        if own_handlers:
            run.stop.restore()
        if lock is not None:
            lock.release()


def train(run: Run, state: TrainState) -> dict:
    """Resume, train to train.steps (or a stop request), and write summary.json, which it returns."""
    cfg, t, ev = run.cfg, run.cfg.train, run.cfg.eval
    with holding(run):
        start_step = resume(run, state)
        if start_step >= t.steps:
            run.say(f"run {run.run_dir} is already complete at step {start_step} (train.steps={t.steps}); nothing "
                    "to do. Raise train.steps to continue it.")
            return run.records.read_json(rundir.SUMMARY)
        start_records(run, state, start_step)
        data, status = DataStream(run), rundir.FAILED
        try:
            watch = Stopwatch(run.device)
            collector = Collector(run.device, run.ranks.all_reduce if run.world > 1 else None)
            # FLOP count and device peak for perf/mfu, outside the timed ticks (a first CPU-peak measurement
            # takes a while: the others wait under dist.rank0_timeout_s)
            run.ranks.rank0("counting FLOPs and measuring the device peak", run.mfu.budget)
            data.restart(state)
            clock = TickClock(state.train_seconds)
            announce(run)
            # A stop request ends the loop only once every rank agreed on it (stop.agree, a collective), so that
            # every rank stops at the same step; a signal during set-up or resume stops it before the first step.
            run.stop.agree(run.ranks.any)
            last = run.stop.requested
            compiling = compiled(cfg)  # train.compile: this process's first step compiles the nets
            with collector:
                while not last:
                    cpu0, wall0 = time.process_time(), time.perf_counter()
                    agreed_stop = train_step(run, state, data, watch)
                    state.data_skipped = data.skipped
                    clock.count_step(time.process_time() - cpu0, time.perf_counter() - wall0)
                    if compiling and not run.compile_record:
                        if run.device.type == "cuda":
                            torch.cuda.synchronize()
                        run.compile_record = compile_facts(time.perf_counter() - wall0)
                        r = run.compile_record
                        run.say(f"train.compile={t.compile}: the first step took {r['compile_s']:.1f} s "
                                f"({r['compile_graphs']} graphs, {r['compile_graph_breaks']} graph breaks)")
                    run.trained = True
                    clock.steps += 1
                    if run.diversity.due(state.step):  # before the tick that reports it; not training: kept aside
                        clock.set_aside(run.diversity.report(run.ranks, state.G_ema))
                    # The stop request travelled with the gradients (asked before the last phase's backward). A
                    # collective of its own in one process or without buckets, and after the last step, so that a
                    # signal in that step's tail stops it as it would any other (no samples or evaluation).
                    if agreed_stop is None or state.step >= t.steps:
                        run.stop.agree(run.ranks.any)
                    else:
                        run.stop.agree(lambda _: agreed_stop)
                    interrupted = run.stop.requested
                    last = state.step >= t.steps or interrupted
                    # A tick line at tick boundaries and at the final step, not when a signal cuts a tick short: a
                    # resumed run then has exactly the lines of an uninterrupted one.
                    if state.step % t.tick_every == 0 or state.step >= t.steps:
                        tick(run, state, collector, watch.take(), clock)
                        last = last or run.stop.on_collapse  # a signal during the tick waits for the next agree
                    # Checkpoints, sample grids and evaluations are not training: their time is kept out of the
                    # tick's img/s (it still counts in summary.json's wall time).
                    watch.stop()
                    aside_t0 = time.perf_counter()
                    if (t.ckpt_every and state.step % t.ckpt_every == 0) or last:
                        state.train_seconds = clock.wall()
                        save_checkpoint(run, state)
                        if not last:
                            data.restart(state)  # keeps resumed runs on the same data stream
                    if not interrupted and ((t.sample_every and state.step % t.sample_every == 0) or last):
                        save_samples(run, state)
                    if not interrupted and not ev.get("async") and (  # eval.async: `bench eval watch` evaluates
                            (ev.every and state.step % ev.every == 0) or (last and (ev.every or ev.final))):
                        evaluate(run, state)
                    clock.set_aside(time.perf_counter() - aside_t0)
                if run.trained:
                    state.train_seconds = clock.wall()
            status = run.stop.status()
            message = run.stop.message(state.step, run.trained)
            if message and run.is_main:  # also when quiet: why the run ended early
                print(message, file=sys.stderr, flush=True)
        except Diverged as exc:
            status = _diverged(run, state, exc)
        except KeyboardInterrupt:  # a second Ctrl-C: leave now, without another collective
            status, run.ranks.broken = rundir.INTERRUPTED, run.world > 1
            raise
        except Exception as exc:  # this rank failed, or a peer did: recorded, every rank exits non-zero
            _failed(run, state, exc)
            if is_user_error(exc):
                raise  # bad input: one line from the CLI, exit 2 (after the summary below)
        finally:
            data.close()
            summary = finish(run, state, status)
        if status == rundir.INTERRUPTED and run.stop.signal == signal.SIGUSR2 and run.is_main:
            from bench import launch

            launch.requeue_self(int(cfg.cluster.max_requeue))
        return summary


def announce(run: Run) -> None:
    if run.is_main and not run.quiet:
        from bench.data.shards import data_facts, describe_size

        cfg, t = run.cfg, run.cfg.train
        facts = data_facts(run.shards_spec, cfg.data.mirror)
        kind = "" if facts["data_labelled"] is not False else ", unlabelled: unconditional nets"
        print(f"training {cfg.model.family} at {cfg.data.resolution}x{cfg.data.resolution} on {run.shards_spec} "
              f"({describe_size(facts)}{kind}) | "
              f"{run.world} process(es) x batch {t.batch_size} x accumulate {t.accumulate} = {run.eff_batch} | "
              f"{t.precision}{' channels_last' * run.channels_last} | run dir {run.run_dir}", flush=True)


def tick(run: Run, state: TrainState, collector: Collector, times: dict, clock: TickClock) -> None:
    """The tick record: throughput, the time split, memory, MFU, the collected statistics; the collapse
    detector reads it. Written by rank 0 to metrics.jsonl and the loggers."""
    t = run.cfg.train
    tick_s, steps, wall_s = clock.lap()
    util = clock.cpu_utilisation(torch.get_num_threads())
    if run.device.type == "cpu" and math.isfinite(util):
        collector.add(registry.CPU_UTIL, util)
    stats = collector.tick()  # one all-reduce across ranks
    row = {"step": state.step, "kimg": state.images_seen / 1000.0, "time/wall_s": wall_s,
           "throughput/img_per_s": steps * run.eff_batch / tick_s, "time/step_ms": 1000.0 * tick_s / steps}
    for name in telemetry.TIMED_SECTIONS:
        row[f"time/{name}_ms"] = 1000.0 * times.get(name, 0.0) / steps
    row["mem/peak_gb"] = bdevice.peak_memory_gb(run.device)
    if run.is_main:
        clock.set_aside(run.mfu.add_to(row, steps, tick_s))  # a peak re-measurement is not training
    row.update({"batch/effective": run.eff_batch, "batch/per_device": t.batch_size, "dist/world_size": run.world,
                "data/skipped_total": state.data_skipped})
    row.update(stats)
    run.ticks_since_start += 1
    if run.ticks_since_start == 1:  # the first tick after a start or resume also waits for the first batches
        row[registry.START_TICK] = 1.0
    row["stability/nonfinite_total"] = state.guard.total
    reason = state.collapse.update(row)
    row["stability/collapse"] = 1.0 if reason else 0.0
    flags = state.collapse.take_flags()
    for _, _, why, _ in flags:  # each rule once, when it first fires (stability/collapse: every tick it holds)
        run.say(f"collapse detected at step {state.step}: {why}")
    # an FID-flagged collapse is known on rank 0 only: every rank must stop at the same step
    if run.ranks.any(state.collapse.collapse_step is not None and run.cfg.telemetry.stop_on_collapse):
        run.stop.collapse()
    run.last_row = row
    util = row.get(registry.CPU_UTIL, 1.0)
    if util < registry.CONTENDED and run.ticks_since_start > 1 and not run.warned_contention:
        run.warned_contention = True  # once per run: the records keep every tick's perf/cpu_util
        run.say(f"warning: at step {state.step} this run's training steps got {util:.0%} of the CPU time of its "
                f"{torch.get_num_threads()} thread(s) (perf/cpu_util): another CPU-bound process, or its own data "
                f"workers, probably shares the cores, so its img/s are not clean figures")

    def write() -> None:
        run.records.metrics(row)
        run.records.flags(state.step, flags)

    run.ranks.rank0(f"writing the metrics of step {state.step}", write)
    run.say(telemetry.tick_line(row, t.steps, eta_s=(t.steps - state.step) * tick_s / steps))


# ---- checkpoints, samples, evaluation ---------------------------------------------------------------------
def checkpoint_of(run: Run, state: TrainState) -> dict:
    return {**state.state_dict(), "config": OmegaConf.to_container(run.cfg, resolve=True)}


def save_checkpoint(run: Run, state: TrainState) -> Optional[Path]:
    if not all_finite(state.G, state.D):
        print(f"warning: weights are non-finite at step {state.step}; checkpoint not written (the last good one is "
              "kept for rollback)", file=sys.stderr, flush=True)
        return None

    def save() -> Path:
        injected_fault(run.rank, state.step, "checkpoint")
        return run.checkpoints.save(state.step, lambda: checkpoint_of(run, state))

    return run.ranks.rank0(f"saving the checkpoint of step {state.step}", save)


def resume(run: Run, state: TrainState) -> int:
    """Rank 0 picks the newest checkpoint that reads and names it to the others (broadcast), so every rank
    resumes from the same step; a rank that cannot read it fails the resume on every rank."""
    saved, path = agreed_load(run.ranks, "reading the newest checkpoint", run.checkpoints.for_resume)
    if path is None:
        return 0
    run.config_changes = config_changes(saved.get("config"), OmegaConf.to_container(run.cfg, resolve=True))
    try:
        state.load_state_dict(saved)
    except (RuntimeError, KeyError, ValueError) as exc:  # nets or optimisers of another shape
        raise ConfigError(f"cannot resume from {path}: it does not fit this config ({exc.__class__.__name__}: "
                          f"{str(exc).strip().splitlines()[0][:160]})") from None
    run.say(f"resuming from {path} at step {state.step}")
    return state.step


def evaluate(run: Run, state: TrainState) -> Optional[dict]:
    """Rank 0 evaluates the EMA G, appends to evals.jsonl, keeps checkpoints/best.pt for eval.best_metric
    (rundir.best_eval decides), and feeds the collapse detector; with several ranks each samples and
    extracts features for its share first (bench.eval.spread)."""
    from bench.eval.metrics import EvalSettings
    from bench.eval.evalrecords import append_eval
    from bench.eval.spread import EvalJob, evaluate_on_ranks

    t0, step = time.perf_counter(), state.step

    def record(metrics: dict) -> dict:  # rank 0, with the metrics
        rec = append_eval(run.run_dir, step, metrics)
        run.last_eval = {"step": step, **metrics}  # summary.json's quality: the final step's
        run.records.evaluation(step, metrics)
        best = run.checkpoints.keep_if_best(step, run.records.training_evals(), run.cfg.eval,
                                            lambda best: {**checkpoint_of(run, state), "best": best})
        state.best = best or state.best
        if registry.FID in metrics:
            state.collapse.update_fid(step, metrics[registry.FID])
        state.collapse.update_eval(step, metrics, run.n_data_classes)
        flags = state.collapse.take_flags()
        for _, _, why, _ in flags:  # each rule once, when it first fires
            run.say(f"collapse detected at step {step}: {why}")
        run.records.flags(step, flags)
        run.say(telemetry.eval_line(step, metrics, time.perf_counter() - t0))
        return rec

    job = EvalJob(state.G_ema, EvalSettings.from_cfg(run.cfg), run.shards_spec, run.n_data_classes, run.device,
                  progress=not run.quiet)
    return evaluate_on_ranks(job, run.ranks, f"evaluating step {step}", record,
                             before=lambda: injected_fault(run.rank, step, "eval"))  # the fault tests' hook


def save_samples(run: Run, state: TrainState) -> Optional[Path]:
    def write() -> Path:
        path = write_grid(run.run_dir, state.step, state.G_ema, run.fixed_z, run.class_names, run.n_data_classes)
        run.records.samples(state.step, path)  # the same grid, to the loggers
        return path

    return run.ranks.rank0(f"writing the samples of step {state.step}", write)


# ---- records and the end ----------------------------------------------------------------------------------
def start_records(run: Run, state: TrainState, start_step: int) -> None:
    run.hosts = gather_hosts(run.world)  # a collective: every rank

    def start() -> None:
        run.records.open(start_step)  # drops the records past the checkpoint
        state.best = run.checkpoints.reconcile_best(run.records.training_evals(), run.cfg.eval, start_step)
        run.records.write_config(OmegaConf.to_yaml(run.cfg), start_step, run.config_changes)
        run.records.start(start_step, run.hosts, run.config_changes)

    run.ranks.rank0("writing the run's records", start)


def _failed(run: Run, state: TrainState, exc: Exception) -> None:
    """This rank failed or learnt that another did (ranks.Ranks.failed); rank 0 names the first error."""
    run.error = run.ranks.failed(exc)
    if not isinstance(exc, RankFailed) and not is_comm_error(exc) and not is_user_error(exc):
        traceback.print_exc()
    if run.is_main:
        run.error = run.ranks.first_error(exc)
        print(f"error: run failed at step {state.step}: {run.error}", file=sys.stderr, flush=True)


def _diverged(run: Run, state: TrainState, exc: Diverged) -> str:
    run.error = str(exc)
    # A run that diverged has collapsed, whether or not a telemetry signal fired first.
    state.collapse.flag(state.guard.first_step or state.step,
                        f"non-finite: training diverged ({state.guard.total} skipped updates)")
    run.records.flags(state.step, state.collapse.take_flags())  # rank 0's loggers; no collective here
    return rundir.DIVERGED


def finish(run: Run, state: TrainState, status: str) -> dict:
    """summary.json and run.json's end; after a failure, no collective (rank 0's checksum, the start's hosts)."""
    checksum = param_checksum(state.G, state.D)
    checksums, hosts = [checksum], run.hosts
    if run.world > 1 and not run.ranks.broken:
        checksums, hosts = [None] * run.world, gather_hosts(run.world)
        torch.distributed.all_gather_object(checksums, checksum)
    summary = summary_of(run, state, status, checksums)
    run.records.write_json(rundir.SUMMARY, summary)
    run.records.write_run(status, hosts, {"end_time": now(), **run.compile_record})
    run.records.close(status)
    return summary
