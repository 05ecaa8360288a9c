"""The objective interface: the training loss and the evaluation score, and what it declares
about itself (its network's attention, its sampler, what the commands may ask of it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import Tensor, nn

from tdlm.components.common import ComponentConfig, RunContext, VocabInfo, placeholder
from tdlm.components.corruption import Corruption


@dataclass
class SequenceScores:
    """What an objective's `score` returns for a batch of clean sequences."""

    nll: Tensor  # [B] float64: per-sequence NLL in nats (exact) or NELBO estimate (a bound)
    is_bound: bool
    nll_var: Tensor | None = None  # [B] variance of the mean over t samples (Monte Carlo), if any
    estimator: str | None = None  # how a bound was estimated (e.g. the schedule t was drawn under)
    extras: dict[str, Tensor] = field(default_factory=dict)  # summed counters, e.g. per-t-bucket loss


class Objective(nn.Module):
    """The training loss and the evaluation score. `causal` decides the model's attention.

    The class attributes declare what tdlm may ask of the objective; a command reads them and
    never guesses from a name, an option or a signature (docs/plugins.md, "Declared capabilities").
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    causal: ClassVar[bool] = False
    """True: the network's attention is causal and the objective predicts each token from the ones
    before it (autoregressive); False: a bidirectional denoiser (masked diffusion)."""
    default_sampler: ClassVar[str] = "ancestral"
    """The sampler a recipe without a [sampler] section uses."""
    needs_corruption: ClassVar[tuple[str, ...]] = ()
    """Corruption methods this objective calls (e.g. ("corrupt", "nelbo_terms")): checked when a
    recipe is resolved, so a corruption that lacks one is refused before training starts."""
    score_takes_maskable: ClassVar[bool] = False
    """True when `score` also takes `maskable` (bool [B, N]: only those positions may be masked, the
    others are a clean context) and then bounds -log p(x0[maskable] | the rest): `tdlm lm-eval`
    scores a continuation given its context this way. (A causal objective scores continuations
    with `shifted_inputs` instead.)"""
    supports_eval_schedule: ClassVar[bool] = False
    """True when the evaluation may draw its t under cosine or under the recipe's schedule: the
    Config then has an option `eval_schedule` ("cosine" | "recipe"), which `tdlm eval --t-schedule`
    sets (`set_eval_schedule`)."""

    def __init__(self, config: ComponentConfig, *, corruption: Corruption, vocab: VocabInfo,
                 context: RunContext | None = None):
        super().__init__()
        self.config, self.corruption, self.vocab = config, corruption, vocab
        self.context = context if context is not None else getattr(corruption, "context", None)

    @classmethod
    def requirements(cls, config: ComponentConfig) -> dict[str, tuple[str, ...]]:
        """kind -> the methods this objective, with these options, calls on that component."""
        return {"corruption": tuple(cls.needs_corruption)}

    @classmethod
    def training_t_min(cls, config: ComponentConfig) -> float:
        """The smallest t the training loss draws, t ~ U[t_min, 1] (a loop written by hand to
        compare with, as `tdlm bench` has, draws the same). 0 unless the objective clips t."""
        return 0.0

    def set_eval_schedule(self, schedule: str) -> None:
        """Draw the evaluation's t under `schedule` ("cosine" or "recipe"), where the objective
        `supports_eval_schedule`; otherwise nothing changes (an exact objective draws no t)."""
        if self.supports_eval_schedule:
            self.config = self.config.model_copy(update={"eval_schedule": schedule})

    @placeholder
    def loss(
        self, net: nn.Module, x0: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss (nats per real token) and detached tensors worth logging."""
        raise NotImplementedError

    @placeholder
    @torch.no_grad()
    def score(
        self, net: nn.Module, x0: Tensor, *, generator: torch.Generator, t_samples: int
    ) -> SequenceScores:
        """Score every token of every sequence of x0 [B, N] (evaluation)."""
        raise NotImplementedError

    @placeholder
    def shifted_inputs(self, x0: Tensor) -> Tensor:
        """A causal objective's network input for x0 [B, N]: [B, N] ids whose output at position i
        predicts x0_i (e.g. [BOS, x0_0 .. x0_{N-2}]). `tdlm lm-eval` scores a continuation with it."""
        raise NotImplementedError
