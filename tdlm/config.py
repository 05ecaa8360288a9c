"""Recipes: TOML files validated by pydantic, one section per part of a run.

Each component section names its component (`[corruption] name = "uniform"`); the rest of the
section's keys are validated by that component's own `Config` class. Every error is a single
line naming the key, raised as RecipeError before any work starts.

TOML has no null, so a field that accepts None is written as the string "none" (NONE), and that
string given to such a field means None: a saved config.toml reads back as the config it came from.
"""

from __future__ import annotations

import datetime
import difflib
import json
import re
import tomllib
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tdlm.data.config import DataConfig
from tdlm.errors import TdlmError
from tdlm.model import ModelConfig

COMPONENT_SECTIONS = ("schedule", "corruption", "objective", "sampler")
NONE = "none"
"""The TOML spelling of None, in the fields that accept None."""
BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
SEED_LIMIT = 2**40
"""Seeds are multiplied by ~1e6 to seed each epoch, step and eval batch; below this they stay
inside the 64-bit range torch's generators take."""
Seed = Annotated[int, Field(ge=-SEED_LIMIT, lt=SEED_LIMIT)]
Beta = Annotated[float, Field(ge=0.0, lt=1.0)]


class RecipeError(TdlmError, ValueError):
    """A recipe (or override) that cannot run: the message says which key and why."""


class SamplerRefused(RecipeError):
    """The recipe's sampler cannot sample its objective (Sampler.objective_problem), and nothing
    else is wrong with the recipe: a run saved before this was checked still loads for scoring."""


class Section(BaseModel):
    """A recipe section: unknown keys are errors, and so are NaN and infinite floats."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False)


class RunSection(Section):
    name: str | None = None
    """Run directory name under out_dir; default: the recipe file's stem."""
    seed: Seed = 42
    out_dir: str = "runs"

    @field_validator("name")
    @classmethod
    def _one_folder(cls, name: str | None) -> str | None:
        """The run directory is out_dir/name: a name that is empty, '.', '..', absolute or holds a
        path separator would put it (or its .aborted/ copy) somewhere else."""
        if name is not None and (name.strip() in ("", ".", "..") or any(c in name for c in "/\\\0")):
            raise ValueError("must be one folder name (the run directory under run.out_dir): not empty, "
                             "not '.' or '..', without '/' or a backslash")
        return name


class TrainingConfig(Section):
    batch_size: int = Field(64, ge=1)
    """Global batch: sequences per optimizer step, whatever the number of processes."""
    micro_batch_size: int | None = Field(None, ge=1)
    """Sequences per forward pass per process; the rest is gradient accumulation."""
    epochs: float = Field(1.0, gt=0, allow_inf_nan=False)
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps; overrides epochs when set."""
    lr: float = Field(3e-4, gt=0, allow_inf_nan=False)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    """The cosine decay ends at lr * min_lr_ratio."""
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.01, ge=0, allow_inf_nan=False)
    """AdamW weight decay, applied to matrices only (not to biases, norms or embeddings)."""
    betas: tuple[Beta, Beta] = (0.9, 0.999)
    """AdamW's (beta1, beta2), each in [0, 1)."""
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
    init_from: str | None = None
    """Start from another model's weights: a run directory (its best checkpoint; `DIR@last` or
    `DIR@STEP` for another) or a folder `tdlm export` wrote. Only the network's weights are taken:
    the optimizer, the step and the learning-rate schedule start fresh. The shapes and the
    tokenizer must be this recipe's. Saved resolved (absolute path and checkpoint) in config.json,
    the source's identity in data.json; a resume loads the run's own checkpoint, never the source.
    See docs/init_from.md."""
    attention_anneal_steps: int = Field(0, ge=0)
    """DiffuLLaMA's attention annealing, for a diffusion model started from an AR one: at step s <
    this, each position attends to the ones before it and to each later one with probability
    s / attention_anneal_steps (causal at step 0); full attention after. 0: full from the start.
    Evaluation and sampling always use full attention."""

    @model_validator(mode="after")
    def _warmup_within_the_run(self):
        if self.max_steps is not None:
            check_warmup(self.warmup_steps, self.max_steps)
        return self


