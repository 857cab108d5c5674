"""The installed distribution (docs/architecture.md, "Packaging"): the wheel holds the tree's bench/, models/
(as bench.models) and configs/ (as bench.configs) and nothing else at the top level; a checkout with no install
of its own still finds bench.models and bench.configs. That the wheel, installed into a fresh venv outside the
checkout, trains and inspects is scripts/wheel-check.sh, which .ci/run runs after the test suite (a minute: kept
out of the suite's time)."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "wheel-check.sh"


def _shipped_files() -> list[str]:
    """What git would ship: tracked and new unignored files that exist now (the script builds from these)."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         capture_output=True, check=True).stdout.decode()
    return [f for f in out.split("\0") if f and (ROOT / f).is_file()]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel, built with this venv's setuptools (no download) from a copy of the shipped files."""
    if subprocess.run(["git", "rev-parse"], cwd=ROOT, capture_output=True).returncode:
        pytest.skip("not a git checkout")
    from importlib.metadata import version

    found = version("setuptools")
    if tuple(int(x) for x in found.split(".")[:2]) < (70, 1):  # bdist_wheel is built in from 70.1
        pytest.fail(f"setuptools {found} in this venv builds no wheel by itself; pip install -e '.[test]' "
                    f"installs setuptools>=70.1")
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    for f in _shipped_files():
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        (src / f).write_bytes((ROOT / f).read_bytes())
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp / "dist"), str(src)], check=True, timeout=600)
    (whl,) = (tmp / "dist").glob("gan_bench-*.whl")
    return whl


def test_the_wheel_holds_the_tree_under_bench_and_nothing_else(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    files = _shipped_files()
    # Every shipped file of the three folders: a data file added without package data fails here.
    expected = ({f for f in files if f.startswith("bench/")}
                | {"bench/" + f for f in files if f.startswith(("models/", "configs/"))})
    got = {n for n in names if ".dist-info/" not in n}
    assert got == expected, (sorted(expected - got), sorted(got - expected))
    assert {n.split("/")[0] for n in names} == {"bench", wheel.name.split("-py3")[0] + ".dist-info"}
    assert "bench/configs/config.yaml" in got and "bench/configs/model/biggan.yaml" in got


def test_the_wheel_declares_the_command_and_the_extras(wheel):
    z = zipfile.ZipFile(wheel)
    meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    entry = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "bench = bench.cli:entry" in entry
    extras = {line.split(":", 1)[1].strip() for line in meta.splitlines() if line.startswith("Provides-Extra:")}
    assert {"test", "hdf5", "lmdb", "mlflow", "wandb"} <= extras
    core = [line for line in meta.splitlines() if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert any(line.split()[1].startswith("tensorboard") for line in core)  # a core dependency: no `tb` extra
    for extra, package in (("hdf5", "h5py"), ("lmdb", "lmdb"), ("mlflow", "mlflow"), ("wandb", "wandb")):
        assert any(line.startswith(f"Requires-Dist: {package}") and f'extra == "{extra}"' in line
                   for line in meta.splitlines()), extra


def test_a_checkout_with_no_install_finds_models_and_configs(tmp_path):
    """bench imported straight from the checkout (the editable install's finder removed): bench.models is the
    checkout's models/, the configs its configs/ (bench/__init__.py adds the checkout's root to bench's path)."""
    code = ("import sys\n"
            "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n"
            f"sys.path.insert(0, {str(ROOT)!r})\n"
            "import bench, bench.models, bench.config\n"
            "print(bench.__file__); print(bench.models.__file__); print(bench.config.CONFIG_DIR)\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(ROOT / "bench" / "__init__.py"), str(ROOT / "models" / "__init__.py"),
                                  str(ROOT / "configs")]
