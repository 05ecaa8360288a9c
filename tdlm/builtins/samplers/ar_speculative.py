"""Speculative decoding of an autoregressive target with a masked-diffusion draft.

docs/maths.md section 5 (Christopher et al. 2024). The target chain is the `ar` sampler's: the masked
positions of the canvas are filled left to right, position i from p_i(. | x_<i) (temperature,
top-k, top-p as in `ar`). One round, per row:
  1. the diffusion draft sees the canvas (the prefix, fixed tokens and masks) and, in ONE call,
     draws the next gamma masked positions independently from its marginals q_i;
  2. the AR target scores the drafted canvas in ONE call, giving p_i for every drafted position
     (conditioned on the drafted tokens before it) and for the position after them;
  3. drafted tokens are accepted in order with probability min(1, p_i(y_i) / q_i(y_i)); the
     first rejected one is redrawn from max(0, p_i - q_i) normalised and the round ends there;
     if all gamma are accepted, the next masked position gets a bonus token drawn from p.
This is the standard speculative rule, so every filled position follows p_i(. | x_<i): the
samples are exactly the `ar` sampler's, with fewer sequential target calls.
"""

from __future__ import annotations

import torch
from pydantic import Field

from tdlm.plugin import (ComponentConfig, DraftMixin, SampleOutput, Sampler, hookimpl, next_token_probs,
                         sample_categorical)


class ARSpeculativeSampler(DraftMixin, Sampler):
    """`nfe` counts the AR target's (batched) calls; `stats` adds draft calls and acceptance."""

    causal = True  # the target is a causal network (the draft, a diffusion one, is checked when loaded)

    class Config(ComponentConfig):
        draft: str | None = None
        """Run directory of a trained masked-diffusion model with the target's tokenizer (the draft)."""
        draft_checkpoint: str = "best"
        """Which checkpoint of the draft run: best, last or a step number."""
        gamma: int = Field(4, ge=1)
        """Tokens the draft proposes per round (one draft call, one target call)."""
        temperature: float = Field(1.0, gt=0.0)
        """Divides the target's logits (as in the `ar` sampler)."""
        top_k: int | None = Field(None, ge=1)
        """As in the `ar` sampler: the target's distribution cut to its k most likely tokens."""
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        """As in the `ar` sampler: the target's distribution cut to its nucleus of this mass."""
        draft_temperature: float | None = Field(None, gt=0.0)
        """Divides the draft's logits (default: `temperature`); changes the speed, never the result."""

    def __init__(self, config, *, objective, vocab, context=None):
        super().__init__(config, objective=objective, vocab=vocab, context=context)
        self.draft_net = None

    def target_probs(self, logits):
        """The `ar` sampler's next-token distribution: the chain this sampler must reproduce."""
        cfg = self.config
        return next_token_probs(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        cfg, mask_id, gamma = self.config, self.vocab.mask_id, self.config.gamma
        batch, length = canvas.shape
        device = canvas.device
        draft = self.get_draft(length, device)
        draft_temperature = cfg.draft_temperature or cfg.temperature
        allowed = torch.ones_like(canvas, dtype=torch.bool) if positions is None else positions.bool()
        x = canvas.clone()
        index = torch.arange(length, device=device)
        calls_per_row = torch.zeros(batch, dtype=torch.long)
        stats = dict(target_calls=0, draft_calls=0, proposed=0, accepted=0, bonus=0)
        while True:
            todo = (x == mask_id) & allowed
            active = todo.any(-1)
            if not active.any():
                break
            r = active.nonzero().squeeze(-1)
            xr, todo = x[r], todo[r]
            rank = todo.long().cumsum(-1) - 1  # order of the positions still to fill, left to right
            drafted = todo & (rank < gamma)
            bonus = todo & (rank == gamma)

            # 1. the draft's marginals, one call; the drafted positions drawn independently
            q = torch.softmax(draft(xr).double() / draft_temperature, dim=-1)
            stats["draft_calls"] += 1
            proposal = torch.where(drafted, sample_categorical(q, generator), xr)

            # 2. the target's conditionals at every drafted position and the bonus one, one call
            last = int(torch.where(drafted | bonus, index, -1).max())
            inputs = torch.cat([torch.full_like(xr[:, :1], self.vocab.bos_id), proposal[:, :last]], dim=1)
            p = self.target_probs(net(inputs))  # [R, last + 1, V]: position i given x_<i
            stats["target_calls"] += 1
            calls_per_row[r.cpu()] += 1

            # 3. accept in order; the first rejection is redrawn from the residual
            span = slice(0, last + 1)
            y = proposal[:, span].clamp(max=mask_id - 1).unsqueeze(-1)  # masks: any index, unused
            ratio = p.gather(-1, y).squeeze(-1) / q[:, span].gather(-1, y).squeeze(-1)
            u = torch.rand(ratio.shape, generator=generator, device=device, dtype=torch.float64)
            rejected = drafted[:, span] & ~(u < ratio)
            first = torch.where(rejected, index[span], length).amin(-1)  # first rejected position
            any_rejected = first < length
            keep = drafted[:, span] & (index[span] < first[:, None])
            new = torch.where(keep, proposal[:, span], xr[:, span])
            stats["proposed"] += int(keep.sum() + any_rejected.sum())  # drafted tokens tested
            stats["accepted"] += int(keep.sum())
            # the position to draw from a target distribution: the first rejected, else the bonus
            redraw_at = torch.where(any_rejected, first, torch.where(bonus.any(-1), bonus.long().argmax(-1), -1))
            fill = redraw_at >= 0
            if fill.any():
                rows, pos = fill.nonzero().squeeze(-1), redraw_at[fill]
                p_at = p[rows, pos]
                q_at = q[rows, pos]
                residual = (p_at - q_at).clamp_min(0.0)
                use_residual = any_rejected[rows]
                empty = residual.sum(-1) <= 0  # p == q up to rounding: the residual is p itself
                weights = torch.where((use_residual & ~empty)[:, None], residual, p_at)
                new[rows, pos] = sample_categorical(weights, generator)
                stats["bonus"] += int((~use_residual).sum())
            x[r, : last + 1] = new
        stats["acceptance_rate"] = stats["accepted"] / max(1, stats["proposed"])
        stats["target_calls_per_row"] = calls_per_row.tolist()
        return SampleOutput(tokens=x, nfe=stats["target_calls"], stats=stats)


@hookimpl
def register_samplers(register):
    register("ar-speculative", ARSpeculativeSampler)
