"""The collapse detector's rules of issue 22 §2 on synthetic tick sequences: d_wins (D wins outright), class (the
class input ignored: the probe's class accuracy / separation, an evaluation's eval/class_acc) and warmup_blowup (a
warm-up blow-up that never recovers); each fires, does not fire, waits for its patience and its warm-up, names
itself, and survives a checkpoint round trip. Also the probe's class-separation measurement."""
import math

import pytest
import torch

from bench.config import compose, validate
from bench.train.diversity import class_separation
from bench.train.collapse import RULE_KEY, RULES, CollapseDetector, CollapseSettings, rule_of


def det(**kw):
    """A detector with only the rule under test on (the older rules' factors out of reach)."""
    base = dict(sigma_factor=1e9, window=50, loss_gap=50.0, fid_factor=1e9, warmup=20)
    base.update(kw)
    return CollapseDetector(CollapseSettings(**base))


def tick(step, ld=1.0, lg=1.0, real_sign=0.7, fake_sign=0.3, real_logit=0.5, fake_logit=-0.5, **extra):
    row = {"step": step, "loss/D": ld, "loss/G": lg, "D/real_sign_mean": real_sign, "D/fake_sign_mean": fake_sign,
           "D/real_logit_mean": real_logit, "D/fake_logit_mean": fake_logit}
    row.update(extra)
    return row


def feed(d, rows):
    """Feeds rows; returns [(step, reason)] of the ticks where something fired."""
    return [(r["step"], why) for r in rows if (why := d.update(r))]


# ---- d_wins -------------------------------------------------------------------------------------------------
def test_d_wins_fires_after_k_ticks_in_a_row():
    d = det(dwins_level=0.02, dwins_ticks=3)
    rows = [tick(s) for s in (10, 20, 30)] + [tick(s, fake_sign=0.0, real_sign=0.97) for s in (40, 50, 60, 70)]
    fired = feed(d, rows)
    assert fired[0][0] == 60 and fired[0][1].startswith("d_wins:")  # 40, 50, 60: the third in a row
    assert d.collapse_step == 60 and d.rule == "d_wins" and "since step 40" in d.reason
    assert rows[5][RULE_KEY + "d_wins"] == 1.0 and RULE_KEY + "d_wins" not in rows[6]  # the first tick only


def test_d_wins_patience_resets_and_healthy_d_does_not_fire():
    d = det(dwins_level=0.02, dwins_ticks=3)
    won = dict(fake_sign=0.01, real_sign=0.99)
    rows = [tick(30, **won), tick(40, **won), tick(50), tick(60, **won), tick(70, **won), tick(80, fake_sign=0.05),
            tick(90, **won), tick(100, **won)]
    assert feed(d, rows) == [] and d.collapse_step is None  # never three in a row
    # a strong but healthy D (a few fakes still pass) and a D that rejects everything, reals too: no flag
    d = det(dwins_level=0.02, dwins_ticks=2)
    assert feed(d, [tick(s, fake_sign=0.05, real_sign=0.99) for s in range(30, 200, 10)]) == []
    assert feed(d, [tick(s, fake_sign=0.0, real_sign=0.5) for s in range(200, 300, 10)]) == []


def test_d_wins_ignores_the_warm_up_and_wasserstein_losses():
    won = dict(fake_sign=0.0, real_sign=1.0)
    d = det(dwins_level=0.02, dwins_ticks=2, warmup=40)
    assert feed(d, [tick(s, **won) for s in (10, 20, 30, 40)]) == []  # all inside the warm-up: not counted
    assert feed(d, [tick(50, **won)]) == [] and d.update(tick(60, **won)).startswith("d_wins")
    d = det(dwins_level=0.02, dwins_ticks=2, loss_gap=math.inf)  # a critic: its sign is an arbitrary offset
    assert feed(d, [tick(s, **won) for s in range(30, 200, 10)]) == []
    d = det(dwins_level=0.0, dwins_ticks=2)  # level 0 = off
    assert feed(d, [tick(s, **won) for s in range(30, 200, 10)]) == []


