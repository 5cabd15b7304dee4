"""The package boundaries, kept by a test rather than by convention: the model library imports
no MLflow, Ray or argparse; only mmsa/app (the edges) does; search/ imports no mmsa command line."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ["config.py", "errors.py", "locks.py", "data", "features", "models", "training"]
EDGE_ONLY = ("mlflow", "ray", "argparse")
COMMANDS = ("mmsa.train", "mmsa.final", "mmsa.predict", "mmsa.app.train", "mmsa.app.final", "mmsa.app.predict")


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
            out.update(f"{node.module}.{alias.name}" for alias in node.names)
    return out


def _files(*parts: str) -> list[Path]:
    found = []
    for part in parts:
        path = ROOT / part
        found += sorted(path.rglob("*.py")) if path.is_dir() else [path]
    return found


@pytest.mark.parametrize("path", _files(*(f"mmsa/{p}" for p in LIBRARY)), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_model_library_imports_no_mlflow_ray_or_argparse(path):
    bad = {m for m in _imports(path) if m.split(".")[0] in EDGE_ONLY or m.startswith("mmsa.app")}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}: that belongs in mmsa/app"


@pytest.mark.parametrize("path", _files("search"), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_search_imports_no_mmsa_command_line(path):
    bad = {m for m in _imports(path) if any(m == c or m.startswith(c + ".") for c in COMMANDS)}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_every_mmsa_module_is_library_edge_or_entry_point():
    entry_points = {"train.py", "final.py", "predict.py", "__init__.py"}
    top = {p.name for p in (ROOT / "mmsa").iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")}
    assert top == set(LIBRARY) | {"app"} | entry_points
    for name in entry_points - {"__init__.py"}:  # `python -m mmsa.X` launches mmsa.app.X and does nothing else
        path = ROOT / "mmsa" / name
        assert _imports(path) == {"mmsa.app.commands", "mmsa.app.commands.launch"}
        assert f'launch("mmsa.app.{name[:-3]}")' in path.read_text()
