"""The corruption interface: the forward (noising) process and the per-position terms of its NELBO."""

from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import Tensor, nn

from tdlm.components.common import ComponentConfig, RunContext, VocabInfo, construct, placeholder
from tdlm.components.schedule import Schedule
from tdlm.head import Denoised

Denoiser = Callable[[Tensor], Denoised]  # x_t [B, N] -> the prediction mu(. | x_t), see Denoised


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
    needs_schedule: ClassVar[tuple[str, ...]] = ()
    """Schedule methods this corruption calls (e.g. ("alpha", "alpha_prime")): checked when a
    recipe is resolved."""

    def __init__(self, config: ComponentConfig, *, schedule: Schedule, vocab: VocabInfo,
                 context: RunContext | None = None):
        super().__init__()
        self.config, self.schedule, self.vocab, self.context = config, schedule, vocab, context

    @classmethod
    def requirements(cls, config: ComponentConfig) -> dict[str, tuple[str, ...]]:
        """kind -> the methods this corruption, with these options, calls on that component."""
        return {"schedule": tuple(cls.needs_schedule)}

    def with_schedule(self, schedule: Schedule) -> "Corruption":
        """The same corruption under another schedule (for a schedule_invariant evaluation)."""
        return construct(type(self), self.config, schedule=schedule, vocab=self.vocab, context=self.context)

    @placeholder
    def corrupt(self, x0: Tensor, t: Tensor, generator: torch.Generator | None) -> Tensor:
        """x0 [B, N] long, t [B] -> x_t [B, N] with `vocab.mask_id` at masked positions."""
        raise NotImplementedError

    @placeholder
    def nelbo_terms(self, denoised: Denoised, x0: Tensor, xt: Tensor, t: Tensor) -> Tensor:
        """Per-position integrand of the NELBO at time t: [B, N], zero where x_t is not masked.

        `denoised` is the denoiser's prediction at x_t: `denoised.cross_entropy(x0)` gives
        -log mu(x0_n | x_t) [B, N] (zero at unmasked positions), `denoised.masked_log_probs()`
        the whole log mu [M, V] at the M masked positions when a bound needs more than the
        cross-entropy, and `denoised.scatter(values [M])` puts per-masked-position values back
        into [B, N]. (Before plugin API 1.0 this method received logits; a test that has logits
        wraps them with `Denoised.from_logits(logits, xt, mask_id)`.)

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

    @placeholder
    def reverse_unmask_probs(self, probs: Tensor, xt: Tensor, t: Tensor, s: Tensor) -> Tensor:
        """One reverse step t -> s < t at the masked positions of x_t.

        probs [B, N, V] is the denoiser's mu(. | x_t); t, s [B]. Returns [B, N, V]: the
        probability that the position becomes token v at time s; the rest of the mass
        (1 - sum over v) is the probability that it stays masked.
        """
        raise NotImplementedError