def test_d_wins_and_d_dead_wait_while_g_still_closes_in_on_the_data():
    """D may win outright for a while in a healthy run and lose again. The collapse suite's held-out seed 1: its
    DCGAN with the non-saturating loss (fp32) had D reject every fake for 7 ticks from step 970 while the probe's
    distance to the data fell from 29.3 (step 700) to 22.5; a large G on 500 images had D win from step 30 to
    step 350 while the distance fell from 216 to 105, and ended at 3x chance class accuracy. With the probe on
    (probe_every > 0) d_wins waits like the class rule: while the distance fell by more than `progress` over
    `progress_window` steps, and until a measurement that old exists."""
    won = dict(fake_sign=0.0, real_sign=1.0)
    gate = dict(dwins_level=0.02, dwins_ticks=5, progress=0.1, progress_window=300, probe_every=25, patience=3)
    fd = {700: 29.3, 730: 28.6, 750: 27.8, 780: 27.7, 800: 26.5, 830: 26.2, 850: 25.8, 880: 26.1, 900: 24.8,
          930: 24.7, 950: 23.9, 980: 23.4, 1000: 22.9, 1030: 22.5}
    rows = [tick(s, **(won if s >= 970 else {}), **({"stability/probe_fd": fd[s]} if s in fd else {}))
            for s in range(700, 1040, 10)]
    assert feed(det(**gate), rows) == []
    ungated = det(**{**gate, "probe_every": 0})  # no probe: the streak alone decides, as before
    assert feed(ungated, [dict(r) for r in rows])[0][0] == 1010 and ungated.rule == "d_wins"
    # a young run waits until it has a measurement progress_window steps old, then fires if the distance stalled
    d = det(**gate)
    stalled = [tick(s, **won, **({"stability/probe_fd": 150.0 - s / 1000} if s % 50 == 0 else {}))
               for s in range(30, 500, 10)]
    fired = feed(d, stalled)
    assert fired[0][0] == 350 and d.rule == "d_wins" and "since step 30" in d.reason  # 350 - 300 = the first, 50
    assert "distance to the data went only from 150 (step 50)" in d.reason
    # before the probe's first measurement (probe_every steps) the rule waits too
    d = det(**{**gate, "probe_every": 100, "progress_window": 100})
    assert feed(d, [tick(s, **won) for s in range(30, 110, 10)]) == [] and d.collapse_step is None
    fired = feed(d, [tick(s, **won, **{"stability/probe_fd": 80.0}) for s in range(110, 260, 10)])
    assert fired and fired[0][0] == 210 and d.rule == "d_wins"  # the first distance at 110, one 100 steps old at 210
    # d_dead does not wait: a D whose sign says nothing is broken, not ahead (LeCam 0.3's 200-step run, whose
    # distance fell from 127 to 104 while D accepted everything from its first tick)
    d = det(**gate)
    accepts = dict(fake_sign=1.0, real_sign=1.0)
    fired = feed(d, [tick(s, **accepts, **{"stability/probe_fd": 127.0 - s / 8}) for s in range(30, 210, 10)])
    assert fired[0][0] == 70 and d.rule == "d_dead"


def test_d_dead_fires_when_d_rejects_everything():
    d = det(dwins_level=0.02, dwins_ticks=3)
    dead = dict(fake_sign=0.0, real_sign=0.01, real_logit=-0.8, fake_logit=-0.8)  # the fp32 demo's end
    rows = [tick(30), tick(40, **dead), tick(50, **dead), tick(60, real_sign=0.2, fake_sign=0.0),
            tick(70, **dead), tick(80, **dead), tick(90, **dead)]
    fired = feed(d, rows)
    assert fired == [(90, d.reason)] and d.rule == "d_dead" and "since step 70" in d.reason
    assert rows[-1][RULE_KEY + "d_dead"] == 1.0
    d = det(dwins_level=0.02, dwins_ticks=2, loss_gap=math.inf)  # off for a critic
    assert feed(d, [tick(s, **dead) for s in range(30, 100, 10)]) == []


def test_d_dead_fires_when_d_accepts_everything():
    """LeCam at 0.3 on a small BigGAN (the collapse suite's held-out lecam03, seed 1): D called every real and every
    fake real for the whole run, D loss ~11 and G loss ~-10 (a gap under 50), and the run ended collapsed."""
    d = det(dwins_level=0.02, dwins_ticks=3)
    accepts = dict(fake_sign=1.0, real_sign=1.0, real_logit=10.0, fake_logit=11.0)
    fired = feed(d, [tick(30, **accepts), tick(40, **accepts), tick(50, real_sign=0.97, fake_sign=1.0),
                     tick(60, **accepts), tick(70, **accepts), tick(80, **accepts)])
    assert fired[0][0] == 80 and d.rule == "d_dead" and "D accepts everything" in d.reason
    assert "since step 60" in d.reason
    # a D that passes most fakes but still tells reals apart is not dead
    d = det(dwins_level=0.02, dwins_ticks=2)
    assert feed(d, [tick(s, fake_sign=0.99, real_sign=0.95) for s in range(30, 200, 10)]) == []


