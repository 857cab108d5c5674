"""GAN losses and regularisers as named terms: the loss table (each `Loss` carries whether its gap is bounded,
its gradient penalty and its post-D-step hook), the optimiser table, R1 / R2 / gradient penalty, and
`GANObjective`, which owns every forward/backward of a phase and reports its terms by name
(docs/architecture.md, "One training step" and "Add a loss")."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bench import device as bdevice
from bench.registry import LOSSES, OPTIMIZERS
from bench.schema import AugCfg, LossCfg, RegCfg, typed
from bench.train.augment import AdaptiveP, DiffAugment
from bench.train.stabilisers import LeCam, consistency_sq, g_zcr, latent_perturbation
from bench.train.telemetry import report
from bench.models.layers import MinibatchDiscrimination, MinibatchStdDev
from bench.models.norms import VirtualBatchNorm2d

Tensor = torch.Tensor


# ---- D losses: (real_logits, fake_logits) -> scalar ------------------------------------------------
def d_hinge(real: Tensor, fake: Tensor) -> Tensor:
    return F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()


def d_logistic(real: Tensor, fake: Tensor) -> Tensor:
    # -log sigmoid(real) - log(1 - sigmoid(fake)); shared by minimax and non-saturating GANs.
    return F.softplus(-real).mean() + F.softplus(fake).mean()


def d_wasserstein(real: Tensor, fake: Tensor) -> Tensor:
    return fake.mean() - real.mean()


def d_relativistic(real: Tensor, fake: Tensor) -> Tensor:
    # RpGAN (Jolicoeur-Martineau 2019; R3GAN, Huang et al. 2024): softplus(-(D(x_i) - D(G(z_i)))), paired.
    return F.softplus(-(real - fake)).mean()


# ---- G losses: fake_logits -> scalar ---------------------------------------------------------------
def g_hinge(fake: Tensor) -> Tensor:
    return -fake.mean()


def g_nonsaturating(fake: Tensor) -> Tensor:
    # -log sigmoid(fake): the -log D trick.
    return F.softplus(-fake).mean()


def g_minimax(fake: Tensor) -> Tensor:
    # log(1 - sigmoid(fake)) = -softplus(fake): G minimises what D maximises.
    return -F.softplus(fake).mean()


def g_relativistic(fake: Tensor, real: Tensor) -> Tensor:
    # RpGAN's G: softplus(-(D(G(z_i)) - D(x_i))): the real logits of the pairs enter G's loss.
    return F.softplus(-(fake - real)).mean()


@torch.no_grad()
def clip_weights_(net: torch.nn.Module, clip: float) -> None:
    """WGAN's Lipschitz constraint: every parameter of `net` clipped to [-clip, clip]."""
    params = list(net.parameters())
    torch._foreach_clamp_min_(params, -clip)
    torch._foreach_clamp_max_(params, clip)


def _wgan_clip(D: torch.nn.Module, loss_cfg) -> None:
    clip_weights_(D, float(loss_cfg.clip))


@dataclass(frozen=True)
class Loss:
    d: Callable[[Tensor, Tensor], Tensor]
    g: Callable[..., Tensor]  # fake_logits -> scalar; relativistic: (fake_logits, real_logits) -> scalar
    # The critic's values are unbounded distance estimates: |loss/G - loss/D| says nothing about
    # divergence, so the collapse detector's divergence signal is off (sigma, non-finite and FID stay on).
    gap_unbounded: bool = False
    gradient_penalty: bool = False  # adds loss.gp_lambda x the WGAN-GP penalty to every D step
    # A weight operation after every D optimiser step, given D and the loss config.
    after_d_step: Optional[Callable[[torch.nn.Module, object], None]] = None
    relativistic: bool = False  # G's loss pairs each fake logit with a real one (the G phase needs reals)


# loss.name -> Loss; each also has its configs/loss/<name>.yaml (a new loss: one line here plus that file)
LOSSES.register("hinge", Loss(d_hinge, g_hinge))
LOSSES.register("ns", Loss(d_logistic, g_nonsaturating))
LOSSES.register("minimax", Loss(d_logistic, g_minimax))
LOSSES.register("wgan", Loss(d_wasserstein, g_hinge, gap_unbounded=True, after_d_step=_wgan_clip))
LOSSES.register("wgan_gp", Loss(d_wasserstein, g_hinge, gap_unbounded=True, gradient_penalty=True))
LOSSES.register("rpgan", Loss(d_relativistic, g_relativistic, relativistic=True))  # its YAML adds R1 + R2