def check_warmup(warmup_steps: int, total_steps: int) -> None:
    """A ValueError when the learning-rate warm-up does not end before the run does (it would
    train the whole run at a fraction of training.lr)."""
    if warmup_steps >= total_steps:
        raise ValueError(f"training.warmup_steps = {warmup_steps} is not shorter than the run's {total_steps} steps "
                         "(training.max_steps, or training.epochs): the run would end before the learning rate "
                         "reaches training.lr; lower training.warmup_steps (e.g. --set training.warmup_steps=0)")


class EvalConfig(Section):
    split: Literal["valid", "test"] = "valid"
    t_samples: int = Field(8, ge=1)
    """Stratified t per sequence for the diffusion NELBO (>= 8 for a reported figure)."""
    batch_size: int = Field(32, ge=1)
    seed: Seed = 1234
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

    @model_validator(mode="before")
    @classmethod
    def _none_from_toml(cls, raw: Any) -> Any:
        return none_from_toml(cls, raw)


def _union_members(annotation) -> tuple:
    return get_args(annotation) if get_origin(annotation) in (Union, types.UnionType) else (annotation,)


def _accepts_none(annotation) -> bool:
    return annotation is Any or type(None) in _union_members(annotation)


def _value_from_toml(annotation, value: Any) -> Any:
    if value == NONE and _accepts_none(annotation):
        return None
    if not isinstance(value, dict):
        return value
    for member in _union_members(annotation):
        if isinstance(member, type) and issubclass(member, BaseModel):
            return none_from_toml(member, value)
    if get_origin(annotation) is dict:  # an inline table of options, e.g. semi-ar's inner_options
        return {key: _value_from_toml(get_args(annotation)[1], item) for key, item in value.items()}
    return value


def none_from_toml(model: type[BaseModel], raw: Any) -> Any:
    """`raw` (a TOML table for `model`) with NONE turned into None wherever the field it is given
    to accepts None, in nested sections and inline tables too. Keys `model` does not know (a
    component section's options) are left for their own Config."""
    if not isinstance(raw, dict):
        return raw
    fields = model.model_fields
    return {key: _value_from_toml(fields[key].annotation, value) if key in fields else value
            for key, value in raw.items()}


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
        elif error["type"] == "value_error" and isinstance(error.get("input"), dict):  # a whole section's check
            message = str(error["ctx"]["error"])  # names its keys itself
        else:
            message = f"{key}: {error['msg']} (got {error.get('input')!r})"
        problems.append(message)
    return "; ".join(problems)


