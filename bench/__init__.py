"""gan-bench: a benchmark harness for class-conditional GANs.

The repository keeps models/ and configs/ beside bench/; an install maps them to bench.models and
bench.configs (pyproject.toml). Imported from a checkout, bench also searches the checkout's root for
its subpackages, so they resolve with no install or an older one (docs/architecture.md, "Packaging").
"""
from pathlib import Path as _Path

_root = _Path(__file__).resolve().parent.parent
if not _Path(__file__).resolve().parent.joinpath("models").is_dir() and (_root / "models" / "__init__.py").is_file() \
        and (_root / "configs" / "__init__.py").is_file():
    __path__.append(str(_root))  # a checkout: bench.models is models/, bench.configs is configs/
del _Path, _root
