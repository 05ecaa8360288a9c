"""Speculative sampling of the ancestral chain: a cheap draft proposes, the target verifies.

docs/maths.md section 5 (after De Bortoli et al. 2025). The target chain is exactly the `ancestral`
sampler's: time grid 1 = t_0 > ... > t_T = 0 and, from t_i to t_{i+1}, each masked position
independently unmasks to v with probability reverse_unmask_probs[v] or stays masked. Its
kernel P_i(y | x) is a product over the masked positions. A draft network q runs the SAME chain
(the target's corruption, grid and times) with its own mu in place of the target's, kernel Q_i.

One round, per row, from state x^0 at grid index i:
  1. draft K steps x^0 -> x^1 -> ... -> x^K with Q_{i+j}  (sequential draft calls);
  2. the target evaluates mu(. | x^j) for all drafted states in ONE batched call (the net
     ignores t, so consecutive equal states are evaluated once);
  3. for j = 0, 1, ...: accept x^{j+1} with probability min(1, P(x^{j+1} | x^j) / Q(x^{j+1} | x^j))
     (whole-state probabilities: sums of per-position logs); at the first rejection, redraw
     x^{j+1} from the residual max(0, P - Q) / TV(P, Q) over whole-state transitions and end the
     round there. If all K are accepted the target's mu at x^K is already known, so the next
     step(s) are taken with the target's own kernel at no cost (the "bonus" step).
Steps taken with a known target mu (including every step after which the state did not change)
cost no call either, exactly like the ancestral sampler's cache.

Exactness: each accepted-or-redrawn transition is the textbook speculative (maximal coupling)
step, whose output is distributed as P_i(. | x^j); the draws for later steps are independent of
the acceptance test of step j, so conditioning on acceptance leaves them proposals from Q. The
samples therefore follow the ancestral chain of the target exactly; only the number of
sequential target calls changes. The residual is sampled by rejection: y ~ P kept with
probability max(0, 1 - Q(y)/P(y)) (acceptance rate TV(P, Q), one draw per step on average).
The loop is capped at `residual_draws` draws; past the cap y ~ P is used instead, which biases
that step by at most TV (1 - TV)^M <= 1 / (e M) (M = residual_draws). `stats["residual_fallbacks"]`
counts those events (0 in every test) and a warning is issued when one happens.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field

from tdlm import hookimpl
from tdlm.components import ComponentConfig, SampleOutput, Sampler, sample_categorical
from tdlm.sampling.draft import DraftMixin
from tdlm.sampling.grids import time_grid


def step_kernel(corruption, logits, x, t, s, temperature):
    """One reverse step's per-position kernel [R, L, V + 1] (float64, rows sum to 1).

    Index v < V: unmask to token v; index V (== mask_id): stay masked. Only the masked positions
    that may move use it. The probabilities are the ancestral sampler's: softmax in float64.
    """
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    unmask = corruption.reverse_unmask_probs(probs, x, t, s)
    stay = (1.0 - unmask.sum(-1, keepdim=True)).clamp_min(0.0)
    kernel = torch.cat([unmask, stay], dim=-1)
    return kernel / kernel.sum(-1, keepdim=True)


def log_transition(kernel, y, movable):
    """log K(y | x): the sum over movable positions of log kernel[n, y_n] ([R] float64).

    y_n == mask_id == V picks the "stay masked" entry, so no translation is needed.
    """
    picked = kernel.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    return torch.where(movable, picked.log(), 0.0).sum(-1)


def sample_step(kernel, x, movable, generator):
    """y ~ K(. | x): each movable position drawn from its kernel, the rest unchanged."""
    return torch.where(movable, sample_categorical(kernel, generator), x)


def sample_residual(p_kernel, q_kernel, x, movable, generator, max_draws: int):
    """Exact draws from max(0, P - Q) normalised over WHOLE-STATE transitions, by rejection.

    Candidates y ~ P (a product over positions, cheap) are kept with probability
    max(0, 1 - Q(y) / P(y)); their density is P(y) max(0, 1 - Q(y)/P(y)) = max(0, P(y) - Q(y)).
    Candidates are drawn in vectorised chunks (16, 32, ... at most 1024) by inverse CDF in
    float64 and the first kept one is used, which is the same as drawing them one by one.
    Returns (y [R, L], candidates drawn [R], fallback [R] bool): rows that found nothing within
    about `max_draws` candidates take y ~ P instead (see the module doc).
    """
    rows, length, _ = p_kernel.shape
    y, device = x.clone(), x.device
    done = torch.zeros(rows, dtype=torch.bool, device=device)
    draws = torch.zeros(rows, dtype=torch.long, device=device)
    cdf = p_kernel.cumsum(-1)
    log_ratio = torch.where(movable[..., None], q_kernel.log() - p_kernel.log(), 0.0)  # [R, L, V + 1]
    chunk = 16
    while True:
        todo = (~done & (draws < max_draws)).nonzero().squeeze(-1)
        if todo.numel() == 0:
            break
        chunk = int(min(chunk, max_draws, max(1, 2**22 // (todo.numel() * length))))
        c = cdf[todo]
        u = torch.rand(todo.numel(), length, chunk, generator=generator, device=device, dtype=torch.float64)
        cand = torch.searchsorted(c, u * c[..., -1:], right=True).clamp_(max=c.shape[-1] - 1)  # [r, L, C]
        # sum over positions of log Q/P; P > 0 at every candidate, Q may be 0 (always kept)
        log_q_over_p = log_ratio[todo].gather(-1, cand).sum(1)  # [r, C]
        keep = -torch.expm1(log_q_over_p)  # 1 - Q/P, negative where Q > P
        ok = torch.rand(keep.shape, generator=generator, device=device, dtype=torch.float64) < keep
        hit = ok.any(-1)
        first = ok.long().argmax(-1)
        draws[todo] += torch.where(hit, first + 1, chunk)
        found = todo[hit]
        if found.numel():
            chosen = cand[hit].gather(-1, first[hit, None, None].expand(-1, length, 1)).squeeze(-1)
            y[found] = torch.where(movable[found], chosen, x[found])
            done[found] = True
        chunk = min(2 * chunk, 1024)
    fallback = ~done
    if fallback.any():
        y[fallback] = sample_step(p_kernel[fallback], x[fallback], movable[fallback], generator)
    return y, draws, fallback


class SpeculativeSampler(DraftMixin, Sampler):
    """The ancestral chain of the target (`steps`, `grid`, `temperature`), drafted K steps at a time.

    `nfe` is the number of sequential (batched) target calls; `stats` has the breakdown: draft
    calls, acceptance rate, target calls per row, residual draws. Set `draft_net` to draft with
    a network built in code instead of a run directory.
    """

    class Config(ComponentConfig):
        draft: str | None = None
        """Run directory of a trained masked-diffusion model with the target's tokenizer (the draft)."""
        draft_checkpoint: str = "best"
        """Which checkpoint of the draft run: best, last or a step number."""
        draft_steps: int = Field(4, ge=1)
        """K: chain steps the draft proposes per round (K sequential draft calls at most)."""
        steps: int = Field(128, ge=1)
        """T: steps of the target's ancestral chain."""
        grid: Literal["uniform", "cosine"] = "uniform"
        """The target chain's time grid, as in `ancestral`."""
        temperature: float = Field(1.0, gt=0.0)
        """Divides the target's logits: the chain sampled is `ancestral` at this temperature."""
        draft_temperature: float | None = Field(None, gt=0.0)
        """Divides the draft's logits (default: `temperature`); changes the speed, never the result."""
        residual_draws: int = Field(10_000, ge=1)
        """Cap on the candidates drawn for one residual sample (see the module doc)."""

    def __init__(self, config, *, objective, vocab):
        super().__init__(config, objective=objective, vocab=vocab)
        self.draft_net = None

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        cfg, mask_id = self.config, self.vocab.mask_id
        steps, draft_steps = cfg.steps, cfg.draft_steps
        corruption = self.objective.corruption
        batch, length = canvas.shape
        device = canvas.device
        draft = self.get_draft(length, device)
        draft_temperature = cfg.draft_temperature or cfg.temperature
        grid = time_grid(steps, cfg.grid, device)
        allowed = torch.ones_like(canvas, dtype=torch.bool) if positions is None else positions.bool()
        x = canvas.clone()
        g = torch.zeros(batch, dtype=torch.long, device=device)  # each row's grid index
        # each net ignores t, so its logits are cached per row with the state they belong to
        t_state, t_logits = torch.full_like(x, -1), None
        d_state, d_logits = torch.full_like(x, -1), None
        calls_per_row = torch.zeros(batch, dtype=torch.long)
        stats = dict(target_calls=0, target_states=0, draft_calls=0, draft_states=0, proposed=0, accepted=0,
                     free_steps=0, residual_draws=0, residual_fallbacks=0)

        def live():
            return ((x == mask_id) & allowed).any(-1) & (g < steps)

        while True:
            # steps with a known target mu (after an accepted round, or an unchanged state): no call
            while True:
                free = live() & (x == t_state).all(-1)
                if not free.any():
                    break
                r = free.nonzero().squeeze(-1)
                xr = x[r]
                kernel = step_kernel(corruption, t_logits[r], xr, grid[g[r]], grid[g[r] + 1], cfg.temperature)
                x[r] = sample_step(kernel, xr, (xr == mask_id) & allowed[r], generator)
                g[r] += 1
                stats["free_steps"] += r.numel()
            active = live()
            if not active.any():
                break
            r = active.nonzero().squeeze(-1)
            rows, allowed_r, g0 = r.numel(), allowed[r], g[r]
            drafted = (steps - g0).clamp(max=draft_steps)  # >= 1 for a live row

            # 1. draft: x^0 -> ... -> x^n with the draft's mu in the target's chain
            states, draft_logits, log_q = [x[r]], [], []
            cur = states[0]
            for j in range(int(drafted.max())):
                stepping = j < drafted
                mov = (cur == mask_id) & allowed_r & stepping[:, None]
                need = mov.any(-1) & ~(cur == d_state[r]).all(-1)
                if need.any():
                    out = draft(cur[need])
                    if d_logits is None:
                        d_logits = out.new_zeros(batch, length, out.shape[-1])
                    d_logits[r[need]], d_state[r[need]] = out.to(d_logits.dtype), cur[need]
                    stats["draft_calls"] += 1
                    stats["draft_states"] += int(need.sum())
                logits = d_logits[r]
                t, s = grid[(g0 + j).clamp(max=steps - 1)], grid[(g0 + j + 1).clamp(max=steps)]
                q_kernel = step_kernel(corruption, logits, cur, t, s, draft_temperature)
                nxt = sample_step(q_kernel, cur, mov, generator)
                log_q.append(log_transition(q_kernel, nxt, mov))
                draft_logits.append(logits)
                states.append(nxt)
                cur = nxt

            # 2. the target's mu at every distinct drafted state, in one batched call
            S = torch.stack(states, dim=1)  # [R, J + 1, L]
            movable = (S == mask_id) & allowed_r[:, None]
            need = movable.any(-1)
            need[:, 1:] &= (S[:, 1:] != S[:, :-1]).any(-1)
            out = net(S[need])
            if t_logits is None:
                t_logits = out.new_zeros(batch, length, out.shape[-1])
            # row of `out` holding the mu of S[:, j]: an unchanged state has the previous one's
            # (x^0 of every row is evaluated, so the running count never crosses into another row)
            slot = need.flatten().long().cumsum(0).view(need.shape) - 1
            stats["target_calls"] += 1
            stats["target_states"] += int(need.sum())
            calls_per_row[r[need.any(-1)].cpu()] += 1

            # 3. verify step by step; the first rejection is redrawn from the residual
            ar = torch.arange(rows, device=device)
            final, g_new = S[ar, drafted].clone(), g0 + drafted
            cache_state, cache_logits = final.clone(), out[slot[ar, drafted]]
            alive = torch.ones(rows, dtype=torch.bool, device=device)
            u = torch.rand(rows, S.shape[1] - 1, generator=generator, device=device, dtype=torch.float64)
            for j in range(S.shape[1] - 1):
                stepping = alive & (j < drafted)
                if not stepping.any():
                    break
                mov = movable[:, j] & stepping[:, None]
                t, s = grid[(g0 + j).clamp(max=steps - 1)], grid[(g0 + j + 1).clamp(max=steps)]
                p_logits = out[slot[:, j]]
                p_kernel = step_kernel(corruption, p_logits, S[:, j], t, s, cfg.temperature)
                log_p = log_transition(p_kernel, S[:, j + 1], mov)
                accept = u[:, j].log() < log_p - log_q[j]
                reject = stepping & ~accept
                stats["proposed"] += int(stepping.sum())
                stats["accepted"] += int((stepping & accept).sum())
                if reject.any():
                    q_kernel = step_kernel(corruption, draft_logits[j][reject], S[reject, j], t[reject], s[reject],
                                           draft_temperature)
                    y, draws, fallback = sample_residual(p_kernel[reject], q_kernel, S[reject, j], mov[reject],
                                                         generator, cfg.residual_draws)
                    final[reject], g_new[reject] = y, g0[reject] + j + 1
                    cache_state[reject], cache_logits[reject] = S[reject, j], p_logits[reject]
                    stats["residual_draws"] += int(draws.sum())
                    stats["residual_fallbacks"] += int(fallback.sum())
                    alive &= ~reject
            x[r], g[r] = final, g_new
            t_state[r], t_logits[r] = cache_state, cache_logits.to(t_logits.dtype)

        if stats["residual_fallbacks"]:
            warnings.warn(f"speculative sampler: {stats['residual_fallbacks']} residual draw(s) hit the cap of "
                          f"{cfg.residual_draws} candidates and used the target's kernel instead (a bias of at "
                          "most 1/(e * residual_draws) per such step); raise residual_draws", stacklevel=2)
        stats["acceptance_rate"] = stats["accepted"] / max(1, stats["proposed"])
        stats["target_calls_per_row"] = calls_per_row.tolist()
        return SampleOutput(tokens=x, nfe=stats["target_calls"], stats=stats)


@hookimpl
def register_samplers(register):
    register("speculative", SpeculativeSampler)
