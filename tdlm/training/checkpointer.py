"""Checkpoints: safetensors weights plus optimizer, RNG and progress state, written atomically.

Layout of a run directory:
    .lock                       held (flock) by the process training in it; holds its PID
    config.json / config.toml   the resolved recipe (every default filled in)
    data.json                   content hashes of the data and the tokenizer (tdlm.data.record)
    checkpoints/step-000300/    model.safetensors + state.pt
    checkpoints/last.json       {"step": 300, "dir": "step-000300", "previous": "step-000200"}:
    checkpoints/best.json       pointers replaced atomically (write_atomically) only after the directory
                                is complete, so a kill mid-save never leaves a broken "last" or "best".

Kept: the directories `last`, `best` and `last`'s previous checkpoint name. Keeping the previous
one costs a checkpoint's disk space and buys two things: a reader (`tdlm eval` while the run
trains) that read the pointer just before a save still finds its directory, and `--resume`
falls back to it when `last` cannot be read. A reader that still loses the race (two saves
while it reads) reads the pointer again (read_checkpoint).

Only finite weights are ever written (the trainer checks them first), so "last" is always a
good checkpoint. Every file is written by tdlm.files.write_atomically (fsynced, then renamed),
the staging directory is renamed into place only when whole (tdlm.files.rename_folder), and
`last` moves after `best`: a kill at any moment leaves `last` naming a whole checkpoint. A write
that fails (no space left, a read-only folder, a stop signal's exception) removes its staging
directory, keeps `last` and says so in one line (CheckpointError); what a kill -9 left (a
staging directory, a temporary file) is removed by the next process that takes the run
(remove_leftovers). state.pt also
carries what makes a resume exact and its figures whole (tdlm.training.checkpoint_state): the
log window a stop between log steps left open, and the training seconds, steps, wall seconds
and sessions of the run so far.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from pathlib import Path
from typing import Callable, NamedTuple

import torch

from tdlm.errors import CheckpointError, CheckpointNotFound, TrainingDiverged
from tdlm.files import describe, remove_temporaries, rename_folder, write_atomically
from tdlm.training.checkpoint_state import TrainingState, rng_state, set_rng_state  # noqa: F401 - rng_*: first here

POINTERS = ("last", "best")
READ_ATTEMPTS = 5  # pointer re-reads when a concurrent save pruned the directory being read


def _write_json(path: Path, data: dict) -> None:
    write_atomically(path, json.dumps(data, indent=2))


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


def remove_leftovers(run_dir: Path) -> None:
    """Remove what saves a kill cut short left in the run's checkpoints folder: staging directories
    and temporary pointer files. Only for the process that holds the run (tdlm.training.run_lock.RunLock)."""
    root = Path(run_dir) / "checkpoints"
    for tmp in root.glob(".step-*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)
    remove_temporaries(root)


def final_dir(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / "checkpoints" / f"step-{step:07d}"


def _write_weights(weights: dict, path: Path) -> None:
    from safetensors.torch import save

    # serialized in memory (one more copy of the weights) so that the bytes reach the disk through
    # write_atomically, where a full disk is an OSError (safetensors' own writer raises its own type)
    write_atomically(path, save({k: v.detach().contiguous().cpu() for k, v in weights.items()}))


def _write_state(state: dict, path: Path) -> None:
    write_atomically(path, lambda f: torch.save(state, f))  # into the open file: see tdlm.files


def save_checkpoint(run_dir: Path, step: int, weights: dict, state: dict, *, pointers=("last",),
                    staged: bool = False) -> Path:
    """Write `weights` (a full state dict) and `state`, then point `pointers` at them.

    `staged`: staging_dir(run_dir, step) was already created (and filled with engine state).
    Any failure (a full disk, a read-only folder, a stop signal's exception) removes the staging
    directory and leaves `last` as it was; an OSError becomes one CheckpointError line.
    """
    root = Path(run_dir) / "checkpoints"
    final, tmp = final_dir(run_dir, step), staging_dir(run_dir, step)
    before = _pointer_or_none(root, "last")
    try:
        if not final.exists():
            if not staged:
                open_staging(run_dir, step)
            _write_weights(weights, tmp / "model.safetensors")
            _write_state(state, tmp / "state.pt")
            rename_folder(tmp, final)
        # `last` moves last: once it names this checkpoint the save is done, so a kill before it
        # resumes from the previous one and makes the same save again (`best` included)
        for pointer in sorted(pointers, key=lambda name: name == "last"):
            info = {"step": step, "dir": final.name, **state.get("pointer_info", {})}
            if pointer == "last" and before is not None:
                previous = before["dir"] if before["dir"] != final.name else before.get("previous")
                if previous:
                    info["previous"] = previous
            _write_json(root / f"{pointer}.json", info)
    except BaseException as exc:  # a full disk, a kill signal's exception: no partial file stays
        shutil.rmtree(tmp, ignore_errors=True)
        with contextlib.suppress(Exception):
            _prune(root)  # a complete directory no pointer names (the pointer write failed)
        if isinstance(exc, OSError):
            raise _not_written(root, step, exc) from exc
        raise
    _prune(root)
    return final


def _not_written(root: Path, step: int, exc: OSError) -> CheckpointError:
    """The one line of a checkpoint write that failed (its partial files already removed)."""
    what, fix = describe(exc, root)
    last = _pointer_or_none(root, "last")  # read now: `last` is the save's final write, so it did not move
    kept = f"step {last['step']}" if last else "none was written yet"
    return CheckpointError(f"{what}: the checkpoint of step {step} was not written (its partial files are removed) "
                           f"and the last checkpoint ({kept}) is kept; {fix}, then continue with tdlm run RECIPE "
                           "--resume")


def all_finite(weights: dict) -> bool:
    """Whether every floating-point tensor of a state dict is free of NaN and inf (one host sync)."""
    floats = [v for v in weights.values() if v.is_floating_point() and v.numel()]
    return bool(torch.stack([torch.isfinite(v).all() for v in floats]).all()) if floats else True


def _parse_pointer(path: Path) -> dict:
    """A pointer file's content; FileNotFoundError when absent, ValueError when it is not a pointer."""
    info = json.loads(path.read_text(errors="replace"))
    if not isinstance(info, dict) or not isinstance(info.get("dir"), str) or not isinstance(info.get("step"), int):
        raise ValueError("not a pointer with a step and a dir")
    return info


def _pointer_or_none(root: Path, which: str) -> dict | None:
    """The pointer, or None when there is none or it cannot be read."""
    try:
        return _parse_pointer(root / f"{which}.json")
    except (OSError, ValueError):
        return None


def kept_dirs(root: Path) -> set[str] | None:
    """The directories the pointers name (`last`'s previous one included); None when a pointer
    exists but cannot be read (then nothing may be pruned)."""
    keep = set()
    for which in POINTERS:
        if not (root / f"{which}.json").exists():
            continue
        info = _pointer_or_none(root, which)
        if info is None:
            return None
        keep.add(info["dir"])
        if which == "last" and info.get("previous"):
            keep.add(info["previous"])
    return keep


def _prune(root: Path) -> None:
    """Keep only the directories a pointer names, and `last`'s previous one."""
    keep = kept_dirs(root)
    if keep is None:
        return
    for path in root.glob("step-*"):
        if path.name not in keep:
            shutil.rmtree(path, ignore_errors=True)


def last_step(run_dir: Path) -> int | None:
    """The step of the `last` checkpoint; None when there is none (or it cannot be read)."""
    last = _pointer_or_none(Path(run_dir) / "checkpoints", "last")
    return last["step"] if last else None


def read_pointer(run_dir: Path, which: str) -> dict:
    """The pointer `which` (last, best); FileNotFoundError when there is none, CheckpointError
    when it is not a pointer (a damaged file)."""
    path = Path(run_dir) / "checkpoints" / f"{which}.json"
    try:
        return _parse_pointer(path)
    except ValueError as exc:  # json.JSONDecodeError is one
        raise CheckpointError(
            f"{path} is damaged ({exc}); delete it and name a checkpoint by step (--checkpoint STEP; "
            f"{describe_checkpoints(run_dir)}); tdlm run --resume falls back to the newest readable one"
        ) from None


def step_dirs(run_dir: Path) -> list[Path]:
    """The run's checkpoint directories, newest first."""
    root = Path(run_dir) / "checkpoints"
    return sorted((p for p in root.glob("step-*") if p.name[5:].isdigit() and p.is_dir()), reverse=True)


def describe_checkpoints(run_dir: Path) -> str:
    """What a run has, in words: 'it has best (step 8), last (step 8); kept steps 4, 8'."""
    root = Path(run_dir) / "checkpoints"
    named = []
    for which in POINTERS:
        if (root / f"{which}.json").exists():
            info = _pointer_or_none(root, which)
            named.append(f"{which} (step {info['step']})" if info else f"{which} (damaged)")
    steps = [str(int(p.name[5:])) for p in reversed(step_dirs(run_dir))]
    if not named and not steps:
        return "it has no checkpoint yet (one is saved at every eval and at the end)"
    return ("it has " + ", ".join(named) if named else "it has no best/last pointer") + (
        f"; kept steps {', '.join(steps)}" if steps else "; no step directory")


def checkpoint_dir(run_dir: Path, which: str = "last") -> Path:
    """`which`: last, best, or a step number."""
    root = Path(run_dir) / "checkpoints"
    if which.isdigit():
        path = root / f"step-{int(which):07d}"
        if not path.is_dir():
            raise CheckpointNotFound(f"no checkpoint of step {int(which)} in {run_dir}: {describe_checkpoints(run_dir)}")
    elif which in POINTERS:
        pointer = root / f"{which}.json"
        if not pointer.exists():
            raise CheckpointNotFound(f"no {which!r} checkpoint in {run_dir} (looked for {pointer}): "
                                     f"{describe_checkpoints(run_dir)}")
        path = root / read_pointer(run_dir, which)["dir"]
    else:
        raise CheckpointNotFound(f"no checkpoint {which!r} in {run_dir}: name one as best, last or a step number; "
                                 f"{describe_checkpoints(run_dir)}")
    if not (path / "model.safetensors").exists():
        raise CheckpointNotFound(f"checkpoint {path} is missing model.safetensors: {describe_checkpoints(run_dir)}")
    return path


def read_checkpoint(run_dir: Path, which: str, read):
    """(path, read(path)) for checkpoint `which`, safe against a save running at the same time:
    if the directory the pointer named vanished (pruned by a save after the pointer moved on),
    the pointer is read again and the new directory read instead."""
    root = Path(run_dir) / "checkpoints"
    for attempt in range(READ_ATTEMPTS):
        named = _pointer_or_none(root, which) if which in POINTERS else None
        try:
            path = checkpoint_dir(run_dir, which)
            return path, read(path)
        except FileNotFoundError:
            now = _pointer_or_none(root, which) if which in POINTERS else None
            if named is None or now is None or now["dir"] == named["dir"] or attempt == READ_ATTEMPTS - 1:
                raise  # nothing moved: the file is really missing
    raise AssertionError("unreachable")


def readable_checkpoint(run_dir: Path, *, weights: bool = True,
                        expected: dict | None = None) -> tuple[Path, dict, dict | None, list[str]]:
    """The newest checkpoint that can be read, for --resume: `last`, else `last`'s previous one,
    else the newest other kept directory. `expected`: the model's state dict (or its shapes);
    weights that do not fit it count as unreadable (check_fits). Returns (path, state, weights or
    None, what was skipped and why). CheckpointError when none can be read."""
    root = Path(run_dir) / "checkpoints"
    candidates, skipped, limit = [], [], None
    try:
        last = read_pointer(run_dir, "last")
        candidates += [last["dir"]] + ([last["previous"]] if last.get("previous") else [])
        limit = last["step"]
    except (OSError, CheckpointError) as exc:
        skipped.append(f"{root / 'last.json'}: {str(exc).split(';')[0]}")
    candidates += [p.name for p in step_dirs(run_dir)
                   if p.name not in candidates and (limit is None or int(p.name[5:]) <= limit)]
    for name in candidates:
        path = root / name
        try:
            state = load_state(path)
            read = read_weights(path) if weights else None
            if read is not None and expected is not None:
                check_fits(path / "model.safetensors", read, expected)
            return path, state, read, skipped
        except (OSError, CheckpointError) as exc:
            skipped.append(f"{name}: {str(exc).split(': the checkpoint is')[0]}")
    raise CheckpointError(f"--resume: no checkpoint in {root} can be read ({'; '.join(skipped) or 'none kept'}); "
                          "start the run again under another name (--set run.name=<new name>)")


def set_aside(path: Path) -> Path:
    """Move an unreadable checkpoint directory out of the way (never deleted): .unreadable-<name>[-n]."""
    target, n = path.with_name(f".unreadable-{path.name}"), 1
    while target.exists():
        n += 1
        target = path.with_name(f".unreadable-{path.name}-{n}")
    return path.rename(target)


def point(run_dir: Path, which: str, path: Path, step: int, **info) -> None:
    """Replace pointer `which` by one naming `path` (a checkpoint directory of `step`)."""
    _write_json(Path(run_dir) / "checkpoints" / f"{which}.json", {"step": step, "dir": Path(path).name, **info})


def _unreadable(file: Path, exc: Exception) -> CheckpointError:
    why = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    run_dir = file.parent.parent.parent
    return CheckpointError(
        f"{file} cannot be read ({type(exc).__name__}: {why}): the checkpoint is truncated or corrupt; use another "
        f"one with --checkpoint ({describe_checkpoints(run_dir)}); tdlm run --resume falls back to the previous one")


def read_weights(path: Path) -> dict:
    """The state dict in `path`/model.safetensors (FileNotFoundError if absent, CheckpointError if damaged)."""
    from safetensors.torch import load_file

    file = Path(path) / "model.safetensors"
    try:
        return load_file(file)
    except FileNotFoundError:  # safetensors' names no file: this one does, for the caller's message
        raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), str(file)) from None
    except Exception as exc:  # noqa: BLE001 - SafetensorError and I/O errors: a damaged file
        raise _unreadable(file, exc) from exc


