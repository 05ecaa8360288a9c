"""Uniform absorbing masking: every position is masked independently with prob. 1 - alpha_t."""

import torch

from tdlm.plugin import Corruption, hookimpl


class UniformMasking(Corruption):
    """Absorbing masking: each position is replaced by the mask token independently with
    probability 1 - alpha_t; NELBO weight w(t) = -alpha'_t / (1 - alpha_t) (MDLM / MD4)."""

    schedule_invariant = True  # the NELBO of a time-agnostic denoiser is one integral over the mask rate
    masks_independently = True
    needs_schedule = ("alpha", "alpha_prime")  # mask_rate and weight follow from them

    def corrupt(self, x0, t, generator):
        mask_prob = self.schedule.mask_rate(t)
        noise = torch.rand(x0.shape, generator=generator, device=x0.device, dtype=mask_prob.dtype)
        return torch.where(noise < mask_prob[:, None], self.vocab.mask_id, x0)

    def nelbo_terms(self, denoised, x0, xt, t):
        return denoised.cross_entropy(x0, self.schedule.weight(t)[:, None])

    def reverse_unmask_probs(self, probs, xt, t, s):
        # (alpha_s - alpha_t) / (1 - alpha_t) = 1 - m_s / m_t with the mask rates m: no cancellation near t = 0
        unmask = (1.0 - self.schedule.mask_rate(s) / self.schedule.mask_rate(t)).clamp(0.0, 1.0)
        return probs * unmask.to(probs.dtype)[:, None, None]


@hookimpl
def register_corruptions(register):
    register("uniform", UniformMasking)
