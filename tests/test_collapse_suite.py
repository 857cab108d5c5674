"""scripts/collapse_suite.py: every cell composes and passes the config checks under both precisions, the ground
truth rule is the one written down, and the confusion matrix / recall / false-positive rate count right."""
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
    intents = [intent for intent, _ in suite.CELLS.values()]
    assert intents.count("collapse") >= 6 and intents.count("healthy") >= 4
    assert len(suite.CELLS) * len(suite.PRECISIONS) >= 24 and set(suite.PRECISIONS) == {"fp32", "bf16"}
    assert "+experiment=collapse" in suite.CELLS["demo"][1]
    # the rule written down in the docstring is the one the code applies
    doc = suite.__doc__
    assert f"CHANCE_FACTOR" in doc and "DIVERSITY_FLOOR" in doc and "FID_CEIL" in doc
    assert (suite.CHANCE_FACTOR, suite.DIVERSITY_FLOOR) == (1.5, 0.5)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_every_cell_composes_and_validates(suite, precision, tmp_path):
    for cell, (_, overrides) in suite.CELLS.items():
        cfg = compose([*overrides, *suite.COMMON, f"eval.classifier_path={tmp_path / 'c.pt'}",
                       f"train.precision={precision}", f"run.dir={tmp_path / cell}"])
        validate(cfg)
        assert cfg.telemetry.diversity_every > 0 and cfg.train.steps <= 1000, cell


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
