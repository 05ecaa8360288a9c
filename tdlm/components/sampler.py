"""The sampler interface: what fills the masked positions of a canvas, what it returns, and what
it declares about itself (the network it drives, the objectives it can sample, its step budget)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Union

import torch
from torch import Tensor, nn

from tdlm.components.common import ComponentConfig, RunContext, VocabInfo, placeholder
from tdlm.components.objective import Objective
from tdlm.errors import TdlmError

SampleStats = dict[str, Union[int, float, list[int]]]
"""A sampler's own counters: numbers (averaged over batches by `tdlm gen-eval`, printed by `tdlm
sample`) and lists of numbers (concatenated over batches, e.g. a value per row)."""


@dataclass
class SampleOutput:
    """What `Sampler.sample` returns."""

    tokens: Tensor  # [B, L] long, no mask ids left (among `positions`, when given)
    nfe: int  # number of sequential calls of the net being sampled (network function evaluations)
    stats: SampleStats = field(default_factory=dict)
    """Optional sampler-specific counters, e.g. the speculative samplers' `draft_calls` and
    `acceptance_rate` (`nfe` stays the number of sequential calls of the net being sampled);
    `tdlm sample --json` prints them and `tdlm gen-eval` averages them over batches."""


class Sampler:
    """Generates tokens into the masked positions of a canvas.

    `canvas` [B, L] holds prompt / template tokens, and `vocab.mask_id` where tokens are to be
    generated. Tokens that are not masked in the canvas must come back unchanged.
    `positions` (bool [B, L], optional) limits which masked positions may be committed in this
    call; the others stay masked but are still seen by the network (semi-autoregressive blocks).

    The class attributes declare what the sampler is for; tdlm reads them and never guesses
    from its name or options (docs/plugins.md, "Declared capabilities").
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    trace: list[Tensor] | None = None
    """Set to a list by `tdlm sample --trace`: `record` appends the canvas after each step."""
    causal: ClassVar[bool] = False
    """True: the sampler drives a causal (autoregressive) network, left to right; False: a
    masked-diffusion denoiser. A sampler is refused with an objective of the other kind
    (`objective_problem`), whatever its name."""
    supports_stop_at_eos: ClassVar[bool] = False
    """True when the sampler can save calls knowing that each generated span will be cut at its
    first end-of-text token (`tdlm sample --stop-at-eos`, lm-eval's generate_until): its Config
    then has a boolean option `stop_at_eos`, which tdlm sets (`set_stop_at_eos`)."""
    needs_corruption: ClassVar[tuple[str, ...]] = ()
    """Corruption methods this sampler calls (e.g. ("reverse_unmask_probs",)): checked when a
    recipe is resolved (`tdlm run --check`), so a corruption that lacks one is refused at once."""
    needs_objective: ClassVar[tuple[str, ...]] = ()
    """Objective methods this sampler calls, checked likewise."""

    def __init__(self, config: ComponentConfig, *, objective: Objective, vocab: VocabInfo,
                 context: RunContext | None = None):
        self.config, self.objective, self.vocab = config, objective, vocab
        self.context = context if context is not None else getattr(objective, "context", None)

    @classmethod
    def requirements(cls, config: ComponentConfig) -> dict[str, tuple[str, ...]]:
        """kind -> the methods this sampler, with these options, calls on that component. Default:
        the class attributes; override where they depend on the options (a sampler that runs
        another sampler needs what that one needs)."""
        return {"corruption": tuple(cls.needs_corruption), "objective": tuple(cls.needs_objective)}

    @classmethod
    def objective_problem(cls, objective: type[Objective], config: ComponentConfig) -> str | None:
        """Why this sampler, with these options, cannot sample a model trained with `objective` (a
        registered objective class), or None when it can. Checked when a recipe is resolved (`tdlm
        run --check`, and whenever a command picks a sampler); the reason is one line, without
        the components' names (tdlm adds them). Default: the network's kind must be the sampler's
        (`causal`). Override to refuse more, and call this one too."""
        if cls.causal == objective.causal:
            return None
        kind, other = ("an autoregressive", "masked-diffusion") if objective.causal else ("a masked-diffusion",
                                                                                         "autoregressive")
        reason = (f"it is for {other} models and this run is {kind} one; use one of its own samplers, e.g. "
                  f"{objective.default_sampler!r}")
        if objective.causal and not any("causal" in vars(base) for base in cls.__mro__ if base is not Sampler):
            # before plugin API 1.2 a sampler named `ar` or `ar-...` was taken for an AR one
            reason += (" (a sampler for autoregressive models declares `causal = True`, since plugin API 1.2: "
                       "docs/plugins.md#declared-capabilities)")
        return reason

    def set_stop_at_eos(self) -> None:
        """Each generated span will be cut at its first end-of-text token: a sampler that
        `supports_stop_at_eos` gets its option `stop_at_eos` set (and may save calls); any other
        is left as it is (the cut is made after sampling, whatever the sampler)."""
        if self.supports_stop_at_eos:
            self.config = self.config.model_copy(update={"stop_at_eos": True})

    def record(self, x: Tensor) -> None:
        """Call after each step with the whole canvas [B, L]: `tdlm sample --trace` draws the steps.
        (A sampler that never calls it is traced by its first and last canvas only.)"""
        if self.trace is not None:
            self.trace.append(x.detach().cpu().clone())

    @placeholder
    @torch.no_grad()
    def sample(
        self, net: nn.Module, canvas: Tensor, generator: torch.Generator, *, positions: Tensor | None = None
    ) -> SampleOutput:
        raise NotImplementedError


class SamplerOptionError(TdlmError, ValueError):
    """A sampler option that cannot finish: more steps than any use for the canvas."""


STEPS_PER_POSITION = 1024
"""A sampler's step counts are bounded by the canvas: at most one step per position can change it
(each masked position is filled once), and a finer time grid than this many steps per position
only makes the loop longer (steps = 10**9 would run for days and its grid alone take 8 GB)."""


def check_steps(config, length: int) -> None:
    """SamplerOptionError when an option of `config` (a sampler's Config) named `steps` or
    `*_steps`, nested options included, is more than STEPS_PER_POSITION x `length` (the canvas
    length, or the sequence length it cannot exceed)."""
    limit = STEPS_PER_POSITION * max(length, 1)

    def walk(options: dict, prefix: str) -> None:
        for key, value in options.items():
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif (key == "steps" or key.endswith("_steps")) and isinstance(value, int) and value > limit:
                raise SamplerOptionError(
                    f"sampler option {prefix}{key} = {value:,} is more than {STEPS_PER_POSITION:,} steps per position "
                    f"of a {length}-token canvas: at most {length} steps can change it and the rest would only make "
                    f"sampling run for hours; give {prefix}{key} <= {limit:,}")

    walk(config.model_dump(), "")
