"""Run directories: creating them for training and loading them back for eval and sampling.

A training process holds an exclusive lock on `<run dir>/.lock` (flock, with its PID written in
the file) from before it looks at the directory until it exits; the OS drops the lock when the
process dies, however it dies. So two `tdlm run` never train into one directory.
"""

from __future__ import annotations

import fcntl
import json
import os
import platform
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import numpy as np
from pydantic import ValidationError

from tdlm.components import VocabInfo
from tdlm.config import (RecipeError, RunConfig, apply_overrides, flatten_table, format_validation_error, read_recipe,
                         read_toml, resolve_components, resolved_dict, to_toml)
from tdlm.data.locate import file_in_the_way, not_a_folder
from tdlm.errors import RunError
from tdlm.files import remove_temporaries, write_atomically


def vocab_info(corpus) -> VocabInfo:
    """The vocabulary facts components get, with the train split's token counts (from the
    manifest when the train split is streamed from shards)."""
    vocab = corpus.vocab
    counts = corpus.train_token_counts
    if counts is None:
        counts = np.bincount(corpus.splits["train"], minlength=vocab.size)[: vocab.size]
    return VocabInfo(size=vocab.size, mask_id=vocab.mask_id, bos_id=vocab.bos_id, token_counts=counts)


def environment_info() -> dict:
    """Package versions and the git commit, saved with every run for reproducibility."""
    versions = {}
    for package in ("tdlm", "torch", "accelerate", "tokenizers", "pydantic", "pluggy", "deepspeed"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    repo = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip() or None
        dirty = bool(subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5,
        ).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        commit, dirty = None, None
    return {
        "versions": versions,
        "git_commit": commit,
        "git_dirty": dirty,
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
    }


def write_config(run_dir: Path, resolved: dict) -> None:
    """config.json and config.toml, each replaced atomically."""
    for name, text in (("config.json", json.dumps(resolved, indent=2)), ("config.toml", to_toml(resolved))):
        write_atomically(run_dir / name, text)


def write_run_files(run_dir: Path, cfg: RunConfig, components: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    write_config(run_dir, resolved_dict(cfg, components))
    environment = environment_info()
    environment["components"] = {  # which package (and version) provided each component
        kind: {"name": c.name, "plugin": c.plugin, "package": c.package, "version": c.version}
        for kind, c in ((kind, resolved.component) for kind, resolved in components.items())
    }
    write_atomically(run_dir / "environment.json", json.dumps(environment, indent=2))


# -- the state of a run directory, and who holds it ------------------------------------------
# The one vocabulary of a run directory's state, for `tdlm run`, sweeps and reports.
STATUSES = {
    "finished": "trained to its last step and scored (summary.json says so)",
    "stopped": "has a checkpoint but did not finish: stopped on purpose or killed; --resume goes on",
    "aborted": "started but ended before its first checkpoint: nothing to resume; a new start sets it aside",
    "new": "no run there yet",
}


def run_status(run_dir: Path) -> str:
    """The state of a run directory: one of STATUSES."""
    run_dir = Path(run_dir)
    try:
        summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
        if isinstance(summary, dict) and summary.get("status") == "finished":
            return "finished"
    except (OSError, ValueError):  # absent, or damaged (not JSON, not UTF-8): not a finished run's
        pass
    if (run_dir / "checkpoints" / "last.json").exists():
        return "stopped"
    if (run_dir / "config.json").exists():
        return "aborted"
    return "new"


class RunLock:
    """An exclusive flock on `<run_dir>/.lock`, with the holder's PID in the file. Released by
    release(), or by the OS when the process ends (a crash or a kill -9 included)."""

    def __init__(self, run_dir: Path):
        self.fd, self.run_dir = None, Path(run_dir)
        blocker = file_in_the_way(self.run_dir)
        if blocker is not None:
            raise RunError(f"cannot make the run directory {self.run_dir}: {blocker} {not_a_folder(blocker)}; "
                           "set run.out_dir (or run.name) to a folder")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.run_dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise RunError(f"run directory {self.run_dir} is in use by another tdlm process (PID {holder}); "
                           f"wait for it to end or stop it (kill -TERM {holder}: it checkpoints first), "
                           "then try again") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd

    def release(self, *, discard_if_empty: bool = False) -> None:
        """Drop the lock; `discard_if_empty`: remove the directory too if the lock file is all it
        holds (a run that failed before writing anything leaves no directory behind)."""
        if self.fd is None:
            return
        if discard_if_empty and [p.name for p in self.run_dir.iterdir()] == [".lock"]:
            (self.run_dir / ".lock").unlink()
            self.run_dir.rmdir()
        os.close(self.fd)  # closing the descriptor drops the flock
        self.fd = None

    def removed(self) -> bool:
        """Whether the lock file was deleted while held: the run directory was removed (rm -rf)
        under the process, and whatever it writes now would land in a new, partial directory."""
        return self.fd is not None and os.fstat(self.fd).st_nlink == 0

    def __del__(self):
        self.release()


def set_aside(run_dir: Path, lock: RunLock | None = None) -> Path:
    """Move a run that died before its first checkpoint to <parent>/.aborted/<name>-<n> (nothing
    is deleted). Refused while another process holds the directory; `lock`: ours, if we hold it."""
    run_dir = Path(run_dir)
    own = lock or RunLock(run_dir)
    try:
        aborted = run_dir.parent / ".aborted"
        aborted.mkdir(parents=True, exist_ok=True)
        n = 1
        while (aborted / f"{run_dir.name}-{n}").exists():
            n += 1
        return run_dir.rename(aborted / f"{run_dir.name}-{n}")
    finally:
        if lock is None:
            own.release()


def discard_leftovers(run_dir: Path) -> None:
    """Remove what writes a kill cut short left (temporary files, checkpoint staging directories):
    never read, they would only take space. Safe only under the run's lock: no one else writes."""
    from tdlm.training.checkpointer import remove_leftovers

    remove_temporaries(run_dir)
    remove_leftovers(run_dir)


def claim_run_dir(run_dir: Path, *, resume: bool, echo=print) -> RunLock:
    """Lock `run_dir` for a training process and check it can do what was asked: a new run in a
    new directory (one that died before its first checkpoint is set aside into .aborted/ and
    started again), or a resume of a run with a checkpoint. The lock is held on return."""
    run_dir = Path(run_dir)
    if resume and not run_dir.is_dir():
        raise RunError(f"--resume: no checkpoint to resume in {run_dir} (no such run directory); "
                       "start it without --resume")
    lock = RunLock(run_dir)
    try:
        discard_leftovers(run_dir)
        status = run_status(run_dir)
        last = run_dir / "checkpoints" / "last.json"
        if status == "finished" and not last.exists():  # neither a resume nor a new start can use it
            raise RunError(f"run directory {run_dir} holds a finished run whose checkpoints were deleted ({last} "
                           "is missing): it cannot be continued, and it is not overwritten; start a new run "
                           "under another name (--set run.name=<new name>)")
        if resume and not last.exists():
            why = ("it stopped before its first checkpoint; start it again without --resume (the old files go "
                   "to .aborted/)" if status == "aborted" else "start it without --resume")
            raise RunError(f"--resume: no checkpoint to resume in {run_dir} (looked for {last}); {why}")
        if not resume and status in ("finished", "stopped"):
            raise RunError(f"run directory {run_dir} already holds a run; continue it with --resume, "
                           "or start a new one with --set run.name=<new name> (nothing was overwritten)")
        if not resume and status == "aborted":
            moved = set_aside(run_dir, lock)
            lock.release()
            lock = RunLock(run_dir)
            echo(f"tdlm: {run_dir} held a run that stopped before its first checkpoint: moved it to {moved}; "
                 "starting again")
    except BaseException:
        lock.release()
        raise
    return lock


# -- what may change when a run is resumed ---------------------------------------------------
RESUME_MAY_CHANGE = (
    "run.out_dir", "run.name",  # where the directory is (it may have been moved or renamed)
    "logging.",  # what is shown
    "eval.", "sampler.",  # what is measured and how samples are drawn: not the training
    "training.eval_every", "training.eval_sequences", "training.checkpoint_every", "training.log_every",
    "training.micro_batch_size", "training.compile",  # fit the hardware, as the process count does
    "training.max_steps", "training.epochs",  # the length: the lr schedule follows the new total
)
"""Keys of the resolved config that `--resume` accepts changed (a key, or a prefix ending in '.').
Everything else (data, model, objective, corruption, schedule, seed, optimizer, batch, precision)
decides what is trained: a change is refused."""


MISSING = "(absent)"


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """Dotted key -> (saved value, current value) for every key where two resolved configs differ
    (MISSING where one of them lacks the key), in the current config's order."""
    old, new = flatten_table(saved), flatten_table(current)
    keys = list(new) + [k for k in old if k not in new]
    return {k: (old.get(k, MISSING), new.get(k, MISSING)) for k in keys if old.get(k, MISSING) != new.get(k, MISSING)}


def may_change_on_resume(key: str) -> bool:
    return any(key == rule or (rule.endswith(".") and key.startswith(rule)) for rule in RESUME_MAY_CHANGE)


def check_resume_config(run_dir: Path, cfg: RunConfig, components: dict, registry=None) -> dict[str, tuple]:
    """Compare the recipe of a resume with the run's saved config.json (both with every default
    filled in). Refuse any change to what is trained; return the allowed changes."""
    from tdlm.registry import PluginError, build_registry

    run_dir = Path(run_dir)
    try:
        saved_cfg = with_manifest(read_run_config(run_dir))
        saved = resolved_dict(saved_cfg, resolve_components(saved_cfg, registry or build_registry()))
    except (RecipeError, PluginError, ValueError) as exc:
        raise RunError(f"--resume: the saved config of {run_dir} no longer validates ({exc}); "
                       "resume with the tdlm version and plugins that started the run") from None
    changes = config_changes(saved, resolved_dict(cfg, components))
    refused = {k: v for k, v in changes.items() if not may_change_on_resume(k)}
    if refused:
        listed = "; ".join(f"{k}: {_show(a)} -> {_show(b)}" for k, (a, b) in refused.items())
        raise RunError(
            f"--resume: the recipe trains something else than the run in {run_dir}: {listed}. A resume may "
            "change only where the run is, logging, eval and sampler settings, eval/log/checkpoint cadence, "
            "micro_batch_size, compile and the length (max_steps/epochs); resume with the run's own recipe "
            f"(tdlm run {run_dir / 'config.toml'} --resume) or start a new run (--set run.name=<new name>)")
    return changes


def _show(value) -> str:
    return value if value is MISSING else json.dumps(value)


# -- loading a run back ------------------------------------------------------------------------
def with_manifest(cfg: RunConfig, warn=None) -> RunConfig:
    """`cfg` with the corpus and tokenizer of its shards' manifest (format='webdataset'): what the
    run really trains on, so that its saved config says so. Other formats: `cfg` itself."""
    from tdlm.data.manifest import data_from_manifest

    data = data_from_manifest(cfg.data, warn=warn)
    return cfg if data == cfg.data else cfg.model_copy(update={"data": data})


def read_run_config(run_dir: Path) -> RunConfig:
    """The run's resolved config from config.json; if that file is damaged, from its copy
    config.toml (written beside it at the same moments), with a warning."""
    path = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise RecipeError(f"{run_dir} {not_a_folder(run_dir)}: it is not a tdlm run directory (runs live under "
                          "runs/<name>)")
    if not path.exists():
        raise RecipeError(f"{run_dir} is not a tdlm run directory (no config.json); runs live under runs/<name>")
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        _check_saved_sections(raw)
    except (UnicodeDecodeError, ValueError) as exc:
        copy = path.with_name("config.toml")
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            _check_saved_sections(read_toml(copy, RecipeError, f"{copy} is missing"))
            cfg = read_recipe(copy)
        except (RecipeError, ValueError):
            raise RecipeError(f"{path} is damaged ({why}) and its copy {copy} cannot be read either; the run's "
                              "settings are lost: restore config.json from a backup") from None
        print(f"tdlm: warning: {path} is damaged ({why}); read its copy {copy} instead (restore config.json: "
              f"tdlm rewrites it at the next --resume)", file=sys.stderr)
        return cfg
    return RunConfig.model_validate(raw)


SAVED_SECTIONS = ("run", "data", "model", "objective", "training")


def _check_saved_sections(raw) -> None:
    """A saved config holds every section the trainer writes; an empty or cut-down one would
    otherwise read as the default recipe, i.e. as some other run."""
    if not isinstance(raw, dict):
        raise ValueError("not a table of sections")
    missing = [name for name in SAVED_SECTIONS if not isinstance(raw.get(name), dict)]
    if missing:
        raise ValueError(f"it lacks the section(s) {', '.join(missing)} that every saved config holds")


LOAD_MAY_OVERRIDE = ("schedule.", "corruption.", "objective.", "sampler.", "eval.")
"""Keys `load_run(overrides=...)` may change: how a trained network is scored or sampled, never its
shape (model, data) nor what the run was (run, training, logging)."""


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: RunConfig
    components: dict
    corpus: object
    built: object  # tdlm.lm.Built
    checkpoint: Path
    overrides: dict[str, tuple] = field(default_factory=dict)
    """Dotted key -> (saved value, value used) for every key the overrides changed."""
    left_out: list[str] = field(default_factory=list)
    """Checkpoint entries no component uses any more (the learned parameters of a corruption the
    overrides replaced)."""
    kept_initial: list[str] = field(default_factory=list)
    """Component parameters and buffers the checkpoint lacks (a corruption the overrides brought in
    that has its own): they keep the values the component was built with."""


def override_config(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """A run's config with recipe overrides (`section.key=value`, as `tdlm run --set`) applied to
    its schedule, corruption, objective, sampler or eval sections. A `.name` that switches a
    component starts that section from the new component's defaults (the old one's options are
    dropped), plus the overrides given for it. Any other key is refused: it would change the
    network's shape or what the run was."""
    from tdlm.config import parse_override

    raw = cfg.model_dump(mode="json")
    parsed = [(text, *parse_override(text)) for text in overrides]
    for text, path, value in parsed:
        key = ".".join(path)
        if len(path) < 2 or not any(key.startswith(prefix) for prefix in LOAD_MAY_OVERRIDE):
            raise RecipeError(f"override {text!r}: a trained run can be loaded with other "
                              + ", ".join(p.rstrip(".") for p in LOAD_MAY_OVERRIDE)
                              + " settings only; its model, data, run and training settings are what it was "
                                "trained with")
        if path[1:] == ["name"] and path[0] != "eval" and value != (raw.get(path[0]) or {}).get("name"):
            raw[path[0]] = {"name": value}  # another component: its own defaults, not the old one's options
    raw = apply_overrides(raw, [text for text, _, _ in parsed])
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"overrides {' '.join(overrides)}: {format_validation_error(exc, RunConfig)}") from None


def load_run(run_dir: str | Path, *, which: str = "best", device="cpu", sampler=None,
             registry=None, progress: bool = False, action: str = "scoring or sampling it",
             overrides: list[str] = ()) -> LoadedRun:
    """Rebuild a trained run's model from its saved config and checkpoint, once checked that
    its data and tokenizer are those it was trained with (tdlm.data.record). `run_dir` may also be
    a folder `tdlm export` wrote (its one checkpoint, its recipe and data record: tdlm.export.folder).

    `sampler`: (name, options dict) to sample with another sampler than the recipe's.
    `action`: what the caller is about to do, for the message when the data changed.
    `overrides`: `section.key=value` settings of the schedule, corruption, objective, sampler or
    eval sections (`tdlm eval --set`), e.g. `corruption.name=uniform` to score the network under
    another corruption; see `override_config`. An objective whose attention (causal or not)
    differs from the run's is refused: the network was trained with the other.
    """
    from tdlm.training import checkpointer as ckpt
    from tdlm.data import load_corpus
    from tdlm.export.folder import WEIGHTS_FILE, is_export
    from tdlm.data.record import check_record
    from tdlm.lm import build_model
    from tdlm.registry import build_registry

    run_dir = Path(run_dir)
    exported = read_export(run_dir, which) if is_export(run_dir) else None
    cfg = exported_config(run_dir, exported.recipe) if exported else read_run_config(run_dir)
    registry = registry or build_registry()
    saved_cfg = cfg
    if overrides:
        cfg = override_config(cfg, list(overrides))
        # first: the network itself cannot serve another attention, whatever sampler would go with it
        check_same_attention(registry, saved_cfg, cfg, run_dir)
    components = resolve_components(cfg, registry)
    if sampler is not None:
        from tdlm.sampling.select import with_sampler

        cfg, components = with_sampler(cfg, components, registry, *sampler)
    corpus = load_corpus(cfg.data, progress=progress)
    check_record(run_dir, corpus, cfg.data, action=action, recorded=exported.data if exported else None)
    built = build_model(cfg, components, vocab_info(corpus), load_draft=load_draft)
    if exported:
        path, weights = run_dir / WEIGHTS_FILE, exported.state_dict
    else:
        path, weights = ckpt.read_checkpoint(run_dir, which, ckpt.read_weights)  # safe against a save in progress
    left_out, kept_initial = [], []
    # the network must be the run's, whole; the components' state only where they still have it
    def must_match(key: str) -> bool:
        return not overrides or key.startswith("net.")

    if exported:
        check_exported_fits(run_dir, weights, built.model.state_dict(), must_match)
    else:
        ckpt.check_fits(path / "model.safetensors", weights, built.model.state_dict(), must_match=must_match)
    if overrides:
        own = built.model.state_dict()
        left_out = sorted(k for k in weights if k not in own and not k.startswith("net."))
        kept_initial = sorted(k for k in own if k not in weights and not k.startswith("net."))
        weights = {k: v for k, v in weights.items() if k not in left_out}
        built.model.load_state_dict({**{k: v for k, v in own.items() if k in kept_initial}, **weights})
    else:
        built.model.load_state_dict(weights)
    built.model.to(device).eval()
    changes = config_changes(saved_cfg.model_dump(mode="json"), resolved_dict(cfg, components)) if overrides else {}
    return LoadedRun(run_dir, cfg, components, corpus, built, path, changes, left_out, kept_initial)


def load_draft(run_dir: str | Path, *, which: str = "best", device="cpu"):
    """The network of a trained diffusion run (checkpoint `which`), in eval mode on `device`: a
    speculative sampler's draft (tdlm.components.draft.Draft). Samplers reach it through their
    RunContext (`load_run` and the trainer hand it to the components they build), never by
    importing this module."""
    from tdlm.components.draft import Draft, DraftError

    loaded = load_run(run_dir, which=which, device=device)
    if loaded.built.model.objective.causal:
        raise DraftError(
            f"draft run {run_dir} is a causal (autoregressive) model; a draft must be a masked-diffusion "
            "run, whose network predicts every masked position of a canvas"
        )
    return Draft(loaded.built.model.net.eval(), loaded.built.vocab, Path(run_dir), loaded.checkpoint)


def read_export(folder: Path, which: str):
    """An exported folder (`tdlm export`) read back: tdlm.export.folder.ExportedRun, once checked that
    it holds the checkpoint asked for."""
    from tdlm.export.folder import check_checkpoint, read_folder

    exported = read_folder(folder)
    check_checkpoint(folder, exported.info, which)
    return exported


def check_exported_fits(folder: Path, weights: dict, own: dict, must_match=lambda key: True) -> None:
    """A one-line RecipeError where an exported folder's weights do not fit the model its recipe
    builds (state dict `own`); `must_match(key)`: the keys that must be present in both."""
    from tdlm.training import checkpointer as ckpt

    found = ckpt.compare_state(weights, own, must_match)
    missing, extra, shapes = sorted(found.missing), sorted(found.extra), sorted(k for k, *_ in found.shapes)
    if found:
        said = [f"{what}: {', '.join(keys[:4])}{' ...' if len(keys) > 4 else ''}"
                for what, keys in (("missing", missing), ("not in the model", extra), ("other shape", shapes)) if keys]
        raise RecipeError(f"{folder / 'model.safetensors'} does not fit the model its recipe builds "
                          f"({'; '.join(said)}); export the run again")


def exported_config(folder: Path, recipe: dict) -> RunConfig:
    """The RunConfig of an exported folder's recipe, a RecipeError in one line if it no longer validates."""
    try:
        return RunConfig.model_validate(recipe)
    except ValidationError as exc:
        raise RecipeError(f"the recipe of the exported folder {folder} does not validate with this tdlm: "
                          f"{format_validation_error(exc, RunConfig)}") from None


def check_same_attention(registry, saved_cfg: RunConfig, cfg: RunConfig, run_dir: Path) -> None:
    """Refuse an objective (cfg's) whose network attention (causal or bidirectional) is not the run's
    (saved_cfg's). An objective that is not installed is left to resolve_components to report."""
    from tdlm.registry import UnknownComponentError

    def attention(causal) -> str:
        return "causal" if causal else "bidirectional"

    try:
        saved = registry.get("objective", saved_cfg.objective.name).cls.causal
    except UnknownComponentError as exc:
        raise RecipeError(f"the run's own objective is not installed: {exc}") from None
    try:
        objective = registry.get("objective", cfg.objective.name)
    except UnknownComponentError:
        return
    wanted = objective.cls.causal
    if wanted != saved:
        raise RecipeError(f"objective {objective.name!r} needs a {attention(wanted)} network and {run_dir} trained a "
                          f"{attention(saved)} one (objective {saved_cfg.objective.name!r}); score it with an "
                          f"objective of its kind")