class StateMismatch(NamedTuple):
    """How a set of tensors differs from a model's state dict: (key, their shape, the model's
    shape) where both have the key, and the keys only one of them has."""

    shapes: list[tuple[str, list[int], list[int]]]
    missing: list[str]
    extra: list[str]

    def __bool__(self) -> bool:
        return bool(self.shapes or self.missing or self.extra)


def compare_state(weights: dict, expected: dict, must_match=lambda key: True) -> StateMismatch:
    """The one comparison of tensors against a model's state dict (or its shapes), for every
    reader of weights (a checkpoint, an exported folder, training.init_from). `must_match(key)`:
    the keys that must be present in both; a key present in both must always have the model's shape."""
    def shape(value) -> list[int]:
        return list(getattr(value, "shape", value))

    return StateMismatch(
        shapes=[(k, shape(weights[k]), shape(v)) for k, v in expected.items() if k in weights and shape(weights[k]) != shape(v)],
        missing=[k for k in expected if k not in weights and must_match(k)],
        extra=[k for k in weights if k not in expected and must_match(k)])


def check_fits(file: Path, weights: dict, expected: dict, *, must_match=lambda key: True) -> None:
    """CheckpointError naming the tensors when `weights` (read from `file`) do not fit a model
    whose state dict (or its shapes) is `expected`: a checkpoint of another model size or
    architecture, copied into this run (compare_state says which keys must match)."""
    found = compare_state(weights, expected, must_match)
    wrong = [f"{k} {theirs} (the model's: {ours})" for k, theirs, ours in found.shapes]
    wrong += [f"{k} missing" for k in found.missing] + [f"{k} not in the model" for k in found.extra]
    if wrong:
        listed = ", ".join(wrong[:3]) + (f" and {len(wrong) - 3} more" if len(wrong) > 3 else "")
        run_dir = Path(file).parent.parent.parent
        raise CheckpointError(
            f"{file} does not fit the run's model ({listed}): the checkpoint is of another model size or "
            f"architecture than the run's config.json; use another one with --checkpoint "
            f"({describe_checkpoints(run_dir)}); tdlm run --resume falls back to the previous one")


