"""Declared capabilities: what tdlm may ask of a component is read from its class attributes, never
guessed from its name, its options or its signature (docs/plugins.md, "Declared capabilities"); a
sampler that cannot sample an objective says so when the recipe is resolved, in one line."""

from __future__ import annotations

import inspect

import pytest
import torch

from test_plugin_fit import registered
from tdlm.plugin import (AutoregressiveObjective, ComponentConfig, DiffusionObjective, Objective, RecipeError,
                         ResolvedComponent, RunConfig, SampleOutput, Sampler, SemiAutoregressiveSampler, VocabInfo,
                         build_model, build_registry, get_plugin_manager, resolve_components)

V = 20


def registry_with(**components):
    return registered("toy-capabilities", **components)


def recipe(**sections) -> RunConfig:
    raw = {"data": {"seq_len": 8}, "model": {"n_layers": 1, "d_model": 16, "n_heads": 2}}
    for key, value in sections.items():
        raw[key] = {"name": value} if isinstance(value, str) else value
    return RunConfig.model_validate(raw)


class FillAll(Sampler):
    """One call: every masked position takes the most likely token (a diffusion sampler)."""

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        fill = canvas == self.vocab.mask_id
        return SampleOutput(tokens=torch.where(fill, net(canvas).argmax(-1), canvas), nfe=1)


class NotAutoregressive(FillAll):
    """Its name starts with `ar`, which once made tdlm take it for an AR sampler."""

    causal = False


class RefusesCausal(FillAll):
    """A sampler with a refusal of its own: needs a bound to compare its steps with."""

    class Config(ComponentConfig):
        strict: bool = True

    @classmethod
    def objective_problem(cls, objective, config):
        if config.strict and "nelbo_terms" not in objective.needs_corruption:
            return "it compares its steps with the corruption's NELBO, which this objective does not use"
        return super().objective_problem(objective, config)


def test_a_sampler_named_ar_that_declares_causal_false_samples_diffusion_models():
    registry = registry_with(sampler=[("ar-like", NotAutoregressive)])
    components = resolve_components(recipe(sampler="ar-like"), registry)  # a diffusion objective
    assert components["sampler"].component.cls is NotAutoregressive
    with pytest.raises(RecipeError) as info:
        resolve_components(recipe(objective="ar", sampler="ar-like"), registry)
    assert str(info.value) == ("sampler 'ar-like' (plugin 'toy-capabilities', package tdlm) cannot sample objective "
                               "'ar' (tdlm): it is for masked-diffusion models and this run is an autoregressive one; "
                               "use one of its own samplers, e.g. 'ar'")


def test_a_sampler_written_before_declared_capabilities_is_told_to_declare_causal():
    """A plugin's AR sampler named `ar-...` was once taken for an AR one by its name; now it declares
    `causal = True`, and the refusal says so when it does not."""
    registry = registry_with(sampler=[("ar-old", FillAll), ("ar-like", NotAutoregressive)])
    with pytest.raises(RecipeError) as info:
        resolve_components(recipe(objective="ar", sampler="ar-old"), registry)
    assert str(info.value).endswith("(a sampler for autoregressive models declares `causal = True`, since plugin API "
                                    "1.2: docs/plugins.md#declared-capabilities)")
    with pytest.raises(RecipeError) as info:  # one that declared causal = False meant it
        resolve_components(recipe(objective="ar", sampler="ar-like"), registry)
    assert "declares `causal = True`" not in str(info.value)


def test_a_sampler_can_refuse_an_objective_when_the_recipe_is_resolved():
    registry = registry_with(sampler=[("refuses-causal", RefusesCausal)])
    resolve_components(recipe(sampler="refuses-causal"), registry)
    with pytest.raises(RecipeError, match=r"^sampler 'refuses-causal' \(plugin 'toy-capabilities', package tdlm\) "
                                          r"cannot sample objective 'ar' \(tdlm\): it compares its steps with the "
                                          r"corruption's NELBO, which this objective does not use$"):
        resolve_components(recipe(objective="ar", sampler="refuses-causal"), registry)
    # its own default rule still holds when its own check passes
    with pytest.raises(RecipeError, match="it is for masked-diffusion models"):
        resolve_components(recipe(objective="ar", sampler={"name": "refuses-causal", "strict": False}), registry)


def test_tdlm_run_check_refuses_a_sampler_of_the_other_kind_in_one_line(tmp_path):
    from click.testing import CliRunner

    from tdlm.cli import cli

    path = tmp_path / "mismatch.toml"
    path.write_text('[objective]\nname = "ar"\n\n[sampler]\nname = "ancestral"\n')
    result = CliRunner().invoke(cli, ["run", str(path), "--check"])
    assert result.exit_code == 2 and result.stderr.count("\n") == 1, result.output
    assert "sampler 'ancestral' (tdlm) cannot sample objective 'ar' (tdlm): it is for masked-diffusion models" \
           in result.stderr


def test_semi_ar_refuses_what_its_inner_sampler_refuses():
    with pytest.raises(RecipeError, match=r"sampler 'semi-ar' \(tdlm\) cannot sample objective 'diffusion' \(tdlm\): "
                                          r"its inner sampler 'ar': it is for autoregressive models"):
        resolve_components(recipe(sampler={"name": "semi-ar", "inner": "ar"}), build_registry())


