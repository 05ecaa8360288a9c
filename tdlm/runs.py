"""Run directories: creating them for training and loading them back for eval and sampling."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np

from tdlm.components import VocabInfo
from tdlm.config import RecipeError, RunConfig, resolve_components, resolved_dict, to_toml


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


def write_run_files(run_dir: Path, cfg: RunConfig, components: dict) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = resolved_dict(cfg, components)
    (run_dir / "config.json").write_text(json.dumps(resolved, indent=2))
    (run_dir / "config.toml").write_text(to_toml(resolved))
    environment = environment_info()
    environment["components"] = {  # which package (and version) provided each component
        kind: {"name": c.name, "plugin": c.plugin, "package": c.package, "version": c.version}
        for kind, (c, _) in components.items()
    }
    (run_dir / "environment.json").write_text(json.dumps(environment, indent=2))


def read_run_config(run_dir: Path) -> RunConfig:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise RecipeError(f"{run_dir} is not a tdlm run directory (no config.json); runs live under runs/<name>")
    return RunConfig.model_validate(json.loads(path.read_text()))


@dataclass
class LoadedRun:
    run_dir: Path
    cfg: RunConfig
    components: dict
    corpus: object
    built: object  # tdlm.lm.Built
    checkpoint: Path


def load_run(run_dir: str | Path, *, which: str = "best", device="cpu", sampler=None,
             registry=None, progress: bool = False) -> LoadedRun:
    """Rebuild a trained run's model from its saved config and checkpoint.

    `sampler`: (name, options dict) to sample with another sampler than the recipe's.
    """
    from tdlm.checkpoint import checkpoint_dir, load_weights
    from tdlm.data import load_corpus
    from tdlm.lm import build_model
    from tdlm.plugins import build_registry

    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    registry = registry or build_registry()
    components = resolve_components(cfg, registry)
    if sampler is not None:
        name, options = sampler
        recipe_sampler, recipe_options = components["sampler"]
        name = name or recipe_sampler.name
        # the same sampler keeps the recipe's options unless overridden; another starts from its defaults
        base = recipe_options.model_dump() if name == recipe_sampler.name else {}
        raw = cfg.model_dump()
        raw["sampler"] = {"name": name, **base, **options}
        cfg = RunConfig.model_validate(raw)
        components = resolve_components(cfg, registry)
    corpus = load_corpus(cfg.data, progress=progress)
    built = build_model(cfg, components, vocab_info(corpus))
    path = checkpoint_dir(run_dir, which)
    load_weights(built.model, path)
    built.model.to(device).eval()
    return LoadedRun(run_dir, cfg, components, corpus, built, path)
