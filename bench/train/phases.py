"""Phases as data: one G step = `train.d_steps` D phases + 1 G phase. A `Phase` carries everything that differs
between D and G (net, optimiser, scaler, step function, frozen nets, weight regularisers, post-step hooks), so
loop.train_step runs every phase with the same code (docs/architecture.md, "One training step")."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from bench.config import RegSpecs
from bench.schema import RegCfg
from bench.train import telemetry
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
    """What the weight-only regularisers and the sigma0 clamp need (reg.*, typed and parsed once)."""
    reg: RegCfg  # reg.* typed (schema.typed): ortho_beta / _nets / _full, sigma_penalty / _nets, sigma_clamp_nets
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
