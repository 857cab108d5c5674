"""Cold starts: every optional switch, turned on for the first time, on an empty cache, fresh built-in shards and
no domain classifier, completes, resumes once and prints no traceback (docs/architecture.md, "Cold starts").

The switches are combined by a pairwise covering array (every pair of two switches' values appears in some case),
built here by a seeded greedy search and checked for coverage, instead of the full product.
"""
import itertools
import json
import random

import pytest

from bench.cli import main

pytestmark = pytest.mark.coldstart

# name -> {level: overrides}; the first level is "off".
SWITCHES = {
    "family": {f: [f"model={f}"] for f in ("biggan", "biggan_deep", "sagan", "dcgan")},
    "precision": {p: [f"train.precision={p}"] for p in ("fp32", "bf16")},
    "eval": {"off": ["eval.final=false"],  # the built-in set's default (auto) evaluates the final step
             "domain": ["eval.every=2", "eval.extractor=domain"],
             "inception": ["eval.every=2", "eval.extractor=inception"]},  # weights path added per case
    "intra_fid": {"off": [], "on": ["eval.intra_fid=true", "eval.intra_min_per_class=2"]},
    "repeats": {"1": [], "2": ["eval.repeats=2"]},
    "async": {"off": [], "on": ["eval.async=true"]},
    "diversity": {"off": [], "on": ["telemetry.diversity_every=2", "telemetry.diversity_samples=4"]},
    "aug": {"off": [], "diffaug": ["aug.policy=[color,translation,cutout]"],
            "ada": ["aug.policy=[color,translation,cutout]", "aug.ada_target=0.6", "aug.ada_interval=1"]},
    "loss": {"hinge": [], "rpgan": ["loss=rpgan"]},
    "lecam": {"off": [], "on": ["reg.lecam=0.3"]},
    "bcr": {"off": [], "on": ["reg.bcr=[10,10]"]},
    "zcr": {"off": [], "on": ["reg.zcr=[5,0.5,0.03]"]},
    "sigma_clamp": {"off": [], "on": ["reg.sigma_clamp=2.0"]},
    "sigma_penalty": {"off": [], "on": ["reg.sigma_penalty=0.1", "reg.sigma_target=1.0"]},
    "ortho": {"off": [], "on": ["reg.ortho_beta=1e-4"]},
    "grad_penalty": {"off": [], "r1": ["reg.r1_gamma=1"], "r2": ["reg.r2_gamma=1"]},
    "accumulate": {"1": [], "2": ["train.accumulate=2"]},
    "d_steps": {"1": [], "2": ["train.d_steps=2"]},
    "mbstd": {"off": [], "on": ["model.mbstd=2"]},
    "batchnorm": {"batch": [], "vbn": ["model.vbn=true", "model.vbn_ref=4"], "cross_replica": ["model.cross_replica_bn=true"]},
}
NEEDS_EVAL = ("intra_fid", "repeats", "async")  # meaningless without evaluation: pinned to their first level

COMMON = ["data.num_samples=200", "data.samples_per_shard=50", "model.ch=8", "model.d_ch=8", "model.z_dim=32",
          "model.shared_dim=16", "train.batch_size=4", "train.tick_every=1", "train.sample_cols=2", "ema.start=0",
          "train.ckpt_every=2", "eval.num_samples=30", "eval.batch_size=20", "telemetry.sigma_every=2"]
# The cases' evaluation sizes: the random Inception's features cost most of a case, so few samples keep it short.
# eval.seed=43's labels (and eval.seed + 1's, for eval.repeats=2) give each of the 10 classes the 2 generated samples
# intra-class FID needs out of only 30 (eval.seed=0 needs 46), and the first 46 real images do the same for the real
# side (its features are computed once per cache, the generated ones per evaluation and repeat)
CASE_EVAL = ["eval.seed=43", "eval.num_real=46"]


def _valid_pair(f1, v1, f2, v2) -> bool:
    for f, v, other, ov in ((f1, v1, f2, v2), (f2, v2, f1, v1)):
        if f == "eval" and v == "off" and other in NEEDS_EVAL and ov != next(iter(SWITCHES[other])):
            return False
    return True


def _normalise(row: dict) -> dict:
    if row["eval"] == "off":
        row.update({f: next(iter(SWITCHES[f])) for f in NEEDS_EVAL})
    return row


def covering_rows(seed: int = 0) -> list[dict]:
    """Rows (switch -> level) in which every valid pair of two switches' levels appears at least once: each row
    starts from an uncovered pair and fills the other switches, in a random order, with the level that covers
    the most pairs still uncovered."""
    names = sorted(SWITCHES)
    uncovered = {(a, va, b, vb) for a, b in itertools.combinations(names, 2)
                 for va in SWITCHES[a] for vb in SWITCHES[b] if _valid_pair(a, va, b, vb)}
    rng, rows = random.Random(seed), []
    while uncovered:
        a, va, b, vb = min(uncovered)
        row = {a: va, b: vb}
        for f in rng.sample([n for n in names if n not in row], len(names) - 2):
            def gain(v):
                return sum(((f, v, g, row[g]) if f < g else (g, row[g], f, v)) in uncovered for g in row)
            row[f] = max(SWITCHES[f], key=lambda v: (gain(v), rng.random()))
        row = _normalise(row)
        covered = {(x, row[x], y, row[y]) for x, y in itertools.combinations(sorted(row), 2)}
        uncovered -= covered
        rows.append(row)
    return rows


