"""What each kind of component receives and returns: the interface a plugin implements.

Every component class has a nested pydantic `Config` (the keys of its recipe section besides
`name`; unknown keys are rejected) and is built by tdlm as shown in each class's `__init__`.
Shapes: B sequences of N positions; V real tokens; the mask token is id V (`vocab.mask_id`),
one past the last real token. The denoiser `net(x) -> logits [B, N, V]` never scores the mask
token, so the SUBS rule "the mask id has probability 0" holds by construction. Training and
evaluation hand a corruption a `Denoised` (tdlm.head) instead of logits: the output head is
applied only at the masked positions, where the NELBO has terms.

Flow: data -> corruption (forward process, uses a schedule) -> model -> objective -> step ->
eval (objective.score) -> sample (sampler, uses the corruption's reverse kernel).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar

import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from tdlm.head import Denoised

Denoiser = Callable[[Tensor], Denoised]  # x_t [B, N] -> the prediction mu(. | x_t), see Denoised


class ComponentConfig(BaseModel):
    """Base for every component's Config: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


@dataclass(frozen=True)
class VocabInfo:
    """What components need to know about the vocabulary (tdlm.data.Vocab provides these)."""

    size: int  # V, real tokens
    mask_id: int  # == size
    bos_id: int  # BOS / end-of-text id, a real token
    token_counts: Any = field(default=None, compare=False, repr=False)
    """np.ndarray [V]: how often each token occurs in the train split (None when unknown)."""


class Schedule:
    """alpha_t: the probability that a token is still clean at time t in [0, 1].

    Implement `alpha` and `alpha_prime` (elementwise on float tensors); `weight` follows.
    alpha_0 = 1, alpha_1 = 0 (or a tiny eps), monotone decreasing.
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig

    def __init__(self, config: ComponentConfig):
        self.config = config

    def alpha(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def alpha_prime(self, t: Tensor) -> Tensor:
        raise NotImplementedError

    def weight(self, t: Tensor) -> Tensor:
        """NELBO weight w(t) = -alpha'_t / (1 - alpha_t) (docs/maths.md section 1)."""
        return -self.alpha_prime(t) / (1.0 - self.alpha(t))


