"""The diversity signal (bench/train/diversity.py) and the collapse detector's diversity and recall rules."""
import itertools
import json
import math
import time

import pytest
import torch

from bench.cli import main
from bench.train.diversity import (CLASS_ACC, CLASS_ACC_X, CLASS_SEP, DIVERSITY, DIVERSITY_MIN, PROBE_FD, DiversityProbe,
                                    diversity_ratios, pairwise_mean)
from bench.train.collapse import CollapseDetector, CollapseSettings
from conftest import TINY


def _mean_distance(x: torch.Tensor) -> float:
    """The mean over unordered pairs, written out."""
    rows = x.double().tolist()
    d = [math.dist(a, b) for a, b in itertools.combinations(rows, 2)]
    return sum(d) / len(d)


def test_pairwise_mean_against_an_independent_computation():
    x = torch.randn(17, 5, generator=torch.Generator().manual_seed(0))
    assert pairwise_mean(x) == pytest.approx(_mean_distance(x), rel=1e-12)
    assert math.isnan(pairwise_mean(x[:1]))


def test_ratio_is_zero_for_copies_and_about_one_for_samples_like_the_reals():
    g = torch.Generator().manual_seed(1)
    real = {c: torch.randn(400, 16, generator=g) * (c + 1) + 3 * c for c in range(3)}
    like = {c: torch.randn(400, 16, generator=g) * (c + 1) + 3 * c for c in range(3)}
    copies = {c: real[c][:1].repeat(400, 1) for c in range(3)}
    half = {0: real[0] * 0.5, 1: like[1], 2: like[2]}  # class 0 at half the spread
    assert diversity_ratios(copies, real) == {0: 0.0, 1: 0.0, 2: 0.0}
    for c, v in diversity_ratios(like, real).items():
        assert v == pytest.approx(1.0, abs=0.03), c
    r = diversity_ratios(half, real)
    assert r[0] == pytest.approx(0.5, rel=1e-9) and r[1] == pytest.approx(1.0, abs=0.03)
    # a class without two real samples (or with no real spread) is left out
    assert diversity_ratios({0: like[0], 5: like[1]}, {0: real[0], 5: real[1][:1]}).keys() == {0}
    assert diversity_ratios({0: like[0]}, {0: torch.zeros(4, 16)}) == {}


def test_detector_flags_a_sustained_diversity_drop_with_its_reason():
    det = CollapseDetector(CollapseSettings(warmup=0, diversity_factor=0.5, patience=2))
    for step, v in ((100, 0.6), (200, 0.8), (300, 0.75), (400, 0.45)):  # one low value: not sustained
        assert det.update({"step": step, DIVERSITY: v}) is None
    assert det.update({"step": 500, DIVERSITY: 0.7}) is None  # back above 0.4: the count restarts
    assert det.update({"step": 600, DIVERSITY: 0.3}) is None
    reason = det.update({"step": 700, DIVERSITY: 0.2})
    assert reason.startswith("diversity: fell from 0.8 (step 200) to 0.2") and "since step 600" in reason
    assert det.collapse_step == 700 and det.reason == reason
    # the state survives a checkpoint
    again = CollapseDetector(CollapseSettings(warmup=0, diversity_factor=0.5, patience=2))
    again.load_state_dict(det.state_dict())
    assert again.state_dict() == det.state_dict() and again.best_div == (200, 0.8)


def test_detector_does_not_flag_noise_or_a_rule_that_is_off():
    g = torch.Generator().manual_seed(3)
    det = CollapseDetector(CollapseSettings(warmup=0, diversity_factor=0.5, recall_factor=0.6, patience=2))
    off = CollapseDetector(CollapseSettings(warmup=0))  # the factors' defaults: off
    for i in range(1, 60):
        noisy = 0.6 + 0.3 * float(torch.rand((), generator=g))  # healthy, noisy (0.6..0.9): never half the best
        recall = 0.45 + 0.05 * float(torch.rand((), generator=g))
        assert det.update({"step": 10 * i, DIVERSITY: noisy}) is None
        assert det.update_recall(10 * i, recall) is None
        assert off.update({"step": 10 * i, DIVERSITY: 0.01}) is None and off.update_recall(10 * i, 0.01) is None
    assert det.collapse_step is None and off.collapse_step is None
    # within the warm-up a diversity drop is not judged; None and non-finite recall are ignored
    warm = CollapseDetector(CollapseSettings(warmup=500, diversity_factor=0.5, recall_factor=0.6, patience=1))
    warm.update({"step": 100, DIVERSITY: 0.9})
    assert warm.update({"step": 200, DIVERSITY: 0.1}) is None
    assert warm.update_recall(100, None) is None and warm.update_recall(100, float("nan")) is None