ROWS = min((covering_rows(seed) for seed in range(8)), key=len)


def test_the_cases_cover_every_valid_pair_of_switch_levels():
    names = sorted(SWITCHES)
    for a, b in itertools.combinations(names, 2):
        for va in SWITCHES[a]:
            for vb in SWITCHES[b]:
                seen = any(r[a] == va and r[b] == vb for r in ROWS)
                assert seen == _valid_pair(a, va, b, vb), (a, va, b, vb)
    assert len(ROWS) <= 20  # a covering array, not the product (which would be millions of cases)


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory):
    """A weights file of torch-fidelity's Inception architecture with random values (nothing is downloaded):
    the inception extractor's code path runs end to end; its numbers mean nothing."""
    import torch
    import torch_fidelity.feature_extractor_inceptionv3 as inc

    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    empty = path.with_suffix(".empty")
    torch.save({}, empty)
    keep = inc.FeatureExtractorInceptionV3.load_state_dict
    inc.FeatureExtractorInceptionV3.load_state_dict = lambda self, sd, *a, **k: None
    try:
        torch.manual_seed(0)
        net = inc.FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                              feature_extractor_weights_path=str(empty))
    finally:
        inc.FeatureExtractorInceptionV3.load_state_dict = keep
    torch.save(net.state_dict(), path)
    return path


def _case_id(row: dict) -> str:
    return "-".join(f"{k}={row[k]}" for k in SWITCHES if row[k] != next(iter(SWITCHES[k])) or k in ("family", "precision"))


@pytest.mark.parametrize("row", ROWS, ids=[_case_id(r) for r in ROWS])
def test_every_switch_completes_and_resumes_from_a_cold_start(row, tmp_path, monkeypatch, capfd,
                                                              random_inception_weights, quick_classifier):
    cache = tmp_path / "cache"
    monkeypatch.setenv("GAN_BENCH_CACHE", str(cache))  # empty: built-in shards, classifier, peak all made now
    overrides = [o for name, level in row.items() for o in SWITCHES[name][level]]
    if row["eval"] == "inception":
        overrides.append(f"eval.weights_path={random_inception_weights}")
    run = tmp_path / "run"
    base = ["train", f"run.dir={run}", *COMMON, *CASE_EVAL, *overrides]

    import torch

    threads = torch.get_num_threads()
    assert main([*base, "train.steps=2"]) == 0
    assert torch.get_num_threads() == threads  # eval.async's share of the cores held for that training only
    first = capfd.readouterr()
    assert main([*base, "train.steps=4"]) == 0  # resumes from the step-2 checkpoint
    second = capfd.readouterr()

    for out in (first, second):
        assert "Traceback" not in out.err + out.out, out.err[-3000:]
        assert "worker processes in total" not in out.err  # torch's DataLoader warning: workers follow the cores
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["steps"] == 4
    run_facts = json.loads((run / "run.json").read_text())
    assert run_facts.get("resumes"), run_facts
    ticks = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [t["step"] for t in ticks] == [1, 2, 3, 4]
    assert [t["step"] for t in ticks if "perf/start_tick" in t] == [1, 3]  # the first tick of the start and resume
    if row["eval"] != "off" and row["async"] == "off":
        evals = [json.loads(line) for line in (run / "evals.jsonl").read_text().splitlines()]
        assert [e["step"] for e in evals] == [2, 4]
    needs_classifier = row["diversity"] == "on" or row["eval"] == "domain"
    assert bool(list(cache.rglob("classifier-r32.pt"))) == needs_classifier
    if row["diversity"] == "on":
        ticks = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert any("stability/diversity" in t for t in ticks)


def test_intra_fid_labels_that_leave_a_class_short_stop_the_run_before_its_first_step(tmp_path, monkeypatch, capfd):
    """eval.seed alone decides the evaluation's labels: 24 samples over 10 classes leave one with none, which
    used to fail the run at its first evaluation (step 2); now one line before any step or classifier."""
    monkeypatch.setenv("GAN_BENCH_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    rc = main(["train", f"run.dir={run}", *COMMON, "train.steps=2", "eval.every=2", "eval.num_samples=24",
               "eval.intra_fid=true", "eval.intra_min_per_class=2", "train.precision=fp32"])
    err = capfd.readouterr().err
    assert rc == 2
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "eval.seed=0" in lines[0] and "0 of eval.num_samples=24" in lines[0], err[-2000:]
    assert "Traceback" not in err and "training it now" not in err
    assert not (run / "metrics.jsonl").exists()
