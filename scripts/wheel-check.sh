#!/usr/bin/env bash
# The wheel works outside the checkout (issue 23; docs/architecture.md, "Packaging"). Builds the wheel from
# the files git would ship, installs it into a fresh venv outside the checkout, and from a folder outside
# the checkout checks that bench, bench.models and the configs are the wheel's own, trains 2 steps on the
# built-in data and runs `bench inspect`. Exit 1 on the first failure (the step is named on stderr).
#
# Usage: scripts/wheel-check.sh [PYTHON]   (default: python3; CI and tests/test_wheel.py pass the project
# venv's python). The fresh venv borrows PYTHON's installed packages through a .pth file, so torch is not
# installed twice: the wheel goes in with --no-deps --no-index, and `pip check` then confirms that every
# dependency the wheel declares is met. The fresh venv's own site-packages comes first on sys.path, and the
# borrowed folder's .pth files (the checkout's editable install) are not run, so only the wheel's files
# can be imported as bench.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
py=${1:-python3}
work=$(mktemp -d "${TMPDIR:-/tmp}/gan-bench-wheel.XXXXXX")
trap 'rm -rf "$work"' EXIT
step() { echo "wheel-check: $*"; }
fail() { echo "wheel-check: FAILED: $*" >&2; exit 1; }

step "1/5 building the wheel from $repo"
mkdir -p "$work/src" "$work/dist"
if git -C "$repo" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked and new (not ignored) files as they are now; never a stale build/ or egg-info.
  (cd "$repo" && git ls-files -z --cached --others --exclude-standard \
     | tar --null -T - --ignore-failed-read -cf - 2>/dev/null) | tar -xf - -C "$work/src"
else
  tar -C "$repo" --exclude=.venv --exclude=build --exclude='*.egg-info' --exclude=.git -cf - . | tar -xf - -C "$work/src"
fi
"$py" -m pip wheel -q --no-deps --no-build-isolation -w "$work/dist" "$work/src" || fail "pip wheel"
whl=$(ls "$work/dist"/gan_bench-*.whl)
"$py" - "$whl" <<'EOF' || fail "the wheel's top level"
import sys, zipfile
top = {n.split("/")[0] for n in zipfile.ZipFile(sys.argv[1]).namelist()}
extra = sorted(t for t in top if t != "bench" and not t.endswith(".dist-info"))
if extra:
    sys.exit(f"the wheel installs {extra} at the top level of site-packages besides bench")
EOF

step "2/5 installing $(basename "$whl") into a fresh venv at $work/venv"
base=$("$py" -c 'import sys; print(getattr(sys, "_base_executable", sys.executable))')
"$base" -m venv "$work/venv" || fail "python -m venv"
vpy=$work/venv/bin/python
"$vpy" -m pip install -q --no-deps --no-index "$whl" || fail "pip install the wheel"
site=$("$vpy" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# PYTHON's package folders (its site-packages and what its .pth files add), never the checkout's sources or the
# stdlib. A venv inside the checkout (CI's .venv) is borrowed: its site-packages is not the checkout's source.
env -u PYTHONPATH "$py" - "$repo" > "$site/zz-borrowed-packages.pth" <<'EOF' || fail "PYTHON's package folders"
import os, sys, sysconfig
from pathlib import Path
repo, std = Path(sys.argv[1]).resolve(), {sysconfig.get_paths()["stdlib"], sysconfig.get_paths()["platstdlib"]}
for p in dict.fromkeys(sys.path):
    path = Path(p).resolve() if p else None
    source = path is not None and path.is_relative_to(repo) and not {"site-packages", "dist-packages"} & set(path.parts)
    if p and os.path.isdir(p) and p not in std and not p.endswith("lib-dynload") and not source:
        print(p)
EOF
if ! "$vpy" -m pip check > "$work/pipcheck" 2>&1 && grep -i "^gan-bench " "$work/pipcheck" >&2; then
  fail "pip check: a dependency the wheel declares is missing"
fi

step "3/5 importing from outside the checkout ($work/run)"
mkdir -p "$work/run"
cd "$work/run"
export GAN_BENCH_CACHE=$work/cache OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
unset PYTHONPATH GAN_BENCH_CONFIG_PATH
"$vpy" - "$site" "$repo" <<'EOF' || fail "imports"
import importlib.util, sys
from pathlib import Path
site, repo = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
import bench, bench.config, bench.models
for what, path in (("bench", bench.__file__), ("bench.models", bench.models.__file__),
                   ("the configs", bench.config.CONFIG_DIR)):
    p = Path(path).resolve()
    if not p.is_relative_to(site) or p.is_relative_to(repo):
        sys.exit(f"{what} comes from {p}, not from the fresh venv's site-packages {site}")
if importlib.util.find_spec("models") is not None:
    sys.exit(f"a top-level 'models' is importable: {importlib.util.find_spec('models').origin}")
print(f"  bench from {Path(bench.__file__).parent}, configs from {bench.config.CONFIG_DIR}")
EOF
bench_cmd=$work/venv/bin/bench
[ -x "$bench_cmd" ] || fail "the wheel installed no bench command"

step "4/5 bench train train.steps=2 (built-in data, 200 images; the main job's end: classifier, evaluation, quality line)"
"$bench_cmd" train train.steps=2 data.num_samples=200 data.num_workers=0 train.tick_every=1 \
  run.dir="$work/run/train" || fail "bench train"
"$vpy" - "$work/run/train" <<'EOF' || fail "the training's records"
import json, sys
from pathlib import Path
run = Path(sys.argv[1])
status = json.loads((run / "summary.json").read_text()).get("status")
ckpts = sorted((run / "checkpoints").glob("ckpt-*.pt"))
if status != "completed" or not ckpts:
    sys.exit(f"run {run}: status {status!r}, checkpoints {[c.name for c in ckpts]}")
quality = json.loads((run / "summary.json").read_text()).get("quality") or {}
if not {"FID", "class_acc"} <= set(quality):
    sys.exit(f"run {run}: no quality line (summary.json quality: {quality})")
EOF

step "5/5 bench inspect"
"$bench_cmd" inspect > "$work/inspect.json" || fail "bench inspect"
"$vpy" -c 'import json, sys; d = json.load(open(sys.argv[1])); assert d["G_params"] > 0 and d["D_params"] > 0, d' \
  "$work/inspect.json" || fail "bench inspect's output"
step "OK: the wheel trains and inspects from outside the checkout"
