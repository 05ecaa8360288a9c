"""Speculative sampling of the ancestral chain: a cheap draft proposes, the target verifies.

docs/maths.md section 5 (after De Bortoli et al. 2025). The target chain is exactly the `ancestral`
sampler's: time grid 1 = t_0 > ... > t_T = 0 and, from t_i to t_{i+1}, each masked position
independently unmasks to v with probability reverse_unmask_probs[v] or stays masked. Its
kernel P_i(y | x) is a product over the masked positions. A draft network q runs the SAME chain
(the target's corruption, grid and times) with its own mu in place of the target's, kernel Q_i.
Both are built and drawn by tdlm.components.kernel, the code `ancestral` samples with.

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
from dataclasses import dataclass, field
from typing import Literal

import torch
from pydantic import Field
from torch import Tensor

from tdlm.plugin import (ComponentConfig, DraftMixin, ReverseKernel, SampleOutput, Sampler, denoiser_probs, hookimpl,
                         reverse_kernel, time_grid)


def sample_residual(p_kernel, q_kernel, x, movable, generator, max_draws: int):
    """Exact draws from max(0, P - Q) normalised over WHOLE-STATE transitions, by rejection.

    `p_kernel`, `q_kernel`: per-position tables [R, L, V + 1] (`ReverseKernel.table`).
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
    if fallback.any():  # y ~ P: the table's token columns are P's unmask probabilities
        p_fallback = ReverseKernel(p_kernel[fallback][..., :-1])
        y[fallback] = p_fallback.draw(x[fallback], movable[fallback], generator)
    return y, draws, fallback


class LogitsCache:
    """Each net ignores t, so its logits at a row's canvas stay valid while the canvas does."""

    def __init__(self, batch: int, length: int, device):
        self.state = torch.full((batch, length), -1, dtype=torch.long, device=device)  # -1: nothing cached
        self.logits: Tensor | None = None

    def holds(self, canvases: Tensor, rows: Tensor | slice = slice(None)) -> Tensor:
        """bool [R]: whether the logits of row rows[k] (default: every row) are those of canvases[k]."""
        return (canvases == self.state[rows]).all(-1)

    def store(self, rows: Tensor, canvases: Tensor, logits: Tensor) -> None:
        if self.logits is None:
            self.logits = logits.new_zeros(*self.state.shape, logits.shape[-1])
        self.state[rows], self.logits[rows] = canvases, logits.to(self.logits.dtype)


@dataclass
class Chain:
    """The state of one `sample` call: each row's canvas and grid index, and both nets' caches."""

    x: Tensor  # [B, L]
    allowed: Tensor  # [B, L] bool: positions this call may commit
    grid: Tensor  # [T + 1] float64
    mask_id: int
    target: LogitsCache
    draft: LogitsCache
    g: Tensor = field(init=False)  # [B] long: each row's grid index
    calls_per_row: Tensor = field(init=False)  # [B] long (CPU): target calls each row took part in
    stats: dict = field(default_factory=lambda: dict(
        target_calls=0, target_states=0, draft_calls=0, draft_states=0, proposed=0, accepted=0, free_steps=0,
        residual_draws=0, residual_fallbacks=0))

    def __post_init__(self):
        self.g = torch.zeros(self.x.shape[0], dtype=torch.long, device=self.x.device)
        self.calls_per_row = torch.zeros(self.x.shape[0], dtype=torch.long)

    @property
    def steps(self) -> int:
        return len(self.grid) - 1

    def live(self) -> Tensor:
        """bool [B]: rows with a position left to commit and a step left to take."""
        return ((self.x == self.mask_id) & self.allowed).any(-1) & (self.g < self.steps)

    def times(self, g: Tensor) -> tuple[Tensor, Tensor]:
        """(t, s) of the step from grid index g [R] (clamped: rows past the end do not move)."""
        return self.grid[g.clamp(max=self.steps - 1)], self.grid[(g + 1).clamp(max=self.steps)]


@dataclass
class Proposal:
    """A round's drafted chain for rows `rows`: states[:, j] is x^j, reached from x^{j-1} with
    the draft's logits[j - 1] (log-probability log_q[j - 1]); row k drafted `drafted[k]` steps."""

    rows: Tensor  # [R]
    g0: Tensor  # [R] grid index of x^0
    drafted: Tensor  # [R]
    states: Tensor  # [R, J + 1, L]
    logits: list[Tensor]  # J x [R, L, V]
    log_q: list[Tensor]  # J x [R]


