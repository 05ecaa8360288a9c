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
from pydantic import Field, PrivateAttr, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from tdlm import hookimpl
from tdlm.components import ComponentConfig, SampleOutput, Sampler


def component_registry(info: ValidationInfo):
    """The registry the caller validates against, `Config.model_validate(options,
    context={"registry": registry})`, so that an inner sampler registered on the caller's plugin
    manager is known. Validated without one (e.g. a Config built in code), the inner sampler is
    looked up among the built-ins and the installed plugins."""
    registry = (info.context or {}).get("registry")
    if registry is not None:
        return registry
    from tdlm.registry import build_registry

    return build_registry()


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

        _inner: tuple = PrivateAttr(None)
        """(registered Component, its validated Config): the inner sampler as validation resolved
        it, in the caller's registry; the sampler is built from it."""

        @field_validator("inner")
        @classmethod
        def _known_sampler(cls, name: str, info: ValidationInfo) -> str:
            from tdlm.registry import UnknownComponentError

            try:
                component_registry(info).get("sampler", name)
            except UnknownComponentError as exc:
                raise PydanticCustomError("unknown_sampler", str(exc).replace("{", "{{")) from None
            return name

        @field_validator("inner_options")
        @classmethod
        def _valid_options(cls, options: dict, info: ValidationInfo) -> dict:
            from pydantic import ValidationError

            from tdlm.config import format_validation_error

            if "inner" not in info.data:  # the name was already reported
                return options
            config_cls = component_registry(info).get("sampler", info.data["inner"]).config_cls
            try:
                return config_cls.model_validate(options, context=info.context).model_dump(mode="json")
            except ValidationError as exc:
                message = format_validation_error(exc, config_cls).replace("{", "{{")
                raise PydanticCustomError("inner_options", message) from None

        @model_validator(mode="after")
        def _resolve_inner(self, info: ValidationInfo):
            component = component_registry(info).get("sampler", self.inner)
            self._inner = (component, component.config_cls.model_validate(self.inner_options, context=info.context))
            return self

    @classmethod
    def requirements(cls, config):
        """What the inner sampler needs: semi-ar itself calls nothing on the other components."""
        component, inner_config = config._inner
        return component.cls.requirements(inner_config)

    def __init__(self, config, *, objective, vocab):
        super().__init__(config, objective=objective, vocab=vocab)
        component, inner_config = config._inner
        self.inner = component.cls(inner_config, objective=objective, vocab=vocab)

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