def test_diversity_above_one_counts_as_one():
    """An early G's noise spreads more than the data (ratio 3.9): settling near the data's level is not a drop."""
    det = CollapseDetector(CollapseSettings(warmup=0, diversity_factor=0.5, patience=2))
    for step, v in ((25, 2.1), (50, 3.9), (75, 3.0), (100, 1.6), (125, 0.9), (150, 0.7), (175, 0.6)):
        assert det.update({"step": step, DIVERSITY: v}) is None
    assert det.update({"step": 200, DIVERSITY: 0.45}) is None
    assert det.update({"step": 225, DIVERSITY: 0.4}).startswith("diversity: fell from 3.9 (step 50) to 0.4")


def test_recall_rule_waits_for_a_recall_worth_losing():
    """Early recall is tiny and noisy: 0.05 falling to 0.01 is not a collapse (the rule arms at RECALL_FLOOR)."""
    det = CollapseDetector(CollapseSettings(recall_factor=0.6, patience=2))
    for step, r in ((100, 0.05), (200, 0.01), (300, 0.01), (400, 0.02)):
        assert det.update_recall(step, r) is None
    assert det.update_recall(500, 0.3) is None  # armed from here
    assert det.update_recall(600, 0.1) is None
    assert det.update_recall(700, 0.1).startswith("recall: fell from 0.3 (step 500) to 0.1")


def test_detector_flags_a_sustained_recall_drop():
    det = CollapseDetector(CollapseSettings(recall_factor=0.6, patience=2))
    for step, r in ((300, 0.40), (600, 0.47), (900, 0.30), (1200, 0.44)):
        assert det.update_recall(step, r) is None  # 0.30 > 0.6 x 0.47: not a drop
    assert det.update_recall(1350, 0.25) is None  # one low evaluation
    reason = det.update_recall(1500, 0.21)
    assert reason == ("recall: fell from 0.47 (step 600) to 0.21, below 0.6 x best for 2 evaluations in a row "
                      "(since step 1350)")
    assert det.collapse_step == 1500


def test_measure_identical_samples_is_zero(tiny_shards, tmp_path):
    """The probe end to end with a real classifier: a generator that ignores z gives diversity 0."""
    from bench.eval.classifier import ClassifierSettings, train_classifier

    clf = tmp_path / "clf.pt"
    train_classifier(tiny_shards, out=clf, settings=ClassifierSettings(epochs=1, max_seconds=20, width=8,
                                                                         holdout=0.0), progress=False)

    class Constant(torch.nn.Module):
        z_dim = 4

        def __init__(self, vary: bool):
            super().__init__()
            self.vary, self.w = vary, torch.nn.Parameter(torch.zeros(()))

        def forward(self, z, y):
            base = (y.float() / 10 - 0.5)[:, None, None, None].expand(-1, 3, 32, 32)
            noise = z[:, :1, None, None].expand(-1, 3, 32, 32) * 0.5 if self.vary else 0.0
            return (base + noise + self.w).clamp(-1, 1)

    probe = DiversityProbe(10, 6, tiny_shards, 32, 10, torch.device("cpu"), classifier_path=str(clf))
    G = Constant(vary=False).train()
    out = probe.measure(G)
    assert out[DIVERSITY] == 0.0 and out[DIVERSITY_MIN] == 0.0 and G.training  # train mode restored
    varied = probe.measure(Constant(vary=True))
    assert varied[DIVERSITY] > 0.0 and varied[DIVERSITY_MIN] <= varied[DIVERSITY]
    # the class rule's inputs, and the distance to the data that holds it back while it falls
    assert {CLASS_ACC_X, PROBE_FD} <= set(varied) and varied[PROBE_FD] > 0.0
    # one class (unlabelled data, an unconditional G): no class input to ignore, so no class numbers
    one = DiversityProbe(10, 6, tiny_shards, 32, 1, torch.device("cpu"), classifier_path=str(clf))
    alone = one.measure(Constant(vary=True))
    assert DIVERSITY in alone and PROBE_FD in alone and not {CLASS_ACC, CLASS_ACC_X, CLASS_SEP} & set(alone)
    missing = DiversityProbe(10, 6, tiny_shards, 32, 10, torch.device("cpu"), classifier_path=str(tmp_path / "no.pt"))
    assert missing.measure(G) == {} and missing.off and not missing.due(10)


