"""Stability toolkit, harness side: label tricks, feature matching, historical averaging, collapse
detection, non-finite handling, and the regulariser switches end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bench import objectives as O
from bench.cli import main
from bench.telemetry import CollapseDetector
from conftest import TINY


def bce(logit, target):  # written out: -(t log s + (1-t) log(1-s))
    s = 1 / (1 + math.exp(-logit))
    return -(target * math.log(s) + (1 - target) * math.log(1 - s))


def test_one_sided_label_smoothing_and_noisy_labels():
    real, fake = torch.tensor([1.5, -0.5]), torch.tensor([0.3, -2.0])
    got = O.d_logistic_targets(real, fake, real_target=0.9).item()
    want = (bce(1.5, 0.9) + bce(-0.5, 0.9)) / 2 + (bce(0.3, 0.0) + bce(-2.0, 0.0)) / 2
    assert got == pytest.approx(want, rel=1e-6)
    # flipping every target swaps the roles: real gets target 0.1 (= 1 - 0.9), fake gets 0.9
    flip = (torch.ones(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool))
    got = O.d_logistic_targets(real, fake, real_target=0.9, flip=flip).item()
    want = (bce(1.5, 0.1) + bce(-0.5, 0.1)) / 2 + (bce(0.3, 0.9) + bce(-2.0, 0.9)) / 2
    assert got == pytest.approx(want, rel=1e-6)
    # with target 1 and no flips it is the plain logistic loss
    assert O.d_logistic_targets(real, fake).item() == pytest.approx(O.d_logistic(real, fake).item(), rel=1e-6)


def test_feature_matching():
    real = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    fake = torch.tensor([[0.0, 0.0], [2.0, 2.0]])
    # means (2, 3) vs (1, 1): squared distance 1 + 4
    assert O.feature_matching_loss(real, fake).item() == pytest.approx(5.0)


def test_historical_averaging_gradient_and_online_mean():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(4, 3))
    history = [p.detach().clone()]
    h = O.HistoricalAverage([p], weight=0.5)
    for _ in range(3):
        with torch.no_grad():
            p.add_(torch.randn_like(p))
        mean = torch.stack(history).mean(0)
        # autograd of the penalty at the current theta against the mean of the past thetas
        q = p.detach().clone().requires_grad_(True)
        (0.5 * (q - mean).square().sum()).backward()
        p.grad = None
        value = h.add_grad_()
        torch.testing.assert_close(p.grad, q.grad)
        assert value.item() == pytest.approx(0.5 * (p.detach() - mean).square().sum().item(), rel=1e-5)
        history.append(p.detach().clone())
    torch.testing.assert_close(h.mean[0], torch.stack(history).mean(0))


def _row(step, s0=1.0, lg=1.0, ld=1.0):
    return {"step": step, "loss/G": lg, "loss/D": ld, "sigma/D/blocks.0.conv1/s0": s0,
            "sigma/D/linear/s0": s0 / 2}


def test_collapse_detector_signals():
    det = CollapseDetector(sigma_factor=3.0, window=50, loss_gap=50.0, warmup=20)
    for step in range(10, 110, 10):  # steady: nothing fires
        assert det.update(_row(step, s0=2.0 + 0.01 * step)) is None
    assert det.update(_row(110, s0=9.0)).startswith("sigma")  # 9 > 3 x min over the window (2.6)
    assert det.collapse_step == 110
    det = CollapseDetector(loss_gap=50.0, warmup=20)
    assert det.update(_row(10, lg=-400.0, ld=700.0)) is None  # the start is a transient
    assert det.update(_row(30, lg=1.0, ld=1.5)) is None
    assert det.update(_row(60, lg=-618.0, ld=836.0)).startswith("divergence")
    det = CollapseDetector(sigma_factor=2.0, window=50, warmup=20)
    det.update(_row(10, s0=1.0))
    assert det.update(_row(20, s0=9.0)) is None  # within the warm-up
    det = CollapseDetector()
    assert det.update(_row(10, ld=float("nan"))) == "nonfinite"
    det = CollapseDetector(fid_factor=1.5)
    assert det.update_fid(100, 50.0) is None and det.update_fid(200, 40.0) is None
    assert det.update_fid(300, 70.0).startswith("fid") and det.collapse_step == 300


def test_sigma_jump_outside_the_window_is_not_a_collapse():
    det = CollapseDetector(sigma_factor=2.0, window=20, warmup=0)
    for step, s0 in ((10, 1.0), (20, 1.4), (30, 1.9), (40, 2.6), (50, 3.5)):  # steady growth, < 2x per 20 steps
        assert det.update(_row(step, s0=s0)) is None


def _metrics(run_dir):
    return [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_sigma_clamp_ratio_in_the_records(tmp_path, tiny_shards):
    run_dir = tmp_path / "b3"
    rc = main(["train", f"data.shards={tiny_shards}", f"run.dir={run_dir}", *TINY, "reg.sigma_clamp=ratio:1.5",
               "reg.ortho_beta=1e-4", "reg.r1_gamma=1", "telemetry.sigma_every=2", "train.steps=4",
               "train.batch_size=4", "train.tick_every=2"])
    assert rc == 0
    rows = _metrics(run_dir)
    s0_keys = [k for k in rows[-1] if k.endswith("/s0")]
    assert any(k.startswith("sigma/G/") for k in s0_keys) and any(k.startswith("sigma/D/") for k in s0_keys)
    for row in rows:  # clamp applies from the first step: every layer's s0 <= 1.5 s1 (within 1%)
        for k in s0_keys:
            if k[:-2] + "s1" not in row:  # a one-row matrix (D's output layer) has a single singular value
                continue
            s1 = row[k[:-2] + "s1"]
            assert row[k] <= 1.5 * s1 * 1.01, (row["step"], k, row[k], s1)
            assert row[k[:-2] + "s0_over_s1"] <= 1.5 * 1.01
            assert row[k[:-2] + "fro"] >= row[k]
    assert rows[-1]["loss/R1"] > 0


@pytest.mark.parametrize("extra", [
    ["reg.r2_gamma=1"], ["reg.hist_avg=1e-3"], ["loss=ns", "loss.real_target=0.9", "loss.label_noise=0.1"],
    ["loss.feature_matching=1"], ["model.mbdisc=4"], ["model.mbstd=2"], ["model.vbn=true"],
    ["reg.sigma_penalty=1", "reg.sigma_target=ratio:1.2"], ["reg.sigma_clamp=2.0", "reg.ortho_full=true"],
])
def test_each_switch_trains_and_shows_in_the_records(tmp_path, tiny_shards, extra):
    run_dir = tmp_path / "sw"
    rc = main(["train", f"data.shards={tiny_shards}", f"run.dir={run_dir}", *TINY, "train.steps=2",
               "train.batch_size=4", *extra])
    assert rc == 0
    row = _metrics(run_dir)[-1]
    expect = {"reg.r2_gamma=1": "loss/R2", "reg.hist_avg=1e-3": "loss/hist_avg_D",
              "loss.feature_matching=1": "loss/FM", "reg.sigma_penalty=1": "loss/sigma_D"}
    for e in extra:
        if e in expect:
            assert row[expect[e]] >= 0 and math.isfinite(row[expect[e]])
    assert math.isfinite(row["loss/D"]) and math.isfinite(row["loss/G"])


def test_nonfinite_steps_are_skipped_then_rolled_back(tmp_path, tiny_shards, capsys):
    """Real batches turn NaN for a stretch: those D steps are skipped and counted, the run rolls back to
    the last good checkpoint, and every metrics line written before stays."""
    from bench.cli import compose
    from bench.config import validate
    from bench.loop import Trainer

    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=8", "train.batch_size=4",
                            "train.ckpt_every=2", "train.nonfinite_rollback=2"]))

    class NaNData(Trainer):
        def _next_batch(self):
            x, y = super()._next_batch()
            return (x * float("nan") if 4 <= self.step < 6 else x), y

    t = NaNData(cfg, tmp_path / "nan")
    summary = t.run()
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["nonfinite_skipped"] == 2 and summary["rollbacks"] == 1
    rows = _metrics(tmp_path / "nan")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("grad/G"))
    assert "rolled back" in capsys.readouterr().err
    state = torch.load(sorted((tmp_path / "nan" / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["D"].values() if v.is_floating_point())


def test_a_diverged_run_is_a_collapse_at_its_first_nonfinite_step(tmp_path, tiny_shards):
    """NaN for good from step 3: updates are skipped, the single rollback does not help, the run ends as
    'diverged' with the collapse step at the first skipped update, and `bench report` counts it as a
    finished run (a result of the ablation, not a run still to come)."""
    from bench import report
    from bench.cli import compose
    from bench.config import validate
    from bench.loop import Trainer

    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=12", "train.batch_size=4",
                            "train.ckpt_every=2", "train.nonfinite_rollback=2", "train.max_rollbacks=1",
                            "telemetry.collapse_warmup=100"]))  # the detector is still warming up

    class NaNData(Trainer):
        def _next_batch(self):
            x, y = super()._next_batch()
            return (x * float("nan") if self.step >= 2 else x), y

    summary = NaNData(cfg, tmp_path / "div").run()
    assert summary["status"] == "diverged" and summary["steps"] < 12
    assert summary["collapse_step"] == 3  # step 3 is the first whose D update was skipped
    assert summary["collapse_reason"].replace("-", "").startswith("nonfinite")
    result = report.build_report(tmp_path, tmp_path / "report")
    (run,) = result["runs"]
    assert run.finished and run.status == "diverged"


def test_bad_stability_keys_are_one_line_errors(tmp_path, capsys):
    for override, needle in (("reg.sigma_clamp=ratio:x", "reg.sigma_clamp"),
                             ("loss.real_target=0.9", "loss=ns"),
                             ("reg.sigma_penalty=1", "reg.sigma_target"),
                             ("reg.ortho_nets=[X]", "reg.ortho_nets")):
        assert main(["train", override, f"run.dir={tmp_path / 'x'}"]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.parametrize("loss,flagged", [("hinge", True), ("wgan", False)])
def test_loss_gap_signal_is_off_for_wasserstein_losses(tmp_path, tiny_shards, loss, flagged):
    """A tiny loss gap flags a hinge run at the first tick after warm-up; WGAN critic values are
    unbounded distance estimates, so the same setting does not flag a wgan run."""
    run_dir = tmp_path / loss
    rc = main(["train", f"data.shards={tiny_shards}", f"run.dir={run_dir}", *TINY, f"loss={loss}",
               "train.steps=3", "train.batch_size=4", "train.d_steps=1", "telemetry.collapse_loss_gap=1e-6",
               "telemetry.collapse_warmup=0", "telemetry.sigma_every=0"])
    assert rc == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["collapse_step"] is not None) == flagged
    if flagged:
        assert summary["collapse_reason"].startswith("divergence")
