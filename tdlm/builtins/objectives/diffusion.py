"""The continuous-time masked-diffusion NELBO (docs/maths.md section 1) as training loss and score."""

from typing import Literal

import torch
from pydantic import Field

from tdlm.builtins.schedules import CosineSchedule
from tdlm.plugin import (ComponentConfig, Denoised, Objective, SequenceScores, TdlmError, hookimpl,
                         stratified_times)

T_BUCKETS = 10  # per-bucket figures by mask rate, t in tenths


class DiffusionObjective(Objective):
    """The continuous-time masked-diffusion NELBO: training loss at one stratified t per
    sequence, evaluation with K evenly spaced t per sequence (a valid bound on the NLL)."""

    causal = False
    default_sampler = "ancestral"
    needs_corruption = ("corrupt", "nelbo_terms")
    score_takes_maskable = True  # a bound on the maskable positions given the others (lm-eval)
    supports_eval_schedule = True  # Config.eval_schedule: `tdlm eval --t-schedule` sets it

    class Config(ComponentConfig):
        t_eps: float = Field(1e-3, ge=0.0, lt=1.0)
        """Training draws t from [t_eps, 1]: w(t) blows up at 0. Evaluation never clips."""
        stratified: bool = True
        """Low-discrepancy t across the batch (lower variance, same expectation)."""
        eval_schedule: Literal["cosine", "recipe"] = "cosine"
        """The schedule the evaluation draws t under. For a corruption whose NELBO is the same under
        every schedule (uniform masking with a denoiser that does not see t, as tdlm's does),
        cosine's estimator has finite variance, so its `mc_stderr` is honest; the linear
        schedule's weight 1/t meets rare masked tokens near t = 0 and its variance is infinite.
        `recipe` scores with the recipe's own schedule."""

    @classmethod
    def training_t_min(cls, config):
        return config.t_eps

    def loss(self, net, x0, generator):
        batch = x0.shape[0]
        if self.config.stratified:
            t = stratified_times(batch, generator, x0.device)
        else:
            t = torch.rand(batch, generator=generator, device=x0.device)
        t = self.config.t_eps + (1.0 - self.config.t_eps) * t
        terms = self.corruption.training_terms(self.denoiser(net), x0, t, generator)
        per_sequence = terms.sum(-1)
        loss = per_sequence.sum() / x0.numel()
        bucket = (t * T_BUCKETS).long().clamp_(max=T_BUCKETS - 1)
        zeros = torch.zeros(T_BUCKETS, device=x0.device)
        stats = {  # the NELBO integrand per token, by t bucket (summed; divide by the count)
            "bucket_loss": zeros.scatter_add(0, bucket, per_sequence.detach() / x0.shape[1]),
            "bucket_count": zeros.scatter_add(0, bucket, torch.ones_like(t)),
        }
        return loss, stats

    def denoiser(self, net):
        """x_t -> Denoised: the head is applied only at x_t's masked positions, when asked."""
        return lambda xt: Denoised(net, xt, self.vocab.mask_id)

    def evaluation_corruption(self):
        """The corruption whose estimator `score` uses (see Config.eval_schedule)."""
        if self.config.eval_schedule == "cosine" and self.corruption.schedule_invariant:
            return self.corruption.with_schedule(CosineSchedule(CosineSchedule.Config()))
        return self.corruption

    @torch.no_grad()
    def score(self, net, x0, *, generator, t_samples, maskable=None):
        """NELBO per sequence from `t_samples` stratified t each (one forward pass per t).

        `maskable` (bool [B, N], optional): only these positions are corrupted, the others stay
        clean (a context); the figure is then a bound on -log p(x0[maskable] | the rest), for a
        corruption that masks positions independently (docs/maths.md section 1.12).
        """
        corruption = self.evaluation_corruption()
        if maskable is not None and not corruption.masks_independently:
            raise TdlmError(f"the {type(corruption).__name__} corruption does not mask positions independently, "
                            "so holding a context clean changes its forward process: no conditional bound")
        batch, length = x0.shape
        u = torch.rand(batch, generator=generator, device=x0.device, dtype=torch.float64)
        draws = torch.empty(t_samples, batch, dtype=torch.float64, device=x0.device)
        times = torch.empty_like(draws)
        ce_sum = torch.zeros(T_BUCKETS, dtype=torch.float64, device=x0.device)
        correct = torch.zeros(T_BUCKETS, dtype=torch.float64, device=x0.device)
        count = torch.zeros(T_BUCKETS, dtype=torch.float64, device=x0.device)
        for k in range(t_samples):
            # float64 t, clamped only off exact zero: no clipping, so the estimate stays a bound
            t = ((u + k / t_samples) % 1.0).clamp_min(1e-12)
            times[k] = t
            xt = corruption.corrupt(x0, t, generator)
            if maskable is not None:
                xt = torch.where(maskable, xt, x0)
            denoised = Denoised(net, xt, self.vocab.mask_id)
            # one pass over the head at the masked positions gives the per-bucket figures and
            # the cross-entropy that nelbo_terms reads back
            ce, hit = denoised.masked_scores(x0)
            draws[k] = corruption.nelbo_terms(denoised, x0, xt, t).double().sum(-1)
            rows = denoised.masked.nonzero(as_tuple=True)[0]
            # buckets by mask rate 1 - alpha_t (t itself under the linear schedule)
            rate = corruption.schedule.mask_rate(t)
            bucket = (rate * T_BUCKETS).long().clamp_(min=0, max=T_BUCKETS - 1)[rows]
            ce_sum.index_add_(0, bucket, ce.double())
            correct.index_add_(0, bucket, hit.double())
            count.index_add_(0, bucket, torch.ones_like(ce, dtype=torch.float64))
        nll_var = stratified_variance(draws, times)
        extras = {"bucket_ce": ce_sum, "bucket_correct": correct, "bucket_masked": count}
        return SequenceScores(nll=draws.mean(0), is_bound=True, nll_var=nll_var, extras=extras,
                              estimator=estimator_name(corruption))


