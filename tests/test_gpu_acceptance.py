"""scripts/gpu-acceptance.sh at a tiny width on this machine's device, so the GPU script never goes stale
(README, "GPU acceptance")."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_the_acceptance_script_runs_end_to_end_at_a_tiny_width(tmp_path):
    out = tmp_path / "acc"
    env = dict(os.environ, PYTHON=sys.executable)
    proc = subprocess.run([str(ROOT / "scripts" / "gpu-acceptance.sh"), "--tiny", str(out)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = (out / "acceptance.md").read_text()
    assert table in proc.stdout  # the one table, printed and written
    rows = [line for line in table.splitlines() if line.startswith("| headline") or line.startswith("| largest")]
    assert len(rows) == 2 and all("failed" not in r for r in rows), table
    headline = json.loads(next(p for p in out.glob("throughput-*-b4.json") if p.stem.count("-") == 2).read_text())
    img_s = float(rows[0].split("|")[4])
    assert abs(img_s - headline["img_per_s"]) < 0.051  # the table shows the measured numbers
    assert json.loads((out / "train" / "summary.json").read_text())["status"] == "completed"
    assert "eval/FID" in (out / "train" / "evals.jsonl").read_text()
    assert json.loads((out / "inspect.out").read_text())["G_params"] > 0
    # largest batch: the ladder's top (8) ran at a tiny width
    assert rows[1].split("|")[2].strip() == "8"
    # the math switches' rows (issue 25), each measured and recorded as it took effect
    switches = [line for line in table.splitlines() if line.startswith(("| Adam's loop", "| fp32", "| train.compile"))]
    assert len(switches) == 4 and all("failed" not in r for r in switches), table
    compiled = json.loads(next(out.glob("throughput-*-b4-compile.json")).read_text())
    assert compiled["compile"] == "default" and compiled["compile_s"] > 0 and compiled["compile_graph_breaks"] == 0
    loop = json.loads(next(out.glob("throughput-*-b4-loop-adam.json")).read_text())
    assert loop["optimizer_impl"] == "loop" and headline["optimizer_impl"] == "fused"
    tf32 = json.loads((out / "throughput-fp32-b4-tf32-on.json").read_text())
    assert tf32["tf32"] is (headline["device"].startswith("cuda") or "cpu" not in headline["device"].lower())
