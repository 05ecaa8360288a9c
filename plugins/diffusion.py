"""The continuous-time masked-diffusion NELBO (docs/maths.md section 1) as training loss and score."""

import torch
from pydantic import Field

from tdlm import hookimpl
from tdlm.components import ComponentConfig, Objective, SequenceScores, stratified_times
from tdlm.head import Denoised

T_BUCKETS = 10  # per-bucket figures by mask rate, t in tenths


class DiffusionObjective(Objective):
    causal = False
    default_sampler = "ancestral"

    class Config(ComponentConfig):
        t_eps: float = Field(1e-3, ge=0.0, lt=1.0)
        """Training draws t from [t_eps, 1]: w(t) blows up at 0. Evaluation never clips."""
        stratified: bool = True
        """Low-discrepancy t across the batch (lower variance, same expectation)."""

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

    @torch.no_grad()
    def score(self, net, x0, *, generator, t_samples):
        """NELBO per sequence from `t_samples` stratified t each (one forward pass per t)."""
        batch, length = x0.shape
        u = torch.rand(batch, generator=generator, device=x0.device, dtype=torch.float64)
        draws = torch.empty(t_samples, batch, dtype=torch.float64, device=x0.device)
        ce_sum = torch.zeros(T_BUCKETS, dtype=torch.float64, device=x0.device)
        correct = torch.zeros(T_BUCKETS, dtype=torch.float64, device=x0.device)
        count = torch.zeros(T_BUCKETS, dtype=torch.float64, device=x0.device)
        for k in range(t_samples):
            # float64 t, clamped only off exact zero: no clipping, so the estimate stays a bound
            t = ((u + k / t_samples) % 1.0).clamp_min(1e-12)
            xt = self.corruption.corrupt(x0, t, generator)
            denoised = Denoised(net, xt, self.vocab.mask_id)
            # one pass over the head at the masked positions gives the per-bucket figures and
            # the cross-entropy that nelbo_terms reads back
            ce, hit = denoised.masked_scores(x0)
            draws[k] = self.corruption.nelbo_terms(denoised, x0, xt, t).double().sum(-1)
            rows = denoised.masked.nonzero(as_tuple=True)[0]
            bucket = (t * T_BUCKETS).long().clamp_(max=T_BUCKETS - 1)[rows]
            ce_sum.index_add_(0, bucket, ce.double())
            correct.index_add_(0, bucket, hit.double())
            count.index_add_(0, bucket, torch.ones_like(ce, dtype=torch.float64))
        nll_var = draws.var(0) / t_samples if t_samples > 1 else None
        extras = {"bucket_ce": ce_sum, "bucket_correct": correct, "bucket_masked": count}
        return SequenceScores(nll=draws.mean(0), is_bound=True, nll_var=nll_var, extras=extras)


@hookimpl
def register_objectives(register):
    register("diffusion", DiffusionObjective)
