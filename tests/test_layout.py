"""The architecture DESIGN.md draws ("Layout"), checked on the code: the import graph of
`service/` and `models/` has no cycle and no arrow pointing the wrong way, and importing the
app loads no TensorFlow.

Every import counts, including those inside functions and under `TYPE_CHECKING`: an import
deferred to keep start-up fast is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("service", "models")

#: (importer prefix, imported prefix, why not): no module under the first may import the second.
FORBIDDEN = [
    ("service.storage", "service.api", "storage/ imports nothing of api/"),
    ("models", "service.api", "models/ imports nothing of api/"),
    ("models", "service", "models/ imports nothing of service/"),
    ("service.storage", "service.jobs", "storage/ sits below the use cases"),
    ("service.storage", "service.workers", "storage/ sits below the runners"),
    ("service.storage", "service.serving", "storage/ sits below serving"),
    ("service.jobs", "service.api", "use cases do not know HTTP"),
    ("service", "tools", "tools/ holds development launchers, not installed"),
    ("models", "tools", "tools/ holds development launchers, not installed"),
]


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(path): path for package in PACKAGES
            for path in sorted((ROOT / package).rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The first-party modules `name` imports anywhere in its source, by full name.
    `from a import b` is an arrow to `a.b` when that is a module, else to `a`."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()

    def add(target: str) -> None:
        root = target.split(".")[0]
        if root not in (*PACKAGES, "tools"):
            return
        while target and target not in known and root != "tools":
            target = target.rpartition(".")[0]  # a name defined in a module, not a module
        if target and target != name:
            found.add(target)

    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolved against this module's package
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                submodule = f"{module}.{alias.name}"
                add(submodule if submodule in known else module)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle per strongly connected component of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return components


def _under(module: str, prefix: str) -> bool:
    return module == prefix or module.startswith(prefix + ".")


def test_the_graph_sees_imports_inside_functions():
    graph = import_graph()
    # service.app imports the training code inside a function, after fork.
    assert "service.jobs.training" in graph["service.app"]
    assert "models.backbone" in graph["service.serving.backbone"]


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


@pytest.mark.parametrize("importer, imported, why", FORBIDDEN)
def test_no_forbidden_arrow(importer, imported, why):
    wrong = sorted(f"{source} -> {target}" for source, targets in import_graph().items()
                   if _under(source, importer) for target in targets if _under(target, imported))
    assert wrong == [], why


def test_importing_the_app_loads_no_tensorflow():
    code = ("import sys\nimport service.app\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('tensorflow', 'keras')))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