def test_logit_scale_fires_after_the_warm_up_only():
    d = det(logit_scale=50.0)
    assert feed(d, [tick(10, real_logit=500.0), tick(20, real_logit=-300.0)]) == []  # warm-up
    assert feed(d, [tick(30, real_logit=45.0, fake_logit=-49.0)]) == []
    assert d.update(tick(40, fake_logit=-51.0)).startswith("logit_scale") and d.collapse_step == 40
    for off in (det(logit_scale=0.0), det(logit_scale=50.0, loss_gap=math.inf)):
        assert feed(off, [tick(s, real_logit=900.0) for s in range(30, 100, 10)]) == []


# ---- class input ignored --------------------------------------------------------------------------------------
def probe(step, acc_x=None, sep=None, fd=None):
    extra = {}
    if acc_x is not None:
        extra["stability/class_acc_over_chance"] = acc_x
    if sep is not None:
        extra["stability/class_sep"] = sep
    if fd is not None:
        extra["stability/probe_fd"] = fd
    return tick(step, **extra)


def test_class_rule_on_the_probe_fires_after_patience_and_class_after():
    d = det(class_factor=1.5, class_sep=0.25, class_after=100, patience=2)
    rows = [probe(50, acc_x=1.0), probe(100, acc_x=1.0),  # not yet looked at (class_after)
            probe(150, acc_x=1.2), probe(200, acc_x=1.1)]
    fired = feed(d, rows)
    assert fired == [(200, d.reason)] and d.rule == "class" and "since step 150" in d.reason
    assert rows[3][RULE_KEY + "class"] == 1.0
    # without a classifier the separation decides; with one, the accuracy does (a healthy DCGAN of the suite had
    # 5x chance accuracy at a separation of 0.12: dcgan_sn_r1, fp32, seed 1, flagged at step 700 when both counted)
    d = det(class_factor=1.5, class_sep=0.25, class_after=0, patience=2)
    fired = feed(d, [probe(s, sep=0.1) for s in (50, 100)])
    assert fired and "separation" in fired[0][1]
    d = det(class_factor=1.5, class_sep=0.25, class_after=0, patience=2)
    assert feed(d, [probe(s, acc_x=5.0, sep=0.1) for s in (50, 100, 150)]) == []


def test_class_rule_does_not_fire_on_a_g_that_follows_its_class():
    d = det(class_factor=1.5, class_sep=0.25, class_after=100, patience=2)
    rows = [probe(150, acc_x=1.4), probe(200, acc_x=3.0, sep=0.8), probe(250, acc_x=1.4), probe(300, acc_x=6.0)]
    assert feed(d, rows) == [] and d.collapse_step is None  # never two low measurements in a row
    d = det(class_factor=0.0, class_sep=0.0, patience=1)  # both off
    assert feed(d, [probe(s, acc_x=0.5, sep=0.0) for s in range(100, 400, 50)]) == []


# A healthy run of the collapse suite (nosn_dcgan, fp32, shapes v3): (step, class accuracy over chance, probe_fd).
# Its G ignored the class for 350 steps, with a plateau of its distance to the data at steps 180-350, then learnt
# the classes (final class_acc 0.75, FID 10.9). A rule judged over `patience` measurements flagged it at step 200.
HEALTHY_LATE = [(30, 1.06, 158.4), (50, 0.97, 139.9), (80, 1.06, 87.7), (100, 0.78, 91.0), (130, 0.81, 85.5),
                (150, 1.03, 76.9), (180, 1.03, 73.5), (200, 0.72, 73.6), (230, 0.88, 82.1), (250, 1.0, 70.1),
                (280, 0.66, 61.7), (300, 0.81, 60.5), (330, 0.94, 67.9), (350, 1.25, 71.9), (380, 1.12, 54.8),
                (400, 1.31, 47.9), (430, 1.78, 42.5), (450, 1.84, 40.5), (480, 2.19, 36.3), (500, 2.53, 31.9)]


