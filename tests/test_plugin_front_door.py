"""tdlm.plugin, the one module a plugin imports from: every name it lists resolves, importing it is
cheap, the guide and tdlm's own components import from nothing else, the components layer imports
nothing above it, and the sampler template of the guide's testing section runs as written."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

import tdlm.plugin

REPO = Path(__file__).resolve().parent.parent
GUIDE = REPO / "docs" / "plugins.md"


def test_every_name_of_the_front_door_resolves():
    assert len(tdlm.plugin.__all__) == len(set(tdlm.plugin.__all__)) >= 60
    for name in tdlm.plugin.__all__:
        assert getattr(tdlm.plugin, name) is not None, name
    with pytest.raises(AttributeError, match="the plugin API is tdlm.plugin.__all__"):
        tdlm.plugin.NoSuchThing  # noqa: B018


def test_importing_the_front_door_imports_nothing_heavy():
    """`tdlm --help` must stay fast: the names are imported when first used, not with the module."""
    code = ("import sys, tdlm.plugin; heavy = [m for m in ('torch', 'pydantic', 'numpy', 'tdlm.components') "
            "if m in sys.modules]; print(heavy); tdlm.plugin.hookimpl; tdlm.plugin.PLUGIN_API_VERSION; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[:2] == ["[]", "False"]


def python_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


def imported_modules(source: str) -> list[str]:
    """The modules a piece of code imports (`import a.b`, `from a.b import c`), however indented."""
    modules = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            modules += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            modules.append(node.module)
    return modules


def is_tdlm(module: str) -> bool:
    return module == "tdlm" or module.startswith("tdlm.")


def test_the_guides_code_imports_tdlm_only_through_the_front_door():
    blocks = python_blocks(GUIDE.read_text())
    assert len(blocks) >= 10
    for block in blocks:
        source = "\n".join(line for line in block.splitlines())
        try:
            modules = imported_modules(source)
        except SyntaxError:  # a fragment (a method body): its import lines alone
            modules = imported_modules("\n".join(line.strip() for line in source.splitlines()
                                                 if line.strip().startswith(("import ", "from "))))
        assert [m for m in modules if is_tdlm(m) and m != "tdlm.plugin"] == [], block[:200]
    example = (REPO / "examples" / "tdlm-fixed-count")
    for path in [example / "tdlm_fixed_count" / "__init__.py", *sorted((example / "tests").glob("*.py"))]:
        assert [m for m in imported_modules(path.read_text()) if is_tdlm(m) and m != "tdlm.plugin"] == [], path


def test_the_builtins_import_tdlm_only_through_the_front_door():
    """tdlm's own components use nothing a plugin cannot (or each other)."""
    for path in sorted((REPO / "tdlm" / "builtins").rglob("*.py")):
        modules = [m for m in imported_modules(path.read_text()) if is_tdlm(m)]
        assert all(m == "tdlm.plugin" or m.startswith("tdlm.builtins.") for m in modules), (path, modules)


# the higher layers, and the parts of the components layer built on the interfaces
NOT_FROM_THE_INTERFACES = ("tdlm.cli", "tdlm.rundir", "tdlm.studies", "tdlm.export", "tdlm.init_from", "tdlm.training",
                           "tdlm.sampling", "tdlm.evaluate", "tdlm.plugin", "tdlm.builtins", "tdlm.registry",
                           "tdlm.config", "tdlm.lm")


def test_the_components_layer_imports_nothing_above_it():
    """The helpers the samplers share live with the components; none of them reaches up (a
    sampler must not load a whole run through tdlm.rundir), not even in a function."""
    for path in sorted((REPO / "tdlm" / "components").glob("*.py")):
        modules = [m for m in imported_modules(path.read_text()) if is_tdlm(m)]
        assert not [m for m in modules if m.startswith(NOT_FROM_THE_INTERFACES)], (path, modules)
    for old_path in ("grids", "kernel", "next_token", "draft"):  # the re-exports stay where they were
        modules = imported_modules((REPO / "tdlm" / "sampling" / f"{old_path}.py").read_text())
        assert modules == [f"tdlm.components.{old_path}"]


def test_the_old_helper_paths_still_import():
    from tdlm.components import grids, kernel, next_token
    from tdlm.sampling.draft import DraftMixin
    from tdlm.sampling.grids import time_grid
    from tdlm.sampling.kernel import reverse_kernel
    from tdlm.sampling.next_token import next_token_probs

    assert (time_grid, reverse_kernel, next_token_probs) == (grids.time_grid, kernel.reverse_kernel,
                                                             next_token.next_token_probs)
    assert DraftMixin is tdlm.plugin.DraftMixin
    with pytest.raises(ImportError, match=r"^tdlm.sampling.draft.load_draft is tdlm.rundir.load_draft since plugin "
                                          r"API 1.2 .*docs/plugins.md#upgrading-a-plugin$"):
        from tdlm.sampling.draft import load_draft  # noqa: F401 - moved up a layer: the message says where


def template(name: str) -> str:
    """The code block of the guide marked `<!-- template: name -->`."""
    match = re.search(rf"<!-- template: {name} -->\n```python\n(.*?)```", GUIDE.read_text(), flags=re.S)
    assert match, name
    return match.group(1)


def test_the_guides_sampler_template_runs_as_written(monkeypatch):
    plugin = types.ModuleType("tdlm_one_shot")
    exec(compile(template("tdlm_one_shot"), "docs/plugins.md:tdlm_one_shot", "exec"), plugin.__dict__)
    monkeypatch.setitem(sys.modules, "tdlm_one_shot", plugin)
    tests: dict = {"__name__": "test_one_shot"}
    exec(compile(template("test_one_shot"), "docs/plugins.md:test_one_shot", "exec"), tests)
    ran = [name for name, function in tests.items() if name.startswith("test_") and callable(function)]
    assert len(ran) == 4
    for name in ran:
        tests[name]()
