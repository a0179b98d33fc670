"""The package runs on Python 3.10, as the README promises: checked with a real 3.10 interpreter.

Every source file of the package is compiled by Python 3.10 (3.11+ syntax such as `except*` or PEP 695
generics fails there), and every name it takes from `typing` and every standard-library module (and name
imported from one) is looked up in 3.10's own standard library: `typing.Self` and `tomllib` are 3.11+.
The names are collected here with `ast`; Python 3.10 only receives them as JSON, so it needs nothing
installed. Code under `if TYPE_CHECKING:`, behind a `sys.version_info` test that is false on 3.10, or in
a `try:` whose `except` catches the ImportError is not run by 3.10, so it is not checked.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TARGET = (3, 10)


def sources() -> list[Path]:
    """What Python 3.10 must run: the core, the ComfyUI nodes, the pack's entry point, and the tests (where
    `tomllib` once slipped in)."""
    folders = ("infvsr_core", "nodes", "tests")
    return sorted([ROOT / "__init__.py", *(path for folder in folders for path in (ROOT / folder).rglob("*.py"))])


def python310() -> str:
    """A Python 3.10 interpreter that works, or skip saying where one was looked for.

    A pyenv shim named python3.10 exists even when no 3.10 is selected (it then fails), so each candidate
    is run; pyenv's installed versions are tried too. `INFVSR_PYTHON310` names one explicitly.
    """
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    candidates = [
        os.environ.get("INFVSR_PYTHON310"),
        shutil.which("python3.10"),
        *(str(p) for p in sorted(pyenv.glob("versions/3.10*/bin/python3.10"))),
        "/usr/bin/python3.10",
        "/usr/local/bin/python3.10",
    ]
    tried = []
    for candidate in dict.fromkeys(c for c in candidates if c):
        tried.append(candidate)
        try:
            done = subprocess.run(
                [candidate, "-c", f"import sys; assert sys.version_info[:2] == {TARGET}"],
                capture_output=True,
                timeout=60,
            )
        except (OSError, subprocess.TimeoutExpired):
            continue
        if done.returncode == 0:
            return candidate
    pytest.skip(
        f"no working Python 3.10 interpreter (tried {', '.join(tried) or 'nothing: none on PATH'}); "
        "install one (e.g. pyenv install 3.10) or set INFVSR_PYTHON310 to its path"
    )


@dataclass
class Uses:
    """What a file needs from the standard library, each with where it is needed ("path:line")."""

    modules: dict[str, list[str]] = field(default_factory=dict)
    names: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # (module, name): from module import name

    def add_module(self, module: str, where: str) -> None:
        self.modules.setdefault(module, []).append(where)

    def add_name(self, module: str, name: str, where: str) -> None:
        self.names.setdefault((module, name), []).append(where)


class _Collector(ast.NodeVisitor):
    """Standard-library imports and `typing` names of one module, outside code 3.10 never runs."""

    def __init__(self, path: str, uses: Uses) -> None:
        self.path, self.uses = path, uses
        self.typing_aliases: set[str] = set()  # names bound to the typing module (import typing [as t])

    def where(self, node: ast.AST) -> str:
        return f"{self.path}:{getattr(node, 'lineno', 0)}"

    def visit_If(self, node: ast.If) -> None:
        runs = _runs_on_target(node.test)
        if runs is not False:
            for child in node.body:
                self.visit(child)
        if runs is not True:
            for child in node.orelse:
                self.visit(child)
        if runs is None:
            self.visit(node.test)

    def visit_Try(self, node: ast.Try) -> None:
        guarded = any(_catches_import_error(handler.type) for handler in node.handlers)
        if not guarded:
            for child in node.body:
                self.visit(child)
        for child in [*node.handlers, *node.orelse, *node.finalbody]:
            self.visit(child)

    visit_TryStar = visit_Try  # ast's name for `try ... except*` (only met where the file is 3.11+)

    def visit_Import(self, node: ast.Import) -> None:
        for alias in node.names:
            if _is_stdlib(alias.name):
                self.uses.add_module(alias.name, self.where(node))
            if alias.name == "typing":
                self.typing_aliases.add(alias.asname or "typing")

    def visit_ImportFrom(self, node: ast.ImportFrom) -> None:
        if node.level or not node.module or not _is_stdlib(node.module):
            return
        self.uses.add_module(node.module, self.where(node))
        for alias in node.names:
            if alias.name != "*":
                self.uses.add_name(node.module, alias.name, self.where(node))

    def visit_Attribute(self, node: ast.Attribute) -> None:
        if isinstance(node.value, ast.Name) and node.value.id in self.typing_aliases:
            self.uses.add_name("typing", node.attr, self.where(node))
        self.generic_visit(node)


def _is_stdlib(module: str) -> bool:
    return module.split(".")[0] in sys.stdlib_module_names or module == "__future__"


def _catches_import_error(handler_type: ast.expr | None) -> bool:
    if handler_type is None:
        return True
    caught = handler_type.elts if isinstance(handler_type, ast.Tuple) else [handler_type]
    names = {c.id if isinstance(c, ast.Name) else c.attr if isinstance(c, ast.Attribute) else "" for c in caught}
    return bool(names & {"ImportError", "ModuleNotFoundError", "Exception", "BaseException"})


def _runs_on_target(test: ast.expr) -> bool | None:
    """Whether an `if` body runs on 3.10: False under TYPE_CHECKING, the value of a `sys.version_info`
    comparison with a tuple, None (both branches may run) otherwise."""
    if (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    ):
        return False
    if not (isinstance(test, ast.Compare) and len(test.ops) == 1 and isinstance(test.comparators[0], ast.Tuple)):
        return None
    left = test.left.value if isinstance(test.left, ast.Subscript) else test.left  # sys.version_info[:2]
    if isinstance(left, ast.Attribute) and left.attr == "version_info":
        try:
            bound = ast.literal_eval(test.comparators[0])
        except ValueError:
            return None
        version = (*TARGET, 99, 99, 99)[: len(bound)]  # the latest 3.10 release
        compare = {ast.Lt: tuple.__lt__, ast.LtE: tuple.__le__, ast.Gt: tuple.__gt__, ast.GtE: tuple.__ge__}
        op = compare.get(type(test.ops[0]))
        return None if op is None else op(tuple(version), tuple(bound))
    return None


def collect(paths: list[Path]) -> Uses:
    """The standard-library modules and names (typing's included) these files use where 3.10 runs them."""
    uses = Uses()
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        _Collector(str(path.relative_to(ROOT) if path.is_relative_to(ROOT) else path), uses).visit(tree)
    return uses


# Run by Python 3.10: compile every file, import every module, look up every name; print what fails as JSON.
_CHECK = r"""
import importlib, json, sys
job = json.load(sys.stdin)
problems = []
for path in job["files"]:
    with open(path, "rb") as f:
        source = f.read()
    try:
        compile(source, path, "exec", dont_inherit=True)
    except SyntaxError as e:
        problems.append(f"{path}:{e.lineno}: does not compile on Python 3.10: {e.msg}")
for module, where in job["modules"]:
    try:
        importlib.import_module(module)
    except ImportError as e:
        problems.append(f"{where[0]}: module {module!r} is not in Python 3.10's standard library ({e})")
for module, name, where in job["names"]:
    try:
        found = importlib.import_module(module)
    except ImportError:
        continue  # reported above
    if not hasattr(found, name):
        try:
            importlib.import_module(f"{module}.{name}")
        except ImportError:
            problems.append(f"{where[0]}: {module}.{name} does not exist on Python 3.10")
print(json.dumps(problems))
"""


def check_on_python310(interpreter: str, paths: list[Path]) -> list[str]:
    uses = collect(paths)
    job = {
        "files": [str(p) for p in paths],
        "modules": sorted([module, where] for module, where in uses.modules.items()),
        "names": sorted([module, name, where] for (module, name), where in uses.names.items()),
    }
    done = subprocess.run(
        [interpreter, "-I", "-c", _CHECK], input=json.dumps(job), capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_the_package_compiles_and_imports_its_stdlib_on_python310():
    interpreter = python310()
    paths = sources()
    assert len(paths) > 20 and ROOT / "infvsr_core" / "pipeline.py" in paths
    problems = check_on_python310(interpreter, paths)
    assert not problems, "Python 3.10 (README: 3.10+) cannot run:\n" + "\n".join(problems)


def test_the_check_catches_311_only_code(tmp_path):
    """A module-level `from typing import Self`, `typing.Self`, tomllib, enum.StrEnum and `except*` fail."""
    interpreter = python310()
    (tmp_path / "names.py").write_text(
        "import typing\nfrom typing import Self\nimport tomllib\nfrom enum import StrEnum\nX = typing.Never\n"
    )
    (tmp_path / "syntax.py").write_text("try:\n    pass\nexcept* ValueError:\n    pass\n")
    problems = check_on_python310(interpreter, [tmp_path / "names.py", tmp_path / "syntax.py"])
    text = "\n".join(problems)
    for expected in ("typing.Self does not exist", "typing.Never does not exist", "'tomllib' is not", "StrEnum"):
        assert expected in text, text
    assert "syntax.py:3: does not compile on Python 3.10" in text
    assert len(problems) == 5, text


def test_code_3_10_does_not_run_is_not_collected(tmp_path):
    """TYPE_CHECKING blocks, false version tests and guarded imports are skipped; the rest is collected."""
    path = tmp_path / "guarded.py"
    path.write_text(
        "from __future__ import annotations\n"
        "import sys\n"
        "import typing as t\n"
        "from typing import TYPE_CHECKING, Any\n"
        "if TYPE_CHECKING:\n    from typing import Self\n"
        "if sys.version_info >= (3, 11):\n    import tomllib\nelse:\n    import json\n"
        "if sys.version_info < (3, 11):\n    import csv\n"
        "if sys.version_info[:2] >= (3, 12):\n    import tomllib\n"
        "try:\n    from enum import StrEnum\nexcept ImportError:\n    StrEnum = None\n"
        "def f(x: t.Self) -> Any:\n    from datetime import UTC\n    return UTC\n"
    )
    uses = collect([path])
    assert set(uses.modules) == {"__future__", "sys", "typing", "json", "csv", "datetime"}
    assert set(uses.names) == {
        ("__future__", "annotations"),
        ("typing", "TYPE_CHECKING"),
        ("typing", "Any"),
        ("typing", "Self"),  # t.Self in an annotation: typing.get_type_hints evaluates it
        ("datetime", "UTC"),
    }
