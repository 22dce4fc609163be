"""The package's imports point one way (shared/DESIGN.md, "Layers"): nothing low imports anything
high, models import no data code, and no module reaches itself through others, counting imports
inside functions (a local import that dodges a cycle at load time is still one)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import trustgen

PACKAGE = Path(trustgen.__file__).parent

# Low to high; a module may import its own layer and those below it.
LAYERS: dict[str, int] = {
    "": 0, "errors": 0, "config": 0, "runtime": 0, "cores": 0, "cache": 0, "io": 0, "progress": 0,
    "data": 1,
    "models": 2,
    "sample": 3, "safety": 3, "compress": 3,
    "training": 4,
    "evaluate": 5,
    "runs": 6, "hf": 6, "federated": 6,
    "api": 7,
    "cli": 8, "serve": 8,
}
# Forbidden although the layers allow them: a model is architecture, loss and sampling only.
FORBIDDEN = {("models", "data")}


def module_files(root: Path) -> dict[str, Path]:
    """Dotted module names (relative to the package, "" for the package itself) -> files."""
    modules = {}
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path], package: str) -> set[str]:
    """The package's modules that `name` imports anywhere in its file (top level or local)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if name else []
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[: len(base) - node.level + 1]
                module = ".".join([package, *base, *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            # `from pkg import mod` names a module; `from pkg.mod import func` names its module.
            targets = [f"{module}.{a.name}" for a in node.names]
        for target in targets:
            if target != package and not target.startswith(package + "."):
                continue
            relative = target[len(package) + 1:]
            while relative not in modules and "." in relative:
                relative = relative.rsplit(".", 1)[0]
            if relative not in modules:
                relative = ""  # a name of the package itself (`from trustgen import __version__`)
            if relative != name:
                found.add(relative)
    return found


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = module_files(root)
    return {name: imports_of(name, path, modules, root.name) for name, path in modules.items()}


def layer_of(module: str) -> tuple[str, int]:
    top = module.split(".")[0]
    if top not in LAYERS:
        raise AssertionError(f"trustgen.{module} is in no layer: add its package to LAYERS")
    return top, LAYERS[top]


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that points up or is forbidden, and every cycle (one per strongly connected
    group of modules)."""
    found = []
    for module, targets in sorted(graph.items()):
        top, layer = layer_of(module)
        for target in sorted(targets):
            target_top, target_layer = layer_of(target)
            if target_layer > layer or (top, target_top) in FORBIDDEN:
                found.append(f"{module or 'trustgen'} imports {target} (layer {layer} -> {target_layer})")
    found += [f"cycle: {' -> '.join(sorted(group))}" for group in cycles(graph)]
    return found


def cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """Strongly connected groups of more than one module (Tarjan's algorithm, iteratively)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    groups = []
    for start in graph:
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is None:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[node])
                if low[node] == index[node]:
                    group = set()
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        group.add(member)
                        if member == node:
                            break
                    if len(group) > 1:
                        groups.append(group)
            elif child not in index:
                index[child] = low[child] = len(index)
                stack.append(child)
                on_stack.add(child)
                work.append((child, iter(sorted(graph.get(child, ())))))
            elif child in on_stack:
                low[node] = min(low[node], index[child])
    return groups


def test_the_package_imports_point_one_way_with_no_cycles() -> None:
    assert violations(import_graph(PACKAGE)) == []


def write_package(root: Path, files: dict[str, str]) -> Path:
    for name, source in files.items():
        path = root / "fake" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source)
    for folder in {p.parent for p in (root / "fake").rglob("*.py")}:
        (folder / "__init__.py").touch()
    return root / "fake"


@pytest.mark.parametrize(("files", "expected"), [
    ({"models/gpt.py": "def f():\n    from fake.training import loop\n", "training/loop.py": ""},
     "models.gpt imports training.loop"),
    ({"models/gpt.py": "from fake.data.text import x\n", "data/text.py": "x = 1\n"},
     "models.gpt imports data.text"),
    ({"data/a.py": "from fake.data import b\n", "data/b.py": "def f():\n    from fake.data.a import g\n"},
     "cycle: data.a -> data.b"),
    ({"io.py": "from . import api\n", "api.py": ""}, "io imports api"),
    ({"widgets.py": ""}, "in no layer"),
])
def test_the_import_check_fails_on_a_bad_import(tmp_path: Path, files: dict[str, str], expected: str) -> None:
    root = write_package(tmp_path, files)
    try:
        found = violations(import_graph(root))
    except AssertionError as error:
        found = [str(error)]
    assert any(expected in line for line in found), found


def test_the_import_check_accepts_imports_that_point_down(tmp_path: Path) -> None:
    root = write_package(tmp_path, {
        "cli.py": "from fake import api\nfrom fake.models.gpt import GPT\n", "api.py": "from fake import io\n",
        "io.py": "", "models/gpt.py": "from fake.config import Config\n", "config.py": ""})
    assert violations(import_graph(root)) == []
