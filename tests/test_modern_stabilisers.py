"""LeCam, bCR, zCR, DiffAugment / ADA inside the objective, and their state in checkpoints, against hand
computations (the random draws are replayed from a generator seeded as the objective's)."""
import contextlib
import io
import math

import pytest
import torch
import torch.nn.functional as F

from bench.config import ConfigError, compose, validate
from bench.train import objectives as O
from bench.train.augment import AdaptiveP, DiffAugment
from bench.train.stabilisers import LeCam
from bench.train.state import NonfiniteGuard, TrainState
from bench.train.telemetry import Collector
from bench.train.collapse import CollapseDetector, CollapseSettings

CPU = torch.device("cpu")


class TinyG(torch.nn.Module):
    z_dim = 4

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 3 * 8 * 8)

    def forward(self, z, y):
        return torch.tanh(self.lin(z)).view(-1, 3, 8, 8)


class LinearD(torch.nn.Module):
    """D(x) = <w, x> + b."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(3, 8, 8) * 0.1)
        self.b = torch.nn.Parameter(torch.tensor(0.2))

    def forward(self, x, y):
        return (x * self.w).flatten(1).sum(1) + self.b


def objective(*overrides, seed=0):
    torch.manual_seed(seed)
    G, D = TinyG(), LinearD()
    cfg = compose(list(overrides))
    validate(cfg)
    gen = torch.Generator().manual_seed(123)
    return O.GANObjective(O.ObjectiveSettings.from_cfg(cfg), G, D, autocast=contextlib.nullcontext, gen=gen), G, D


def batch(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    real = torch.rand(n, 3, 8, 8, generator=g) * 2 - 1
    return O.MicroBatch(real, torch.zeros(n, dtype=torch.long), torch.randn(n, 4, generator=g),
                        torch.zeros(n, dtype=torch.long), reg_index=1)


def run(phase, mb):
    got = []
    with Collector(CPU) as c:
        total = phase(mb, lambda loss: got.append(loss))
        row = c.tick()
    return total, got[0], row


def hinge(r, f):
    return sum(max(0.0, 1 - v) for v in r.tolist()) / len(r) + sum(max(0.0, 1 + v) for v in f.tolist()) / len(f)


# ---- defaults: nothing changes -----------------------------------------------------------------------
def test_defaults_leave_the_step_as_it_was():
    obj, G, D = objective()
    mb = batch()
    total, _, row = run(obj.d_phase, mb)
    with torch.no_grad():
        r, f = D(mb.real, None), D(G(mb.z, None), None)
    assert total.item() == pytest.approx(hinge(r, f), rel=1e-6)
    assert not any(k.startswith(("aug/", "lecam/")) or "CR" in k or "LeCam" in k for k in row)
    assert obj.after_d_step() == [] and obj.state_dict() == {}


# ---- LeCam -------------------------------------------------------------------------------------------
def test_lecam_against_a_hand_computation():
    lc = LeCam(weight=0.3, decay=0.9, device=CPU)
    real, fake = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([-1.0, 0.0, -2.0])
    # before any update the anchors are the batch's own means: a_R = 2, a_F = -1
    pen = lc.penalty(real, fake)
    assert pen.item() == pytest.approx(0.3 * ((4 + 9 + 16) / 3 + (9 + 4 + 16) / 3))
    lc.after_d_step()
    assert lc.anchors.tolist() == pytest.approx([2.0, -1.0])
    # a D step of two micro-batches: penalties against (2, -1); then the EMA with the step's mean means
    pen = lc.penalty(torch.tensor([0.0, 4.0]), torch.tensor([1.0, 1.0]))
    assert pen.item() == pytest.approx(0.3 * ((1 + 25) / 2 + (1 + 1) / 2))
    lc.penalty(torch.tensor([3.0, 3.0]), torch.tensor([0.0, 2.0]))
    with Collector(CPU) as c:
        lc.after_d_step()
        row = c.tick()
    assert lc.anchors.tolist() == pytest.approx([0.9 * 2 + 0.1 * 2.5, 0.9 * -1 + 0.1 * 1.0])
    assert row["lecam/anchor_real"] == pytest.approx(2.05) and row["lecam/anchor_fake"] == pytest.approx(-0.8)
    lc.penalty(torch.tensor([math.nan]), torch.tensor([0.0]))  # a non-finite step leaves the anchors
    lc.after_d_step()
    assert lc.anchors.tolist() == pytest.approx([2.05, -0.8])
    other = LeCam(0.3, 0.9, CPU)
    other.load_state_dict(lc.state_dict())
    assert other.started and other.anchors.tolist() == pytest.approx([2.05, -0.8])


def test_lecam_in_the_d_loss():
    obj, G, D = objective("reg.lecam=0.3", "reg.lecam_decay=0.5")
    mb = batch()
    total, _, row = run(obj.d_phase, mb)
    with torch.no_grad():
        r, f = D(mb.real, None), D(G(mb.z, None), None)
    a_r, a_f = r.mean().item(), f.mean().item()
    lecam = 0.3 * (sum((v - a_f) ** 2 for v in r.tolist()) / 4 + sum((v - a_r) ** 2 for v in f.tolist()) / 4)
    assert total.item() == pytest.approx(hinge(r, f) + lecam, rel=1e-5)
    assert row["loss/LeCam"] == pytest.approx(lecam, rel=1e-5)
    for hook in obj.after_d_step():
        hook()
    assert obj.lecam.anchors.tolist() == pytest.approx([a_r, a_f], rel=1e-5)


# ---- consistency regularisation ----------------------------------------------------------------------
def test_bcr_against_a_hand_computation():
    obj, G, D = objective("reg.bcr=[10,2]")
    mb = batch()
    total, _, row = run(obj.d_phase, mb)
    replay = DiffAugment([], torch.Generator().manual_seed(123))  # the objective's draws, in its order
    with torch.no_grad():
        fake = G(mb.z, None)
        r, f = D(mb.real, None), D(fake, None)
        tr, tf = D(replay.consistency(mb.real), None), D(replay.consistency(fake), None)
    bcr_real = 10 * sum((a - b) ** 2 for a, b in zip(r.tolist(), tr.tolist())) / 4
    bcr_fake = 2 * sum((a - b) ** 2 for a, b in zip(f.tolist(), tf.tolist())) / 4
    assert bcr_real > 0 and bcr_fake > 0
    assert row["loss/bCR_real"] == pytest.approx(bcr_real, rel=1e-5)
    assert row["loss/bCR_fake"] == pytest.approx(bcr_fake, rel=1e-5)
    assert total.item() == pytest.approx(hinge(r, f) + bcr_real + bcr_fake, rel=1e-5)


def test_zcr_against_a_hand_computation():
    obj, G, D = objective("reg.zcr=[5,0.5,0.1]")
    mb = batch()
    total, _, row = run(obj.d_phase, mb)
    g = torch.Generator().manual_seed(123)
    with torch.no_grad():
        z2 = mb.z + 0.1 * torch.randn(mb.z.shape, generator=g)
        r, f, f2 = D(mb.real, None), D(G(mb.z, None), None), D(G(z2, None), None)
    zcr_d = 5 * sum((a - b) ** 2 for a, b in zip(f.tolist(), f2.tolist())) / 4
    assert row["loss/zCR_D"] == pytest.approx(zcr_d, rel=1e-5)
    assert total.item() == pytest.approx(hinge(r, f) + zcr_d, rel=1e-5)
    # G term: -0.5 * mean over samples and pixels of (G(z) - G(z'))^2, with G's gradient
    z3 = mb.z + 0.1 * torch.randn(mb.z.shape, generator=g)
    total, loss, row = run(obj.g_phase, mb)
    with torch.no_grad():
        a, b = G(mb.z, None), G(z3, None)
        zcr_g = -0.5 * sum((u - v) ** 2 for u, v in zip(a.flatten().tolist(), b.flatten().tolist())) / a.numel()
        g_loss = -D(a, None).mean().item()
    assert row["loss/zCR_G"] == pytest.approx(zcr_g, rel=1e-5)
    assert total.item() == pytest.approx(g_loss + zcr_g, rel=1e-5)
    loss.backward()
    assert G.lin.weight.grad.abs().sum() > 0


# ---- augmentation in both phases, ADA's p ------------------------------------------------------------
def test_diffaugment_feeds_d_augmented_images_in_both_phases():
    obj, G, D = objective("aug.policy=[color,translation,cutout]")
    mb = batch()
    total, loss, _ = run(obj.d_phase, mb)
    replay = DiffAugment(["color", "translation", "cutout"], torch.Generator().manual_seed(123))
    with torch.no_grad():
        r, f = D(replay(mb.real), None), D(replay(G(mb.z, None)), None)
    assert total.item() == pytest.approx(hinge(r, f), rel=1e-5)
    total, loss, _ = run(obj.g_phase, mb)
    fake = G(mb.z, None)
    expected = -D(replay(fake), None).mean()
    assert total.item() == pytest.approx(expected.item(), rel=1e-5)
    loss.backward()  # G's gradient through the augmentation equals the replayed expression's
    got = G.lin.weight.grad.clone()
    G.lin.weight.grad = None
    expected.backward()
    torch.testing.assert_close(got, G.lin.weight.grad)


def test_ada_hook_updates_p_after_d_steps():
    obj, G, D = objective("aug.policy=[color]", "aug.ada_target=0.6", "aug.ada_interval=1", "aug.ada_kimg=0.1",
                          "train.batch_size=4")
    with torch.no_grad():
        D.b.fill_(100.0)  # every real logit positive: r_t = 1 > 0.6, p rises by 4 / 100 per D step
    for step in range(3):
        _, _, row = run(obj.d_phase, batch(seed=step))
        hooks = obj.after_d_step()
        assert len(hooks) == 1
        with Collector(CPU) as c:
            hooks[0]()
            row = c.tick()
        assert obj.ada.p.item() == pytest.approx(0.04 * (step + 1)) and row["aug/p"] == pytest.approx(0.04 * (step + 1))
        assert row["aug/rt"] == 1.0


# ---- relativistic pairing loss -----------------------------------------------------------------------
def test_rpgan_loss_values_and_pairing():
    real, fake = torch.tensor([2.0, 0.5, -1.0]), torch.tensor([-2.0, 0.0, 1.5])
    sp = lambda v: math.log1p(math.exp(v))  # noqa: E731
    d = sum(sp(-(r - f)) for r, f in zip(real.tolist(), fake.tolist())) / 3
    g = sum(sp(-(f - r)) for r, f in zip(real.tolist(), fake.tolist())) / 3
    assert O.LOSSES["rpgan"].d(real, fake).item() == pytest.approx(d, rel=1e-6)
    assert O.LOSSES["rpgan"].g(fake, real).item() == pytest.approx(g, rel=1e-6)
    # G's gradient on its fake logits depends on the paired real logits: d/df softplus(r - f) = -sigmoid(r - f)
    f = fake.clone().requires_grad_(True)
    O.LOSSES["rpgan"].g(f, real).backward()
    torch.testing.assert_close(f.grad, -torch.sigmoid(real - fake) / 3)


def test_rpgan_g_phase_pairs_with_the_d_phase_reals():
    obj, G, D = objective("loss=rpgan")
    assert obj.settings.reg.r1_gamma == 0.05 and obj.settings.reg.r2_gamma == 0.05
    grads = []
    for seed in (1, 2):  # same latents, other reals: G's gradient changes with the real logits
        mb = batch(seed=seed)
        mb.z = batch(seed=1).z
        run(obj.d_phase, mb)
        total, loss, _ = run(obj.g_phase, O.MicroBatch(None, None, mb.z, mb.y_fake, 1))
        G.zero_grad()
        loss.backward()
        grads.append(G.lin.weight.grad.clone())
        fake = G(mb.z, None)
        with torch.no_grad():
            r = D(mb.real, None)
        expected = F.softplus(-(D(fake, None) - r)).mean()
        assert total.item() == pytest.approx(expected.item(), rel=1e-6)
        G.zero_grad()
        expected.backward()
        torch.testing.assert_close(grads[-1], G.lin.weight.grad)
    assert not torch.allclose(grads[0], grads[1])


# ---- checkpoints -------------------------------------------------------------------------------------
def parts(obj, G, D):
    opts = {"G": torch.optim.Adam(G.parameters()), "D": torch.optim.Adam(D.parameters())}
    return TrainState(G, D, TinyG(), opts, None, torch.Generator(), obj,
                      CollapseDetector(CollapseSettings(2.0, 50, 50.0, 1.5, 20)), NonfiniteGuard(3, 3))


def test_ada_p_and_lecam_anchors_survive_a_checkpoint():
    overrides = ("aug.policy=[color]", "aug.ada_target=0.6", "reg.lecam=0.3")
    obj, G, D = objective(*overrides)
    obj.ada.p = torch.tensor(0.37)
    obj.lecam.anchors, obj.lecam.started = torch.tensor([1.5, -0.5]), True
    buf = io.BytesIO()
    torch.save(parts(obj, G, D).state_dict(), buf)
    state = torch.load(io.BytesIO(buf.getvalue()), weights_only=True)
    obj2, G2, D2 = objective(*overrides, seed=1)
    p2 = parts(obj2, G2, D2)
    assert p2.objective is obj2
    p2.load_state_dict(state)
    assert obj2.ada.p.item() == pytest.approx(0.37)
    assert obj2.lecam.started and obj2.lecam.anchors.tolist() == pytest.approx([1.5, -0.5])
    del state["objective"]  # a checkpoint written before these existed: p = 0, anchors start afresh
    p2.load_state_dict(state)
    assert obj2.ada.p.item() == 0.0 and not obj2.lecam.started


def test_default_checkpoints_keep_their_keys():
    obj, G, D = objective()
    assert "objective" not in parts(obj, G, D).state_dict()


# ---- config ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("override, needle", [
    (["reg.bcr=[1]"], "reg.bcr=[1.0] is not valid; use [lambda_real, lambda_fake]"),
    (["reg.zcr=[1,1,0]"], "reg.zcr=[1.0, 1.0, 0.0] is not valid"),
    (["reg.lecam_decay=1"], "reg.lecam_decay=1.0 must be in [0, 1)"),
    (["aug.policy=[blur]"], "aug.policy='blur' is not valid; choose one of: color, translation, cutout"),
    (["aug.ada_target=0.6"], "aug.ada_target needs the ops it gates"),
    (["aug.policy=[color]", "aug.ada_target=1"], "aug.ada_target=1.0 must be in (0, 1)"),
])
def test_bad_values_are_one_line_naming_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        validate(compose(override))
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_quoted_policy_string_is_a_list():
    assert list(compose(["aug.policy='color,cutout'"]).aug.policy) == ["color", "cutout"]


# ---- across ranks ------------------------------------------------------------------------------------
def _two_ranks(rank, path):
    torch.distributed.init_process_group("gloo", init_method=f"file://{path}", rank=rank, world_size=2)
    try:
        lc = LeCam(0.3, 0.5, CPU)
        lc.penalty(torch.tensor([1.0 + 2 * rank]), torch.tensor([-1.0 - 4 * rank]))  # rank 0: (1, -1); 1: (3, -5)
        lc.after_d_step()
        assert lc.anchors.tolist() == pytest.approx([2.0, -3.0])
        ada = AdaptiveP(0.6, 1, 0.004, CPU)
        ada.observe(torch.tensor([1.0, 1.0]) if rank == 0 else torch.tensor([-1.0, 1.0]))
        ada.after_d_step()  # r_t = 2 / 4 = 0.5 < 0.6 over both ranks: p stays at 0 on both
        assert ada.p.item() == 0.0
        ada.p = torch.tensor(0.5)
        ada.observe(torch.tensor([1.0, 1.0]))  # r_t = 1: p += 4 images / 4 = 1 -> clamp 1 on both
        ada.after_d_step()
        assert ada.p.item() == 1.0
    finally:
        torch.distributed.destroy_process_group()


def test_anchors_and_rt_are_averaged_over_ranks(tmp_path):
    torch.multiprocessing.spawn(_two_ranks, args=(str(tmp_path / "store"),), nprocs=2)


# ---- end to end: records and resume ------------------------------------------------------------------
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_stabiliser_trains_records_its_trace_and_resumes_exactly(tmp_path, tiny_shards, precision):
    """loss=rpgan with DiffAugment + ADA (p moves every D step), LeCam, bCR and zCR: each one's trace is in
    metrics.jsonl, and 2 steps + a resume to 4 equal 4 straight steps (p and the anchors in the checkpoint)."""
    import json

    from bench.cli import main
    from conftest import TINY

    common = [f"data.shards={tiny_shards}", *TINY, "train.batch_size=4", "train.ckpt_every=2",
              "train.deterministic=true", f"train.precision={precision}", "loss=rpgan",
              "aug.policy=[color,translation,cutout]",
              "aug.ada_target=0.6", "aug.ada_interval=1", "aug.ada_kimg=0.05", "reg.lecam=0.3", "reg.bcr=[1,1]",
              "reg.zcr=[1,0.1,0.03]"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert main(["train", f"run.dir={straight}", "train.steps=4", *common]) == 0
    assert main(["train", f"run.dir={resumed}", "train.steps=2", *common]) == 0
    assert main(["train", f"run.dir={resumed}", "train.steps=4", *common]) == 0
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    for key in ("aug/p", "aug/rt", "lecam/anchor_real", "lecam/anchor_fake", "loss/LeCam", "loss/bCR_real",
                "loss/bCR_fake", "loss/zCR_D", "loss/zCR_G", "loss/R1", "loss/R2"):
        assert all(key in r and math.isfinite(r[key]) for r in rows), key
    a = torch.load(straight / "checkpoints" / "ckpt-0000004.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints" / "ckpt-0000004.pt", weights_only=True)
    assert a["objective"]["ada"]["steps"] == 4 and a["objective"]["lecam"]["started"] == 1
    assert rows[-1]["aug/p"] == pytest.approx(a["objective"]["ada"]["p"].item())
    for net in ("G", "D", "G_ema"):
        for k in a[net]:
            torch.testing.assert_close(a[net][k], b[net][k], rtol=0, atol=0, msg=f"{net}.{k}")
    for part in ("ada", "lecam"):
        for k, v in a["objective"][part].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(b["objective"][part][k])), (part, k)
