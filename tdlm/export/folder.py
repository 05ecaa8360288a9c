"""Reading an exported folder back: the one place tdlm reads what `tdlm export` wrote.

`load_run` (tdlm.rundir) comes here when its folder is an export, so `tdlm eval`, `sample`,
`gen-eval` and `lm-eval` take an exported folder as they take a run directory. Other code that
wants a trained network's weights and recipe (e.g. to start a new run from them) calls
`read_folder`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

from tdlm.errors import CheckpointNotFound, TdlmError

RUN_FILE = "tdlm_run.json"
"""The recipe, data record and origin of the exported weights: what makes the folder a tdlm run."""
WEIGHTS_FILE = "model.safetensors"
FORMAT, VERSION = "tdlm-export", 1


class ExportError(TdlmError):
    """A run that cannot be exported, or an exported folder that cannot be read back."""


class ExportedRun(NamedTuple):
    recipe: dict
    """The run's resolved recipe (its config.json): validate with tdlm.config.RunConfig."""
    state_dict: dict
    """name -> CPU tensor, exactly tdlm.lm.LanguageModel.state_dict() (as a checkpoint's
    model.safetensors): `net.*` the Transformer, `objective.*` component state (e.g. learned
    masking weights)."""
    data: dict | None
    """The run's data.json (content hashes of its data and tokenizer), None for runs without one."""
    info: dict
    """The rest of tdlm_run.json: checkpoint (name, step, which), environment, summary."""


def is_export(folder: str | Path) -> bool:
    """Whether `folder` is an exported folder: it holds tdlm_run.json, or a Hugging Face
    config.json of model_type "tdlm" (read_folder then says what is missing)."""
    folder = Path(folder)
    if (folder / RUN_FILE).is_file():
        return True
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8")).get("model_type") == "tdlm"
    except (OSError, ValueError, AttributeError):
        return False


def read_run_file(folder: str | Path) -> dict:
    """tdlm_run.json of an exported folder, checked to be one tdlm can read."""
    folder = Path(folder)
    path = folder / RUN_FILE
    if not path.is_file():
        raise ExportError(f"{folder} holds a Hugging Face tdlm model but no {RUN_FILE} (the recipe it was trained "
                          f"with), so tdlm cannot score or sample it; export the run again with tdlm export")
    try:
        run = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(run, dict) or not isinstance(run.get("recipe"), dict):
            raise ValueError("no recipe table")
    except (UnicodeDecodeError, ValueError) as exc:
        raise ExportError(f"{path} is damaged ({str(exc).splitlines()[0]}); export the run again") from None
    if run.get("format") != FORMAT or not isinstance(run.get("version"), int) or run["version"] > VERSION:
        raise ExportError(f"{path} is format {run.get('format')!r} version {run.get('version')!r}; this tdlm reads "
                          f"{FORMAT!r} up to version {VERSION}: upgrade tdlm")
    return run


def read_folder(folder: str | Path) -> ExportedRun:
    """(recipe, state_dict, data, info) of an exported folder; ExportError in one line if it is
    not one or is damaged."""
    from safetensors.torch import load_file

    folder = Path(folder)
    run = read_run_file(folder)
    weights = folder / WEIGHTS_FILE
    try:
        state_dict = load_file(weights)
    except FileNotFoundError:
        raise ExportError(f"{folder} has no {WEIGHTS_FILE}: the export is incomplete; export the run again") from None
    except Exception as exc:  # noqa: BLE001 - SafetensorError and I/O errors: a damaged file
        why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise ExportError(f"{weights} cannot be read ({why}): the file is truncated or corrupt; "
                          "export the run again") from None
    info = {k: v for k, v in run.items() if k not in ("recipe", "data")}
    return ExportedRun(run["recipe"], state_dict, run.get("data"), info)


def check_checkpoint(folder: Path, info: dict, which: str) -> None:
    """An exported folder holds one checkpoint: `which` may be best (the default), the pointer it
    was exported from, or its step; anything else is refused in one line."""
    checkpoint = info.get("checkpoint") or {}
    step, pointer = checkpoint.get("step"), checkpoint.get("which")
    if which in ("best", pointer) or (which.isdigit() and step is not None and int(which) == step):
        return
    raise CheckpointNotFound(f"no checkpoint {which!r} in {folder}: an exported folder holds one, step {step} "
                             f"(the run's {pointer!r}); give --checkpoint best or {step}")
