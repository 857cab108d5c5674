"""docs/architecture.md stays true: every repository path, module name, `module.name`, `Class.member` and config
key it cites in backticks exists (read from the source with ast, nothing imported)."""
import ast
import re
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PAGE = ROOT / "docs" / "architecture.md"
INSTALL_ONLY = {"bench/models", "bench/configs"}  # package names of the wheel (pyproject.toml's package-dir)


def _sources() -> dict:
    return {p: p.read_text() for d in ("bench", "models") for p in (ROOT / d).rglob("*.py")}


def _names(tree: ast.Module) -> tuple[set, dict]:
    """Top-level names of a module, and {class: its members, including attributes set on self in its methods}."""
    top, classes = set(), {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            top.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                top |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            top |= {(a.asname or a.name).split(".")[0] for a in node.names}
        if isinstance(node, ast.ClassDef):
            members = set()
            for sub in ast.walk(node):
                if isinstance(sub, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and sub is not node:
                    members.add(sub.name)
                elif isinstance(sub, (ast.Assign, ast.AnnAssign)):
                    for t in sub.targets if isinstance(sub, ast.Assign) else [sub.target]:
                        if isinstance(t, ast.Name):
                            members.add(t.id)
                        elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                            members.add(t.attr)
            classes[node.name] = members
    return top, classes


def _config_keys() -> dict:
    """{group: its keys} of the config schema (bench/schema.py)."""
    from bench import schema

    return {f.name: {g.name for g in fields(f.default_factory)} for f in fields(schema.Config)
            if is_dataclass(f.default_factory)}


def test_every_cited_path_module_name_and_key_exists():
    sources = _sources()
    modules, classes = {}, {}
    for path, text in sources.items():
        top, cls = _names(ast.parse(text))
        modules.setdefault(path.stem, []).append(top)
        for name, members in cls.items():
            classes.setdefault(name, set()).update(members)
    keys = _config_keys()
    files = {p.name for p in sources}
    missing = []
    for token in dict.fromkeys(re.findall(r"`([^`\n]+)`", PAGE.read_text())):
        token = token.strip()
        if re.fullmatch(r"(bench|models|tests|scripts|configs|slurm|docs)/[\w/.-]+", token):
            if token.rstrip("/") not in INSTALL_ONLY and not (ROOT / token).exists():
                missing.append(f"path {token}")
            continue
        if re.fullmatch(r"[a-z_0-9]+\.py", token):  # one of ours by its file name (other projects' are CamelCase)
            if token not in files:
                missing.append(f"file {token}")
            continue
        m = re.fullmatch(r"([A-Za-z_]\w*)\.([A-Za-z_]\w*)(\(.*\))?", token)
        if not m:
            continue
        head, attr = m.group(1), m.group(2)
        if attr in ("json", "jsonl", "yaml", "png", "csv", "md", "txt", "pt", "npz", "py", "pth", "tar"):
            continue  # a file name (the run directory's files are written at run time)
        if head in keys and attr in keys[head]:
            continue  # a config key (telemetry.sigma_every)
        if head in modules and len(modules[head]) == 1:
            if attr not in modules[head][0]:
                missing.append(f"name {token}")
        elif head in classes:
            if attr not in classes[head]:
                missing.append(f"member {token}")
        elif head in keys and not m.group(3):
            missing.append(f"config key {token}")
    assert not missing, "docs/architecture.md cites what does not exist:\n" + "\n".join(missing)


def test_the_check_would_catch_a_stale_name(tmp_path, monkeypatch):
    """The scan above is not vacuous: a page citing a renamed function fails it."""
    page = tmp_path / "architecture.md"
    page.write_text("`collapse.CollapseSettings` and `telemetry.no_such_function` and `bench/nowhere.py` and "
                    "`telemetry.no_such_key`")
    monkeypatch.setattr(sys.modules[__name__], "PAGE", page)
    try:
        test_every_cited_path_module_name_and_key_exists()
    except AssertionError as err:
        text = str(err)
    else:
        raise AssertionError("a stale page passed")
    assert "name telemetry.no_such_function" in text and "path bench/nowhere.py" in text
    assert "name telemetry.no_such_key" in text
    assert "collapse.CollapseSettings" not in text