# ---- optimisers: train.optimizer, which a loss's config group sets (configs/loss/wgan.yaml: rmsprop) ----
OPTIMIZERS.register("adam", torch.optim.Adam)
OPTIMIZERS.register("rmsprop", torch.optim.RMSprop)


def make_optimizer(train_cfg, params, lr: float, device: torch.device) -> torch.optim.Optimizer:
    """train.optimizer at `lr` (a name of OPTIMIZERS, or the dotted path of your own torch.optim.Optimizer class,
    given lr and whichever of eps, betas and the kernel keywords its constructor takes), its step's kernels chosen
    by train.fused_optim (bench.device.optimizer_impl)."""
    import inspect

    from bench.plugins import own_optimizer

    name = str(train_cfg.optimizer)
    cls = OPTIMIZERS[name] if name in OPTIMIZERS else own_optimizer(name)
    offered = {"eps": train_cfg.eps, "betas": tuple(train_cfg.betas),
               **bdevice.optimizer_impl(train_cfg.get("fused_optim", "auto"), cls, device)}
    takes = inspect.signature(cls).parameters  # RMSprop takes no betas (its alpha keeps its own default)
    return cls(params, lr=lr, **{k: v for k, v in offered.items() if k in takes})


def loss_of(loss_cfg) -> Loss:
    """The Loss of the loss config: a built-in one by loss.name, or your own (own_loss)."""
    return own_loss(loss_cfg) if loss_cfg.get("_target_") else LOSSES[loss_cfg.name]


def own_loss(loss_cfg) -> Loss:
    """The Loss that loss._target_ (your package.module.function, bench.plugins.load_target) returns when called
    with the loss config as a dict (your own keys included); anything else is a ValueError naming the key."""
    from bench.plugins import load_target

    from omegaconf import DictConfig, OmegaConf

    plain = OmegaConf.to_container(loss_cfg, resolve=True) if isinstance(loss_cfg, DictConfig) else dict(loss_cfg)
    target = str(plain["_target_"])
    loss = load_target("loss._target_", target, ValueError)(plain)  # plain values, at the check and in training
    if not isinstance(loss, Loss):
        raise ValueError(f"loss._target_={target!r} returned {type(loss).__name__}; it must return a "
                         f"bench.train.objectives.Loss(d=..., g=...)")
    return loss


# ---- penalties -------------------------------------------------------------------------------------
def input_grad_sq_norm(D, x: Tensor, y: Tensor) -> Tensor:
    """Per-sample ||grad_x D(x, y)||^2 with a graph for a second backward (R1, R2, GP)."""
    x = x.detach().requires_grad_(True)
    logits = D(x, y)
    (grad,) = torch.autograd.grad(logits.float().sum(), x, create_graph=True)
    return grad.float().flatten(1).square().sum(1)


def r1_penalty(D, real: Tensor, y: Tensor, gamma: float) -> Tensor:
    """R1 = gamma/2 * E_real ||grad_x D(x)||^2 (Mescheder et al. 2018)."""
    return 0.5 * gamma * input_grad_sq_norm(D, real, y).mean()


def gradient_penalty(D, real: Tensor, fake: Tensor, y: Tensor, lam: float, generator=None) -> Tensor:
    """WGAN-GP: lam * E[(||grad D(x_hat)|| - 1)^2] on random interpolates of real and fake."""
    eps = torch.rand(real.shape[0], 1, 1, 1, device=real.device, generator=generator, dtype=real.dtype)
    x_hat = eps * real.detach() + (1 - eps) * fake.detach()
    norm = (input_grad_sq_norm(D, x_hat, y) + 1e-12).sqrt()
    return lam * (norm - 1.0).square().mean()


def d_logistic_targets(real: Tensor, fake: Tensor, real_target: float = 1.0, flip: Tensor | None = None) -> Tensor:
    """Logistic D loss with soft/noisy targets: BCE(real, t_real) + BCE(fake, 0).

    real_target < 1 is one-sided label smoothing (Salimans et al. 2016: 0.9); `flip` is a pair of bool
    masks (real, fake) of samples whose targets are swapped (noisy labels)."""
    t_real = torch.full_like(real, real_target)
    t_fake = torch.zeros_like(fake)
    if flip is not None:
        t_real = torch.where(flip[0], 1.0 - t_real, t_real)
        t_fake = torch.where(flip[1], torch.full_like(t_fake, real_target), t_fake)
    return (F.binary_cross_entropy_with_logits(real, t_real) + F.binary_cross_entropy_with_logits(fake, t_fake))