class Corruption(nn.Module):
    """The forward (noising) process and the per-position terms of its NELBO.

    A corruption owns both because the bound depends on the forward process. It is an
    nn.Module so that it may hold learnable parameters (they are trained with the model).
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    schedule_invariant: ClassVar[bool] = False
    """True when, for a denoiser that does not take t as input, this corruption's NELBO is the
    same under every schedule (uniform masking): the evaluation may then draw t under a
    schedule whose estimator has finite variance (docs/maths.md section 1.6)."""
    masks_independently: ClassVar[bool] = False
    """True when `corrupt` masks each position independently of the others (given its own token
    and t): holding some positions clean then leaves the forward process of the others as it
    was, and `nelbo_terms` summed over them bounds -log p(them | the clean ones), the bound a
    conditional score needs (docs/maths.md section 1.12). Not so for a fixed count of masks."""

    def __init__(self, config: ComponentConfig, *, schedule: Schedule, vocab: VocabInfo):
        super().__init__()
        self.config, self.schedule, self.vocab = config, schedule, vocab

    def with_schedule(self, schedule: Schedule) -> "Corruption":
        """The same corruption under another schedule (for a schedule_invariant evaluation)."""
        return type(self)(self.config, schedule=schedule, vocab=self.vocab)

    def corrupt(self, x0: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """x0 [B, N] long, t [B] -> x_t [B, N] with `vocab.mask_id` at masked positions."""
        raise NotImplementedError

    def nelbo_terms(self, denoised: Denoised, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-position integrand of the NELBO at time t: [B, N], zero where x_t is not masked.

        `denoised` is the denoiser's prediction at x_t: `denoised.cross_entropy(x0)` gives
        -log mu(x0_n | x_t) [B, N] (zero at unmasked positions), `denoised.masked_log_probs()`
        the whole log mu [M, V] at the M masked positions when a bound needs more than the
        cross-entropy, and `denoised.scatter(values [M])` puts per-masked-position values back
        into [B, N].

        For each sequence, E_t[terms.sum(-1)] with t ~ U[0, 1] is the NELBO in nats. This is what
        `tdlm eval` reports, so it must be a valid bound for this process.
        """
        raise NotImplementedError

    def training_terms(
        self, denoise: Denoiser, x0: Tensor, t: Tensor, generator: torch.Generator | None
    ) -> Tensor:
        """Per-position training loss [B, N] at time t. Default: the NELBO terms of one draw.

        Override to train with another weighting (not a bound) or with extra estimators
        (e.g. a second draw for a gradient of learnable schedule parameters).
        """
        xt = self.corrupt(x0, t, generator)
        return self.nelbo_terms(denoise(xt), x0, xt, t)

    def reverse_unmask_probs(self, probs: Tensor, xt: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """One reverse step t -> s < t at the masked positions of x_t.

        probs [B, N, V] is the denoiser's mu(. | x_t); t, s [B]. Returns [B, N, V]: the
        probability that the position becomes token v at time s; the rest of the mass
        (1 - sum over v) is the probability that it stays masked.
        """
        raise NotImplementedError


@dataclass
class SequenceScores:
    """What an objective's `score` returns for a batch of clean sequences."""

    nll: Tensor  # [B] float64: per-sequence NLL in nats (exact) or NELBO estimate (a bound)
    is_bound: bool
    nll_var: Tensor | None = None  # [B] variance of the mean over t samples (Monte Carlo), if any
    estimator: str | None = None  # how a bound was estimated (e.g. the schedule t was drawn under)
    extras: dict[str, Tensor] = field(default_factory=dict)  # summed counters, e.g. per-t-bucket loss


class Objective(nn.Module):
    """The training loss and the evaluation score. `causal` decides the model's attention."""

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    causal: ClassVar[bool] = False
    default_sampler: ClassVar[str] = "ancestral"

    def __init__(self, config: ComponentConfig, *, corruption: Corruption, vocab: VocabInfo):
        super().__init__()
        self.config, self.corruption, self.vocab = config, corruption, vocab

    def loss(
        self, net: nn.Module, x0: Tensor, generator: torch.Generator | None
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Scalar training loss (nats per real token) and detached tensors worth logging."""
        raise NotImplementedError

    @torch.no_grad()
    def score(
        self, net: nn.Module, x0: Tensor, *, generator: torch.Generator, t_samples: int
    ) -> SequenceScores:
        """Score every token of every sequence of x0 [B, N] (evaluation)."""
        raise NotImplementedError


@dataclass
class SampleOutput:
    tokens: Tensor  # [B, L] long, no mask ids left
    nfe: int  # number of denoiser calls (network function evaluations)
    stats: dict[str, Any] = field(default_factory=dict)
    """Optional sampler-specific counters, e.g. the speculative samplers' draft calls and
    acceptance rate (`nfe` stays the number of sequential calls of the net being sampled)."""


class Sampler:
    """Generates tokens into the masked positions of a canvas.

    `canvas` [B, L] holds prompt / template tokens, and `vocab.mask_id` where tokens are to be
    generated. Tokens that are not masked in the canvas must come back unchanged.
    `positions` (bool [B, L], optional) limits which masked positions may be committed in this
    call; the others stay masked but are still seen by the network (semi-autoregressive blocks).
    """

    Config: ClassVar[type[ComponentConfig]] = ComponentConfig
    trace: list[Tensor] | None = None
    """Set to a list by `tdlm sample --trace`: `record` appends the canvas after each step."""

    def __init__(self, config: ComponentConfig, *, objective: Objective, vocab: VocabInfo):
        self.config, self.objective, self.vocab = config, objective, vocab

    def record(self, x: Tensor) -> None:
        """Call after each step with the whole canvas [B, L]: a trace picture shows the steps.
        (A sampler that never calls it is traced by its first and last canvas only.)"""
        if self.trace is not None:
            self.trace.append(x.detach().cpu().clone())

    @torch.no_grad()
    def sample(
        self, net: nn.Module, canvas: Tensor, generator: torch.Generator, *, positions: Tensor | None = None
    ) -> SampleOutput:
        raise NotImplementedError


def sample_categorical(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """Draw one index per row of `probs` [..., K] (unnormalised is fine), in float64.

    Gumbel-max in low precision is biased (docs/maths.md section 5), so this works in float64.
    """
    p = probs.double()
    u = torch.rand(p.shape, generator=generator, device=p.device, dtype=torch.float64)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-300)))
    return (p.log() + gumbel).argmax(-1)


def stratified_times(
    batch: int, generator: torch.Generator | None, device: torch.device | str = "cpu"
) -> Tensor:
    """t_i = (u + i / B) mod 1 with one u ~ U[0, 1): low-discrepancy times across a batch."""
    u = torch.rand((), generator=generator, device=device, dtype=torch.float64)
    return ((u + torch.arange(batch, device=device, dtype=torch.float64) / batch) % 1.0).float()
