"""What a run directory says about the run it holds: the resolved recipe (config.json, and its
copy config.toml) and the environment it ran in (environment.json), written when a run starts;
the recipe read back (by --resume and by every command that loads a run); and which settings a
resume may change.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from tdlm.config import (RecipeError, RunConfig, flatten_table, read_recipe, read_toml, resolve_components,
                         resolved_dict, to_toml)
from tdlm.data.locate import not_a_folder
from tdlm.errors import RunError
from tdlm.files import write_atomically


def environment_info() -> dict:
    """Package versions and the git commit, saved with every run for reproducibility."""
    versions = {}
    for package in ("tdlm", "torch", "accelerate", "tokenizers", "pydantic", "pluggy", "deepspeed"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    repo = Path(__file__).resolve().parents[2]  # the checkout tdlm runs from
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


# -- the recipe read back ----------------------------------------------------------------------
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