def flatten_table(table: dict, prefix: str = "") -> dict:
    """{"training": {"lr": 1e-3}} -> {"training.lr": 1e-3}: the dotted keys of --set."""
    flat = {}
    for key, value in table.items():
        if isinstance(value, dict):
            flat.update(flatten_table(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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


def remove_keys(raw: dict, keys: list[str]) -> dict:
    """The recipe without the dotted `keys` (`tdlm run --unset`): what `--set` cannot say, e.g.
    the old component's options after `--set corruption.name=...` switched it."""
    for dotted in keys:
        *sections, name = dotted.strip().split(".")
        node = raw
        for part in sections:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or name not in node:
            raise RecipeError(f"--unset {dotted}: the recipe has no such key to remove")
        del node[name]
    return raw


def read_toml(path: Path, error: type[Exception], missing: str) -> dict:
    """The TOML file at `path`, or `error` with a one-line message: `missing` when there is no
    such file, the parser's complaint when it is not valid TOML."""
    if not path.is_file():
        raise error(missing)
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise error(f"{path} looks binary (it holds NUL bytes), not a TOML text file")
    try:
        text = raw.decode("utf-8-sig")  # an editor's byte-order mark is not TOML: dropped
    except UnicodeDecodeError as exc:
        raise error(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); TOML files are UTF-8: convert it, "
                    "e.g. iconv -f latin1 -t utf-8") from exc
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise error(f"{path}: not valid TOML: {exc}") from exc


def read_recipe(path: str | Path, overrides: list[str] = (), unset: list[str] = ()) -> RunConfig:
    """The recipe at `path` with the `--set` overrides applied and the `--unset` keys removed."""
    path = Path(path)
    raw = read_toml(path, RecipeError,
                    f"recipe {str(path)!r} not found (recipes ship in recipes/, e.g. recipes/quick_wikitext2.toml)")
    raw = remove_keys(apply_overrides(raw, list(overrides)), list(unset))
    try:
        cfg = RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise RecipeError(f"{path}: {format_validation_error(exc, RunConfig)}") from exc
    if cfg.run.name is None:
        try:  # validated like a given name
            run = RunSection.model_validate({**cfg.run.model_dump(), "name": path.stem})
        except ValidationError as exc:
            raise RecipeError(f"{path}: {format_validation_error(exc, RunSection, prefix='run.')} "
                              "(the recipe file's name; set run.name)") from exc
        cfg = cfg.model_copy(update={"run": run})
    return cfg


def resolve_components(cfg: RunConfig, registry) -> dict:
    """kind -> ResolvedComponent(component, config): each section's registered Component and its
    validated Config, once checked that the components fit each other (what each needs of the
    others, the sampler's objective, the attention options). Every problem of every section is
    reported together, one RecipeError, before any work starts."""
    from tdlm.registry import ResolvedComponent, UnknownComponentError

    resolved, problems = {}, []
    for kind in COMPONENT_SECTIONS:
        section = getattr(cfg, kind)
        if kind == "sampler" and section is None:
            objective = resolved.get("objective")
            if objective is None:
                continue
            section = ComponentSection(name=objective.component.cls.default_sampler)
        try:
            component = registry.get(kind, section.name)
            # the registry goes along as validation context: an option naming another component
            # (semi-ar's inner sampler) is looked up where this recipe's components are
            options = component.config_cls.model_validate(none_from_toml(component.config_cls, section.options()),
                                                          context={"registry": registry})
        except UnknownComponentError as exc:
            problems.append(f"{kind}.name: {exc}")
            continue
        except ValidationError as exc:
            message = format_validation_error(exc, component.config_cls, prefix=f"{kind}.")
            extra = [f"{kind}.{e['loc'][-1]}" for e in exc.errors() if e["type"] == "extra_forbidden"]
            if extra:  # typically the options of the component a --set {kind}.name switched away from
                message += (f" ({kind} {section.name!r} has no such option; to drop it: "
                            + " ".join(f"--unset {key}" for key in extra) + ")")
            problems.append(message)
            continue
        resolved[kind] = ResolvedComponent(component, options)
    if problems:
        raise RecipeError("; ".join(problems))
    refusals = objective_refusals(resolved)
    problems = unmet_requirements(resolved) + refusals + attention_conflicts(cfg, resolved)
    if problems:
        raise (SamplerRefused if problems == refusals else RecipeError)("; ".join(problems))
    return resolved


def objective_refusals(resolved: dict) -> list[str]:
    """The sampler's refusal of the objective (`Sampler.objective_problem`: by default, one of the
    other kind of network), one line naming both: it would run and write meaningless text."""
    sampler, objective = resolved.get("sampler"), resolved.get("objective")
    if sampler is None or objective is None:
        return []
    why = sampler.component.cls.objective_problem(objective.component.cls, sampler.config)
    if why is None:
        return []
    return [f"sampler {sampler.component.name!r} ({_origin(sampler.component)}) cannot sample objective "
            f"{objective.component.name!r} ({_origin(objective.component)}): {why}"]


def attention_conflicts(cfg: RunConfig, resolved: dict) -> list[str]:
    """The AR -> diffusion adaptation options are for a bidirectional network: a causal objective
    already predicts the next token from a shifted input, and its attention is causal throughout."""
    objective = resolved.get("objective")
    if objective is None or not objective.component.cls.causal:
        return []
    name = objective.component.name
    problems = []
    if cfg.model.shift_logits:
        problems.append(f"model.shift_logits is for a diffusion objective; objective {name!r} is causal and shifts its "
                        "own input (drop it: --unset model.shift_logits)")
    if cfg.training.attention_anneal_steps:
        problems.append(f"training.attention_anneal_steps opens a causal attention to full; objective {name!r} keeps it "
                        "causal (drop it: --unset training.attention_anneal_steps)")
    return problems


def unmet_requirements(resolved: dict) -> list[str]:
    """What each resolved component needs of the others (its class's `requirements(config)`, from
    `needs_corruption` and the like) and they do not implement (tdlm.components.implements): one
    line each, naming the method, the component that needs it and the one that lacks it."""
    from tdlm.components import implements

    problems = []
    for kind, (component, options) in resolved.items():
        requirements = getattr(component.cls, "requirements", None)
        for other_kind, methods in (requirements(options) if requirements else {}).items():
            if other_kind not in COMPONENT_SECTIONS:
                problems.append(f"{kind} {component.name!r} ({_origin(component)}) declares needs of "
                                f"{other_kind!r}, which is not a kind of component ({', '.join(COMPONENT_SECTIONS)})")
                continue
            if other_kind not in resolved:
                continue
            other = resolved[other_kind].component
            for method in methods:
                if not implements(other.cls, method):
                    problems.append(
                        f"{kind} {component.name!r} ({_origin(component)}) needs {other_kind}.{method}, which "
                        f"{other_kind} {other.name!r} ({_origin(other)}) does not implement; pick another "
                        f"{kind} or {other_kind} (--set {kind}.name=... or --set {other_kind}.name=...), or "
                        f"implement {method} in {other.cls.__module__}.{other.cls.__qualname__}")
    return problems


def _origin(component) -> str:
    """'tdlm' for a built-in, else the plugin and package that registered the component."""
    from tdlm.registry import BUILTIN_PLUGINS

    if component.plugin in BUILTIN_PLUGINS:
        return "tdlm"
    return f"plugin {component.plugin!r}, package {component.package}"


def resolved_dict(cfg: RunConfig, components: dict) -> dict:
    """The full config with every default filled in, component options included."""
    raw = cfg.model_dump(mode="json", exclude={"sampler"})
    for kind, resolved in components.items():
        raw[kind] = {"name": resolved.component.name, **resolved.config.model_dump(mode="json")}
    return raw


def toml_value(value: Any) -> str:
    """`value` as TOML text, as a recipe (or `tdlm run --set key=value`) reads it back; None is NONE."""
    if value is None:
        return toml_value(NONE)
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # inf and nan are spelt the same in TOML
    if isinstance(value, str):
        # JSON escapes '"', '\\' and U+0000-U+001F as TOML does, and TOML wants DEL escaped too;
        # other characters stay as they are (JSON's \ud83d-style surrogate pairs are not TOML).
        return json.dumps(value, ensure_ascii=False).replace("\x7f", "\\u007f")
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):  # an inline table, e.g. semi-ar's inner_options
        return "{" + ", ".join(f"{toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (datetime.date, datetime.time)):  # TOML's own date-time values
        return value.isoformat()
    raise TypeError(f"{value!r} has no TOML spelling")


def toml_key(key: Any) -> str:
    """A bare key where TOML allows one (`lr = ...`), else a quoted one."""
    key = str(key)
    return key if BARE_KEY.fullmatch(key) else toml_value(key)


def to_toml(data: dict) -> str:
    """A resolved config (section -> table) as TOML that reads back as the same config."""
    lines = []
    for section, table in data.items():
        lines.append(f"[{toml_key(section)}]")
        lines.extend(f"{toml_key(key)} = {toml_value(value)}" for key, value in table.items())
        lines.append("")
    return "\n".join(lines)
