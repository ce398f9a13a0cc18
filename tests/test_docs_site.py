"""The documentation site's sources: the API reference covers every public module, and the docstrings it
is generated from document their arguments and show examples that run. (``make test`` builds the site
itself, strict: no broken link, reference or docstring.)"""

from __future__ import annotations

import ast
import doctest
import itertools
import re
from pathlib import Path

import pytest

import groupnorm
import groupnorm._plan

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"

#: every module a user imports from; each has a page of the API reference
PUBLIC_MODULES = {
    "groupnorm",
    "groupnorm.numpy",
    "groupnorm.torch",
    "groupnorm.tf1",
    "groupnorm.keras",
    "groupnorm.flax",
    "groupnorm.flax.linen",
    "groupnorm.cli",
}


def module_path(name: str) -> Path:
    base = SRC.joinpath(*name.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def public_definitions(path: Path) -> list[ast.FunctionDef | ast.ClassDef]:
    """The functions and classes ``path`` defines and lists in ``__all__``, read without importing it."""
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["__all__"]:
            names = set(ast.literal_eval(node.value))
    return [n for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef) and n.name in names]


def parameters(node: ast.FunctionDef | ast.ClassDef) -> list[str]:
    if isinstance(node, ast.ClassDef):
        init = [n for n in node.body if isinstance(n, ast.FunctionDef) and n.name == "__init__"]
        if init:
            return parameters(init[0])
        if any(isinstance(d, ast.Name | ast.Call) and "dataclass" in ast.unparse(d) for d in node.decorator_list):
            return [n.target.id for n in node.body if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name)]
        return []
    args = node.args
    every = [*args.posonlyargs, *args.args, *args.kwonlyargs, args.vararg, args.kwarg]
    return [a.arg for a in every if a is not None and a.arg not in ("self", "cls")]


def attribute_docstrings(node: ast.FunctionDef | ast.ClassDef) -> set[str]:
    """A class's attributes that have a docstring of their own (a string right after the annotation)."""
    body = node.body if isinstance(node, ast.ClassDef) else []
    return {
        field.target.id
        for field, after in itertools.pairwise(body)
        if isinstance(field, ast.AnnAssign)
        and isinstance(field.target, ast.Name)
        and isinstance(after, ast.Expr)
        and isinstance(after.value, ast.Constant)
        and isinstance(after.value.value, str)
    }


def docstring_gaps(path: Path) -> list[str]:
    """Public functions and classes of ``path`` whose docstring misses an argument or an example."""
    gaps = []
    for node in public_definitions(path):
        doc = ast.get_docstring(node) or ""
        documented = set(re.findall(r"^\s{4,8}\**(\w+)(?: \(.*?\))?:", doc, re.M)) | attribute_docstrings(node)
        missing = [p for p in parameters(node) if p not in documented]
        if missing:
            gaps.append(f"{path.name}:{node.name}: arguments not described: {', '.join(missing)}")
        if "Example" not in doc:
            gaps.append(f"{path.name}:{node.name}: no example")
    return gaps


def test_the_api_reference_has_every_public_module() -> None:
    documented = {
        m for page in (ROOT / "docs" / "api").glob("*.md") for m in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M)
    }
    assert documented == PUBLIC_MODULES
    for name in PUBLIC_MODULES:
        assert module_path(name).exists(), name


def test_the_site_has_every_page() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    pages = {p.relative_to(ROOT / "docs").as_posix() for p in (ROOT / "docs").rglob("*.md")}
    listed = set(re.findall(r"([\w/.-]+\.md)\s*$", nav, re.M))
    assert pages == listed


@pytest.mark.parametrize(
    "name",
    [
        "groupnorm",
        "groupnorm._plan",
        "groupnorm.cli",
        "groupnorm.numpy",
        "groupnorm.torch",
        "groupnorm.tf1",
        "groupnorm.keras",
        "groupnorm.flax",
        "groupnorm.flax.linen",
    ],
)
def test_docstrings_describe_every_argument_and_show_an_example(name: str) -> None:
    assert docstring_gaps(module_path(name)) == []


def test_the_checker_finds_gaps(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        '__all__ = ["f", "g"]\n'
        'def f(a, b=1):\n    """Doc.\n\n    Args:\n        a: the a.\n    """\n'
        'def g(a):\n    """Doc.\n\n    Args:\n        a: the a.\n\n    Example:\n        >>> g(1)\n    """\n'
        "def h(x):\n    pass\n"
        '@dataclass\nclass C:\n    """Doc. Example: C(1, 2)."""\n    a: int\n    """The a."""\n    b: int\n'
    )
    sample.write_text(sample.read_text().replace('"g"]', '"g", "C"]'))
    assert docstring_gaps(sample) == [
        "sample.py:f: arguments not described: b",
        "sample.py:f: no example",
        "sample.py:C: arguments not described: b",
    ]


@pytest.mark.parametrize("module", [groupnorm, groupnorm._plan], ids=lambda m: m.__name__)
def test_docstring_examples_run(module: object) -> None:
    failures, tried = doctest.testmod(module, raise_on_error=False, verbose=False)  # type: ignore[arg-type]
    assert tried >= 3 and failures == 0
