"""Corruption `fixed-count`: mask exactly l = ceil(t * N) of the N positions (LLaDA's estimator).

With t ~ U[0, 1], l is uniform on {1, ..., N}; the l masked positions are uniform among all
subsets of that size. The NELBO integrand is (N / l) * (cross-entropy summed over the masked
positions). For a denoiser that does not take t as input this has the same expectation as the
continuous-time NELBO of uniform masking with any schedule (tdlm's docs/maths.md
section 1.6, time-agnostic denoisers), so `tdlm eval` still reports a bound; the
variance is usually lower, because the number of masked tokens no longer varies at a given t
and the weight N / l never exceeds N.

The recipe's `[schedule]` is not used by the forward process: at time t a fraction of about t of
the positions is masked, i.e. the linear schedule alpha_t = 1 - t, and the reverse step the
ancestral sampler takes is that schedule's.

N is the length of the x0 at hand, `x0.shape[1]`, not the model's `self.context.seq_len`: the
evaluation scores the last, shorter sequence of a split at its own length, and `tdlm sample
--length` asks for any length up to seq_len.
"""

import torch

from tdlm.plugin import ComponentConfig, Corruption, hookimpl

TDLM_PLUGIN_API = "1.2"  # the tdlm plugin API this module is written for (tdlm.plugin.PLUGIN_API_VERSION)


def masked_count(t, length):
    """l = ceil(t * N), clamped to 1..N: [B] long. t ~ U[0, 1] makes l uniform on {1..N}."""
    return torch.ceil(t.double() * length).long().clamp(1, length)


class FixedCountMasking(Corruption):
    """Masks exactly ceil(t N) of the N positions; LLaDA's (N / l)-weighted NELBO; the linear
    schedule's reverse step."""

    class Config(ComponentConfig):
        """No options: the number of masked tokens is set by t alone."""

    def corrupt(self, x0, t, generator):
        batch, length = x0.shape
        count = masked_count(t, length).to(x0.device)
        # the rank of an i.i.d. uniform key is a uniformly random permutation of 0..N-1, so the
        # positions ranked below l are a uniformly random subset of exactly l positions
        keys = torch.rand((batch, length), generator=generator, device=x0.device)
        rank = keys.argsort(dim=-1).argsort(dim=-1)
        return torch.where(rank < count[:, None], self.vocab.mask_id, x0)

    def nelbo_terms(self, denoised, x0, xt, t):
        # (N / l) * -log mu(x0_n | x_t) at the masked positions, 0 elsewhere; passing the factor
        # to cross_entropy (not multiplying afterwards) lets tdlm make the gradient in one pass
        count = denoised.masked.sum(-1, keepdim=True).clamp_min(1)
        return denoised.cross_entropy(x0, x0.shape[1] / count)

    def reverse_unmask_probs(self, probs, xt, t, s):
        # linear schedule alpha = 1 - t: unmask with probability (alpha_s - alpha_t) / (1 - alpha_t)
        unmask = ((t - s) / t).clamp(0.0, 1.0)
        return probs * unmask.to(probs.dtype)[:, None, None]


@hookimpl
def register_corruptions(register):
    register("fixed-count", FixedCountMasking)
