"""Imports run one way (docs/ARCHITECTURE.md): bench, simulations -> server, client -> shared; Flower stays out
of shared/ but for shared/wire.py.

Checked on the source, with ``ast``: every import, at module level or inside a function (an import hidden
in a function still ties the two modules together).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("shared", "server", "client", "simulations", "bench", "tests")
ALLOWED = {  # what each package may import of the project
    "shared": {"shared"},
    "server": {"server", "shared"},
    "client": {"client", "shared"},
    "simulations": {"simulations", "server", "client", "shared"},
    "bench": {"bench", "simulations", "server", "client", "shared"},
    "tests": {"tests", "simulations", "server", "client", "shared", "bench"},
}


def project_imports(root: Path) -> dict[str, list[tuple[str, tuple[str, ...], int]]]:
    """``{module: [(imported module, names taken from it, line)]}`` for every project module under ``root``: its
    imports of the project and of Flower."""
    found = {}
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            module = ".".join(path.relative_to(root).with_suffix("").parts).removesuffix(".__init__")
            imports = []
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    imports += [(a.name, (), node.lineno) for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = tuple(a.name for a in node.names)
                    # ``from shared import learner`` imports the module shared.learner
                    imports += [(f"{node.module}.{n}", (), node.lineno) for n in names
                                if (root / node.module.replace(".", "/") / f"{n}.py").is_file()]
                    imports.append((node.module, names, node.lineno))
            found[module] = [i for i in imports if i[0].split(".")[0] in (*PACKAGES, "flwr")]
    return found


def problems(root: Path) -> list[str]:
    """Every import against the layers, of another module's underscore name, or of a test file by another; and
    every import cycle."""
    graph, found = {}, []
    imports = project_imports(root)
    for module, entries in imports.items():
        package = module.split(".")[0]
        for target, names, line in entries:
            where = f"{module.replace('.', '/')}.py:{line}"
            if target.split(".")[0] == "flwr":
                if package == "shared" and module != "shared.wire":
                    found.append(f"{where}: shared/ imports Flower (only shared/wire.py may: both apps' record types)")
                continue
            if target.split(".")[0] not in ALLOWED[package]:
                found.append(f"{where}: {package}/ imports {target} (allowed: {', '.join(sorted(ALLOWED[package]))})")
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                found.append(f"{where}: imports {target}'s private {', '.join(private)}")
            if package == "tests" and target.startswith("tests.test_"):
                found.append(f"{where}: a test file imports another ({target}): shared helpers go in tests/helpers.py")
            if target in imports and target != module:
                graph.setdefault(module, set()).add(target)
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected group of modules (Tarjan), as a path that returns to its start."""
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [group + [group[0]] for group in groups]


def test_imports_run_one_way_without_cycles_or_private_names():
    assert problems(ROOT) == []


def test_the_check_sees_each_kind_of_breach(tmp_path):
    files = {
        "shared/low.py": "from server.high import thing\n",              # a lower layer imports a higher one
        "server/high.py": "def f():\n    from shared.low import _hidden\n",  # a private name (and a cycle)
        "client/app.py": "import simulations.cli\n",                    # client imports simulations
        "tests/test_a.py": "from tests.test_b import helper\n",           # a test imports a test
        "tests/test_b.py": "helper = 1\n",
        "simulations/cli.py": "x = 1\n",
        "shared/models.py": "from flwr.app import Message\n",               # Flower below the apps
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    found = problems(tmp_path)
    assert any("shared/low.py:1: shared/ imports server.high" in p for p in found)
    assert any("server/high.py:2: imports shared.low's private _hidden" in p for p in found)
    assert any("client/app.py:1: client/ imports simulations.cli" in p for p in found)
    assert any("tests/test_a.py:1: a test file imports another (tests.test_b)" in p for p in found)
    assert "import cycle: server.high -> shared.low -> server.high" in found
    assert any("shared/models.py:1: shared/ imports Flower" in p for p in found)
    assert len(found) == 6


def long_functions(root: Path) -> list[str]:
    """Functions past the style guide's length: 40 lines in the apps (handlers stay thin), 80 anywhere else."""
    found = []
    for package in PACKAGES:
        limit = 40 if package in ("server", "client") else 80
        for path in sorted((root / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1
                    if lines > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {lines} lines (at most "
                                     f"{limit})")
    return found


def test_no_function_is_longer_than_the_style_guide_allows(tmp_path):
    assert long_functions(ROOT) == []
    (tmp_path / "server").mkdir()
    (tmp_path / "server" / "app.py").write_text("def main():\n" + "    x = 1\n" * 40)
    assert long_functions(tmp_path) == ["server/app.py:1 main: 41 lines (at most 40)"]


def test_the_documented_round_names_at_most_eight_files_and_their_functions_exist():
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    steps = text.split("## One round, file by file", 1)[1].split("\nOnce, before round 1", 1)[0]
    files = set(re.findall(r"`([\w/]+\.py)`", steps))
    assert 5 <= len(files) <= 8, sorted(files)
    named = re.findall(r"`([\w/]+\.py)` `(\w+)`", steps)
    assert len(named) >= 6
    for path, name in named:  # each function the page names is defined in the file it names
        tree = ast.parse((ROOT / path).read_text())
        assert name in {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}, f"{path} has no {name}"