def test_class_rule_waits_while_g_still_closes_in_on_the_data():
    """A healthy G often ignores its class until it has learnt what the images look like: the probe's class rule
    holds while its distance to the data fell by more than `progress` over the last progress_window steps (and
    until the run has a measurement that old), and fires once the distance stalls."""
    d = det(class_factor=1.5, class_after=100, patience=3, progress=0.1, progress_window=300, probe_every=25)
    assert feed(d, [probe(s, acc_x=a, fd=fd) for s, a, fd in HEALTHY_LATE]) == [] and d.collapse_step is None
    d = det(class_factor=1.5, class_after=100, patience=3, progress=0.1, progress_window=50, probe_every=25)
    assert feed(d, [probe(s, acc_x=a, fd=fd) for s, a, fd in HEALTHY_LATE])[0][0] == 200  # a window too short
    # a G that stalls: at chance, its distance flat from step 100 on; flagged once a measurement 300 steps old exists
    d = det(class_factor=1.5, class_after=100, patience=3, progress=0.1, progress_window=300, probe_every=25)
    stalled = [probe(s, acc_x=1.0, fd=150.0 if s < 100 else 80.0 - s / 100) for s in range(25, 601, 25)]
    fired = feed(d, stalled)
    assert fired[0] == (400, d.reason) and d.rule == "class" and "since step 125" in d.reason
    assert "from 79 (step 100) to 76" in d.reason  # the latest measurement at least 300 steps old: step 100
    # the history kept is only what a later call can need: the window and the one measurement before it
    assert [s for s, _ in d.probe_fd_hist] == list(range(300, 601, 25))
    # one noisy measurement does not end the wait: the smallest of the last `patience` distances counts (another
    # healthy run of the suite, dcgan_sn_r1 bf16: 46.3 at step 600 between 37.8 and 37.8, against 50.1 at step 300)
    d = det(class_factor=1.5, class_sep=0.25, class_after=100, patience=3, progress=0.1, progress_window=300, probe_every=25)
    spiky = [(s, 1.0, 150.0 - s / 10) for s in range(50, 300, 50)] + [(300, 1.0, 50.1), (550, 1.44, 39.0),
                                                                        (580, 1.4, 37.8), (600, 1.45, 46.3)]
    assert feed(d, [probe(s, acc_x=a, fd=fd) for s, a, fd in spiky]) == []
    # without the probe's distance (an older run, or the key missing) the streak alone decides, as before
    d = det(class_factor=1.5, class_after=0, patience=2, progress=0.1, progress_window=300, probe_every=25)
    assert feed(d, [probe(100, acc_x=1.0), probe(200, acc_x=1.0)])[0][0] == 200
    # progress 0: off, the streak alone decides
    d = det(class_factor=1.5, class_after=0, patience=2, progress=0.0, progress_window=300, probe_every=25)
    assert feed(d, [probe(100, acc_x=1.0, fd=80.0), probe(200, acc_x=1.0, fd=40.0)])[0][0] == 200


def test_class_rule_on_evaluations_waits_for_patience_and_a_stalled_fid():
    d = det(class_factor=1.5, class_after=0, patience=2, progress=0.1)
    assert d.update_eval(100, {"eval/class_acc": 0.1, "eval/FID": 80.0}, 10) is None  # one evaluation: not yet
    assert d.update_eval(200, {"eval/class_acc": 0.1, "eval/FID": 40.0}, 10) is None  # FID halved: still learning
    assert d.update_eval(300, {"eval/class_acc": 0.3, "eval/FID": 30.0}, 10) is None  # off chance: streak reset
    assert d.low_class_eval == []
    assert d.update_eval(400, {"eval/class_acc": 0.12, "eval/FID": 31.0}, 10) is None
    why = d.update_eval(500, {"eval/class_acc": 0.11, "eval/FID": 30.5}, 10)
    assert why.startswith("class:") and "2 evaluations in a row (since step 400)" in why and d.collapse_step == 500


def test_class_rule_on_an_evaluation():
    d = det(class_factor=1.5, class_after=100, recall_factor=0.6, patience=1)
    # ten classes: chance 0.1, the line 0.15; an evaluation inside class_after is not judged
    assert d.update_eval(100, {"eval/class_acc": 0.1, "eval/recall": 0.5}, 10) is None
    assert d.update_eval(200, {"eval/class_acc": 0.16, "eval/recall": 0.5}, 10) is None
    why = d.update_eval(300, {"eval/class_acc": 0.15}, 10)
    assert why.startswith("class:") and d.collapse_step == 300 and "1/10" in why
    d = det(class_factor=1.5, patience=1)
    assert d.update_eval(300, {"eval/class_acc": float("nan")}, 10) is None
    assert d.update_eval(300, {"eval/FID": 3.0}, 10) is None  # no class_acc (another extractor)
    assert d.update_eval(300, {"eval/class_acc": 0.8}, 2) is None  # 2 classes: chance 0.5, the line 0.75
    assert d.update_eval(400, {"eval/class_acc": 0.7}, 2).startswith("class")