def test_training_records_diversity(tiny_shards, tmp_path):
    from bench.eval.classifier import ClassifierSettings, train_classifier

    clf = tmp_path / "clf.pt"
    train_classifier(tiny_shards, out=clf, settings=ClassifierSettings(epochs=1, max_seconds=20, width=8,
                                                                         holdout=0.0), progress=False)
    run_dir = tmp_path / "run"
    rc = main(["train", f"data.shards={tiny_shards}", f"run.dir={run_dir}", *TINY, "train.steps=4",
               "train.batch_size=4", "train.tick_every=2", "telemetry.diversity_every=2",
               "telemetry.diversity_samples=4", f"eval.classifier_path={clf}"])
    assert rc == 0
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "step" in r]
    vals = [r[DIVERSITY] for r in rows if DIVERSITY in r]
    assert len(vals) == 2 and all(math.isfinite(v) and v >= 0 for v in vals)
    assert all(r[DIVERSITY_MIN] <= r[DIVERSITY] for r in rows if DIVERSITY in r)


@pytest.mark.parametrize("override,needle", [
    ("telemetry.diversity_every=-1", "telemetry.diversity_every"),
    ("telemetry.diversity_samples=1", "telemetry.diversity_samples"),
    ("telemetry.collapse_diversity_factor=1.5", "telemetry.collapse_diversity_factor"),
    ("telemetry.collapse_recall_factor=-0.1", "telemetry.collapse_recall_factor"),
    ("telemetry.collapse_patience=0", "telemetry.collapse_patience"),
])
def test_bad_diversity_keys_are_one_line_errors(tmp_path, capsys, override, needle):
    assert main(["train", override, f"run.dir={tmp_path / 'x'}"]) == 2
    err = capsys.readouterr().err
    assert needle in err and len(err.strip().splitlines()) == 1, err


def test_real_images_are_kept_per_class_in_the_shards_order_and_reading_stops_when_all_are_full(tiny_shards):
    """The probe's real side: each class's first images in load_images' order, at most `per_class` of them (a
    frequent class cannot crowd out the rest), and no more reading once every class is full."""
    from bench.eval.classifier import load_images
    from bench.train.diversity import real_per_class

    x, y = load_images(tiny_shards, 32, seed=0)
    kept, read = real_per_class(tiny_shards, 32, list(range(10)), per_class=3, limit=10_000)
    assert sorted(kept) == list(range(10)) and read < len(y)  # stopped before the end (240 images)
    for c in range(10):
        assert torch.equal(kept[c], x[y == c][:3]), c
    few, read = real_per_class(tiny_shards, 32, [0, 1], per_class=500, limit=100)
    assert read >= 100 and read < len(y) and all(torch.equal(few[c], x[:read][y[:read] == c]) for c in (0, 1))


def test_the_measurement_is_kept_out_of_the_ticks_img_per_s(tiny_shards, tmp_path, monkeypatch):
    """Diversity is telemetry, not training: a measurement made 5 s longer shows in the run's wall time but not
    in the tick's img/s (whose seconds are images / img/s)."""
    from bench.eval.classifier import ClassifierSettings, train_classifier

    clf = tmp_path / "clf.pt"
    train_classifier(tiny_shards, out=clf, settings=ClassifierSettings(epochs=1, max_seconds=20, width=8,
                                                                         holdout=0.0), progress=False)
    real_measure = DiversityProbe.measure

    def slow_measure(self, G):
        time.sleep(5)
        return real_measure(self, G)

    monkeypatch.setattr(DiversityProbe, "measure", slow_measure)
    run_dir = tmp_path / "run"
    assert main(["train", f"data.shards={tiny_shards}", f"run.dir={run_dir}", *TINY, "train.steps=4",
                 "train.batch_size=4", "train.tick_every=2", "telemetry.diversity_every=4", "telemetry.mfu=false",
                 "telemetry.diversity_samples=4", "train.sample_every=0", f"eval.classifier_path={clf}"]) == 0
    first, second = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][:2]
    assert DIVERSITY in second and DIVERSITY not in first
    wall = second["time/wall_s"] - first["time/wall_s"]
    tick_s = 2 * 4 / second["throughput/img_per_s"]
    assert wall >= 5 and tick_s < wall - 4.5, (wall, tick_s)
