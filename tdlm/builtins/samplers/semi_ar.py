"""Semi-autoregressive sampling (docs/maths.md section 5): blocks of positions, left to right.

The canvas is cut into blocks of `block` positions. For each block in turn, the inner sampler
(any registered sampler, e.g. `confidence`) fills the block's masked positions while it sees the
whole canvas: positions right of the block are still masked and cannot be committed, positions
left of it are final. Every block gets the inner sampler's full budget (its own `steps`), so a
canvas of L positions costs up to ceil(L / block) * steps network calls; the NFE is the sum.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tdlm.plugin import (ComponentConfig, ResolvedComponent, SampleOutput, Sampler, UnknownComponentError,
                         build_component, format_validation_error, hookimpl, validating_registry)


class SemiAutoregressiveSampler(Sampler):
    """Blocks left to right (BD3-LM / LLaDA semi-AR): an inner diffusion sampler fills one block
    of `block` positions at a time, with everything to its left fixed."""

    class Config(ComponentConfig):
        block: int = Field(32, ge=1)
        """Positions per block; blocks are filled one after the other, left to right."""
        inner: str = "confidence"
        """The sampler that fills each block (a registered sampler name)."""
        inner_options: dict[str, Any] = Field(default_factory=dict, validate_default=True)
        """The inner sampler's options, validated by its own Config (e.g. {steps = 8}). Its step
        budget applies to every block. Saved with every default filled in."""

        _inner: ResolvedComponent = PrivateAttr(None)
        """The inner sampler as validation resolved it, in the caller's registry (tdlm.plugin.
        validating_registry: an inner sampler registered on the caller's plugin manager is known);
        the sampler is built from it."""

        @field_validator("inner")
        @classmethod
        def _known_sampler(cls, name: str, info: ValidationInfo) -> str:
            try:
                validating_registry(info).get("sampler", name)
            except UnknownComponentError as exc:
                raise PydanticCustomError("unknown_sampler", str(exc).replace("{", "{{")) from None
            return name

        @field_validator("inner_options")
        @classmethod
        def _valid_options(cls, options: dict, info: ValidationInfo) -> dict:
            if "inner" not in info.data:  # the name was already reported
                return options
            config_cls = validating_registry(info).get("sampler", info.data["inner"]).config_cls
            try:
                return config_cls.model_validate(options, context=info.context).model_dump(mode="json")
            except ValidationError as exc:
                message = format_validation_error(exc, config_cls).replace("{", "{{")
                raise PydanticCustomError("inner_options", message) from None

        @model_validator(mode="after")
        def _resolve_inner(self, info: ValidationInfo):
            component = validating_registry(info).get("sampler", self.inner)
            inner_config = component.config_cls.model_validate(self.inner_options, context=info.context)
            self._inner = ResolvedComponent(component, inner_config)
            return self

    causal = False  # fills blocks of a masked-diffusion canvas (what the inner sampler drives is checked too)

    @classmethod
    def requirements(cls, config):
        """What the inner sampler needs: semi-ar itself calls nothing on the other components."""
        inner = config._inner
        return inner.component.cls.requirements(inner.config)

    @classmethod
    def objective_problem(cls, objective, config):
        """Refused where the inner sampler refuses the objective, as well as by the default rule."""
        own = super().objective_problem(objective, config)
        if own is not None:
            return own
        inner = config._inner
        why = inner.component.cls.objective_problem(objective, inner.config)
        return None if why is None else f"its inner sampler {config.inner!r}: {why}"

    def __init__(self, config, *, objective, vocab, context=None):
        super().__init__(config, objective=objective, vocab=vocab, context=context)
        inner = config._inner
        self.inner = build_component(inner.component.cls, inner.config, objective=objective, vocab=vocab,
                                     context=self.context)

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        x, nfe, length = canvas, 0, canvas.shape[1]
        self.inner.trace = self.trace  # the inner sampler's steps are this sampler's steps
        for begin in range(0, length, self.config.block):
            in_block = torch.zeros_like(canvas, dtype=torch.bool)
            in_block[:, begin : begin + self.config.block] = True
            if positions is not None:
                in_block &= positions
            if not (in_block & (x == self.vocab.mask_id)).any():
                continue
            out = self.inner.sample(net, x, generator, positions=in_block)
            x, nfe = out.tokens, nfe + out.nfe
        return SampleOutput(tokens=x.clone() if x is canvas else x, nfe=nfe)


@hookimpl
def register_samplers(register):
    register("semi-ar", SemiAutoregressiveSampler)
