"""The collapse detector (docs/architecture.md, "Telemetry"): rules over each tick's row and each evaluation that
flag a run as collapsed and name the rule (`CollapseDetector`), its levels (`CollapseSettings`, from the
telemetry.collapse_* keys), and the rule names a reason starts with."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

RECALL_FLOOR = 0.1  # the recall collapse rule waits until some evaluation's recall reaches this
REAL_WINS = 0.9     # the d_wins rule: D/real_sign_mean at or above this (D calls nearly every real real)


RULES = ("nonfinite", "sigma", "divergence", "fid", "diversity", "recall", "d_wins", "d_dead", "logit_scale", "class",
         "warmup_blowup")
RULE_KEY = "stability/collapse_rule/"  # + a rule's name: 1.0 in the row of the tick where that rule first fired


def rule_of(reason: Optional[str]) -> Optional[str]:
    """The rule that a detector's reason names (its first word, before the colon); None for None."""
    if reason is None:
        return None
    head = reason.split(":", 1)[0].strip()
    return head if head in RULES else ("nonfinite" if head.startswith("non") else head)


@dataclass(frozen=True)
class CollapseSettings:
    """The collapse detector's levels: each field is the config key telemetry.collapse_<field> (CollapseDetector
    says what each rule does with it; a factor, level or tick count of 0 turns its rule off), except the two
    the loss decides: `loss_gap` (inf for a loss whose gap is unbounded: the divergence and logit rules off) and
    `relativistic` (the loss sees only real - fake logit differences: the absolute-logit rules off), and
    `probe_every` (telemetry.diversity_every: 0 = no probe, so no distance to the data to wait on)."""
    sigma_factor: float = 2.0
    window: int = 50
    loss_gap: float = 50.0
    fid_factor: float = 1.5
    warmup: int = 20
    diversity_factor: float = 0.0
    recall_factor: float = 0.0
    patience: int = 3
    dwins_level: float = 0.0
    dwins_ticks: int = 5
    class_factor: float = 0.0
    class_sep: float = 0.0
    class_after: int = 0
    progress: float = 0.0
    progress_window: int = 0
    recover_scale: float = 0.0
    recover_ticks: int = 5
    logit_scale: float = 0.0
    relativistic: bool = False
    probe_every: int = 0

    NOT_KEYS = ("loss_gap", "relativistic", "probe_every")  # not telemetry.collapse_* keys

    @classmethod
    def from_cfg(cls, tc, loss_gap: float, relativistic: bool = False) -> "CollapseSettings":
        """From the config's telemetry group (`loss_gap`: the trainer's, inf for unbounded losses)."""
        own = {f.name: tc[f"collapse_{f.name}"] for f in fields(cls) if f.name not in cls.NOT_KEYS}
        return cls(loss_gap=loss_gap, relativistic=relativistic, probe_every=int(tc.diversity_every), **own)