def test_update_eval_keeps_the_recall_rule():
    d = det(recall_factor=0.6, patience=2)
    for step, recall in ((100, 0.5), (200, 0.2)):
        assert d.update_eval(step, {"eval/recall": recall}, 10) is None
    assert d.update_eval(300, {"eval/recall": 0.1}, 10).startswith("recall") and d.rule == "recall"


def test_class_separation_of_features():
    g = torch.Generator().manual_seed(0)
    spread = {c: torch.randn(32, 8, generator=g) for c in range(5)}
    apart = {c: f + 10.0 * torch.eye(8)[c] for c, f in spread.items()}
    assert class_separation(apart) > 2.0  # class means ~14 apart, within-class spread ~4
    assert class_separation(spread) < 0.25 * class_separation(apart)  # same distribution: means only noise apart
    assert math.isnan(class_separation({0: spread[0]}))  # one class: nothing to separate
    same = {c: torch.ones(4, 8) for c in range(3)}
    assert math.isnan(class_separation(same))  # no spread at all


# ---- blow-up in the warm-up -------------------------------------------------------------------------------------
def test_warmup_blowup_that_never_recovers_is_flagged():
    d = det(recover_scale=10.0, recover_ticks=3)
    # the bf16 demo's shape: hinge losses calm after step 10, D's real logit in the hundreds
    rows = [tick(10, ld=713.0, lg=-403.0, real_logit=564.0), tick(20, ld=0.7, lg=1.3, real_logit=95.0)]
    rows += [tick(s, ld=0.5, lg=1.5, real_logit=200.0 + s) for s in (30, 40, 50, 60)]
    fired = feed(d, rows)
    assert fired[0][0] == 50 and d.rule == "warmup_blowup" and "step 10" in d.reason  # 30, 40, 50 unrecovered
    assert rows[4][RULE_KEY + "warmup_blowup"] == 1.0


def test_warmup_blowup_that_recovers_is_forgiven():
    d = det(recover_scale=10.0, recover_ticks=3)
    rows = [tick(10, ld=700.0, lg=-400.0), tick(20, real_logit=40.0), tick(30, real_logit=30.0),
            tick(40, real_logit=3.0)]  # back in range at the second tick after the warm-up
    rows += [tick(s, real_logit=20.0) for s in range(50, 200, 10)]  # large later, but the blow-up is forgiven
    assert feed(d, rows) == [] and d.blowup is None
    # no blow-up in the warm-up: large logits later are not this rule's business
    d = det(recover_scale=10.0, recover_ticks=1)
    assert feed(d, [tick(10), tick(20)] + [tick(s, real_logit=40.0) for s in range(30, 100, 10)]) == []
    # off: scale 0, or an unbounded (Wasserstein) loss
    for d in (det(recover_scale=0.0), det(recover_scale=10.0, loss_gap=math.inf)):
        assert feed(d, [tick(10, ld=700.0, lg=-400.0)] + [tick(s, real_logit=90.0) for s in range(20, 100, 10)]) == []


def test_a_transient_after_the_warm_up_is_the_divergence_rule():
    d = det(recover_scale=10.0, recover_ticks=3)
    assert feed(d, [tick(10), tick(20)]) == []
    assert d.update(tick(30, ld=700.0, lg=-400.0)).startswith("divergence")


# ---- bookkeeping ----------------------------------------------------------------------------------------------
def test_rule_names():
    assert rule_of(None) is None and rule_of("nonfinite") == "nonfinite"
    assert rule_of("non-finite: training diverged (3 skipped updates)") == "nonfinite"
    assert rule_of("nonfinite FID") == "nonfinite"
    assert {"d_wins", "d_dead", "logit_scale", "class", "warmup_blowup"} <= set(RULES)
    d = det(dwins_level=0.02, dwins_ticks=1, recover_scale=10.0, recover_ticks=1)
    d.update(tick(10, ld=700.0, lg=-400.0))
    d.update(tick(30, fake_sign=0.0, real_sign=1.0, real_logit=80.0))  # both fire at one tick: both recorded
    assert d.rule == "warmup_blowup" and d.fired == ["warmup_blowup", "d_wins"]


