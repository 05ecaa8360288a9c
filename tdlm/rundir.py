"""Run directories loaded back for eval, sampling and export: a trained run's config,
components, corpus and weights (load_run), optionally under other components or settings.

A run directory is made by training (tdlm.training.run_lock claims it, tdlm.training.run_files
writes what it is, tdlm.training.checkpointer its checkpoints); this module reads one back, or
a folder `tdlm export` wrote (tdlm.export.folder). The names those modules define that were
first defined here stay importable from here.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import ValidationError

from tdlm.config import (RecipeError, RunConfig, SamplerRefused, apply_overrides, format_validation_error,
                         resolve_components, resolved_dict)
from tdlm.training.run_files import (  # noqa: F401 - defined here first: still importable from here
    MISSING,
    RESUME_MAY_CHANGE,
    SAVED_SECTIONS,
    check_resume_config,
    config_changes,
    environment_info,
    may_change_on_resume,
    read_run_config,
    with_manifest,
    write_config,
    write_run_files,
)
from tdlm.training.run_lock import (  # noqa: F401 - defined here first: still importable from here
    STATUSES,
    RunLock,
    claim_run_dir,
    discard_leftovers,
    run_status,
    set_aside,
)
from tdlm.vocab_info import vocab_info


# -- loading a run back ------------------------------------------------------------------------
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


def resolve_saved(cfg: RunConfig, registry, run_dir: Path, sampler=None) -> tuple[RunConfig, dict]:
    """A saved run's config and resolved components, with the chosen `sampler` ((name, options) or
    None: the run's own). A run trained before samplers were checked against their objective
    (plugin API 1.2) may name one of the other kind: it still loads, with the sampler chosen or,
    failing that, its objective's default sampler and a warning (scoring it needs no sampler)."""
    from tdlm.sampling.select import with_sampler

    try:
        components = resolve_components(cfg, registry)
    except SamplerRefused as exc:
        without = cfg.model_copy(update={"sampler": None})
        components = resolve_components(without, registry)  # the objective's default sampler
        if sampler is not None:
            if sampler[0] in (None, cfg.sampler.name):
                raise  # the refused sampler itself was asked for
            return with_sampler(without, components, registry, *sampler)
        print(f"tdlm: warning: {run_dir}: {exc}; it samples with {components['sampler'].component.name!r} "
              "instead (another: --sampler)", file=sys.stderr)
        return without, components
    if sampler is not None:
        return with_sampler(cfg, components, registry, *sampler)
    return cfg, components


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
    cfg, components = resolve_saved(cfg, registry, run_dir, sampler)
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
