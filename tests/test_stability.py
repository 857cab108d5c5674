"""Stability toolkit, harness side: label tricks, feature matching, historical averaging, collapse
detection, non-finite handling, and the regulariser switches end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from bench.cli import main
from bench.config import compose, validate
from bench.train import objectives as O
from bench.train.collapse import CollapseDetector, CollapseSettings
from bench.train import loop
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
    det = CollapseDetector(CollapseSettings(sigma_factor=3.0, window=50, loss_gap=50.0, warmup=20))
    for step in range(10, 110, 10):  # steady: nothing fires
        assert det.update(_row(step, s0=2.0 + 0.01 * step)) is None
    assert det.update(_row(110, s0=9.0)).startswith("sigma")  # 9 > 3 x min over the window (2.6)
    assert det.collapse_step == 110
    det = CollapseDetector(CollapseSettings(loss_gap=50.0, warmup=20))
    assert det.update(_row(10, lg=-400.0, ld=700.0)) is None  # the start is a transient
    assert det.update(_row(30, lg=1.0, ld=1.5)) is None
    assert det.update(_row(60, lg=-618.0, ld=836.0)).startswith("divergence")
    det = CollapseDetector(CollapseSettings(sigma_factor=2.0, window=50, warmup=20))
    det.update(_row(10, s0=1.0))
    assert det.update(_row(20, s0=9.0)) is None  # within the warm-up
    det = CollapseDetector()
    assert det.update(_row(10, ld=float("nan"))) == "nonfinite"
    det = CollapseDetector(CollapseSettings(fid_factor=1.5))
    assert det.update_fid(100, 50.0) is None and det.update_fid(200, 40.0) is None
    assert det.update_fid(300, 70.0).startswith("fid") and det.collapse_step == 300


def test_sigma_jump_outside_the_window_is_not_a_collapse():
    det = CollapseDetector(CollapseSettings(sigma_factor=2.0, window=20, warmup=0))
    for step, s0 in ((10, 1.0), (20, 1.4), (30, 1.9), (40, 2.6), (50, 3.5)):  # steady growth, < 2x per 20 steps
        assert det.update(_row(step, s0=s0)) is None


def test_collapse_detector_state_round_trip_and_old_checkpoints():
    det = CollapseDetector(CollapseSettings(warmup=0))
    det.update(_row(10, s0=1.0))
    det.update_fid(10, 30.0)
    state = det.state_dict()
    assert set(state) == {"sigma_hist", "best_fid", "collapse_step", "reason", "best_div", "low_div", "best_recall",
                          "low_recall", "dwins_run", "ddead_run", "low_class", "probe_fd_hist", "low_class_eval", "blowup",
                          "blowup_ticks", "fired"}
    again = CollapseDetector()
    # a checkpoint written before gap_hist was removed still loads; the key is ignored
    again.load_state_dict({**state, "gap_hist": [(10, 0.5)]})
    assert again.state_dict() == state and not hasattr(again, "gap_hist")


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


def _newest_checkpoint(run_dir):
    return torch.load(sorted((run_dir / "checkpoints").glob("ckpt-*.pt"))[-1], weights_only=False)


def _trainer_at_end(tmp_path, shards, extra):
    """The TrainState of a set-up built as the run was (same config, so the same initial weights) and a copy of
    its initial state dicts; then the run's final checkpoint loaded into it."""
    cfg = validate(compose([f"data.shards={shards}", *TINY, *SWITCH_COMMON, *extra]))
    _, t = loop.setup(cfg, tmp_path / "scratch", quiet=True)
    init = {"G": {k: v.clone() for k, v in t.G.state_dict().items()},
            "D": {k: v.clone() for k, v in t.D.state_dict().items()}}
    t.load_state_dict(_newest_checkpoint(tmp_path / "sw"))
    return t, init


def _depends_on_the_batch(net, fn, n=4):
    """Whether sample 0's output changes when the other samples of its batch change."""
    torch.manual_seed(1)
    a = fn(n)
    b = fn(n)
    b = [torch.cat([x[:1], y[1:]]) for x, y in zip(a, b)]
    with torch.no_grad():
        return not torch.allclose(net(*a)[0], net(*b)[0], rtol=0, atol=1e-6)


def _real_batch(n):
    return [torch.rand(n, 3, 32, 32) * 2 - 1, torch.randint(0, 10, (n,))]


def _check_r2(rows, ctx):
    assert all(r["loss/R2"] > 0 for r in rows)


def _check_hist_avg(rows, ctx):
    # the first step's weights are the running mean itself; the second's have moved from it
    assert rows[0]["loss/hist_avg_D"] == 0 and rows[0]["loss/hist_avg_G"] == 0
    assert rows[-1]["loss/hist_avg_D"] > 0 and rows[-1]["loss/hist_avg_G"] > 0
    state = _newest_checkpoint(ctx["run_dir"])["hist_avg"]
    assert state["D"]["count"] == state["G"]["count"] == 1 + len(rows)  # the initial weights + one per step


