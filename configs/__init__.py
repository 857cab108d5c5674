"""gan-bench's own configs (the YAML beside this file). This file makes the folder the package
`bench.configs` (pyproject.toml's package-dir), which bench/config.py finds through importlib.resources."""
