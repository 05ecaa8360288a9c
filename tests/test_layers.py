"""Layers point one way: the import graph of the tdlm package, read from its source with ast,
has no cycle and no import from a lower layer to a higher one.

Every `import` and `from ... import` inside tdlm/ counts, at module level or inside a function
(a lazy import is still a dependency), and so does `importlib.import_module("tdlm....")` with a
literal name. A lazy package facade names what it loads under `if TYPE_CHECKING:` so that its
edges are seen too (tdlm/data/__init__.py, tdlm/export/__init__.py).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "tdlm"

# Module or package prefix -> layer; a module takes the layer of its longest matching prefix
# ("tdlm" itself is the package's __init__ alone, not a prefix of everything). A module may import
# its own layer and the ones below it, never one above.
LAYERS = {
    # 0 base: what every layer may use.
    "tdlm": 0,  # the package's __init__: version, plugin API version, the hookimpl marker
    "tdlm.errors": 0,
    "tdlm.files": 0,
    "tdlm.jsontext": 0,
    "tdlm.hookspecs": 0,
    # 1 the network and the data: no components, no training.
    "tdlm.model": 1,
    "tdlm.head": 1,
    "tdlm.data": 1,
    "tdlm.hf": 1,  # the standalone model code an export ships (torch + transformers only)
    # 2 components: the plugin API, the registry, the recipe, the built-in plugins, and helpers
    # that build things from components.
    "tdlm.components": 2,
    "tdlm.registry": 2,
    "tdlm.plugins": 2,  # the old name of tdlm.registry, kept as an alias that warns
    "tdlm.config": 2,
    "tdlm.plugin": 2,  # the plugin API's front door, should it get a module of its own
    "tdlm.builtins": 2,
    "tdlm.lm": 2,
    "tdlm.vocab_info": 2,  # a corpus's vocabulary as the VocabInfo components get
    # 3 training, sampling and evaluation.
    "tdlm.training": 3,
    "tdlm.sampling": 3,
    "tdlm.evaluate": 3,
    # Moved down from the runs layer: `training.init_from` is a training option, the trainer
    # starts from it (tdlm run --check checks it too).
    "tdlm.init_from": 3,
    # Moved down from the runs layer: the exported folder's layout read back (it imports only
    # tdlm.errors), read by init_from as by load_run, as a checkpoint is read by the checkpointer.
    "tdlm.export.folder": 3,
    # 4 runs and studies: a trained run loaded back, exports, sweeps, reports, benchmarks.
    "tdlm.rundir": 4,
    "tdlm.studies": 4,
    "tdlm.export": 4,
    # 5 commands: the command line and the command modules it adds.
    "tdlm.cli": 5,
    "tdlm.__main__": 5,
    "tdlm.cli_options": 5,  # the checks of the values several commands take
    "tdlm.studies.harness_cli": 5,
    "tdlm.export.cli": 5,
}

def module_files(package: Path = PACKAGE) -> dict[str, tuple[Path, bool]]:
    """Dotted module name -> (its file, whether it is a package's __init__)."""
    found = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def imported_names(tree: ast.AST, module: str, is_package: bool) -> set[str]:
    """Every tdlm name `tree` imports (absolute or relative, at any depth): `from X import Y` as
    X.Y, which import_graph resolves to the submodule X.Y or else to the module X."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            names.update(f"{source}.{alias.name}" for alias in node.names)
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return {name for name in names if name == "tdlm" or name.startswith("tdlm.")}


def import_graph(package: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the tdlm modules it imports (each name resolved to the module that defines it)."""
    files = module_files(package)
    graph = {}
    for module, (path, is_package) in files.items():
        targets = set()
        for name in imported_names(ast.parse(path.read_text(encoding="utf-8")), module, is_package):
            while name not in files and "." in name:  # `from tdlm.x import function`: the module tdlm.x
                name = name.rsplit(".", 1)[0]
            if name in files and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def layer_of(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or (p != "tdlm" and module.startswith(p + "."))]
    if not prefixes:
        raise KeyError(f"{module} has no layer: add it (or its package) to LAYERS, with why")
    return LAYERS[max(prefixes, key=len)]


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

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
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def upward_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    return {(source, target) for source, targets in graph.items() for target in targets
            if layer_of(target) > layer_of(source)}


@pytest.fixture(scope="module")
def graph():
    return import_graph()


def test_the_graph_sees_module_level_and_lazy_imports(graph):
    assert "tdlm.training.checkpointer" in graph["tdlm.rundir"]  # lazy, inside load_run
    assert "tdlm.data.shards" in graph["tdlm.data.corpus"]  # `from tdlm.data import shards`, inside a function
    assert "tdlm.export.write" in graph["tdlm.export"]  # the lazy facade's TYPE_CHECKING names


def test_every_module_has_a_layer(graph):
    for module in graph:
        layer_of(module)
    with pytest.raises(KeyError, match="has no layer"):
        layer_of("tdlm.somewhere_new")  # "tdlm" maps the package's __init__, not every module under it


def test_no_import_cycle(graph):
    assert cycles(graph) == []  # not even inside one package: a cycle makes import order matter


def test_no_import_from_a_lower_layer_to_a_higher_one(graph):
    upward = sorted(upward_edges(graph))
    assert upward == [], "\n".join(f"{a} (layer {layer_of(a)}) imports {b} (layer {layer_of(b)})" for a, b in upward)


def test_the_checks_catch_a_cycle_and_an_upward_import(tmp_path):
    """Negative control: a copy of a small package whose data layer imports the trainer."""
    package = tmp_path / "tdlm"
    for name, text in {"__init__.py": "", "errors.py": "",
                       "data/__init__.py": "", "data/corpus.py": "from tdlm.data import shards\n",
                       "data/shards.py": "def f():\n    from tdlm.data.corpus import Corpus\n",
                       "training/__init__.py": "", "training/trainer.py": "from tdlm.errors import TdlmError\n",
                       "data/streams.py": "def g():\n    from tdlm.training import trainer\n"}.items():
        (package / name).parent.mkdir(parents=True, exist_ok=True)
        (package / name).write_text(text)
    fake = import_graph(package)
    assert cycles(fake) == [["tdlm.data.corpus", "tdlm.data.shards"]]
    assert upward_edges(fake) == {("tdlm.data.streams", "tdlm.training.trainer")}
