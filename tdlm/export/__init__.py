"""A trained run as a Hugging Face model folder, and back (`tdlm export`; docs/export.md).

    from tdlm.export import export_run, read_folder
    export_run("runs/tiny", "exported/tiny", which="best")      # the folder (layout: tdlm.export.write)
    recipe, state_dict, data, info = read_folder("exported/tiny")

`read_folder` gives the resolved recipe (a run's config.json), the weights under tdlm's own
state_dict names (LanguageModel: `net.*`, `objective.*`) and the run's data record; tdlm's
commands read a folder through `tdlm.rundir.load_run`, which comes to it for exported folders.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from tdlm.export.folder import ExportedRun, ExportError, is_export, read_folder

if TYPE_CHECKING:  # what _LAZY loads, named for readers and for tests/test_layers.py's import graph
    from tdlm.export.push import push_folder  # noqa: F401
    from tdlm.export.write import export_run  # noqa: F401

_LAZY = {"export_run": "tdlm.export.write", "push_folder": "tdlm.export.push"}  # these import tdlm.rundir

__all__ = ["ExportedRun", "ExportError", "is_export", "read_folder", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