def feature_matching_loss(real_features: Tensor, fake_features: Tensor) -> Tensor:
    """||E f(real) - E f(fake)||^2 over an intermediate D feature (Salimans et al. 2016)."""
    return (real_features.float().mean(0) - fake_features.float().mean(0)).square().sum()


class HistoricalAverage:
    """||theta - running mean of past theta||^2 (Salimans et al. 2016), the mean kept online.

    `add_grad_` adds the penalty's gradient 2 w (theta - mean) to .grad (cheaper than autograd) and
    then folds the current theta into the mean. Returns the penalty value (0-d tensor)."""

    def __init__(self, params, weight: float):
        self.params = [p for p in params if p.requires_grad]
        self.weight = weight
        self.mean = [p.detach().clone() for p in self.params]
        self.count = 1

    @torch.no_grad()
    def add_grad_(self) -> Tensor:
        diffs = torch._foreach_sub([p.detach() for p in self.params], self.mean)
        value = self.weight * torch.stack([d.float().square().sum() for d in diffs]).sum()
        for p, d in zip(self.params, diffs):
            g = 2.0 * self.weight * d
            p.grad = g if p.grad is None else p.grad.add_(g)
        self.count += 1
        torch._foreach_add_(self.mean, torch._foreach_div(diffs, float(self.count)))
        return value

    def state_dict(self) -> dict:
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, s: dict) -> None:
        for m, v in zip(self.mean, s["mean"]):
            m.copy_(v)
        self.count = int(s["count"])


def _batch_dependent(net: torch.nn.Module) -> bool:
    """True when some layer of `net` mixes the samples of a batch (BatchNorm in training, minibatch
    discrimination / stddev): then real and fake batches must not share a forward pass."""
    kinds = (torch.nn.modules.batchnorm._BatchNorm, MinibatchDiscrimination, MinibatchStdDev, VirtualBatchNorm2d)
    return any(isinstance(m, kinds) for m in net.modules())


@dataclass
class MicroBatch:
    """The inputs of one micro-batch of a phase. real / y_real: None in a phase that reads no data."""
    real: Optional[Tensor]
    y_real: Optional[Tensor]
    z: Tensor
    y_fake: Tensor
    reg_index: int  # the D step's number over the run (lazy regularisation: R1 every reg.r1_every)


@dataclass(frozen=True)
class ObjectiveSettings:
    """GANObjective's settings, made once from the config (`from_cfg`). `loss_cfg` is the loss group as configured:
    it selects the Loss (`loss_of`) and is what the Loss's after_d_step hook receives, so a `_target_` loss keeps
    its own keys; the objective's own knobs are the typed groups (bench/schema.py says what each key means)."""
    loss_cfg: object  # the config's loss node, your own keys included
    loss: LossCfg  # gp_lambda, real_target, label_noise, feature_matching
    reg: RegCfg  # r1_gamma, r2_gamma, r1_every; lecam, lecam_decay, bcr, zcr
    aug: AugCfg  # policy; ada_target, ada_interval, ada_kimg

    @classmethod
    def from_cfg(cls, cfg) -> "ObjectiveSettings":
        return cls(cfg.loss, typed(cfg.loss, LossCfg), typed(cfg.reg, RegCfg), typed(cfg.aug, AugCfg))


