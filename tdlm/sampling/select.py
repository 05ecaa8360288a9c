"""Which sampler a trained run samples with, when a command names one (`--sampler`, `--option`).

`tdlm sample`, `tdlm gen-eval` and `tdlm lm-eval` all choose by the same rule, here: the
recipe's sampler keeps the recipe's options, another sampler starts from its own defaults, and
the options given override either. `options_label` is how tdlm names those options in what it
prints.
"""

from __future__ import annotations

from tdlm.config import RunConfig, resolve_components


def sampler_section(recipe_sampler, name: str | None, options: dict) -> dict:
    """The [sampler] section to sample with. `recipe_sampler`: the run's ResolvedComponent;
    `name`: None or the recipe's own name keeps its options, another name starts from defaults;
    `options` override them."""
    component, recipe_options = recipe_sampler
    name = name or component.name
    base = recipe_options.model_dump() if name == component.name else {}
    return {"name": name, **base, **options}


def with_sampler(cfg: RunConfig, components: dict, registry, name: str | None,
                 options: dict | None = None) -> tuple[RunConfig, dict]:
    """The run's config and resolved components with the chosen sampler (see `sampler_section`),
    validated against `registry`: an unknown name or a bad option is a RecipeError naming the
    `sampler.` key."""
    raw = cfg.model_dump()
    raw["sampler"] = sampler_section(components["sampler"], name, options or {})
    cfg = RunConfig.model_validate(raw)
    return cfg, resolve_components(cfg, registry)


def options_label(options: dict) -> str:
    """A sampler's options as `key=value` words, unset (None) ones left out, e.g.
    "steps=128 grid=uniform temperature=0.7"."""
    return " ".join(f"{k}={v}" for k, v in options.items() if v is not None)
