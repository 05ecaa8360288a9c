"""Recipes: TOML files validated by pydantic, one section per part of a run.

Each component section names its component (`[corruption] name = "uniform"`); the rest of the
section's keys are validated by that component's own `Config` class. Every error is a single
line naming the key, raised as RecipeError before any work starts.
"""

from __future__ import annotations

import difflib
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tdlm.data.config import DataConfig
from tdlm.model import ModelConfig

COMPONENT_SECTIONS = ("schedule", "corruption", "objective", "sampler")


class RecipeError(ValueError):
    """A recipe (or override) that cannot run: the message says which key and why."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class RunSection(Section):
    name: str | None = None
    """Run directory name under out_dir; default: the recipe file's stem."""
    seed: int = 42
    out_dir: str = "runs"


class TrainingConfig(Section):
    batch_size: int = Field(64, ge=1)
    """Global batch: sequences per optimizer step, whatever the number of processes."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Sequences per forward pass per process; the rest is gradient accumulation."""
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides epochs when set."""
    lr: float = Field(3e-4, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.01, ge=0)
    """AdamW weight decay, applied to matrices only (not to biases, norms or embeddings)."""
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = Field(1.0, gt=0)
    mixed_precision: Literal["auto", "no", "bf16", "fp16"] = "auto"
    """auto: bf16 autocast on a GPU that supports it, full precision on CPU."""
    compile: bool = False
    eval_every: int = Field(500, ge=1)
    eval_sequences: int | None = Field(256, ge=1)
    """Validation sequences scored at each periodic eval (None: all); the final eval uses all."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Default: every eval."""
    log_every: int = Field(10, ge=1)
    """Steps between host syncs: loss logging, NaN check, progress bar."""


class EvalConfig(Section):
    split: Literal["valid", "test"] = "valid"
    t_samples: int = Field(8, ge=1)
    """Stratified t per sequence for the diffusion NELBO (>= 8 for a reported figure)."""
    batch_size: int = Field(32, ge=1)
    seed: int = 1234
    """Fixed seed of the evaluation's mask draws, so a score is reproducible."""
    sample_num: int = Field(2, ge=0)
    """Text samples written at each eval."""
    final_splits: list[Literal["valid", "test"]] = ["valid", "test"]
    """Splits the best checkpoint is scored on, in full, when training ends."""


class LoggingConfig(Section):
    tensorboard: bool = True
    progress: bool = True


class ComponentSection(BaseModel):
    """`name` picks the component; the other keys go to its Config (checked in resolve)."""

    model_config = ConfigDict(extra="allow", frozen=True)
    name: str

    def options(self) -> dict[str, Any]:
        return dict(self.model_extra or {})


class RunConfig(Section):
    run: RunSection = RunSection()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    schedule: ComponentSection = ComponentSection(name="linear")
    corruption: ComponentSection = ComponentSection(name="uniform")
    objective: ComponentSection = ComponentSection(name="diffusion")
    sampler: ComponentSection | None = None
    """Default: the objective's own sampler (ancestral for diffusion, ar for AR)."""
    training: TrainingConfig = TrainingConfig()
    eval: EvalConfig = EvalConfig()
    logging: LoggingConfig = LoggingConfig()


def _known_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """Field names of the sub-model at `loc` (for 'did you mean' hints)."""
    for part in loc[:-1]:
        field = model.model_fields.get(str(part)) if isinstance(model, type) else None
        annotation = getattr(field, "annotation", None)
        candidates = [a for a in getattr(annotation, "__args__", (annotation,)) if isinstance(a, type)]
        model = next((a for a in candidates if issubclass(a, BaseModel)), None)
        if model is None:
            return []
    return list(model.model_fields)


def format_validation_error(exc: ValidationError, model: type[BaseModel], prefix: str = "") -> str:
    problems = []
    for error in exc.errors():
        loc = tuple(error["loc"])
        key = prefix + ".".join(str(p) for p in loc)
        if error["type"] == "extra_forbidden":
            known = _known_keys(model, loc)
            hint = difflib.get_close_matches(str(loc[-1]), known, n=1)
            message = f"unknown key {key!r}"
            message += f" (did you mean {hint[0]!r}?)" if hint else f" (known: {', '.join(known)})" if known else ""
        else:
            message = f"{key}: {error['msg']} (got {error.get('input')!r})"
        problems.append(message)
    return "; ".join(problems)


def parse_override(text: str) -> tuple[list[str], Any]:
    """'training.max_steps=20' -> (['training', 'max_steps'], 20); values are read as TOML."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise RecipeError(f"override {text!r} is not of the form section.key=value")
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # a bare word is a string: --set corruption.name=uniform
    return key.strip().split("."), value


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise RecipeError(f"override {text!r}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def read_toml(path: Path, error: type[Exception], missing: str) -> dict:
    """The TOML file at `path`, or `error` with a one-line message: `missing` when there is no
    such file, the parser's complaint when it is not valid TOML."""
    if not path.is_file():
        raise error(missing)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from exc


def read_recipe(path: str | Path, overrides: list[str] = ()) -> RunConfig:
    path = Path(path)
    raw = read_toml(path, RecipeError,
                    f"recipe {str(path)!r} not found (recipes ship in recipes/, e.g. recipes/quick_wikitext2.toml)")
    raw = apply_overrides(raw, list(overrides))
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {format_validation_error(exc, RunConfig)}") from exc
    if cfg.run.name is None:
        cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"name": path.stem})})
    return cfg


def resolve_components(cfg: RunConfig, registry) -> dict[str, tuple[Any, BaseModel]]:
    """kind -> (registered Component, its validated Config), checking every section."""
    from tdlm.plugins import UnknownComponentError

    sampler = cfg.sampler
    resolved, problems = {}, []
    for kind in COMPONENT_SECTIONS:
        section = getattr(cfg, kind)
        if kind == "sampler" and section is None:
            objective = resolved.get("objective")
            if objective is None:
                continue
            section = sampler = ComponentSection(name=objective[0].cls.default_sampler)
        try:
            component = registry.get(kind, section.name)
            options = component.config_cls.model_validate(section.options())
        except UnknownComponentError as exc:
            problems.append(f"{kind}.name: {exc}")
            continue
        except ValidationError as exc:
            problems.append(format_validation_error(exc, component.config_cls, prefix=f"{kind}."))
            continue
        resolved[kind] = (component, options)
    if problems:
        raise RecipeError("; ".join(problems))
    return resolved


def resolved_dict(cfg: RunConfig, components: dict) -> dict:
    """The full config with every default filled in, component options included."""
    raw = cfg.model_dump(mode="json", exclude={"sampler"})
    for kind, (component, options) in components.items():
        raw[kind] = {"name": component.name, **options.model_dump(mode="json")}
    return raw


def to_toml(data: dict) -> str:
    """A small TOML writer for resolved configs (tables of scalars, lists and inline tables)."""

    def scalar(value):
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, str):
            return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(value, (list, tuple)):
            return "[" + ", ".join(scalar(v) for v in value) + "]"
        if isinstance(value, dict):  # an inline table, e.g. semi-ar's inner_options
            return "{" + ", ".join(f"{scalar(str(k))} = {scalar(v)}" for k, v in value.items() if v is not None) + "}"
        return repr(value)

    lines = []
    for section, table in data.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {scalar(value)}" for key, value in table.items() if value is not None)
        lines.append("")
    return "\n".join(lines)