@dataclass
class Verdict:
    """Where a round leaves its rows: the state, its grid index, and the target's logits at the
    last state whose mu is known (the next step from there costs no call)."""

    final: Tensor  # [R, L]
    g: Tensor  # [R]
    known_state: Tensor  # [R, L]
    known_logits: Tensor  # [R, L, V]

    def end_at(self, rows: Tensor, state: Tensor, g: Tensor, known_state: Tensor, known_logits: Tensor) -> None:
        """Rows `rows` end the round at `state` (grid index g), the target's mu known at `known_state`."""
        self.final[rows], self.g[rows] = state, g
        self.known_state[rows], self.known_logits[rows] = known_state, known_logits


class SpeculativeSampler(DraftMixin, Sampler):
    """The ancestral chain of the target (`steps`, `grid`, `temperature`), drafted K steps at a time.

    `nfe` is the number of sequential (batched) target calls; `stats` has the breakdown: draft
    calls, acceptance rate, target calls per row, residual draws. Set `draft_net` to draft with
    a network built in code instead of a run directory.
    """

    causal = False  # a masked-diffusion target
    needs_corruption = ("reverse_unmask_probs",)  # drafts and verifies the reverse chain

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

    def __init__(self, config, *, objective, vocab, context=None):
        super().__init__(config, objective=objective, vocab=vocab, context=context)
        self.draft_net = None

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        batch, length = canvas.shape
        draft = self.get_draft(length, canvas.device)
        allowed = torch.ones_like(canvas, dtype=torch.bool) if positions is None else positions.bool()
        chain = Chain(canvas.clone(), allowed, time_grid(self.config.steps, self.config.grid, canvas.device),
                      self.vocab.mask_id, LogitsCache(batch, length, canvas.device),
                      LogitsCache(batch, length, canvas.device))
        while True:
            self.take_free_steps(chain, generator)
            active = chain.live()
            if not active.any():
                break
            proposal = self.draft_round(chain, draft, active.nonzero().squeeze(-1), generator)
            self.apply(chain, proposal, self.verify(chain, net, proposal, generator))
        return self.output(chain)

    def kernel(self, chain: Chain, logits: Tensor, x: Tensor, g: Tensor, *, draft: bool = False) -> ReverseKernel:
        """The chain's kernel from grid index g [R] at x [R, L], with the target's mu (or, with
        draft=True, the draft's) from `logits`: the one kernel `ancestral` samples too."""
        cfg = self.config
        temperature = (cfg.draft_temperature or cfg.temperature) if draft else cfg.temperature
        t, s = chain.times(g)
        return reverse_kernel(self.objective.corruption, denoiser_probs(logits, temperature), x, t, s)

    def take_free_steps(self, chain: Chain, generator) -> None:
        """Steps from states whose target mu is known (after an accepted round, or an unchanged
        state): the target's own kernel, no call."""
        while True:
            free = chain.live() & chain.target.holds(chain.x)
            if not free.any():
                return
            r = free.nonzero().squeeze(-1)
            x = chain.x[r]
            kernel = self.kernel(chain, chain.target.logits[r], x, chain.g[r])
            chain.x[r] = kernel.draw(x, (x == chain.mask_id) & chain.allowed[r], generator)
            chain.g[r] += 1
            chain.stats["free_steps"] += r.numel()

    def draft_round(self, chain: Chain, draft, rows: Tensor, generator) -> Proposal:
        """x^0 -> ... -> x^K with the draft's mu in the target's chain; one draft call per step,
        on the rows whose state changed since the draft last saw them."""
        g0, allowed = chain.g[rows], chain.allowed[rows]
        drafted = (chain.steps - g0).clamp(max=self.config.draft_steps)  # >= 1 for a live row
        states, logits_per_step, log_q = [chain.x[rows]], [], []
        for j in range(int(drafted.max())):
            x = states[-1]
            movable = (x == chain.mask_id) & allowed & (j < drafted)[:, None]
            need = movable.any(-1) & ~chain.draft.holds(x, rows)
            if need.any():
                chain.draft.store(rows[need], x[need], draft(x[need]))
                chain.stats["draft_calls"] += 1
                chain.stats["draft_states"] += int(need.sum())
            logits = chain.draft.logits[rows]
            kernel = self.kernel(chain, logits, x, g0 + j, draft=True)
            states.append(kernel.draw(x, movable, generator))
            log_q.append(kernel.log_prob(states[-1], movable))
            logits_per_step.append(logits)
        return Proposal(rows, g0, drafted, torch.stack(states, dim=1), logits_per_step, log_q)

    def verify(self, chain: Chain, net, proposal: Proposal, generator) -> Verdict:
        """The target's mu at every drafted state (one call), then each step accepted with
        probability min(1, P/Q) in turn; the first rejection is redrawn from the residual."""
        S, g0, drafted = proposal.states, proposal.g0, proposal.drafted
        target_logits, slot, movable = self.score(chain, net, proposal)
        last = torch.arange(len(S), device=S.device), drafted
        verdict = Verdict(S[last].clone(), g0 + drafted, S[last].clone(), target_logits[slot[last]])
        alive = torch.ones(len(S), dtype=torch.bool, device=S.device)
        u = torch.rand(len(S), S.shape[1] - 1, generator=generator, device=S.device, dtype=torch.float64)
        for j in range(S.shape[1] - 1):
            stepping = alive & (j < drafted)
            if not stepping.any():
                break
            mov = movable[:, j] & stepping[:, None]
            p_logits = target_logits[slot[:, j]]
            p_kernel = self.kernel(chain, p_logits, S[:, j], g0 + j)
            accept = u[:, j].log() < p_kernel.log_prob(S[:, j + 1], mov) - proposal.log_q[j]
            reject = stepping & ~accept
            chain.stats["proposed"] += int(stepping.sum())
            chain.stats["accepted"] += int((stepping & accept).sum())
            if reject.any():  # x^{j+1} from the residual instead; the round ends there for these rows
                y = self.redraw(chain, proposal, j, reject, p_kernel, mov, generator)
                verdict.end_at(reject, y, g0[reject] + j + 1, S[reject, j], p_logits[reject])
                alive &= ~reject
        return verdict

    def score(self, chain: Chain, net, proposal: Proposal) -> tuple[Tensor, Tensor, Tensor]:
        """One batched target call on every distinct drafted state that can move. Returns (logits
        [M, L, V], slot [R, J + 1]: the row of logits holding the mu of states[:, j], movable
        [R, J + 1, L])."""
        S = proposal.states
        movable = (S == chain.mask_id) & chain.allowed[proposal.rows][:, None]
        need = movable.any(-1)
        need[:, 1:] &= (S[:, 1:] != S[:, :-1]).any(-1)  # an unchanged state has the previous one's mu
        logits = net(S[need])
        # x^0 of every row is evaluated, so the running count never crosses into another row
        slot = need.flatten().long().cumsum(0).view(need.shape) - 1
        chain.stats["target_calls"] += 1
        chain.stats["target_states"] += int(need.sum())
        chain.calls_per_row[proposal.rows[need.any(-1)].cpu()] += 1
        return logits, slot, movable

    def redraw(self, chain, proposal, j, reject, p_kernel, movable, generator) -> Tensor:
        """x^{j+1} [r, L] for the rows `reject` that refused step j: a draw from the residual
        max(0, P - Q) of the whole-state transitions."""
        S, g0 = proposal.states, proposal.g0
        q_kernel = self.kernel(chain, proposal.logits[j][reject], S[reject, j], g0[reject] + j, draft=True)
        y, draws, fallback = sample_residual(p_kernel.rows(reject).table(), q_kernel.table(), S[reject, j],
                                             movable[reject], generator, self.config.residual_draws)
        chain.stats["residual_draws"] += int(draws.sum())
        chain.stats["residual_fallbacks"] += int(fallback.sum())
        return y

    @staticmethod
    def apply(chain: Chain, proposal: Proposal, verdict: Verdict) -> None:
        rows = proposal.rows
        chain.x[rows], chain.g[rows] = verdict.final, verdict.g
        chain.target.store(rows, verdict.known_state, verdict.known_logits)

    def output(self, chain: Chain) -> SampleOutput:
        stats = chain.stats
        if stats["residual_fallbacks"]:
            warnings.warn(f"speculative sampler: {stats['residual_fallbacks']} residual draw(s) hit the cap of "
                          f"{self.config.residual_draws} candidates and used the target's kernel instead (a bias "
                          "of at most 1/(e * residual_draws) per such step); raise residual_draws", stacklevel=3)
        stats["acceptance_rate"] = stats["accepted"] / max(1, stats["proposed"])
        stats["target_calls_per_row"] = chain.calls_per_row.tolist()
        return SampleOutput(tokens=chain.x, nfe=stats["target_calls"], stats=stats)


@hookimpl
def register_samplers(register):
    register("speculative", SpeculativeSampler)