def test_new_rule_state_round_trips_through_a_checkpoint(tmp_path):
    d = det(dwins_level=0.02, dwins_ticks=4, class_factor=1.5, class_after=0, patience=3, recover_scale=10.0,
            recover_ticks=5)
    feed(d, [tick(10, ld=700.0, lg=-400.0), tick(30, fake_sign=0.0, real_sign=1.0, real_logit=80.0,
                                                    **{"stability/class_acc_over_chance": 1.0}),
             tick(40, fake_sign=0.0, real_sign=1.0, real_logit=80.0, **{"stability/class_acc_over_chance": 1.0})])
    assert d.collapse_step is None and d.dwins_run == [30, 40] and d.low_class == [30, 40] and d.blowup_ticks == 2
    torch.save({"collapse": d.state_dict()}, tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)["collapse"]
    again = det(dwins_level=0.02, dwins_ticks=4, class_factor=1.5, class_after=0, patience=3, recover_scale=10.0,
                recover_ticks=5)
    again.load_state_dict(state)
    assert again.state_dict() == d.state_dict()
    # the resumed detector goes on counting where the first stopped: the third tick fires the class rule and the
    # blow-up rule's third unrecovered tick is still short of five
    nxt = tick(50, fake_sign=0.0, real_sign=1.0, real_logit=80.0, **{"stability/class_acc_over_chance": 1.0})
    assert again.update(dict(nxt)).startswith("class") and again.fired == ["class"]
    assert d.update(dict(nxt)) == again.reason  # the same decision as the detector that never stopped
    # an older checkpoint without the new keys loads with the new rules' state empty
    old = {k: v for k, v in state.items()
           if k not in ("dwins_run", "ddead_run", "low_class", "blowup", "blowup_ticks", "fired")}
    fresh = det(dwins_level=0.02, dwins_ticks=4)
    fresh.load_state_dict(old)
    assert fresh.dwins_run == [] and fresh.blowup is None and fresh.fired == []


def test_config_defaults_and_checks():
    cfg = compose([])
    tc = cfg.telemetry
    assert (tc.collapse_dwins_level, tc.collapse_dwins_ticks, tc.collapse_class_factor, tc.collapse_class_sep,
            tc.collapse_class_after, tc.collapse_recover_scale, tc.collapse_recover_ticks, tc.collapse_logit_scale) == (
                0.02, 5, 1.5, 0.25, 100, 10.0, 5, 50.0)
    d = CollapseDetector.from_cfg(tc, 50.0)
    assert (d.dwins_level, d.dwins_ticks, d.class_factor, d.class_sep, d.class_after, d.recover_scale,
            d.recover_ticks, d.logit_scale) == (0.02, 5, 1.5, 0.25, 100, 10.0, 5, 50.0)
    for bad in ("telemetry.collapse_dwins_level=0.7", "telemetry.collapse_dwins_ticks=-1",
                "telemetry.collapse_class_factor=-1", "telemetry.collapse_recover_scale=-2",
                "telemetry.collapse_class_sep=true", "telemetry.collapse_logit_scale=-1"):
        with pytest.raises(Exception, match=bad.split("=")[0].replace(".", r"\.")):
            validate(compose([bad]))


def test_a_relativistic_loss_turns_the_absolute_logit_rules_off():
    """loss=rpgan sees only real - fake logit differences, so D's logits drift by any constant in a healthy run:
    all negative (d_dead's signs) and far from zero (logit_scale) mean nothing there. The rules that read the
    logits' sign and size are off; the same ticks flag a non-relativistic run."""
    tc = validate(compose(["loss=rpgan"])).telemetry
    drifted = [tick(s, real_sign=0.0, fake_sign=0.0, real_logit=-80.0, fake_logit=-83.0) for s in range(30, 400, 10)]
    rel = CollapseDetector.from_cfg(tc, 50.0, relativistic=True)
    assert feed(rel, [dict(r) for r in drifted]) == [] and rel.collapse_step is None
    plain = CollapseDetector.from_cfg(tc, 50.0)
    fired = feed(plain, [dict(r) for r in drifted])
    assert fired and rule_of(fired[0][1]) in ("logit_scale", "d_dead")