class GANObjective:
    """Computes and backpropagates one micro-batch of a phase.

    `d_phase` / `g_phase` take the micro-batch and `backward`, a callable(loss) doing the
    (accumulation-scaled) backward pass, and return the phase's total loss (detached) so the runner
    can skip non-finite steps. `gen` draws the label noise, the gradient-penalty interpolation, the
    augmentations and zCR's latent perturbation. With aug.policy set, D sees only augmented images
    (real and fake, D and G phase; R1 / R2 / GP differentiate D(T(x)) with respect to x). Its running
    state (ADA's p, LeCam's anchors) goes into checkpoints through `state_dict` / `load_state_dict`.
    """

    def __init__(self, settings: ObjectiveSettings, G, D, autocast, gen: Optional[torch.Generator] = None):
        self.G, self.D = G, D
        self.settings = settings
        self.loss = loss_of(settings.loss_cfg)
        self.autocast = autocast
        self.gen = gen
        self.last_real = None  # (real, y) of the latest D phase, for feature matching and relativistic G
        # Real and fake go through D as one batch (bigger, faster kernels; one spectral-norm power
        # iteration per D step, as BigGAN-PyTorch does) unless a D layer looks across the batch.
        self.joint_d = not _batch_dependent(D)
        self._stabilisers(next(D.parameters()).device)

    def _stabilisers(self, device: torch.device) -> None:
        """aug.* and reg.lecam / bcr / zcr, validated by bench.config (check_aug, check_reg)."""
        aug, reg = self.settings.aug, self.settings.reg
        self.ops = DiffAugment(list(aug.policy), self.gen)
        self.augment_on = bool(aug.policy)
        self.ada = (AdaptiveP(aug.ada_target, aug.ada_interval, aug.ada_kimg, device)
                    if aug.ada_target is not None else None)
        self.lecam = LeCam(reg.lecam, reg.lecam_decay, device) if reg.lecam > 0 else None

    def _augment(self, x: Tensor) -> Tensor:
        if not self.augment_on:
            return x
        return self.ops(x, self.ada.p if self.ada is not None else None)

    def _d_of_input(self, x: Tensor, y: Tensor) -> Tensor:
        """D as the losses see it: D(T(x)) with augmentation on (input-gradient penalties go through T)."""
        return self.D(self._augment(x), y)

    def _stateful(self) -> dict:
        return {k: v for k, v in (("ada", self.ada), ("lecam", self.lecam)) if v is not None}

    def state_dict(self) -> dict:
        return {k: part.state_dict() for k, part in self._stateful().items()}

    def load_state_dict(self, s: dict) -> None:
        """A checkpoint without a part's state (older, or written with it off) starts that part afresh."""
        for k, part in self._stateful().items():
            part.load_state_dict((s or {}).get(k) or {})

    def after_d_step(self) -> list[Callable[[], None]]:
        """The weight operations and running-state updates after each D optimiser step: the loss's (WGAN:
        clipping), ADA's p update, LeCam's anchors."""
        hook = self.loss.after_d_step
        hooks = [functools.partial(hook, self.D, self.settings.loss_cfg)] if hook is not None else []
        return hooks + [part.after_d_step for part in self._stateful().values()]

    def _d_logits(self, real: Tensor, y_real: Tensor, fake: Tensor, y_fake: Tensor) -> tuple[Tensor, Tensor]:
        if self.joint_d and real.shape[1:] == fake.shape[1:]:
            logits = self.D(torch.cat([real, fake]), torch.cat([y_real, y_fake])).float()
            return logits.split([real.shape[0], fake.shape[0]])
        return self.D(real, y_real).float(), self.D(fake, y_fake).float()

    def _d_loss(self, real_logits: Tensor, fake_logits: Tensor) -> Tensor:
        cfg = self.settings.loss
        if cfg.real_target < 1.0 or cfg.label_noise > 0.0:
            flip = None
            if cfg.label_noise > 0.0:
                dev = real_logits.device
                flip = (torch.rand(real_logits.shape, device=dev, generator=self.gen) < cfg.label_noise,
                        torch.rand(fake_logits.shape, device=dev, generator=self.gen) < cfg.label_noise)
                report("D/flipped_frac", torch.cat(flip).float().mean())
            return d_logistic_targets(real_logits, fake_logits, cfg.real_target, flip)
        return self.loss.d(real_logits, fake_logits)

    def _d_stabilisers(self, mb: MicroBatch, seen: tuple[Tensor, Tensor], fake: Tensor,
                       logits: tuple[Tensor, Tensor]) -> Optional[Tensor]:
        """LeCam, bCR and zCR's D term on one micro-batch (`seen`: the images D's loss saw, `logits` its
        outputs on them; `fake` = G(z) before augmentation). None when all are off."""
        bcr, zcr = self.settings.reg.bcr, self.settings.reg.zcr  # (lambda_real, lambda_fake), (lambda_dis, _, sigma)
        terms = []
        if self.ada is not None:
            self.ada.observe(logits[0])
        with self.autocast():
            if self.lecam is not None:
                terms.append(self.lecam.penalty(*logits))
            for i, (name, y) in enumerate((("real", mb.y_real), ("fake", mb.y_fake))):
                if bcr[i] > 0:  # ||D(x) - D(T(x))||^2, T = flip + translation, on what D saw
                    term = bcr[i] * consistency_sq(logits[i], self.D(self.ops.consistency(seen[i]), y).float())
                    report(f"loss/bCR_{name}", term.detach())
                    terms.append(term)
            if zcr[0] > 0:  # ||D(G(z)) - D(G(z'))||^2, on un-augmented fakes
                with torch.no_grad():
                    fake_p = self.G(latent_perturbation(mb.z, zcr[2], self.gen), mb.y_fake)
                base = logits[1] if not self.augment_on else self.D(fake, mb.y_fake).float()
                term = zcr[0] * consistency_sq(base, self.D(fake_p, mb.y_fake).float())
                report("loss/zCR_D", term.detach())
                terms.append(term)
        return sum(terms[1:], terms[0]) if terms else None

    def d_phase(self, mb: MicroBatch, backward: Callable[[Tensor], None]) -> Tensor:
        real, y_real, z, y_fake = mb.real, mb.y_real, mb.z, mb.y_fake
        with self.autocast():
            with torch.no_grad():
                fake = self.G(z, y_fake)
            seen = self._augment(real), self._augment(fake)
            real_logits, fake_logits = self._d_logits(seen[0], y_real, seen[1], y_fake)
            loss = self._d_loss(real_logits, fake_logits)
        report("loss/D", loss.detach())
        report("D/real_logit_mean", real_logits.detach().mean())
        report("D/fake_logit_mean", fake_logits.detach().mean())
        report("D/real_sign_mean", (real_logits.detach() > 0).float().mean())
        report("D/fake_sign_mean", (fake_logits.detach() > 0).float().mean())
        total = loss
        D = self._d_of_input if self.augment_on else self.D
        reg = self.settings.reg
        if self.loss.gradient_penalty:
            with self.autocast():
                gp = gradient_penalty(D, real, fake, y_real, self.settings.loss.gp_lambda, generator=self.gen)
            report("loss/GP", gp.detach())
            total = total + gp
        if mb.reg_index % reg.r1_every == 0:
            # Lazy regularisation: apply every r1_every D steps, scaled by the interval.
            if reg.r1_gamma > 0:
                with self.autocast():
                    r1 = r1_penalty(D, real, y_real, reg.r1_gamma)
                report("loss/R1", r1.detach())
                total = total + r1 * reg.r1_every
            if reg.r2_gamma > 0:
                with self.autocast():
                    r2 = r1_penalty(D, fake, y_fake, reg.r2_gamma)  # same form, on fakes
                report("loss/R2", r2.detach())
                total = total + r2 * reg.r1_every
        extra = self._d_stabilisers(mb, seen, fake, (real_logits, fake_logits))
        if extra is not None:
            total = total + extra
        if self.settings.loss.feature_matching > 0 or self.loss.relativistic:
            self.last_real = (real, y_real)
        backward(total)
        return total.detach()

    def _real_logits_for_g(self, mb: MicroBatch) -> Tensor:
        """A relativistic G's real logits: the G phase's own reals when it reads data, else the latest D
        micro-batch's (D is frozen in the G phase: no gradient reaches D through them)."""
        real, y = (mb.real, mb.y_real) if mb.real is not None else (self.last_real or (None, None))
        if real is None:
            raise RuntimeError(f"loss={self.settings.loss.name} pairs fakes with reals: run a D phase before the G "
                               f"phase")
        with torch.no_grad():
            return self._d_of_input(real, y).float()

    def g_phase(self, mb: MicroBatch, backward: Callable[[Tensor], None]) -> Tensor:
        z, y_fake = mb.z, mb.y_fake
        fm_weight, zcr = self.settings.loss.feature_matching, self.settings.reg.zcr
        with self.autocast():
            fake = self.G(z, y_fake)
            seen = self._augment(fake)
            if fm_weight > 0 and self.last_real is not None:
                fake_logits, fake_feat = self.D(seen, y_fake, return_features=True)
                with torch.no_grad():
                    real, y = self.last_real
                    _, real_feat = self.D(self._augment(real), y, return_features=True)
                fm = feature_matching_loss(real_feat, fake_feat)
            else:
                fake_logits, fm = self.D(seen, y_fake), None
            if self.loss.relativistic:
                loss = self.loss.g(fake_logits.float(), self._real_logits_for_g(mb))
            else:
                loss = self.loss.g(fake_logits.float())
        report("loss/G", loss.detach())
        total = loss
        if fm is not None:
            report("loss/FM", fm.detach())
            total = total + fm_weight * fm
        if zcr[1] > 0:  # -lambda_gen E(G(z) - G(z'))^2: G must vary with its latent
            with self.autocast():
                zcr_g = g_zcr(fake, self.G(latent_perturbation(z, zcr[2], self.gen), y_fake), zcr[1])
            report("loss/zCR_G", zcr_g.detach())
            total = total + zcr_g
        backward(total)
        return total.detach()