def _check_label_tricks(rows, ctx):
    # noisy labels: the fraction of D's targets flipped, recorded every tick; smoothed real targets (0.9):
    # each BCE term is at least the target's entropy, so D's loss never goes below H(0.9)
    h = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    assert all(0 <= r["D/flipped_frac"] <= 1 for r in rows) and sum(r["D/flipped_frac"] for r in rows) > 0
    assert all(r["loss/D"] >= h - 1e-6 for r in rows)


def _check_feature_matching(rows, ctx):
    assert all(r["loss/FM"] > 0 for r in rows)


def _check_batch_layer(kind):
    def check(rows, ctx):
        t, init = _trainer_at_end(ctx["tmp_path"], ctx["shards"], ctx["extra"])
        layers = [(n, m) for n, m in t.D.named_modules() if isinstance(m, kind)]
        assert layers and not t.objective.joint_d  # real and fake no longer share a D forward
        t.D.eval()
        assert _depends_on_the_batch(t.D, _real_batch)
        trained = [k for k, v in t.D.state_dict().items() if k.startswith(layers[0][0]) and k.endswith("weight")]
        assert all(not torch.equal(t.D.state_dict()[k], init["D"][k]) for k in trained)  # it trains
    return check


def _check_vbn(rows, ctx):
    from bench.models import spectral
    from bench.models.norms import VirtualBatchNorm2d

    t, _ = _trainer_at_end(ctx["tmp_path"], ctx["shards"], ctx["extra"])
    assert any(isinstance(m, VirtualBatchNorm2d) for m in t.G.modules()) and t.G.vbn_z.shape[0] == ctx["vbn_ref"]
    t.G.train()  # normalisation as in training; spectral norm's power iteration held still
    for _, m in spectral.spectral_modules(t.G):
        m.eval()
    assert not _depends_on_the_batch(t.G, lambda n: [torch.randn(n, t.G.z_dim), torch.randint(0, 10, (n,))])


def _check_sigma_penalty(rows, ctx):
    # ortho-initialised layers have sigma0 = sigma1 = 1 > 0.5 sigma1: every D layer pays; G is not penalised
    assert all(r["loss/sigma_D"] > 0 for r in rows) and not any("loss/sigma_G" in r for r in rows)


SWITCH_COMMON = ["train.steps=2", "train.batch_size=4"]


@pytest.mark.parametrize("extra, check", [
    (["reg.r2_gamma=1"], _check_r2),
    (["reg.hist_avg=1e-3"], _check_hist_avg),
    (["loss=ns", "loss.real_target=0.9", "loss.label_noise=0.3"], _check_label_tricks),
    (["loss.feature_matching=1"], _check_feature_matching),
    (["model.mbdisc=4"], "mbdisc"),
    (["model.mbstd=2"], "mbstd"),
    (["model.vbn=true"], _check_vbn),
    (["reg.sigma_penalty=1", "reg.sigma_target=ratio:0.5"], _check_sigma_penalty),
], ids=lambda v: v if isinstance(v, str) else None)
def test_each_switch_trains_and_shows_in_the_records(tmp_path, tiny_shards, extra, check):
    """Each switch trains, and leaves its own trace: the metric it records, or the property it gives
    the trained nets."""
    from bench.models.layers import MinibatchDiscrimination, MinibatchStdDev

    check = {"mbdisc": _check_batch_layer(MinibatchDiscrimination),
             "mbstd": _check_batch_layer(MinibatchStdDev)}.get(check, check)
    run_dir = tmp_path / "sw"
    rc = main(["train", f"data.shards={tiny_shards}", f"run.dir={run_dir}", *TINY, *SWITCH_COMMON, *extra])
    assert rc == 0
    rows = _metrics(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(math.isfinite(r["loss/D"]) and math.isfinite(r["loss/G"]) for r in rows)
    check(rows, {"run_dir": run_dir, "tmp_path": tmp_path, "shards": tiny_shards, "extra": extra,
                 "vbn_ref": validate(compose(extra)).model.vbn_ref})


def _reg_layers(net):
    """The layers the weight regularisers and the sigma0 clamp act on (G's shared class embedding aside)."""
    from bench.models import spectral

    shared = getattr(net, "shared", None)
    return [m for _, m in spectral.weight_modules(net, exclude=[shared] if shared is not None else [])]


def _top_sv(m):
    from bench.models.svd import weight_matrix

    return torch.linalg.matrix_norm(weight_matrix(m).detach().float(), ord=2).item()


def test_sigma_clamp_bounds_every_clamped_layer(tmp_path, tiny_shards):
    """reg.sigma_clamp=2.0: each layer's raw weight gets a top singular value 4x its own (the rest stay
    at the ortho init's 1); after two training steps (two clamps: the clamp's singular vectors come from
    two warm-started subspace iterations per step) every clamped layer's is 2 again, in G and D."""
    from bench.models.svd import as_weight, weight_matrix

    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=2", "train.batch_size=4",
                            "reg.sigma_clamp=2.0"]))
    run, state = loop.setup(cfg, tmp_path / "clamp", quiet=True)
    layers = _reg_layers(state.G) + _reg_layers(state.D)
    with torch.no_grad():
        for m in layers:
            w = weight_matrix(m).float()
            u, s, vh = torch.linalg.svd(w, full_matrices=False)
            m.weight.copy_(as_weight(m, w + 3 * s[0] * torch.outer(u[:, 0], vh[0])))
    assert min(_top_sv(m) for m in layers) > 3.5
    assert loop.train(run, state)["status"] == "completed"
    tops = [_top_sv(m) for m in layers]
    assert max(tops) <= 2.0 * 1.002, tops


