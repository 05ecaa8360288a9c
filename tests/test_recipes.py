"""Every shipped recipe validates, bad recipes fail early with a one-line error (exit 2), and a
run's saved config.toml reads back as the config it was written from."""

from __future__ import annotations

import json
import tomllib
from pathlib import Path
from typing import Any, get_args

import pytest
from click.testing import CliRunner
from pydantic import BaseModel

from tdlm.cli import cli
from tdlm.config import (
    NONE,
    ComponentSection,
    RecipeError,
    RunConfig,
    apply_overrides,
    parse_override,
    read_recipe,
    resolve_components,
    resolved_dict,
    to_toml,
    toml_value,
)
from tdlm.registry import build_registry, get_plugin_manager
from tdlm.rundir import write_run_files

ROOT = Path(__file__).resolve().parent.parent
# sweep files (recipes/sweeps/) are not recipes: tests/test_sweep.py resolves every run they name
RECIPES = sorted(p for p in (ROOT / "recipes").rglob("*.toml") if "sweeps" not in p.relative_to(ROOT / "recipes").parts)


def test_recipes_are_found():
    names = {path.name for path in RECIPES}
    assert {"tiny_wikitext2.toml", "tiny_wikitext2_ar.toml", "quick_wikitext2.toml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: str(p.relative_to(ROOT)))
def test_shipped_recipe_validates(recipe):
    cfg = read_recipe(recipe)
    components = resolve_components(cfg, build_registry())
    assert set(components) == {"schedule", "corruption", "objective", "sampler"}


@pytest.mark.parametrize("name, corruption, exact", [
    ("tiny_wikitext2_state_dependent.toml", {"name": "state-dependent"}, False),
    ("tiny_wikitext2_cart.toml", {"name": "cart", "p": 0.3}, True),
])
def test_a_research_recipe_is_the_tiny_baseline_with_another_corruption(name, corruption, exact):
    baseline = read_recipe(ROOT / "recipes/tiny_wikitext2.toml").model_dump()
    ours = read_recipe(ROOT / "recipes" / name).model_dump()
    assert {key for key in baseline if baseline[key] != ours[key]} <= {"run", "corruption"}
    assert {k for k in baseline["run"] if baseline["run"][k] != ours["run"][k]} <= {"name"}  # from the file name
    if exact:
        assert ours["corruption"] == corruption
    else:
        assert {k: ours["corruption"][k] for k in corruption} == corruption


def test_the_long_quick_recipe_is_the_quick_one_larger_and_longer():
    # docs/results.md compares it with the quick runs per token: the data, tokenizer, batch and
    # optimiser must stay the quick recipe's (the sample temperature may differ)
    quick = read_recipe(ROOT / "recipes/quick_wikitext2.toml").model_dump()
    long = read_recipe(ROOT / "recipes/quick_wikitext2_long.toml").model_dump()
    assert {key for key in quick if quick[key] != long[key]} == {"run", "model", "sampler", "training"}
    assert quick["data"] == long["data"] and quick["eval"] == long["eval"]
    differing = {section: {k for k in quick[section] if quick[section][k] != long[section][k]}
                 for section in ("run", "model", "sampler", "training")}
    assert differing == {"run": {"name"}, "model": {"n_layers", "d_model", "n_heads"}, "sampler": {"temperature"},
                         "training": {"max_steps", "warmup_steps", "eval_every", "checkpoint_every"}}
    assert (long["model"]["n_layers"], long["model"]["d_model"], long["training"]["max_steps"]) == (4, 256, 12_000)


def test_the_tiny_pair_differs_only_in_the_objective_and_sampler():
    diffusion = read_recipe(ROOT / "recipes/tiny_wikitext2.toml").model_dump()
    ar = read_recipe(ROOT / "recipes/tiny_wikitext2_ar.toml").model_dump()
    differing = {key for key in diffusion if diffusion[key] != ar[key]}
    assert differing == {"run", "objective", "sampler"}
    assert diffusion["run"]["seed"] == ar["run"]["seed"] == 42
    seed_settings = {"n_layers": 2, "d_model": 64, "n_heads": 4}
    assert {k: diffusion["model"][k] for k in seed_settings} == seed_settings
    assert diffusion["data"]["seq_len"] == 128 and diffusion["data"]["tokenizer"] == "gpt2"
    assert diffusion["training"]["batch_size"] == 64 and diffusion["training"]["epochs"] == 5
    assert diffusion["training"]["lr"] == 3e-4


def test_the_seed_model_has_about_6_54m_parameters():
    from tdlm.model import Transformer

    cfg = read_recipe(ROOT / "recipes/tiny_wikitext2.toml")
    net = Transformer(cfg.model, vocab_size=50257, max_len=cfg.data.seq_len, causal=False)
    assert round(net.num_parameters() / 1e6, 2) == 6.54


@pytest.mark.parametrize(
    "override, message",
    [
        ("training.max_step=3", "unknown key 'training.max_step' (did you mean 'max_steps'?)"),
        ("corruption.name=unifrom", "unknown corruption 'unifrom'"),
        ("sampler.stepz=3", "unknown key 'sampler.stepz' (did you mean 'steps'?)"),
        ("training.lr=abc", "training.lr: Input should be a valid number"),
        ("model.positions=alibi", "model.positions"),
        ("data.tokenizer=sentencepiece", "unknown tokenizer 'sentencepiece'"),
        ("bogus.x=1", "unknown key 'bogus'"),
    ],
)
def test_bad_recipe_is_one_line_error_with_exit_code_2(override, message):
    result = CliRunner().invoke(cli, ["run", str(ROOT / "recipes/quick_wikitext2.toml"), "--set", override, "--check"])
    assert result.exit_code == 2
    assert message in result.output
    assert result.output.count("\n") == 1  # one line


def test_missing_recipe_file():
    result = CliRunner().invoke(cli, ["run", "no/such/recipe.toml"])
    assert result.exit_code == 2 and "not found" in result.output


def test_overrides_are_typed_and_nested():
    assert parse_override("training.max_steps=20") == (["training", "max_steps"], 20)
    assert parse_override("training.lr=1e-3") == (["training", "lr"], 1e-3)
    assert parse_override("corruption.name=uniform") == (["corruption", "name"], "uniform")
    assert parse_override("training.betas=[0.9, 0.95]") == (["training", "betas"], [0.9, 0.95])
    assert apply_overrides({"a": {"b": 1}}, ["a.c=2", "d.e=true"]) == {"a": {"b": 1, "c": 2}, "d": {"e": True}}
    with pytest.raises(RecipeError):
        parse_override("no-equals-sign")


def test_unset_drops_the_options_of_a_component_switched_away_from():
    cart = str(ROOT / "recipes/tiny_wikitext2_cart.toml")
    switched = CliRunner().invoke(cli, ["run", cart, "--set", "corruption.name=uniform", "--check"])
    assert switched.exit_code == 2 and switched.output.count("\n") == 1
    assert "corruption 'uniform' has no such option; to drop it: --unset corruption.p" in switched.output
    fixed = CliRunner().invoke(cli, ["run", cart, "--set", "corruption.name=uniform", "--unset", "corruption.p",
                                     "--check"])
    assert fixed.exit_code == 0 and '[corruption]\nname = "uniform"\n\n' in fixed.output
    missing = CliRunner().invoke(cli, ["run", cart, "--unset", "corruption.q", "--check"])
    assert missing.exit_code == 2 and "--unset corruption.q: the recipe has no such key" in missing.output


def test_plugins_name_shows_what_each_option_does():
    result = CliRunner().invoke(cli, ["plugins", "threshold"])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("sampler threshold (tdlm ")
    assert "  tau: float (default 0.9)\n      " in result.output
    typo = CliRunner().invoke(cli, ["plugins", "treshold"])
    assert typo.exit_code == 2 and "did you mean 'threshold'?" in typo.output


def test_every_builtin_component_and_option_is_described(registry):
    from tdlm.registry import describe_options

    for component in registry.all():
        assert (component.cls.__doc__ or "").strip(), f"{component.kind} {component.name} has no docstring"
        for option in describe_options(component.config_cls):
            assert option["doc"], f"{component.kind} {component.name}: option {option['name']} has no docstring"


def test_check_prints_the_resolved_recipe_with_component_defaults():
    result = CliRunner().invoke(cli, ["run", str(ROOT / "recipes/quick_wikitext2.toml"), "--check"])
    assert result.exit_code == 0
    assert "[objective]\nname = \"diffusion\"\nt_eps = 0.001" in result.output
    assert "[sampler]\nname = \"ancestral\"" in result.output


# -- the saved config.toml reads back as the run's config ------------------------------------
def _accepts_none(field) -> bool:
    return field.annotation is Any or type(None) in get_args(field.annotation)


def none_overrides() -> list[str]:
    """One override per field that accepts None, setting it to None: the recipe's own fields and
    those of every registered component (that component chosen), semi-ar's inner options too."""
    overrides = [f"{name}={NONE}" for name, field in RunConfig.model_fields.items() if _accepts_none(field)]
    for section, field in RunConfig.model_fields.items():
        model = field.annotation
        if isinstance(model, type) and issubclass(model, BaseModel) and model is not ComponentSection:
            overrides += [f"{section}.{name}={NONE}" for name, f in model.model_fields.items() if _accepts_none(f)]
    for component in build_registry().all():
        overrides += [f'{component.kind}={{name = "{component.name}", {name} = "{NONE}"}}'
                      for name, f in component.config_cls.model_fields.items() if _accepts_none(f)]
    return overrides + [f'sampler={{name = "semi-ar", inner = "speculative", inner_options = {{draft = "{NONE}"}}}}']


def set_to_none(override: str) -> list[list[str]]:
    """The key paths within a section that `override` sets to None."""

    def paths(path, value):
        if isinstance(value, dict):
            return [p for key, item in value.items() for p in paths([*path, key], item)]
        return [path] if value == NONE and len(path) > 1 else []

    return paths(*parse_override(override))


def test_every_field_that_accepts_none_is_tried():
    overrides = none_overrides()
    for expected in ("sampler=none", "training.grad_clip=none", "training.eval_sequences=none", "data.path=none",
                     'sampler={name = "ar", top_p = "none"}'):
        assert expected in overrides


def fits_the_recipe(recipe: Path, override: str, registry) -> bool:
    """False for a sampler of the other kind than the recipe's objective (refused when resolved:
    tdlm.config.objective_refusals); its options are tried with the recipes of its kind."""
    section, value = parse_override(override)
    if section != ["sampler"] or not isinstance(value, dict):
        return True
    objective = registry.get("objective", read_recipe(recipe).objective.name)
    return registry.get("sampler", value["name"]).cls.causal == objective.cls.causal


def recipes_and_none_overrides() -> list:
    """Every recipe with every override that sets a field to none and fits it."""
    registry = build_registry(get_plugin_manager(entry_points=False))
    return [pytest.param(recipe, override, id=f"{recipe.stem}-{override}")
            for recipe in RECIPES for override in none_overrides() if fits_the_recipe(recipe, override, registry)]


@pytest.mark.parametrize("recipe, override", recipes_and_none_overrides())
def test_the_saved_config_reads_back_as_the_resolved_config(tmp_path, registry, recipe, override):
    cfg = read_recipe(recipe, [override])
    resolved = resolved_dict(cfg, resolve_components(cfg, registry))
    for path in set_to_none(override):
        node = resolved
        for key in path:
            node = node[key]
        expected = recipe.stem if path == ["run", "name"] else None  # a nameless run is named after its file
        assert node == expected, path
    text = to_toml(resolved)
    (tmp_path / "config.toml").write_text(text)
    again = read_recipe(tmp_path / "config.toml")  # as `tdlm run` reads a recipe
    assert resolved_dict(again, resolve_components(again, registry)) == resolved
    assert to_toml(resolved_dict(again, resolve_components(again, registry))) == text


def test_a_run_directory_keeps_grad_clip_and_eval_sequences_none(tmp_path, registry):
    """The bug this guards: None was left out of config.toml and read back as the default."""
    cfg = read_recipe(ROOT / "recipes/quick_wikitext2.toml", ["training.grad_clip=none", "training.eval_sequences=none"])
    write_run_files(tmp_path, cfg, resolve_components(cfg, registry))
    again = read_recipe(tmp_path / "config.toml")
    assert again.training.grad_clip is None and again.training.eval_sequences is None
    assert resolved_dict(again, resolve_components(again, registry)) == json.loads((tmp_path / "config.json").read_text())


STRANGE_STRINGS = ['a "quoted" name', r"back\slash, \n and \u00e9 kept as written", "two\nlines\r\n",
                   "tab\tbell\x07 nul\x00 escape\x1b delete\x7f", "été ✓ 🙂 中文 \u2028", "", "'single' '''"]


@pytest.mark.parametrize("text", STRANGE_STRINGS)
def test_strings_survive_the_writer(text):
    assert tomllib.loads(f"v = {toml_value(text)}")["v"] == text
    assert tomllib.loads(f"v = {toml_value({text: [text, None], 'x': None})}")["v"] == {text: [text, NONE], "x": NONE}


@pytest.mark.parametrize("text", STRANGE_STRINGS)
def test_strings_survive_a_saved_config(tmp_path, registry, text):
    cfg = RunConfig.model_validate({"run": {"name": "r", "out_dir": text}, "data": {"path": text}})
    resolved = resolved_dict(cfg, resolve_components(cfg, registry))
    (tmp_path / "config.toml").write_text(to_toml(resolved), encoding="utf-8")
    again = read_recipe(tmp_path / "config.toml")
    assert again.run.out_dir == again.data.path == text  # (run.name must be one folder name)
    assert resolved_dict(again, resolve_components(again, registry)) == resolved
