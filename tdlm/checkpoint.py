"""Checkpoints: safetensors weights plus optimizer, RNG and progress state, written atomically.

Layout of a run directory:
    .lock                       held (flock) by the process training in it; holds its PID
    config.json / config.toml   the resolved recipe (every default filled in)
    checkpoints/step-000300/    model.safetensors + state.pt
    checkpoints/last.json       {"step": 300, "dir": "step-000300"}: the pointer is replaced
    checkpoints/best.json       atomically (os.replace) only after the directory is complete,
                                so a kill mid-save never leaves a broken "last" or "best".

Only finite weights are ever written (the trainer checks them first), so "last" is always a
good checkpoint. state.pt also carries what makes a resume exact and its figures whole: the
log window a stop between log steps left open, and the training seconds, steps, wall seconds
and sessions of the run so far.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

POINTERS = ("last", "best")


def _write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def staging_dir(run_dir: Path, step: int) -> Path:
    """Where the checkpoint of `step` is assembled before it is renamed into place. Processes of a
    DeepSpeed run write their optimizer shards here first (accelerate's save_state)."""
    return Path(run_dir) / "checkpoints" / f".step-{step:07d}.tmp"


def open_staging(run_dir: Path, step: int) -> Path:
    """An empty staging_dir(run_dir, step): what a crash mid-save left there is discarded."""
    tmp = staging_dir(run_dir, step)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def final_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def save_checkpoint(run_dir: Path, step: int, weights: dict, state: dict, *, pointers=("last",),
                    staged: bool = False) -> Path:
    """Write `weights` (a full state dict) and `state`, then point `pointers` at them.

    `staged`: staging_dir(run_dir, step) was already created (and filled with engine state).
    """
    from safetensors.torch import save_file

    root = Path(run_dir) / "checkpoints"
    final, tmp = final_dir(run_dir, step), staging_dir(run_dir, step)
    if not final.exists():
        if not staged:
            open_staging(run_dir, step)
        save_file({k: v.detach().contiguous().cpu() for k, v in weights.items()}, tmp / "model.safetensors")
        torch.save(state, tmp / "state.pt")
        os.replace(tmp, final)
    for pointer in pointers:
        _write_json_atomic(root / f"{pointer}.json", {"step": step, "dir": final.name, **state.get("pointer_info", {})})
    _prune(root)
    return final


def all_finite(weights: dict) -> bool:
    """Whether every floating-point tensor of a state dict is free of NaN and inf (one host sync)."""
    floats = [v for v in weights.values() if v.is_floating_point() and v.numel()]
    return bool(torch.stack([torch.isfinite(v).all() for v in floats]).all()) if floats else True


def _prune(root: Path) -> None:
    """Keep only the directories a pointer names."""
    keep = {read_pointer(root.parent, p)["dir"] for p in POINTERS if (root / f"{p}.json").exists()}
    for path in root.glob("step-*"):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def read_pointer(run_dir: Path, which: str) -> dict:
    return json.loads((Path(run_dir) / "checkpoints" / f"{which}.json").read_text())


def checkpoint_dir(run_dir: Path, which: str = "last") -> Path:
    """`which`: last, best, or a step number."""
    root = Path(run_dir) / "checkpoints"
    if which.isdigit():
        path = root / f"step-{int(which):07d}"
    else:
        pointer = root / f"{which}.json"
        if not pointer.exists():
            raise FileNotFoundError(
                f"no {which!r} checkpoint in {run_dir} (looked for {pointer}); has the run saved one yet?"
            )
        path = root / read_pointer(run_dir, which)["dir"]
    if not (path / "model.safetensors").exists():
        raise FileNotFoundError(f"checkpoint {path} is missing model.safetensors")
    return path


def load_weights(model, path: Path) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(Path(path) / "model.safetensors"))


def load_state(path: Path) -> dict:
    return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
