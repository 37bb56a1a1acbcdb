"""Each stage's code dependencies in dvc.yaml are exactly the project files its command imports.

The import closure is computed from the code itself (every ``import`` / ``from ... import`` of a ``stages`` module,
at any depth of the file, function-level imports included; package ``__init__`` files count, since importing a
submodule runs them). A directory dependency stands for every Python file below it. A stage that lists too little
keeps results of old code after an edit; one that lists too much reruns for nothing.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "stages"


def module_file(module: str) -> Path | None:
    """The file of a project module (``stages.core.flows`` -> stages/core/flows.py), or None if not ours."""
    if module != PACKAGE and not module.startswith(PACKAGE + "."):
        return None
    base = ROOT.joinpath(*module.split("."))
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    return None


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def imported_modules(path: Path) -> set[str]:
    """Every module name ``path`` imports (``from a.b import c`` yields a.b and a.b.c), TYPE_CHECKING blocks aside."""
    tree = ast.parse(path.read_text(), filename=str(path))
    module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
    # the package that relative imports start from: the module itself for an __init__, else its parent
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def loads_its_modules(path: Path) -> bool:
    """A package ``__init__`` that imports its modules by name (``LOADS_ITS_MODULES = True`` at its top level, as
    stages.core.agents does): importing the package counts as importing every module in it."""
    if path.name != "__init__.py":
        return False
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "LOADS_ITS_MODULES" for t in node.targets):
            return isinstance(node.value, ast.Constant) and node.value.value is True
    return False


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


def import_closure(module: str) -> set[Path]:
    """Project files loaded by ``python -m module``: the module, what it imports, transitively, with packages."""
    todo, seen = [module], set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        for part in _with_parents(name):
            if part in seen:
                continue
            seen.add(part)
            path = module_file(part)
            if path is None:
                continue
            files.add(path)
            todo.extend(imported_modules(path))
            if loads_its_modules(path):
                todo.extend(f"{part}.{module.stem}" for module in sorted(path.parent.glob("*.py")))
    return files


def code_deps(deps: list[str]) -> set[Path]:
    """The Python files a stage's deps cover (directories expanded), ignoring data deps."""
    files: set[Path] = set()
    for dep in deps:
        path = ROOT / dep
        if path.is_dir():
            files.update(p for p in path.rglob("*.py") if "__pycache__" not in p.parts)
        elif path.suffix == ".py":
            files.add(path)
    return files


def stage_entries() -> list[tuple[str, str, list[str]]]:
    """(stage name, its module, its deps) for every stage of dvc.yaml."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    entries = []
    for name, stage in stages.items():
        match = re.search(r"python -m ([\w.]+)", stage["cmd"])
        assert match, f"stage {name}: its cmd does not run a module with `python -m`: {stage['cmd']!r}"
        entries.append((name, match.group(1), [str(d) for d in stage.get("deps", [])]))
    return entries


@pytest.mark.parametrize("name,module,deps", stage_entries(), ids=[e[0] for e in stage_entries()])
def test_stage_code_deps_are_its_import_closure(name, module, deps):
    closure = import_closure(module)
    listed = code_deps(deps)
    rel = lambda paths: sorted(str(p.relative_to(ROOT)) for p in paths)
    missing, extra = rel(closure - listed), rel(listed - closure)
    assert not missing and not extra, (
        f"dvc.yaml stage {name} ({module}): deps missing {missing} (imported, so editing them must rerun the "
        f"stage); deps not imported {extra}"
    )


def test_a_package_that_loads_its_modules_by_name_imports_all_of_them():
    """stages.core.agents loads an agent by its name from the registry: every agent module is in the closure of a
    stage that imports the package (the prior stage uses only bc_flow statically)."""
    names = {str(p.relative_to(ROOT)) for p in import_closure("stages.evaluate")}
    agents = {str(p.relative_to(ROOT)) for p in (ROOT / "stages" / "core" / "agents").glob("*.py")}
    assert agents <= names and len(agents) >= 4


def test_closure_follows_function_level_imports_and_packages():
    """The closure sees imports inside functions and the package __init__ files a submodule import runs."""
    closure = import_closure("stages.train")
    names = {str(p.relative_to(ROOT)) for p in closure}
    # stages/train.py imports stages.core.* inside main(); the core package's __init__ applies the XLA flags
    assert "stages/core/__init__.py" in names and "stages/core/xla_setup.py" in names
    assert "stages/core/training_loop.py" in names
    assert "stages/evaluate.py" not in names  # train shares no code with the evaluate stage's module
