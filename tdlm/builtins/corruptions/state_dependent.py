"""State-dependent masking (GenMD4, Shi et al. 2024; docs/maths.md section 3): each token has its own schedule.

A position holding token v is still clean at time t with probability

    alpha_{t,v} = 1 - u_t^{w_v},   u_t = 1 - alpha_t the recipe's schedule's mask rate,

so with the default `linear` schedule alpha_{t,v} = 1 - t^{w_v}, GenMD4's polynomial schedule. A
large w_v keeps token v clean longer (masked late in the forward process, decoded early in the
reverse one); a small w_v masks it early and decodes it late. The bound does not change if every
w_v is multiplied by one constant (that only reparameterises time), so only the ratios matter.

Continuous-time NELBO (MD4's, eq. for a vector-valued alpha), per masked position n with
k = x0_n and r(t) = -alpha'_t / (1 - alpha_t) the schedule's weight (1/t for `linear`):

    r(t) * [ w_k * (-log mu_n(k) - 1) + sum_v w_v mu_n(v) ]

It is the rate of KL(q(x_s | x_t, x0) || p(x_s | x_t)) as s -> t for the reverse step
p(x_s = v | x_t) = mu(v) (alpha_{s,v} - alpha_{t,v}) / (1 - alpha_{t,v}), so it is >= 0 and its
integral bounds the NLL of that reverse process (the sampler's). With every w_v = w it is exactly
w r(t) * -log mu_n(k): uniform masking with the schedule 1 - u_t^w.

`weights` chooses w:
- "constant": every w_v = `value`.
- "frequency": fixed from the train split's token counts (`VocabInfo.token_counts`):
  w_v proportional to the unigram surprisal -log p_v (add-one smoothed), scaled so that the most
  frequent token has w = 1 and every other w_v > 1 (GPT-2 on WikiText-2: up to about 5).
  Frequent tokens (punctuation, function words) get the smallest w and are masked first, so the
  reverse process writes the rare, informative tokens first and fills in the predictable ones
  from that context last. With a model that cannot exploit every context, revealing the tokens
  that are hard to guess anyway before the ones their context pins down gives a lower bound
  (tests/test_state_dependent.py shows the learned weights move this way on a toy).
  Why min w = 1 rather than mean w = 1 (the scale does not change the bound): the Monte Carlo
  NELBO has a term (w_v r(t))^2 * u_t^{w_v} in its variance, whose integral over t near 0
  diverges like t^{w_v - 2}: logarithmically for w_v = 1 (uniform masking with `linear`, tamed by
  stratified t), but as a power for w_v < 1, so tokens with w_v < 1 make `tdlm eval`'s estimate
  heavy-tailed. The same holds for learned weights that drift below 1.
- "learned": w = softplus(param) [V], an nn.Parameter trained with the model, starting from
  `init` ("constant": every w_v = `value`, or "frequency"). Its gradient has a score-function
  part, estimated with two draws of x_t at the same t and the leave-one-out (RLOO) baseline; see
  `StateDependentMasking.training_terms`.
"""

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from tdlm.plugin import ComponentConfig, Corruption, hookimpl


def frequency_weights(counts) -> torch.Tensor:
    """w_v = s_v / min_u s_u with s_v = -log p_v (add-one smoothed unigram p): float32 [V], min 1."""
    counts = np.asarray(counts, dtype=np.float64)
    surprisal = -np.log((counts + 1.0) / (counts.sum() + len(counts)))
    return torch.from_numpy(surprisal / surprisal.min()).float()


def inverse_softplus(w: torch.Tensor) -> torch.Tensor:
    """param with softplus(param) = w (w > 0)."""
    return w + torch.log(-torch.expm1(-w))


