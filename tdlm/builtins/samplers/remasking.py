"""Confidence-ordered decoding (docs/maths.md section 5): commit the masked positions the model is surest of.

Each step calls the network once on the whole canvas, predicts a token for every masked
position together with a confidence, commits some of them and leaves the rest masked.
Committed tokens are never re-masked.

- `confidence`: low-confidence remasking (LLaDA, Alg. 5). Commits the k most confident, k set
  by a time grid so that after step i about round(n * t_{i+1}) of the n positions stay masked.
- `threshold`: parallel decoding (Fast-dLLM). Commits every position whose confidence is at
  least tau, and always the most confident one.

The denoiser does not see t, so neither needs the corruption's reverse kernel.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from tdlm.plugin import (ComponentConfig, SampleOutput, Sampler, commit_count, hookimpl, sample_categorical,
                         time_grid)


class PredictionConfig(ComponentConfig):
    mode: Literal["argmax", "sample"] = "argmax"
    """argmax: the most likely token, its probability the confidence. sample: a token drawn from
    the model's distribution at `temperature`; its probability under the model is the confidence."""
    temperature: float = Field(1.0, gt=0.0)
    """Divides the logits for the draw of mode = "sample" (unused with argmax). Confidences are
    always the model's own probabilities (temperature 1), as in LLaDA."""


class RemaskingSampler(Sampler):
    """The loop both samplers share; a subclass decides what to commit in each step."""

    Config = PredictionConfig
    causal = False  # a masked-diffusion denoiser

    @property
    def max_steps(self) -> int:
        raise NotImplementedError

    def choose(self, step: int, confidence: torch.Tensor, eligible: torch.Tensor, start: torch.Tensor):
        """bool [B, L]: the positions to commit in `step`, a subset of `eligible`.

        `confidence` [B, L] float64 is -inf outside `eligible`; `start` [B] counts the eligible
        positions each row had when sampling began. The last step must commit every eligible one.
        """
        raise NotImplementedError

    def predict(self, net, x, generator) -> tuple[torch.Tensor, torch.Tensor]:
        """A token and its confidence at every position: ([B, L] long, [B, L] float64)."""
        logits = net(x).double()
        probs = torch.softmax(logits, dim=-1)
        if self.config.mode == "argmax":
            confidence, tokens = probs.max(dim=-1)
            return tokens, confidence
        tokens = sample_categorical(torch.softmax(logits / self.config.temperature, dim=-1), generator)
        return tokens, probs.gather(-1, tokens[..., None]).squeeze(-1)

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        mask_id = self.vocab.mask_id
        allowed = canvas == mask_id if positions is None else (canvas == mask_id) & positions
        start = allowed.sum(-1)
        x, nfe = canvas.clone(), 0
        for step in range(self.max_steps):
            eligible = (x == mask_id) & allowed
            if not eligible.any():
                break
            tokens, confidence = self.predict(net, x, generator)
            nfe += 1
            confidence = confidence.masked_fill(~eligible, float("-inf"))
            commit = self.choose(step, confidence, eligible, start) & eligible
            x = torch.where(commit, tokens, x)
            self.record(x)
        return SampleOutput(tokens=x, nfe=nfe)


def most_confident(confidence: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """bool [B, L]: the k[b] highest confidences of each row b (ties: the leftmost first)."""
    order = confidence.argsort(dim=-1, descending=True, stable=True)
    places = torch.arange(order.shape[-1], device=order.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(-1, order, places)
    return rank < k[:, None]


class ConfidenceSampler(RemaskingSampler):
    """Low-confidence remasking (MaskGIT / LLaDA): each step predicts every masked position and
    commits the most confident ones, as many as the time grid says. Not the model's own chain:
    no NELBO-exact distribution, but far fewer calls than one token per step."""

    class Config(PredictionConfig):
        steps: int = Field(128, ge=1)
        """Steps (network calls at most). With n positions to fill, round(n * t_{i+1}) stay
        masked after step i; at least one is committed per step, so at most n calls are made."""
        grid: Literal["uniform", "cosine"] = "uniform"
        """The time grid t_0 = 1 > ... > t_T = 0 that sets how many tokens each step commits."""

    def __init__(self, config, *, objective, vocab, context=None):
        super().__init__(config, objective=objective, vocab=vocab, context=context)
        self.grid = time_grid(config.steps, config.grid).tolist()

    @property
    def max_steps(self) -> int:
        return self.config.steps

    def choose(self, step, confidence, eligible, start):
        k = commit_count(eligible.sum(-1), start, self.grid[step + 1])
        return most_confident(confidence, k)


class ThresholdSampler(RemaskingSampler):
    """Commits, in each call, every masked position whose confidence reaches `tau` (at least
    one per call), so easy spans take few calls (Fast-dLLM style parallel decoding)."""

    class Config(PredictionConfig):
        tau: float = Field(0.9, ge=0.0, le=1.0)
        """Commit every masked position whose confidence is >= tau (and the most confident one)."""
        max_steps: int = Field(1024, ge=1)
        """Safety cap on the steps: the last one commits every position still masked."""

    @property
    def max_steps(self) -> int:
        return self.config.max_steps

    def choose(self, step, confidence, eligible, start):
        if step == self.config.max_steps - 1:
            return eligible
        best = torch.zeros_like(eligible).scatter_(-1, confidence.argmax(-1, keepdim=True), True)
        return (confidence >= self.config.tau) | best


@hookimpl
def register_samplers(register):
    register("confidence", ConfidenceSampler)
    register("threshold", ThresholdSampler)
