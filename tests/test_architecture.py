"""The package's shape: the add-on apart from the experiments, no import cycle, light imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "memloss_addon"
HEAVY = ("torchattacks", "sklearn", "matplotlib", "tqdm", "torchvision", "scipy")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def runtime_nodes(tree: ast.AST):
    """Every node of a module except those under ``if TYPE_CHECKING:`` (never imported)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in ast.walk(child))
            continue
        yield node
        yield from runtime_nodes(node)


def imports_of(path: Path) -> set[str]:
    """The memloss_addon modules a file imports when run, at any depth (lazy imports too)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("memloss_addon")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("memloss_addon"):
                continue
            for alias in node.names:  # "from .store import files" imports a module
                candidate = f"{target}.{alias.name}"
                found.add(candidate if candidate in MODULES else target)
    return {module for module in found if module in MODULES}


MODULES = {module_name(path) for path in PACKAGE.rglob("*.py")}
GRAPH = {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def is_experiment(module: str) -> bool:
    return module.startswith("memloss_addon.experiments")


def test_the_add_on_never_imports_the_experiments():
    offenders = {
        module: sorted(filter(is_experiment, targets))
        for module, targets in GRAPH.items()
        if not is_experiment(module) and any(map(is_experiment, targets))
    }
    assert offenders == {}


def test_there_is_no_import_cycle_between_modules():
    # A package's __init__ re-exporting its modules is not a cycle of code: leave those edges out.
    edges = {
        module: {
            target
            for target in targets
            if not (PACKAGE.joinpath(*target.split(".")[1:], "__init__.py").exists())
        }
        for module, targets in GRAPH.items()
    }
    state: dict[str, int] = {}
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges.get(module, ())):
            if state.get(target) == 1:
                cycles.append(path[path.index(target) :] + [target])
            elif target not in state:
                visit(target, path + [target])
        state[module] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert cycles == []


def test_the_graph_sees_known_edges():
    """A check of the checker: it finds imports it must find."""
    assert "memloss_addon.store.local" in GRAPH["memloss_addon.memory"]
    assert "memloss_addon.memory" in GRAPH["memloss_addon.experiments.training_setup"]
    assert "memloss_addon.checks" in GRAPH["memloss_addon.store.codecs"]


def loaded_after(statement: str) -> set[str]:
    code = (
        f"import sys; {statement}; "
        f"print(' '.join(sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(done.stdout.split())


def test_importing_the_add_on_loads_no_heavy_package_beyond_what_torch_loads():
    # torch.hub imports tqdm when it is installed, so "nothing" is relative to torch itself.
    assert loaded_after("import memloss_addon") == set()  # its names load on first use
    with_torch = loaded_after("import torch")
    assert loaded_after("from memloss_addon import MemoryWrapper, IndexedDataset") <= with_torch
    assert with_torch <= {"tqdm"}