def test_every_builtin_declares_what_it_is():
    registry = build_registry(get_plugin_manager(entry_points=False))
    for component in registry.all():
        if component.kind not in ("objective", "sampler"):
            continue
        declares = [klass for klass in component.cls.__mro__[:-1]
                    if klass not in (Objective, Sampler) and "causal" in vars(klass)]
        assert declares, f"{component.kind} {component.name} does not declare `causal`"
    assert registry.get("sampler", "ar").cls.causal and registry.get("sampler", "ar-speculative").cls.causal
    assert registry.get("sampler", "ar").cls.supports_stop_at_eos
    assert not registry.get("sampler", "confidence").cls.supports_stop_at_eos
    assert DiffusionObjective.score_takes_maskable and DiffusionObjective.supports_eval_schedule
    assert not AutoregressiveObjective.score_takes_maskable and not AutoregressiveObjective.supports_eval_schedule


def test_every_builtin_takes_its_run_context_in_its_constructor():
    registry = build_registry(get_plugin_manager(entry_points=False))
    for component in registry.all():
        if component.kind != "schedule":
            assert "context" in inspect.signature(component.cls).parameters, component.name


def test_semi_ar_is_built_with_the_context_and_hands_it_to_its_inner_sampler():
    registry = build_registry(get_plugin_manager(entry_points=False))
    cfg = recipe(sampler={"name": "semi-ar", "block": 4, "inner": "confidence"})
    seen = {}
    original = SemiAutoregressiveSampler.__init__

    def spy(self, config, *, objective, vocab, context=None):
        seen["context"] = context
        original(self, config, objective=objective, vocab=vocab, context=context)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(SemiAutoregressiveSampler, "__init__", spy)
        built = build_model(cfg, resolve_components(cfg, registry), VocabInfo(size=V, mask_id=V, bos_id=0))
    assert seen["context"] is not None and seen["context"].seq_len == 8
    assert built.sampler.context is seen["context"] and built.sampler.inner.context is seen["context"]


def test_resolved_components_are_read_by_name():
    components = resolve_components(recipe(), build_registry(get_plugin_manager(entry_points=False)))
    assert all(isinstance(resolved, ResolvedComponent) for resolved in components.values())
    sampler = components["sampler"]
    assert sampler.component.name == "ancestral" and sampler.config.steps == 128
    assert sampler == (sampler.component, sampler.config)  # old code that indexed [0]/[1] keeps working


def test_the_commands_ask_the_declared_capabilities():
    registry = build_registry(get_plugin_manager(entry_points=False))
    vocab = VocabInfo(size=V, mask_id=V, bos_id=0)
    ar = build_model(recipe(objective="ar"), resolve_components(recipe(objective="ar"), registry), vocab)
    ar.sampler.set_stop_at_eos()
    assert ar.sampler.config.stop_at_eos is True
    ar.model.objective.set_eval_schedule("recipe")  # an exact objective draws no t: nothing to set
    diffusion = build_model(recipe(), resolve_components(recipe(), registry), vocab)
    diffusion.sampler.set_stop_at_eos()  # ancestral has no such option: left as it is
    assert "stop_at_eos" not in diffusion.sampler.config.model_dump()
    diffusion.model.objective.set_eval_schedule("recipe")
    assert diffusion.model.objective.config.eval_schedule == "recipe"
    # the t the training draws, which `tdlm bench`'s hand-written loop copies
    assert DiffusionObjective.training_t_min(DiffusionObjective.Config(t_eps=0.01)) == 0.01
    assert AutoregressiveObjective.training_t_min(AutoregressiveObjective.Config()) == 0.0


def test_a_run_saved_with_a_sampler_of_the_other_kind_still_scores_and_samples(trained_pair, tmp_path, monkeypatch):
    """Before samplers were checked against their objective, an AR run could be trained with a
    diffusion sampler in its recipe: it loads, scores and samples (with its objective's own sampler,
    or the one named), and asking for the refused sampler itself is one line."""
    import json
    import shutil

    from click.testing import CliRunner

    from tdlm.cli import cli

    monkeypatch.setenv("TDLM_CACHE_DIR", str(trained_pair["cache"]))
    run = tmp_path / "ar"
    shutil.copytree(trained_pair["ar"], run)
    config = json.loads((run / "config.json").read_text())
    config["sampler"] = {"name": "ancestral", "steps": 8}
    (run / "config.json").write_text(json.dumps(config))
    (run / "config.toml").unlink()

    scored = CliRunner().invoke(cli, ["eval", str(run), "--split", "test", "--json"])
    assert scored.exit_code == 0, scored.output
    assert "cannot sample objective 'ar'" in scored.stderr and "it samples with 'ar' instead" in scored.stderr
    sampled = CliRunner().invoke(cli, ["sample", str(run), "--num", "1", "--length", "6", "--sampler", "ar"])
    assert sampled.exit_code == 0 and "warning" not in sampled.stderr, sampled.output
    refused = CliRunner().invoke(cli, ["sample", str(run), "--num", "1", "--length", "6", "--sampler", "ancestral"])
    assert refused.exit_code == 2 and refused.stderr.count("\n") == 1, refused.output
    assert "sampler 'ancestral' (tdlm) cannot sample objective 'ar' (tdlm)" in refused.stderr
