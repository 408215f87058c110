"""The layering the house keeps: imports go one way, down the layers, with no circles.

    pipeline/     stages (thin Hydra apps) and benchmarks          imports any layer below
    steering/     interventions, Steerer, vectors, exports, server  imports features, sae, activations
    features/     discovery: mining, labels, scores, report         imports sae, activations
    sae/          SAE architectures, training                       imports activations
    activations/  models, sites, corpus, run directory, store       imports nothing of ours

Every import counts, the ones inside functions too. Inside pipeline/, no module imports a stage
module (a stage is an entry point, never a library).
"""

from __future__ import annotations

import ast
from pathlib import Path

from conftest import ROOT

LAYERS = ["activations", "sae", "features", "steering", "pipeline"]  # lowest first
STAGES = {"harvest", "train", "label", "report", "browse", "steer", "serve", "store", "docs"}


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules(root: Path) -> dict[str, Path]:
    return {module_name(root, p): p for layer in LAYERS if (root / layer).is_dir()
            for p in sorted((root / layer).rglob("*.py"))}


def imports_of(path: Path, name: str, modules: dict[str, Path]) -> set[str]:
    """The project modules a module imports, anywhere in its body: `from a.b import c` counts as
    a.b.c when that is a module, else as a.b."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the module's package upwards
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                found.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return {m for m in found if m in modules}


def import_graph(root: Path) -> dict[str, set[str]]:
    modules = project_modules(root)
    return {name: imports_of(path, name, modules) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One path per import circle found by a depth-first search."""
    found, state = [], {}

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return found


def layer_violations(graph: dict[str, set[str]]) -> list[str]:
    """Imports that go up the layers, or that use a stage module as a library."""
    problems = []
    for module, targets in sorted(graph.items()):
        layer = LAYERS.index(module.split(".")[0])
        for target in sorted(targets):
            if LAYERS.index(target.split(".")[0]) > layer:
                problems.append(f"{module} imports {target}, a higher layer")
            elif target.startswith("pipeline.") and target.split(".")[1] in STAGES and target != module:
                problems.append(f"{module} imports the stage module {target}")
    return problems


def test_the_project_has_no_import_circles():
    assert cycles(import_graph(ROOT)) == []


def test_imports_go_down_the_layers_and_no_module_imports_a_stage():
    assert layer_violations(import_graph(ROOT)) == []


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")}
    assert packages - {"tests", "notebooks"} == set(LAYERS)


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_checks_catch_a_circle_and_a_library_importing_a_stage(tmp_path):
    tree = write(tmp_path, {
        "activations/__init__.py": "", "activations/a.py": "def f():\n    from activations import b\n",
        "activations/b.py": "from activations.a import f\n",
        "sae/__init__.py": "", "sae/x.py": "import features.y\n",
        "features/__init__.py": "", "features/y.py": "from pipeline.train import main\n",
        "pipeline/__init__.py": "", "pipeline/train.py": "def main():\n    pass\n",
        "pipeline/bench/__init__.py": "", "pipeline/bench/t.py": "from pipeline import train\n",
    })
    graph = import_graph(tree)
    assert cycles(graph) == [["activations.a", "activations.b", "activations.a"]]
    assert layer_violations(graph) == [
        "features.y imports pipeline.train, a higher layer",
        "pipeline.bench.t imports the stage module pipeline.train",
        "sae.x imports features.y, a higher layer",
    ]
