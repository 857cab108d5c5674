"""The collapse suite (configs/experiment/collapse_suite.yaml, scripts/collapse_suite.py): every cell composes and
passes the config checks under both precisions, the script runs the experiment's cells and judges a run by the
rule in its own config, and the confusion matrix / recall / false-positive rate count right."""
import importlib.util
from pathlib import Path

import pytest

from bench.config import compose, validate

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "collapse_suite.py"


@pytest.fixture(scope="module")
def suite():
    spec = importlib.util.spec_from_file_location("collapse_suite", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_suite_has_its_cells(suite):
    intents = list(suite.CELLS.values())
    assert intents.count("collapse") >= 6 and intents.count("healthy") >= 4
    assert len(suite.CELLS) * len(suite.PRECISIONS) >= 12 and set(suite.PRECISIONS) == {"fp32", "bf16"}
    # the script runs what the Hydra sweep of the experiment runs: every cell named there has its file, and every
    # cell file (the shared bases start with "_") is in the sweep
    files = {p.stem for p in suite.CELL_DIR.glob("*.yaml") if not p.stem.startswith("_")}
    assert files == set(suite.CELLS)
    # the ground-truth rule the script applies is the schema's suite.truth_* (recorded in each run's config.yaml)
    assert suite.TRUTH_DEFAULTS == {"truth_chance_factor": 1.5, "truth_diversity_floor": 0.5, "truth_fid_ceil": 100.0,
                                    "truth_samples": 1000}


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_cell_composes_and_validates(suite, precision, tmp_path):
    for cell, intent in suite.CELLS.items():
        cfg = compose([f"+experiment={suite.EXPERIMENT}", f"collapse_cell={cell}", f"train.precision={precision}",
                       f"eval.classifier_path={tmp_path / 'c.pt'}", f"run.dir={tmp_path / cell}"])
        validate(cfg)
        assert (cfg.suite.cell, cfg.suite.intent) == (cell, intent)
        assert cfg.telemetry.diversity_every > 0 and cfg.eval.every == 0 and cfg.train.steps <= 1500, cell
    demo = compose([f"+experiment={suite.EXPERIMENT}", "collapse_cell=demo"])
    assert demo.model.family == "biggan" and not demo.model.d_sn and demo.train.d_lr == 1e-2  # experiment=collapse
    ns = compose([f"+experiment={suite.EXPERIMENT}", "collapse_cell=dcgan_sn_ns"])
    assert ns.loss.name == "ns" and ns.model.family == "dcgan" and ns.model.d_sn


def test_a_run_is_judged_by_the_rule_in_its_own_config(suite, tmp_path):
    (tmp_path / "config.yaml").write_text("suite:\n  cell: x\n  truth_fid_ceil: 60.0\n")
    rule = suite.truth_rule(tmp_path)
    assert rule["truth_fid_ceil"] == 60.0 and rule["truth_chance_factor"] == 1.5
    (tmp_path / "config.yaml").write_text("train:\n  steps: 3\n")  # a run from before the suite keys
    assert suite.truth_rule(tmp_path) == suite.TRUTH_DEFAULTS


def test_judge_finds_the_runs_of_a_sweep(suite, tmp_path):
    for i, (cell, precision) in enumerate((("dcgan_sn", "bf16"), ("demo", "fp32"), ("demo", "bf16"))):
        rd = tmp_path / "sweep" / str(i)
        (rd / ".hydra").mkdir(parents=True)
        (rd / "config.yaml").write_text(f"suite:\n  cell: {cell}\ntrain:\n  precision: {precision}\n")
        (rd / ".hydra" / "config.yaml").write_text("suite:\n  cell: hydra-copy\n")  # Hydra's own copy: skipped
    (tmp_path / "sweep" / "other").mkdir()
    (tmp_path / "sweep" / "other" / "config.yaml").write_text("train:\n  steps: 3\n")  # not a suite run
    got = [(rd.name, cell, p) for rd, cell, p in suite.suite_runs(tmp_path / "sweep")]
    assert got == [("2", "demo", "bf16"), ("1", "demo", "fp32"), ("0", "dcgan_sn", "bf16")]


def _row(cell, precision, flagged, collapsed, rule="d_wins"):
    return {"cell": cell, "intent": "x", "precision": precision, "flagged": flagged,
            "collapse_step": 50 if flagged else None, "rule": rule if flagged else None,
            "truth": {"collapsed": collapsed, "class_acc": 0.1, "diversity": 0.9, "FID": 10.0}}


def test_confusion_matrix_and_rates(suite):
    rows = [_row("a", "fp32", True, True), _row("b", "fp32", False, True), _row("c", "fp32", True, False, "class"),
            _row("d", "fp32", False, False), _row("e", "bf16", True, True), _row("f", "bf16", False, False),
            _row("g", "bf16", False, None)]  # no ground truth: left out of the counts
    c = suite.confusion(rows)
    assert (c["tp"], c["fn"], c["fp"], c["tn"], c["runs"]) == (2, 1, 1, 2, 6)
    assert c["recall"] == pytest.approx(2 / 3) and c["fp_rate"] == pytest.approx(1 / 3)
    assert suite.confusion([_row("f", "bf16", False, False)])["recall"] is None
    text = suite.tables(rows)
    assert "| fp32 | 1 | 1 | 1 | 1 | 0.50 | 0.50 |" in text
    assert "| bf16 | 1 | 0 | 0 | 1 | 1.00 | 0.00 |" in text
    assert "| class | 0 | 1 |" in text and "| d_wins | 2 | 0 |" in text
    assert "without the class rule" in text