def test_orthogonal_regularisation_pulls_toward_orthogonal_filters(tmp_path, tiny_shards):
    """reg.ortho_beta with ortho_full: from the same N(0, 0.02) init, two steps with a strong orthogonal
    penalty leave G's filters much nearer orthonormal (||W W^T - I||^2) than two steps without it."""
    from bench.models import spectral

    def g_penalty(name, *extra):
        cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=2", "train.batch_size=4",
                                "model.init=N02", "train.precision=fp32", *extra]))
        run, state = loop.setup(cfg, tmp_path / name, quiet=True)
        before = spectral.ortho_penalty(_reg_layers(state.G), 1.0, full=True).item()
        assert loop.train(run, state)["status"] == "completed"
        return before, spectral.ortho_penalty(_reg_layers(state.G), 1.0, full=True).item()

    before, plain = g_penalty("plain")
    before_o, ortho = g_penalty("ortho", "reg.ortho_beta=10", "reg.ortho_full=true")
    assert before == before_o  # the same initial weights
    assert before - ortho > 10 * abs(before - plain), (before, plain, ortho)


def _nan_batches(monkeypatch, when):
    """The training batches turn NaN while `when()` holds."""
    real_next = loop.DataStream.next

    def nan_next(self):
        x, y = real_next(self)
        return (x * float("nan") if when() else x), y

    monkeypatch.setattr(loop.DataStream, "next", nan_next)


def test_nonfinite_steps_are_skipped_then_rolled_back(tmp_path, tiny_shards, capsys, monkeypatch):
    """Real batches turn NaN for a stretch: those D steps are skipped and counted, the run rolls back to
    the last good checkpoint, and every metrics line written before stays."""
    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=8", "train.batch_size=4",
                            "train.ckpt_every=2", "train.nonfinite_rollback=2"]))

    run, state = loop.setup(cfg, tmp_path / "nan")
    _nan_batches(monkeypatch, lambda: 4 <= state.step < 6)
    summary = loop.train(run, state)
    assert summary["status"] == "completed" and summary["steps"] == 8
    assert summary["nonfinite_skipped"] == 2 and summary["rollbacks"] == 1
    rows = _metrics(tmp_path / "nan")
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert all(math.isfinite(v) for r in rows for k, v in r.items() if k.startswith("grad/G"))
    assert "rolled back" in capsys.readouterr().err
    state = torch.load(sorted((tmp_path / "nan" / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["D"].values() if v.is_floating_point())


def test_a_diverged_run_is_a_collapse_at_its_first_nonfinite_step(tmp_path, tiny_shards, monkeypatch):
    """NaN for good from step 3: updates are skipped, the single rollback does not help, the run ends as
    'diverged' with the collapse step at the first skipped update, and `bench report` counts it as a
    finished run (a result of the ablation, not a run still to come)."""
    from bench.report import render

    cfg = validate(compose([f"data.shards={tiny_shards}", *TINY, "train.steps=12", "train.batch_size=4",
                            "train.ckpt_every=2", "train.nonfinite_rollback=2", "train.max_rollbacks=1",
                            "telemetry.collapse_warmup=100"]))  # the detector is still warming up

    run, state = loop.setup(cfg, tmp_path / "div")
    _nan_batches(monkeypatch, lambda: state.step >= 2)
    summary = loop.train(run, state)
    assert summary["status"] == "diverged" and summary["steps"] < 12
    assert summary["collapse_step"] == 3  # step 3 is the first whose D update was skipped
    assert summary["collapse_reason"].replace("-", "").startswith("nonfinite")
    result = render.build_report(tmp_path, tmp_path / "report")
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
