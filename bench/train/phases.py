"""Phases as data: one G step = `train.d_steps` D phases + 1 G phase. A `Phase` carries everything that differs
between D and G (net, optimiser, scaler, step function, frozen nets, weight regularisers, post-step hooks);
`PhaseRunner.run` is the same code for every phase and never asks which net it steps (docs/architecture.md,
"One training step"; why the nets are not wrapped in DDP: "Gradient sync")."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch

from bench.config import RegSpecs
from bench.train import telemetry
from bench.train.gradsync import CommStats, GradSync, step_record
from bench.train.objectives import HistoricalAverage, MicroBatch
from bench.models import spectral

Hook = Callable[[], None]


@dataclass(frozen=True)
class Phase:
    name: str  # "D" or "G": names the timing section and the grad/<name>_norm record, nothing else
    net: torch.nn.Module  # the net whose optimiser steps
    opt: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]  # fp16 only
    step: Callable[[MicroBatch, Callable[[torch.Tensor], None]], torch.Tensor]  # one micro-batch
    reads_data: bool  # each micro-batch takes a real batch
    frozen: tuple[torch.nn.Module, ...] = ()  # nets without weight gradients during the phase
    regularisers: tuple[Hook, ...] = ()  # weight-only penalties, after the gradient all-reduce
    post_step: tuple[Hook, ...] = ()  # weight operations after the optimiser step (under no_grad)
    index: int = 0  # the phase's place among the same net's phases within one G step


def plan(d_phase: Phase, g_phase: Phase, d_steps: int) -> list[Phase]:
    """The phases of one G step, in order: d_steps D phases, then the G phase."""
    return [dataclasses.replace(d_phase, index=i) for i in range(d_steps)] + [g_phase]


@dataclass
class WeightRegs:
    """What the weight-only regularisers and the sigma0 clamp need (reg.*, parsed once)."""
    reg: object  # the `reg` config
    specs: RegSpecs  # reg.sigma_clamp / reg.sigma_target, parsed
    modules: dict[str, list]  # net name -> its regularised weight layers
    hist_avg: Optional[dict[str, HistoricalAverage]] = None  # net name -> historical average (reg.hist_avg)

    def regularisers(self, name: str) -> tuple[Hook, ...]:
        """Penalties that depend on the weights only: identical on every rank, so they are added after
        the gradient all-reduce, once per optimiser step. In order: ortho, sigma0 penalty, hist. avg."""
        reg, mods, out = self.reg, self.modules[name], []
        if reg.ortho_beta > 0 and name in reg.ortho_nets:
            out.append(functools.partial(spectral.ortho_grad_, mods, reg.ortho_beta, full=reg.ortho_full))
        if reg.sigma_penalty > 0 and name in reg.sigma_penalty_nets:
            out.append(functools.partial(_sigma_penalty, name, mods, reg.sigma_penalty, self.specs.sigma_target))
        if self.hist_avg is not None:
            out.append(functools.partial(_hist_avg, name, self.hist_avg[name]))
        return tuple(out)

    def post_step(self, name: str) -> tuple[Hook, ...]:
        spec = self.specs.sigma_clamp
        if spec is None or name not in self.reg.sigma_clamp_nets:
            return ()
        return (functools.partial(spectral.sigma0_clamp_, self.modules[name], spec.value, relative=spec.relative),)


def _sigma_penalty(name: str, mods, weight: float, spec) -> None:
    pen = weight * spectral.sigma0_penalty(mods, spec.value, relative=spec.relative)
    pen.backward()
    telemetry.report(f"loss/sigma_{name}", pen.detach())


def _hist_avg(name: str, hist: HistoricalAverage) -> None:
    telemetry.report(f"loss/hist_avg_{name}", hist.add_grad_())


@dataclass
class PhaseRunner:
    """Runs one phase: micro-batches, gradient all-reduce, weight-only regularisers, the non-finite
    check, the optimiser step, and the post-step weight operations."""
    accumulate: int  # micro-batches per optimiser step
    batch_size: int  # per process per micro-batch
    latents: Callable[[int], tuple[torch.Tensor, torch.Tensor]]  # n -> (z, y_fake)
    device: torch.device
    world: int = 1
    on_nonfinite: Callable[[str], None] = field(default=lambda name: None)  # a skipped update
    any_rank: Callable[[bool], bool] = field(default=lambda flag: flag)  # ranks.Ranks.any: agreed on every rank
    grad_sync: str = "overlap"  # dist.grad_sync: overlap | flat (bench/train/gradsync.py)
    bucket_mb: Optional[float] = None  # dist.bucket_mb (None: gradsync.auto_bucket_mb)
    _syncs: dict = field(default_factory=dict)  # id(net) -> its GradSync, made on the net's first phase

    def backward(self, scaler: Optional[torch.amp.GradScaler], loss: torch.Tensor) -> None:
        loss = loss / self.accumulate
        if scaler is not None:
            loss = scaler.scale(loss)
        loss.backward()

    def sync_of(self, net: torch.nn.Module) -> GradSync:
        if id(net) not in self._syncs:
            self._syncs[id(net)] = GradSync(net, self.world, self.grad_sync, self.bucket_mb)
        return self._syncs[id(net)]

    def comm_record(self) -> dict[str, float]:
        """The gradient communication since the last call (one G step: all its phases), as tick-record
        fields; {} in a single process."""
        if self.world == 1:
            return {}
        total = CommStats()
        for sync in self._syncs.values():
            total.add(sync.take_stats())
        return step_record(total)

    def _micro_batches(self, phase: Phase, watch, batches, reg_index: int) -> torch.Tensor:
        backward = functools.partial(self.backward, phase.scaler)
        for net in phase.frozen:
            net.requires_grad_(False)
        loss_sum = torch.zeros((), device=self.device)
        sync = self.sync_of(phase.net)
        for i in range(self.accumulate):
            real = y_real = None
            if phase.reads_data:
                watch.start("data")
                real, y_real = batches()
            watch.start(phase.name)
            z, y_fake = self.latents(self.batch_size)
            if i == self.accumulate - 1:
                sync.arm()  # the last micro-batch's backward all-reduces each bucket as it completes
            loss_sum += phase.step(MicroBatch(real, y_real, z, y_fake, reg_index), backward)
        for net in phase.frozen:
            net.requires_grad_(True)
        return loss_sum

    def run(self, phase: Phase, watch, batches: Callable[[], tuple], reg_index: int) -> None:
        """`batches()` -> (real, labels) on the device; `reg_index` numbers the phase over the run."""
        loss_sum = self._micro_batches(phase, watch, batches, reg_index)
        opt = phase.opt
        self.sync_of(phase.net).finish()  # (fp16: the scaled gradients; every rank then unscales the same mean)
        if phase.scaler is not None:
            phase.scaler.unscale_(opt)
        watch.start("reg")
        for regulariser in phase.regularisers:
            regulariser()
        gnorm = telemetry.grad_norm(phase.net.parameters())
        telemetry.report(f"grad/{phase.name}_norm", gnorm)
        # Host sync (one per phase): a non-finite loss or gradient skips the step. The loss is this rank's
        # own, so every rank must agree on the skip (one all-reduce), or their weights would part.
        if self.any_rank(not bool(torch.isfinite(loss_sum + gnorm.to(loss_sum.device)))):
            opt.zero_grad(set_to_none=True)
            if phase.scaler is not None:
                phase.scaler.update()  # backs the scale off; without it the next unscale_ raises
            self.on_nonfinite(phase.name)
            return
        if phase.scaler is not None:
            phase.scaler.step(opt)
            phase.scaler.update()
        else:
            opt.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            for hook in phase.post_step:
                hook()