class StateDependentMasking(Corruption):
    """GenMD4's per-token schedules: token v stays clean until t with probability
    1 - u_t^{w_v}; the exponents are fixed from token frequency or learned with the model
    (RLOO gradient), with their own valid NELBO and reverse step."""

    masks_independently = True  # each position with its own token's rate, independently
    needs_schedule = ("alpha", "alpha_prime")  # mask_rate and weight follow from them

    class Config(ComponentConfig):
        weights: Literal["learned", "frequency", "constant"] = "learned"
        """How the per-token exponents w_v of alpha_{t,v} = 1 - u_t^{w_v} are set."""
        value: float = Field(1.0, gt=0.0)
        """w_v of every token for weights = "constant", and the starting w_v for "learned" with
        init = "constant"."""
        init: Literal["constant", "frequency"] = "constant"
        """Starting point of the learned weights ("learned" only)."""

        @model_validator(mode="after")
        def _init_only_when_learned(self):
            if self.init != "constant" and self.weights != "learned":
                raise ValueError('init applies to weights = "learned" only')
            return self

    def __init__(self, config, *, schedule, vocab, context=None):
        super().__init__(config, schedule=schedule, vocab=vocab, context=context)
        uses_counts = config.weights == "frequency" or (config.weights == "learned" and config.init == "frequency")
        if uses_counts:
            if vocab.token_counts is None:
                raise ValueError(
                    'state-dependent corruption: weights from "frequency" need the train split\'s token '
                    'counts (VocabInfo.token_counts), which are not known here; use weights = "constant"'
                )
            if len(vocab.token_counts) != vocab.size:
                raise ValueError(f"token_counts has {len(vocab.token_counts)} entries for {vocab.size} tokens")
            start = frequency_weights(vocab.token_counts)
        else:
            start = torch.full((vocab.size,), float(config.value))
        if config.weights == "learned":
            self.param = nn.Parameter(inverse_softplus(start))
        else:  # frequency weights travel with checkpoints; constant ones follow from the config
            self.register_buffer("fixed", start, persistent=config.weights == "frequency")

    def token_weights(self) -> torch.Tensor:
        """w [V], float32."""
        if self.config.weights == "learned":
            return F.softplus(self.param.float())
        return self.fixed

    def _log_mask_rate(self, t):
        """log u_t = log(1 - alpha_t): [B]."""
        return torch.log(self.schedule.mask_rate(t))

    def mask_probs(self, x0, t):
        """q(masked | x0_n) = u_t^{w_{x0_n}}: [B, N] in t's dtype."""
        u = self.schedule.mask_rate(t)
        # torch.pow, not exp(w log u): u^1 is exactly u, so constant w = 1 draws uniform's masks
        return torch.pow(u[:, None], self.token_weights().to(u.dtype)[x0])

    def corrupt(self, x0, t, generator):
        mask_prob = self.mask_probs(x0, t).detach()
        noise = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=mask_prob.dtype)
        return torch.where(noise < mask_prob, self.vocab.mask_id, x0)

    def nelbo_terms(self, denoised, x0, xt, t):
        # the bound needs the whole distribution (sum_v w_v mu(v)), at the masked positions only
        w = self.token_weights()
        log_mu = denoised.masked_log_probs()  # [M, V]
        targets = x0[denoised.masked]
        log_mu_x0 = log_mu.gather(-1, targets[:, None]).squeeze(-1)
        # sum_v w_v mu_n(v) [M]: elementwise, not a matmul, which autocast would run in bf16
        expected_w = (log_mu.exp() * w).sum(-1)
        bracket = w[targets] * (-log_mu_x0 - 1.0) + expected_w
        return self.schedule.weight(t)[:, None] * denoised.scatter(bracket)

    def log_q(self, x0, xt, t):
        """log q(x_t | x0) per sequence [B]: sum over positions of log u_t^{w} (masked) or
        log(1 - u_t^{w}) (clean); both depend on w, so both enter the score function."""
        log_u = self._log_mask_rate(t).float()[:, None]
        log_masked = self.token_weights()[x0] * log_u
        # log(1 - u^w) = log(-expm1(w log u)); clamped so that u = 1 (never clean) gives no NaN gradient
        log_clean = torch.log((-torch.expm1(log_masked)).clamp_min(1e-30))
        return torch.where(xt == self.vocab.mask_id, log_masked, log_clean).sum(-1)

    def training_terms(self, denoise, x0, t, generator):
        """The NELBO terms; with learned weights, also the RLOO estimate of their w-gradient.

        The loss E_{z ~ q_w(.|x0)}[L(z; w)] depends on w through L (the weights in the terms) and
        through the draw z. Its gradient is E[grad_w L] + E[L(z) grad_w log q_w(z | x0)] (score
        function). With two draws z1, z2 at the same t, each using the other's loss as its baseline
        (unbiased, as the baseline does not depend on the draw it is applied to):

            0.5 * [(L1 - L2) grad log q(z1) + (L2 - L1) grad log q(z2)]
          = grad of 0.5 * stopgrad(L1 - L2) * (log q(z1) - log q(z2)),

        L the per-sequence loss and log q(z|x0) the per-sequence sum of the log-probabilities of
        each position's state (masked: w log u_t; clean: log(1 - u_t^w)). The model gets the mean of
        the two draws' terms. The surrogate is added as (s - stopgrad(s)): it changes the gradient
        and not the value, so the logged loss is still the NELBO estimate.
        """
        if self.config.weights != "learned":
            return super().training_terms(denoise, x0, t, generator)
        xt1 = self.corrupt(x0, t, generator)
        xt2 = self.corrupt(x0, t, generator)
        terms1 = self.nelbo_terms(denoise(xt1), x0, xt1, t)
        terms2 = self.nelbo_terms(denoise(xt2), x0, xt2, t)
        loss_gap = (terms1.sum(-1) - terms2.sum(-1)).detach()
        surrogate = 0.5 * loss_gap * (self.log_q(x0, xt1, t) - self.log_q(x0, xt2, t))
        surrogate = (surrogate - surrogate.detach()).to(terms1.dtype)
        # spread over the positions so that the [B, N] terms still sum to the loss
        return 0.5 * (terms1 + terms2) + surrogate[:, None] / x0.shape[1]

    def reverse_unmask_probs(self, probs, xt, t, s):
        """p(x_s = v | x_t) = mu(v) (alpha_{s,v} - alpha_{t,v}) / (1 - alpha_{t,v}) = mu(v) (1 - (u_s/u_t)^{w_v})."""
        w = self.token_weights().detach().to(probs.dtype)
        log_ratio = (self._log_mask_rate(s) - self._log_mask_rate(t)).to(probs.dtype)  # [B], <= 0
        unmask = -torch.expm1(log_ratio[:, None] * w)  # [B, V]; u_s = 0 gives 1
        return probs * unmask.clamp(0.0, 1.0)[:, None, :]


@hookimpl
def register_corruptions(register):
    register("state-dependent", StateDependentMasking)
