"""The import floors of `ltsearch`, checked on the source against the table in the README's "Layout" section:
a module imports only from its own floor or a lower one, and no modules import each other in a circle.

Every import of a package module counts, wherever it stands: at the top, inside a function, or under
`if TYPE_CHECKING:`. A deferred or type-only import still ties a lower module to a higher one (and to its
changes), so the package has none of those going up. Modules of `search/` and `analysis/` are checked one by
one like the others (siblings may import each other, never in a circle).

Also here: no module over 450 lines, and importing the analysis package (what the notebooks and the report
load) or the config loads no torch.
"""
from __future__ import annotations

import ast
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "ltsearch"
MAX_LINES = 450


def readme_floors(readme: Path) -> dict[str, int]:
    """Floor of each module ("data") or subpackage ("search/") from the `floor N  a, b, c` lines of the README's
    Layout section."""
    layout = readme.read_text().split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    floors: dict[str, int] = {}
    for number, names in re.findall(r"^floor (\d+)  (.+)$", layout, re.MULTILINE):
        for name in names.split(","):
            floors[name.strip()] = int(number)
    return floors


def package_modules(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every module of `package`; a (sub)package is named by its `__init__.py`."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = path.relative_to(package.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imported(name: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """(package module, line) of every import in the module `name` of the package, wherever it stands; an
    import of something inside a module counts as one of that module."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: resolved against the module's package
                module = ".".join(base[:len(base) - node.level + 1] + ([module] if module else []))
            # `from package import module` imports the module; `from module import name`, the module
            targets = [f"{module}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name and (target, node.lineno) not in found:
                found.append((target, node.lineno))
    return found


def floor_of(name: str, package: Path, floors: dict[str, int]) -> int | None:
    parts = name.split(".")[1:]
    if not parts:
        return 0  # the package's __init__ runs before any of its modules: the ground floor
    return floors.get(parts[0] + "/" if (package / parts[0]).is_dir() else parts[0])


def circles(graph: dict[str, set[str]]) -> list[tuple[list[str], list[str]]]:
    """Per group of modules that import each other (a strongly connected component of `graph`, by Tarjan's
    algorithm): one shortest circle through its first module (repeated at the end), and all its modules."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    components: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    out = []
    for component in components:
        if len(component) < 2:
            continue
        start, members = min(component), set(component)
        paths = {start: [start]}
        frontier = [start]
        while frontier:  # breadth first within the component, back to `start`
            v = frontier.pop(0)
            if start in graph[v]:
                out.append(([*paths[v], start], sorted(component)))
                break
            for w in sorted(graph[v] & members):
                if w not in paths:
                    paths[w] = [*paths[v], w]
                    frontier.append(w)
    return out


def layer_problems(package: Path, floors: dict[str, int]) -> list[str]:
    """Every module on no floor, every import from a higher floor, and every circle, one line each."""
    modules = package_modules(package)
    problems, graph = [], {}
    for name, path in modules.items():
        if floor_of(name, package, floors) is None:
            problems.append(f"{name} ({path.relative_to(package.parent)}) is on no floor: add it to a floor in "
                            "the README's Layout section")
    for name, path in modules.items():
        edges = imported(name, path, set(modules))
        graph[name] = {target for target, _ in edges}
        here = floor_of(name, package, floors)
        for target, line in edges:
            there = floor_of(target, package, floors)
            if here is not None and there is not None and there > here:
                problems.append(f"upward import: {name} (floor {here}) imports {target} (floor {there}) at "
                                f"{path.relative_to(package.parent)}:{line}")
    for circle, group in circles(graph):
        others = sorted(set(group) - set(circle))
        problems.append("circle: " + " -> ".join(circle) + (f" (with {', '.join(others)})" if others else ""))
    return problems


# ---------------------------------------------------------------- the package

def test_readme_lists_the_floors_ground_floor_first():
    floors = readme_floors(REPO / "README.md")
    numbers = list(dict.fromkeys(floors.values()))
    assert numbers == list(range(len(numbers))) and len(numbers) > 1, floors
    assert floors["catalog"] == 0 and floors["config"] > floors["data"] and floors["search/"] > floors["train"]


def test_no_module_imports_from_a_higher_floor_or_in_a_circle():
    problems = layer_problems(PACKAGE, readme_floors(REPO / "README.md"))
    assert not problems, "\n".join(problems)


def test_no_module_is_over_450_lines():
    sizes = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in PACKAGE.rglob("*.py")}
    assert not {path: n for path, n in sizes.items() if n > MAX_LINES}


@pytest.mark.parametrize("module", ["ltsearch.analysis", "ltsearch.config"])
def test_importing_loads_no_torch(module):
    """In a fresh interpreter, so that what other tests imported does not count. The notebooks and the report
    start with `import ltsearch.analysis`; torch alone takes about a second to import."""
    code = f"import sys, {module}; print(sorted(m for m in ('torch', 'torchvision', 'ray') if m in sys.modules))"
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]"


# ---------------------------------------------------------------- the check itself, on small packages

def write_package(root: Path, files: dict[str, str]) -> Path:
    package = root / "pkg"
    for name, text in {"__init__.py": "", **files}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(textwrap.dedent(text))
    return package


def test_the_check_names_an_upward_import_even_inside_a_function(tmp_path):
    package = write_package(tmp_path, {
        "low.py": "def f():\n    from .high import g\n",
        "high.py": "from . import low\n",
    })
    assert layer_problems(package, {"low": 0, "high": 1}) == [
        "upward import: pkg.low (floor 0) imports pkg.high (floor 1) at pkg/low.py:2",
        "circle: pkg.high -> pkg.low -> pkg.high",
    ]


def test_the_check_names_a_circle_through_type_checking_imports(tmp_path):
    package = write_package(tmp_path, {
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pkg.b import B\n",
        "b.py": "import pkg.a\n",
        "sub/__init__.py": "from .x import X\n",
        "sub/x.py": "from ..a import A\nfrom . import y\n",
        "sub/y.py": "from .x import X\n",
    })
    assert layer_problems(package, {"a": 1, "b": 1, "sub/": 2}) == [
        "circle: pkg.a -> pkg.b -> pkg.a", "circle: pkg.sub.x -> pkg.sub.y -> pkg.sub.x"]


def test_the_check_names_a_module_on_no_floor(tmp_path):
    package = write_package(tmp_path, {"a.py": "import os\n", "new.py": ""})
    assert layer_problems(package, {"a": 0}) == [
        "pkg.new (pkg/new.py) is on no floor: add it to a floor in the README's Layout section"]
