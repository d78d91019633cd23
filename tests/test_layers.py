"""The import contract: suti's packages form layers, and no module imports one above it.

From the bottom up:

0. ``suti`` - the foundation (storage, images, tokenizer, weights, models, configs, sampling,
   conditioning, scoring, losses, the shard layout, Ray helpers, the synthetic world);
1. ``experts``, ``mining``, ``apprentice`` - the stages, independent of each other;
2. ``generation`` - the expert generation job (``suti generate``), over experts and mining;
3. ``serving`` - the HTTP service;
4. ``orchestration`` - the root command line, the demo, the evaluation and its comparisons.

A module may import its own package and any package of a lower layer. Every ``import`` and
``from ... import`` counts, at module level or inside a function, and so does every string
constant that names a module of another package (``importlib.import_module("mining.cli")``,
``"experts.cli"`` in a list of command modules, ``python -m apprentice.train``): the foundation
imports no stage, not even through strings. The import graph (statements only) has no circle
between modules, except a package's ``__init__`` and its own submodules.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

LAYERS: dict[str, int] = {
    "suti": 0,
    "experts": 1, "mining": 1, "apprentice": 1,
    "generation": 2,
    "serving": 3,
    "orchestration": 4,
}

_MODULE_STRING = re.compile(r"^([A-Za-z_]\w*)((?:\.[A-Za-z_]\w*)+)(?::[A-Za-z_]\w*)?$")


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules(root: Path, packages=tuple(LAYERS)) -> dict[str, Path]:
    """Every module of the layered packages under ``root``: dotted name -> file."""
    out = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            out[module_name(root, path)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path], packages=tuple(LAYERS)) -> tuple[set[str], set[str]]:
    """``(statements, strings)``: the project modules that ``path`` imports with a statement
    (resolved to the deepest existing module: ``from experts import train`` is
    ``experts.train``), and those named by a string constant."""
    tree = ast.parse(path.read_text(), filename=str(path))
    is_package = path.name == "__init__.py"
    statements, strings = set(), set()

    def deepest(dotted: str) -> str | None:
        while dotted and dotted not in modules:
            dotted = dotted.rpartition(".")[0]
        return dotted or None

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_package else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            targets = [f"{module}.{a.name}" for a in node.names] if module else []
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            match = _MODULE_STRING.match(node.value.strip())
            if match and match.group(1) in packages:
                target = deepest(match.group(1) + match.group(2))
                if target:
                    strings.add(target)
            continue
        else:
            continue
        for target in targets:
            if target.split(".")[0] in packages:
                resolved = deepest(target)
                if resolved:
                    statements.add(resolved)
    statements.discard(name)
    strings.discard(name)
    return statements, strings


def layer_violations(root: Path, layers: dict[str, int] = LAYERS) -> list[str]:
    """One line per import (or module string) from a package to another of the same or a
    higher layer."""
    modules = project_modules(root, tuple(layers))
    bad = []
    for name, path in modules.items():
        statements, strings = imports_of(name, path, modules, tuple(layers))
        own = name.split(".")[0]
        for target in sorted(statements | strings):
            other = target.split(".")[0]
            if other != own and layers[other] >= layers[own]:
                how = "imports" if target in statements else "names (in a string)"
                bad.append(f"{path.relative_to(root)}: {name} {how} {target} "
                           f"({own} is layer {layers[own]}, {other} layer {layers[other]})")
    return bad


def import_cycles(root: Path, layers: dict[str, int] = LAYERS) -> list[list[str]]:
    """Circles of import statements between modules (Tarjan's strongly connected components).
    A package's ``__init__`` importing its own submodules is left out: Python imports the
    package before any of its submodules, so that edge is the package's interface, not a circle."""
    modules = project_modules(root, tuple(layers))
    graph = {}
    for name, path in modules.items():
        statements, _ = imports_of(name, path, modules, tuple(layers))
        graph[name] = {t for t in statements if not (path.name == "__init__.py" and t.startswith(name + "."))}
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:  # iterative enough for a graph of a few hundred modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def test_no_module_imports_a_higher_layer():
    bad = layer_violations(ROOT)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_the_import_graph_has_no_circle():
    cycles = import_cycles(ROOT)
    assert not cycles, "import circles:\n" + "\n".join(" -> ".join(c) for c in cycles)


def test_every_package_is_in_a_layer():
    packages = {p.parent.name for p in ROOT.glob("*/__init__.py")} - {"tests", "benchmarks"}
    assert packages <= set(LAYERS), f"packages without a layer: {sorted(packages - set(LAYERS))}"
    assert set(LAYERS) <= packages, f"layers without a package: {sorted(set(LAYERS) - packages)}"


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    for rel, text in {**{f"{p}/__init__.py": "" for p in LAYERS}, **files}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    return tmp_path


@pytest.mark.parametrize("source", [
    "from experts.train import train_expert\n",  # a statement
    "def f():\n    import experts.train\n",  # inside a function
    "from experts import train\n",  # a submodule through its package
    "import importlib\nimportlib.import_module('experts.train')\n",  # a string
    "COMMANDS = ('experts.train',)\n",  # a string in data
])
def test_the_contract_catches_the_foundation_importing_a_stage(tmp_path, source):
    root = _tree(tmp_path, {"experts/train.py": "", "suti/models.py": source})
    bad = layer_violations(root)
    assert len(bad) == 1 and "suti.models" in bad[0] and "experts.train" in bad[0], bad


def test_the_contract_catches_a_stage_importing_a_sibling_or_the_job(tmp_path):
    root = _tree(tmp_path, {"mining/embed.py": "from generation.job import worker_env\n", "apprentice/data.py": "from mining.photos import KIND\n",
                            "generation/job.py": "", "mining/photos.py": "", "experts/train.py": "from suti.losses import mse\n", "suti/losses.py": ""})
    bad = layer_violations(root)
    assert len(bad) == 2, bad
    assert any("mining.embed imports generation.job" in b for b in bad) and any("apprentice.data imports mining.photos" in b for b in bad)


def test_the_contract_finds_a_circle_through_functions(tmp_path):
    root = _tree(tmp_path, {"apprentice/sample.py": "def load():\n    from apprentice.toy import folder\n",
                            "apprentice/toy.py": "def folder():\n    from apprentice.sample import load\n"})
    assert import_cycles(root) == [["apprentice.sample", "apprentice.toy"]]
    assert layer_violations(root) == []