def load_weights(model, path: Path) -> None:
    weights = read_weights(path)
    check_fits(Path(path) / "model.safetensors", weights, model.state_dict())
    model.load_state_dict(weights)


def load_state(path: Path) -> dict:
    file = Path(path) / "state.pt"
    try:
        state = torch.load(file, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise
    except Exception as exc:  # noqa: BLE001 - a truncated zip, a broken pickle: a damaged file
        raise _unreadable(file, exc) from exc
    if not isinstance(state, dict) or "step" not in state:
        raise _unreadable(file, ValueError("not a tdlm training state"))
    return state


class Checkpointer:
    """When and how the trainer's checkpoints are written: at every evaluation, every
    `training.checkpoint_every` steps (and whenever the run stops); the weights gathered from every
    process (ZeRO-3 shards included), checked finite, and written by the main process with the
    trainer's state (under DeepSpeed, the engine's own sharded state beside them)."""

    def __init__(self, run_dir: Path, accelerator, *, deepspeed: int, every: int | None):
        self.run_dir, self.accelerator, self.deepspeed, self.every = run_dir, accelerator, deepspeed, every

    def due(self, step: int, *, evaluated: bool) -> bool:
        """A scheduled save: after an evaluation (it may have named a new best) or every
        `checkpoint_every` steps. (A stop always saves.)"""
        return evaluated or bool(self.every and step % self.every == 0)

    def save(self, model, step: int, state: Callable[[], TrainingState], *, best: bool) -> None:
        """Write checkpoint `step`. `state()` gives the trainer's state (called on the main
        process after the weights are gathered; saved as TrainingState.saved() says); `best`: point
        `best` at it too. Weights that are not finite are not saved: TrainingDiverged."""
        from tdlm.training.distributed import from_main, unwrap

        acc = self.accelerator
        acc.wait_for_everyone()
        if self.deepspeed:  # every process takes part: under ZeRO-3 this gathers the shards
            weights = acc.get_state_dict(model)
        else:  # (get_state_dict would import DeepSpeed whenever it is installed)
            weights = unwrap(acc, model).state_dict()
        # only finite weights are ever saved, so "last" is always a good checkpoint (the loss
        # checked at log steps is the one before the update: the update itself can diverge)
        finite = all_finite(weights) if acc.is_main_process else None
        if not from_main(acc, finite):
            raise self.diverged(f"the weights became NaN or infinite by step {step}; they were not saved")
        fresh = not final_dir(self.run_dir, step).exists()
        if self.deepspeed and fresh:
            if acc.is_main_process:
                open_staging(self.run_dir, step)
            acc.wait_for_everyone()
            acc.save_state(str(staging_dir(self.run_dir, step) / "engine"))
            acc.wait_for_everyone()
        problem = None
        if acc.is_main_process:
            try:
                save_checkpoint(self.run_dir, step, weights, state().saved(),
                                pointers=("last", "best") if best else ("last",), staged=self.deepspeed and fresh)
            except CheckpointError as exc:  # no space left: the staging files are gone, "last" is kept
                problem = exc
        problem = from_main(acc, problem)
        acc.wait_for_everyone()
        if problem is not None:
            raise problem

    def diverged(self, what: str) -> TrainingDiverged:
        """The error that stops a run whose loss, validation figure or weights went non-finite:
        `what` happened, and the last good checkpoint (kept) is named with the usual remedies."""
        return TrainingDiverged(f"{what}; the run stopped. The last good checkpoint ({self.last_good()}) is kept. "
                                "Try a lower training.lr, more training.warmup_steps or training.grad_clip.")

    def last_good(self) -> str:
        try:
            return str(checkpoint_dir(self.run_dir, "last"))
        except (FileNotFoundError, CheckpointError):
            return "none was written yet"