class CollapseDetector:
    """Flags training collapse from the per-tick records.

    Signals (any one fires; all but `nonfinite` are ignored during the first `warmup` steps, where
    the losses and weights move fast from their initial values):
      sigma:      D's largest sigma0 over layers exceeds `sigma_factor` x its minimum over the last
                  `window` steps (BigGAN: collapse comes with an explosion of D's top singular values);
      divergence: |loss/G - loss/D| exceeds `loss_gap` (the losses run apart: hinge and logistic
                  losses stay within a few units in healthy training). inf = off, which is what a
                  loss whose gap is unbounded (the Wasserstein critic's) gets;
      nonfinite:  any loss or logit mean is NaN or inf;
      fid:        an evaluation's FID exceeds `fid_factor` x the best FID so far;
      diversity:  `stability/diversity` (bench/train/diversity.py) stays below `diversity_factor` x its best
                  value so far, taken as at most 1 (an early G's noise spreads more than the data), for
                  `patience` measurements in a row (a partial mode collapse: samples of a class become near
                  copies while the losses and sigma0 look healthy);
      recall:     an evaluation's recall stays below `recall_factor` x the best recall so far for `patience`
                  evaluations in a row;
      d_wins:     D wins outright: D/fake_sign_mean (the share of fakes with a positive logit, i.e. called real)
                  <= `dwins_level` while D/real_sign_mean >= REAL_WINS (0.9), at `dwins_ticks` ticks in a row
                  after the warm-up (G gets no useful gradient: the hinge G loss then only pushes every fake
                  the same way), once G has stopped closing in on the data (below). Off with the loss gap (inf: a
                  Wasserstein critic's sign is an arbitrary offset);
      d_dead:     D's sign says nothing: D/real_sign_mean and D/fake_sign_mean both <= `dwins_level` (D rejects
                  everything: a D collapsed to a constant negative logit) or both >= 1 - `dwins_level` (D accepts
                  everything: LeCam at 0.3 held a small BigGAN's D there for all of a run), at `dwins_ticks` ticks
                  in a row after the warm-up (same keys). It does not wait for G to stop closing in on the data
                  (below): a D whose sign says nothing is broken, not ahead, and no healthy run of the collapse
                  suite showed it, while LeCam 0.3's 200-step run showed it from its first tick;
      logit_scale: |D/real_logit_mean| or |D/fake_logit_mean| above `logit_scale` after the warm-up (a hinge loss
                  clamps, so its losses stay calm while D's logits run into the hundreds). Off with the loss gap;
      class:      the class input is ignored: the probe's class accuracy (`stability/class_acc_over_chance`,
                  its samples' accuracy under the domain classifier over chance) <= `class_factor` (where the
                  probe has no classifier: its class separation, `stability/class_sep`, the distance between the
                  per-class mean features over the within-class spread, G's over the data's, <= `class_sep`; the
                  accuracy decides where it exists: a healthy DCGAN at 5x chance accuracy had a separation of 0.12),
                  for `patience` measurements in a row after `class_after` steps, once G has stopped closing in on
                  the data; or an evaluation's eval/class_acc <= `class_factor` x chance at `patience` evaluations
                  in a row after `class_after` steps while eval/FID fell by no more than `progress` over them
                  (update_eval);
      warmup_blowup: the losses or D's logits blew up inside the warm-up (the largest of |loss/G - loss/D| and
                  |D's mean real / fake logit| above `loss_gap`) and did not come back to the healthy range (all
                  <= `recover_scale`) within `recover_ticks` ticks after it: the warm-up forgives a transient,
                  not a blow-up that stays. Off with the loss gap (inf).
    "Once G has stopped closing in on the data": the class and d_wins rules wait while the probe's Frechet
    distance to the data (`stability/probe_fd`, the smallest of the last `patience` measurements) fell by more than
    `progress` (a fraction) over the last `progress_window` steps, and until the run has a measurement that old. A
    G still learning what the images look like has often not begun to use its class yet (on the built-in shapes a
    healthy DCGAN sat at chance for its first ~20k images while its FID fell from 80 to 34, and paused on a plateau
    for ~150 steps before its classes appeared), and D may win outright for a while and lose again (a healthy
    DCGAN with the non-saturating loss, whose G still gets a gradient then; a large G on 500 images, which went on
    to 3x chance class accuracy). A run without probe distances (an older run, no probe): the streaks alone decide.
    A factor (level, tick count) of 0 turns its rule off. The rule that fired first is `rule` (also the first word
    of `reason`); the tick where a rule first fires gets RULE_KEY + rule = 1.0 in its row.
    """

    STATE = ("sigma_hist", "best_fid", "collapse_step", "reason",  # what a checkpoint keeps
             "best_div", "low_div", "best_recall", "low_recall",
             "dwins_run", "ddead_run", "low_class", "probe_fd_hist", "low_class_eval", "blowup", "blowup_ticks", "fired")

    def __init__(self, settings: CollapseSettings = None):
        self.settings = settings = settings or CollapseSettings()
        for f in fields(settings):  # the levels as attributes: self.sigma_factor, self.patience, ...
            setattr(self, f.name, getattr(settings, f.name))
        # the rules that read D's logits as absolute (their sign and size): off where they mean nothing (a WGAN
        # critic; a relativistic loss, which sees only real - fake differences, so the logits drift freely)
        self.logit_rules = math.isfinite(settings.loss_gap) and not settings.relativistic
        self.sigma_hist: list[tuple[int, float]] = []
        self.best_fid = float("inf")
        self.best_div: Optional[tuple[int, float]] = None     # (step, value) of the best diversity so far
        self.low_div: list[tuple[int, float]] = []            # the measurements in a row below the line
        self.best_recall: Optional[tuple[int, float]] = None
        self.low_recall: list[tuple[int, float]] = []
        self.dwins_run: list[int] = []                        # steps of the ticks in a row where D won outright
        self.ddead_run: list[int] = []                        # ... where D rejected everything
        self.low_class: list[int] = []                        # steps of the probe's class measurements in a row below
        self.probe_fd_hist: list[tuple[int, float]] = []     # (step, stability/probe_fd): the last progress_window steps
        self.low_class_eval: list[tuple[int, Optional[float]]] = []  # (step, FID) of the evaluations in a row below
        self.blowup: Optional[tuple[int, float]] = None       # (step, gap) of the warm-up's largest unrecovered blow-up
        self.blowup_ticks = 0                                 # ticks after the warm-up without recovery
        self.fired: list[str] = []                            # every rule that fired, in order (first time each)
        self.new_flags: list[tuple] = []  # (step, rule, reason, first) of each rule's first firing, until take_flags()
        self.collapse_step: Optional[int] = None
        self.reason: Optional[str] = None

    @classmethod
    def from_cfg(cls, tc, loss_gap: float, relativistic: bool = False) -> "CollapseDetector":
        """The detector of the config's telemetry.collapse_* keys (CollapseSettings.from_cfg)."""
        return cls(CollapseSettings.from_cfg(tc, loss_gap, relativistic))

    @property
    def rule(self) -> Optional[str]:
        """The rule of the first flag (None while nothing fired)."""
        return rule_of(self.reason)

    def _trim(self, hist, step):
        while hist and hist[0][0] < step - self.window:
            hist.pop(0)

    def flag(self, step: int, reason: str) -> str:
        """Record a collapse found outside the detector (a run that diverged); the earliest one is kept."""
        if self.collapse_step is None or step < self.collapse_step:
            self.collapse_step, self.reason = step, reason
        self._fired(step, reason)
        return reason

    def _fired(self, step: int, reason: str) -> None:
        rule = rule_of(reason)
        if rule not in self.fired:
            self.fired.append(rule)
            self.new_flags.append((step, rule, reason, reason == self.reason))

    def take_flags(self) -> list[tuple]:
        """[(step, rule, reason, first)] for each rule that fired for the first time since the last call; `first`:
        it is the run's collapse flag (collapse_step). The run's loggers show them (bench.train.records.flags)."""
        out, self.new_flags = self.new_flags, []
        return out

    def _flag(self, step: int, reason: str) -> str:
        if self.collapse_step is None:
            self.collapse_step, self.reason = step, reason
        self._fired(step, reason)
        return reason

    def update(self, row: dict) -> Optional[str]:
        """Feed one metrics row; returns the reason if a collapse signal fires at this tick. The row gets
        RULE_KEY + rule = 1.0 for each rule that fires at this tick for the first time."""
        before = list(self.fired)
        fired = self._update(row)
        for rule in self.fired:
            if rule not in before:
                row[RULE_KEY + rule] = 1.0
        return fired

    def _update(self, row: dict) -> Optional[str]:
        step = int(row["step"])
        watched = [v for k, v in row.items() if k.startswith(("loss/", "D/")) and isinstance(v, float)]
        if any(not math.isfinite(v) for v in watched):
            return self._flag(step, "nonfinite")
        s0 = [v for k, v in row.items() if k.startswith("sigma/D/") and k.endswith("/s0")]
        fired = None
        warm = step > self.warmup
        self._note_distance(step, row)
        if s0:
            top = max(s0)
            self.sigma_hist.append((step, top))
            self._trim(self.sigma_hist, step)
            lo = min(v for _, v in self.sigma_hist)
            if warm and lo > 0 and top > self.sigma_factor * lo:
                fired = self._flag(step, f"sigma: D sigma0 {top:.3g} > {self.sigma_factor} x {lo:.3g}")
        if "loss/G" in row and "loss/D" in row:
            gap = abs(row["loss/G"] - row["loss/D"])
            if warm and gap > self.loss_gap:
                fired = fired or self._flag(step, f"divergence: |loss/G - loss/D| = {gap:.3g} > {self.loss_gap}")
        fired = self._warmup_blowup(step, row, warm) or fired
        fired = self._d_wins(step, row, warm) or fired
        fired = self._logit_scale(step, row, warm) or fired
        div = row.get("stability/diversity")
        if warm and isinstance(div, float) and math.isfinite(div):
            fired = self._sustained_drop("diversity", step, div) or fired  # always run: it keeps its best and run
        fired = self._class_probe(step, row) or fired
        return fired

    def _warmup_blowup(self, step: int, row: dict, warm: bool) -> Optional[str]:
        """A blow-up inside the warm-up (scale > loss_gap) is forgiven once a tick after it is back in the healthy
        range (scale <= recover_scale); scale = the largest of |loss/G - loss/D|, |D/real_logit_mean| and
        |D/fake_logit_mean| (a hinge loss clamps: its losses calm down while D's logits stay in the hundreds)."""
        if self.recover_scale <= 0 or self.recover_ticks <= 0 or not self.logit_rules:
            return None
        parts = [abs(row["loss/G"] - row["loss/D"])] if "loss/G" in row and "loss/D" in row else []
        parts += [abs(row[k]) for k in ("D/real_logit_mean", "D/fake_logit_mean") if isinstance(row.get(k), float)]
        if not parts:
            return None
        scale = max(parts)
        if not warm:
            if scale > self.loss_gap and (self.blowup is None or scale > self.blowup[1]):
                self.blowup = (step, scale)
            return None
        if self.blowup is None:
            return None
        if scale <= self.recover_scale:
            self.blowup, self.blowup_ticks = None, 0  # recovered: the transient is forgiven
            return None
        self.blowup_ticks += 1
        if self.blowup_ticks >= self.recover_ticks:
            at, peak = self.blowup
            return self._flag(step, f"warmup_blowup: loss gap / D logit scale {peak:.3g} at step {at} (warm-up) "
                                    f"not back to <= {self.recover_scale} in {self.blowup_ticks} ticks after it "
                                    f"(now {scale:.3g})")
        return None

    def _d_wins(self, step: int, row: dict, warm: bool) -> Optional[str]:
        """d_wins and d_dead: D's sign means stuck at an extreme for dwins_ticks ticks in a row."""
        fake, real = row.get("D/fake_sign_mean"), row.get("D/real_sign_mean")
        if (self.dwins_level <= 0 or self.dwins_ticks <= 0 or not self.logit_rules or not warm
                or not isinstance(fake, float) or not isinstance(real, float)):
            return None
        fired = None
        low, high = self.dwins_level, 1.0 - self.dwins_level
        rejects, accepts = fake <= low and real <= low, fake >= high and real >= high
        for rule, run, now in (("d_wins", self.dwins_run, fake <= low and real >= REAL_WINS),
                               ("d_dead", self.ddead_run, rejects or accepts)):
            if not now:
                run.clear()
                continue
            run.append(step)
            if len(run) >= self.dwins_ticks:
                wait, note = self._still_learning(step) if rule == "d_wins" else (False, "")
                if wait:
                    continue
                if rule == "d_wins":
                    what = f"D/fake_sign_mean {fake:.3g} <= {low} and D/real_sign_mean {real:.3g} >= {REAL_WINS}"
                elif rejects:
                    what = f"D/fake_sign_mean {fake:.3g} and D/real_sign_mean {real:.3g} <= {low} (D rejects everything)"
                else:
                    what = (f"D/fake_sign_mean {fake:.3g} and D/real_sign_mean {real:.3g} >= {high:.3g} (D accepts "
                            f"everything)")
                fired = fired or self._flag(step, f"{rule}: {what} for {len(run)} ticks in a row (since step {run[0]})"
                                                  f"{note}")
        return fired

    def _logit_scale(self, step: int, row: dict, warm: bool) -> Optional[str]:
        if self.logit_scale <= 0 or not warm or not self.logit_rules:
            return None
        for key in ("D/real_logit_mean", "D/fake_logit_mean"):
            v = row.get(key)
            if isinstance(v, float) and abs(v) > self.logit_scale:
                return self._flag(step, f"logit_scale: |{key}| = {abs(v):.3g} > {self.logit_scale}")
        return None

    def _class_probe(self, step: int, row: dict) -> Optional[str]:
        """The class rule on the diversity probe's measurements (patience in a row after class_after)."""
        acc, sep = row.get("stability/class_acc_over_chance"), row.get("stability/class_sep")
        acc = acc if isinstance(acc, float) and math.isfinite(acc) else None
        sep = sep if isinstance(sep, float) and math.isfinite(sep) else None
        if (acc is None and sep is None) or step <= max(self.warmup, self.class_after):
            return None
        if acc is not None:  # the accuracy decides where the probe has a classifier
            low = self.class_factor > 0 and acc <= self.class_factor
            what = f"class accuracy {acc:.3g} x chance <= {self.class_factor}"
        else:
            low = self.class_sep > 0 and sep <= self.class_sep
            what = f"class separation {sep:.3g} <= {self.class_sep}"
        if not low:
            self.low_class.clear()
            return None
        self.low_class.append(step)
        if len(self.low_class) < self.patience:
            return None
        wait, note = self._still_learning(step)
        if wait:
            return None
        return self._flag(step, f"class: the class input is ignored: {what} for {len(self.low_class)} probe "
                                f"measurements in a row (since step {self.low_class[0]}){note}")

    def _note_distance(self, step: int, row: dict) -> None:
        """Records the tick's probe distance to the data (stability/probe_fd), if it has one; keeps the last
        progress_window steps and the latest measurement before them (all that _still_learning can need)."""
        fd = row.get("stability/probe_fd")
        if not (isinstance(fd, (int, float)) and math.isfinite(fd)):
            return
        hist = self.probe_fd_hist
        hist.append((step, float(fd)))
        old = [i for i, (s, _) in enumerate(hist) if s <= step - self.progress_window]
        if old:
            del hist[:old[-1]]

    def _still_learning(self, step: int) -> tuple[bool, str]:
        """(wait, note): whether the class and d_wins rules wait at `step` because G is still closing in on
        the data (its probe distance fell by more than `progress` over the last progress_window steps) or the run
        is too young to tell; `note`: what a flag adds about the distance. Off (progress 0), or no probe: no wait."""
        if self.progress <= 0 or self.probe_every <= 0:
            return False, ""
        hist = self.probe_fd_hist
        if not hist:  # none measured yet: wait for the first; none by then (a run from before probe_fd): no wait
            return step <= self.probe_every, ""
        before = [h for h in hist if h[0] <= step - self.progress_window]
        if not before:
            return True, ""  # too young to tell
        then = before[-1]
        now = min(f for _, f in hist[-self.patience:])  # one noisy measurement must not end the wait
        if self._closer(then[1], now):
            return True, ""
        return False, (f", while G's distance to the data went only from {then[1]:.3g} (step {then[0]}) to "
                       f"{now:.3g}")

    def _closer(self, before: Optional[float], now: Optional[float]) -> bool:
        """Whether G got more than `progress` closer to the data (unknown distances: no)."""
        return self.progress > 0 and None not in (before, now) and now < (1.0 - self.progress) * before

    def update_eval(self, step: int, metrics: dict, n_classes: int) -> Optional[str]:
        """Feed one evaluation's metrics: its recall (the recall rule) and eval/class_acc (the class rule: at or
        below class_factor x chance, 1 / n_classes, at an evaluation after class_after steps)."""
        fired = self.update_recall(step, metrics.get("eval/recall"))
        acc = metrics.get("eval/class_acc")
        if not (self.class_factor > 0 and n_classes and n_classes > 1 and isinstance(acc, (int, float))
                and math.isfinite(acc) and step > max(self.warmup, self.class_after)):
            return fired
        if acc > self.class_factor / n_classes:
            self.low_class_eval.clear()
            return fired
        fid = metrics.get("eval/FID")
        self.low_class_eval.append((step, float(fid) if isinstance(fid, (int, float)) and math.isfinite(fid) else None))
        fids = [f for _, f in self.low_class_eval]
        if len(fids) < self.patience or self._closer(fids[-self.patience], fids[-1]):
            return fired
        note = "" if self.progress <= 0 or None in (fids[-self.patience], fids[-1]) else (
            f", while its FID went only from {fids[-self.patience]:.3g} to {fids[-1]:.3g}")
        return self._flag(step, f"class: the class input is ignored: eval/class_acc {acc:.3g} <= {self.class_factor}"
                                f" x chance (1/{n_classes}) at {len(fids)} evaluations in a row (since step "
                                f"{self.low_class_eval[0][0]}){note}") or fired

    def _sustained_drop(self, what: str, step: int, value: float) -> Optional[str]:
        """The diversity / recall rule: `value` below factor x the best so far for `patience` values in a row."""
        recall = what == "recall"
        factor = self.recall_factor if recall else self.diversity_factor
        best_key, low_key = ("best_recall", "low_recall") if recall else ("best_div", "low_div")
        best, low = getattr(self, best_key), getattr(self, low_key)
        # diversity above 1 (more spread than the data: an early G's noise) counts as 1, the data's own level
        # recall: armed once the best reaches RECALL_FLOOR (an early 0.05 falling to 0.02 is noise, not collapse)
        armed = best is not None and (not recall or best[1] >= RECALL_FLOOR)
        if factor > 0 and armed and value < factor * (best[1] if recall else min(best[1], 1.0)):
            low.append((step, value))
            if len(low) >= self.patience:
                kind = "evaluations" if recall else "measurements"
                return self._flag(step, f"{what}: fell from {best[1]:.3g} (step {best[0]}) to {value:.3g}, below "
                                        f"{factor} x best for {len(low)} {kind} in a row (since step {low[0][0]})")
            return None
        low.clear()
        if best is None or value > best[1]:
            setattr(self, best_key, (step, value))
        return None

    def update_recall(self, step: int, recall) -> Optional[str]:
        """Feed one evaluation's recall (None or non-finite: ignored); returns the reason if the rule fires."""
        if not isinstance(recall, (int, float)) or not math.isfinite(recall):
            return None
        return self._sustained_drop("recall", step, float(recall))

    def update_fid(self, step: int, fid: float) -> Optional[str]:
        if not math.isfinite(fid):
            return self._flag(step, "nonfinite FID")
        if fid > self.fid_factor * self.best_fid:
            return self._flag(step, f"fid: {fid:.3g} > {self.fid_factor} x best {self.best_fid:.3g}")
        self.best_fid = min(self.best_fid, fid)
        return None

    def state_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.STATE}

    def load_state_dict(self, s: dict) -> None:
        """Restores what state_dict saved; other keys (an older checkpoint's gap_hist) are ignored."""
        for k in self.STATE:
            if k in s:
                setattr(self, k, s[k])
