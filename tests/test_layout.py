"""The package boundaries, kept by a test rather than by convention: the model library imports
no MLflow, Ray or argparse; only mmsa/app (the edges) does; search/ imports no mmsa command line;
no module imports a higher layer, no two modules import each other (at the top or inside
functions); validating a space file imports neither torch nor Ray."""

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LIBRARY = ["config.py", "errors.py", "locks.py", "processes.py", "data", "features", "models", "training"]
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


def test_in_the_search_only_its_record_imports_mlflow():
    """search/record.py is the one home of the search's MLflow record: every other module of search/
    reads and writes it through SearchRecord (type-only imports aside)."""
    def runtime_imports(path: Path) -> set[str]:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):  # what `if TYPE_CHECKING:` imports is for annotations only
            if isinstance(node, ast.If) and getattr(node.test, "id", None) == "TYPE_CHECKING":
                node.body = []
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    found = {str(p.relative_to(ROOT)) for p in _files("search")
             if any(m.split(".")[0] == "mlflow" for m in runtime_imports(p))}
    assert found == {"search/record.py"}


def test_every_mmsa_module_is_library_edge_or_entry_point():
    entry_points = {"train.py", "final.py", "predict.py", "__init__.py"}
    top = {p.name for p in (ROOT / "mmsa").iterdir() if p.suffix == ".py" or (p.is_dir() and p.name != "__pycache__")}
    assert top == set(LIBRARY) | {"app"} | entry_points
    for name in entry_points - {"__init__.py"}:  # `python -m mmsa.X` launches mmsa.app.X and does nothing else
        path = ROOT / "mmsa" / name
        assert _imports(path) == {"mmsa.app.commands", "mmsa.app.commands.launch"}
        assert f'launch("mmsa.app.{name[:-3]}")' in path.read_text()


# Lowest first; a module may import its own layer and those below it.
LAYERS = (("mmsa.errors", "mmsa.locks", "mmsa.processes", "mmsa.config"), ("mmsa.data",), ("mmsa.features",), ("mmsa.models",),
          ("mmsa.training",), ("mmsa.app",), ("mmsa.train", "mmsa.final", "mmsa.predict"), ("search",))


def _module(path: Path) -> str:
    name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    return name.removesuffix(".__init__")


def _graph() -> dict[str, set[str]]:
    """Each module of mmsa and search -> the modules of theirs it imports."""
    modules = {_module(p): p for p in _files("mmsa", "search")}
    return {name: {m for m in _imports(path) if m in modules and m != name} for name, path in modules.items()}


def _layer(module: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if any(module == p or module.startswith(p + ".") for p in layer))


def test_no_module_imports_a_higher_layer():
    up = sorted(f"{m} -> {d}" for m, deps in _graph().items() for d in deps if _layer(d) > _layer(m))
    assert not up, f"imports from a lower layer into a higher one: {up}"


def test_no_import_cycles():
    graph, cycles = _graph(), []

    def visit(node, path, seen):
        for nxt in sorted(graph[node]):
            if nxt == path[0]:
                cycles.append(" -> ".join([*path, nxt]))
            elif nxt not in path and nxt not in seen and nxt > path[0]:  # each cycle once, from its least module
                seen.add(nxt)
                visit(nxt, [*path, nxt], seen)
    for start in sorted(graph):
        visit(start, [start], set())
    assert not cycles, f"modules that import each other: {cycles[:5]}"


def test_validating_a_space_file_imports_neither_torch_nor_ray():
    """search.run refuses a bad space file in one line before anything heavy loads."""
    import subprocess
    import sys
    code = ("import sys; from search.space import load_space; load_space('spaces/fusion.yaml'); "
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert not {"torch", "ray", "mlflow", "optuna", "numpy"} & set(loaded.stdout.split())
