"""The docs and docstrings name only what exists: every module (`mmsa.features.cache`,
`search.run.Search`) and every file of the project (`bench/cv.py`, `spaces/fusion.yaml`) mentioned
in README.md, docs/*.md, and the docstrings and comments of the code is there (a last part in
capitals, `bench.NAME`, is a placeholder). Measurements kept for the record (bench/results/) cite
the commands of their day and are not checked."""

import ast
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MODULE = re.compile(r"(?<![\w./-])((?:mmsa|search|bench)(?:\.[A-Za-z_]\w*)+)")
PATH = re.compile(r"(?<![\w./-])((?:mmsa|search|bench|spaces|docs|notebooks|tests)/[\w./-]*\w)")
SUFFIXES = (".py", ".md", ".yaml", ".json", ".npz", ".txt", ".png", ".sh", ".ipynb", ".pt", ".db")


def _tag_names() -> set[str]:
    """MLflow tag names (`mmsa.kind`, ...) look like modules: they are not."""
    from mmsa.app import run_tags
    return {v for k, v in vars(run_tags).items() if k.startswith("TAG_")}


def _prose(path: Path) -> str:
    """A markdown file whole; of a Python file, its docstrings and comments only."""
    text = path.read_text()
    if path.suffix != ".py":
        return text
    parts = [tok.string for tok in tokenize.generate_tokens(io.StringIO(text).readline) if tok.type == tokenize.COMMENT]
    for node in ast.walk(ast.parse(text)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=False)
            if doc:
                parts.append(doc)
    return "\n".join(parts)


def _module_exists(name: str) -> bool:
    """`a.b.c`: a module, or a module and a name defined in it."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        base = ROOT.joinpath(*parts[:i])
        source = base.with_suffix(".py") if base.with_suffix(".py").exists() else base / "__init__.py"
        if source.exists():
            return i == len(parts) or re.search(rf"\b{re.escape(parts[i])}\b", source.read_text()) is not None
    return False


def _documents() -> list[Path]:
    code = [p for d in ("mmsa", "search", "bench", "tests") for p in sorted((ROOT / d).rglob("*.py"))]
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), *code]


@pytest.mark.parametrize("path", _documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_what_a_document_names_exists(path):
    text, tags = _prose(path), _tag_names()
    missing = []
    for match in MODULE.finditer(text):
        name = match.group(1)
        placeholder = name.rsplit(".", 1)[-1].isupper()
        if not name.endswith(SUFFIXES) and name not in tags and not placeholder and not _module_exists(name):
            missing.append(name)
    for match in PATH.finditer(text):
        if not (ROOT / match.group(1)).exists() and not Path(match.group(1)).stem.isupper():
            missing.append(match.group(1))
    assert not missing, f"{path.relative_to(ROOT)} names what does not exist: {sorted(set(missing))}"
