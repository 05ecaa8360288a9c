"""The continuous-time masked-diffusion NELBO (docs/maths.md section 1) as training loss and score."""

from typing import Literal

import torch
from pydantic import Field

from tdlm import hookimpl
from tdlm.components import ComponentConfig, Objective, SequenceScores, stratified_times
from tdlm.head import Denoised
from tdlm_plugins.schedules import CosineSchedule

T_BUCKETS = 10  # per-bucket figures by mask rate, t in tenths


class DiffusionObjective(Objective):
    causal = False
    default_sampler = "ancestral"

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
    def score(self, net, x0, *, generator, t_samples):
        """NELBO per sequence from `t_samples` stratified t each (one forward pass per t)."""
        corruption = self.evaluation_corruption()
        batch, length = x0.shape
        u = torch.rand(batch, generator=generator, device=x0.device, dtype=torch.float64)
        draws = torch.empty(t_samples, batch, dtype=torch.float64, device=x0.device)
        ce_sum = torch.zeros(T_BUCKETS, dtype=torch.float64, device=x0.device)
        correct = torch.zeros(T_BUCKETS, dtype=torch.float64, device=x0.device)
        count = torch.zeros(T_BUCKETS, dtype=torch.float64, device=x0.device)
        for k in range(t_samples):
            # float64 t, clamped only off exact zero: no clipping, so the estimate stays a bound
            t = ((u + k / t_samples) % 1.0).clamp_min(1e-12)
            xt = corruption.corrupt(x0, t, generator)
            denoised = Denoised(net, xt, self.vocab.mask_id)
            # one pass over the head at the masked positions gives the per-bucket figures and
            # the cross-entropy that nelbo_terms reads back
            ce, hit = denoised.masked_scores(x0)
            draws[k] = corruption.nelbo_terms(denoised, x0, xt, t).double().sum(-1)
            rows = denoised.masked.nonzero(as_tuple=True)[0]
            # buckets by mask rate 1 - alpha_t (t itself under the linear schedule)
            rate = 1.0 - corruption.schedule.alpha(t)
            bucket = (rate * T_BUCKETS).long().clamp_(min=0, max=T_BUCKETS - 1)[rows]
            ce_sum.index_add_(0, bucket, ce.double())
            correct.index_add_(0, bucket, hit.double())
            count.index_add_(0, bucket, torch.ones_like(ce, dtype=torch.float64))
        nll_var = stratified_variance(draws)
        extras = {"bucket_ce": ce_sum, "bucket_correct": correct, "bucket_masked": count}
        return SequenceScores(nll=draws.mean(0), is_bound=True, nll_var=nll_var, extras=extras,
                              estimator=estimator_name(corruption))


def stratified_variance(draws: torch.Tensor) -> torch.Tensor | None:
    """Monte Carlo variance of the mean of K stratified draws [K, B] (one per stratum, in stratum
    order), per sequence: the collapsed-strata estimate (1/K^2) sum_j (x_2j - x_2j+1)^2.

    The draws' plain sample variance would count the spread between strata, which stratification
    removes, and overstate the error several times (3.7x for cosine's t on the quick model); the
    differences of neighbouring strata keep only the spread within them. Odd K: the last stratum
    is paired with its neighbour too.
    """
    k = draws.shape[0]
    if k < 2:
        return None
    first, second = draws[0 : k - 1 : 2], draws[1:k:2]
    pairs = (first - second) ** 2  # [K // 2, B]: each estimates the two strata's variances together
    if k % 2:
        pairs = torch.cat([pairs, (draws[-1:] - draws[-2:-1]) ** 2])
    return pairs.sum(0) * (k / (2 * len(pairs))) / k**2


def estimator_name(corruption) -> str:
    """Which schedule's t the NELBO estimate draws, and whether its Monte Carlo error has a
    heavy tail: with w(t)^2 (1 - alpha_t) ~ 1/t near 0 (linear), one rare masked token can carry
    the estimate and the variance is infinite, so mc_stderr understates the real spread."""
    schedule = corruption.schedule
    name = type(schedule).__name__.removesuffix("Schedule").lower()
    t = torch.tensor([1e-6], dtype=torch.float64)
    tail = (schedule.weight(t) ** 2 * (1.0 - schedule.alpha(t)) * t).item()
    return f"{name} (heavy-tailed: mc_stderr understates the spread)" if tail > 0.1 else name


@hookimpl
def register_objectives(register):
    register("diffusion", DiffusionObjective)