# Coefficients of the fourth difference x_{k-2} - 4 x_{k-1} + 6 x_k - 4 x_{k+1} + x_{k+2}: it
# cancels an integrand that is locally a cubic in t and keeps the noise of the draws.
FOURTH_DIFFERENCE = (1.0, -4.0, 6.0, -4.0, 1.0)


def stratified_variance(draws: torch.Tensor, times: torch.Tensor) -> torch.Tensor | None:
    """Monte Carlo variance of the mean of one sequence's K draws [K, B] at the times [K, B]
    (K evenly spaced t, one random offset per sequence), per sequence.

    The draws' plain sample variance would count the integrand's change along t, which the even
    spacing removes, and overstate the error several times. With the draws in t order, a fourth
    difference cancels the integrand where it is locally a cubic and keeps the noise: its square
    has expectation sum_i c_i^2 V_{k+i} (sum c_i^2 = 70, 36 of it at the centre), so its square
    over 70 estimates the variance V_k of the draws around stratum k. The estimate is the mean of
    these over the K strata (the two at each end take their nearest centre's) over K: the
    variance of the mean. The differences do not wrap from t = 1 to t = 0: there the integrand has
    a kink (it falls to 0 at both ends, with slopes of opposite sign), which a wrapped difference
    would count as noise (1.4-2.6x at K = 8 on integrands shaped like the quick model's). Within
    20% of the true variance for such shapes at K = 8 and 10% at K = 16 (tests/test_nelbo.py; up
    to 1.35x at K = 8 when the noise peaks mid-range). K < 5 (no whole window): the wrapped
    difference, conservative; K = 2: the pair's squared difference / 4; K = 1: None.
    """
    k = draws.shape[0]
    if k < 2:
        return None
    ordered = draws.gather(0, times.argsort(0))
    if k == 2:
        return (ordered[1] - ordered[0]) ** 2 / 4
    if k < len(FOURTH_DIFFERENCE):
        kernel = [0.0] * k  # the coefficients by offset, wrapped onto K draws
        for offset, c in zip(range(-2, 3), FOURTH_DIFFERENCE):
            kernel[offset % k] += c
        difference = sum(c * ordered.roll(-offset, 0) for offset, c in enumerate(kernel) if c)
        return (difference**2).mean(0) / sum(c * c for c in kernel) / k
    difference = sum(c * ordered[i : k - 4 + i] for i, c in enumerate(FOURTH_DIFFERENCE))  # centres 2 .. K-3
    local = difference**2 / sum(c * c for c in FOURTH_DIFFERENCE)
    strata = torch.cat([local[:1], local[:1], local, local[-1:], local[-1:]])
    return strata.mean(0) / k


def estimator_name(corruption) -> str:
    """Which schedule's t the NELBO estimate draws, and whether its Monte Carlo error has a
    heavy tail: with w(t)^2 (1 - alpha_t) ~ 1/t near 0 (linear), one rare masked token can carry
    the estimate and the variance is infinite, so mc_stderr understates the real spread."""
    schedule = corruption.schedule
    name = type(schedule).__name__.removesuffix("Schedule").lower()
    t = torch.tensor([1e-6], dtype=torch.float64)
    tail = (schedule.weight(t) ** 2 * schedule.mask_rate(t) * t).item()
    return f"{name} (heavy-tailed: mc_stderr understates the spread)" if tail > 0.1 else name


@hookimpl
def register_objectives(register):
    register("diffusion", DiffusionObjective)
