"""Ancestral sampling (random remasking) over a time grid 1 = t_0 > ... > t_T = 0 (MATH.md 5)."""

from typing import Literal

import torch
from pydantic import Field

from tdlm import hookimpl
from tdlm.components import ComponentConfig, SampleOutput, Sampler, sample_categorical
from tdlm.grids import time_grid


class AncestralSampler(Sampler):
    class Config(ComponentConfig):
        steps: int = Field(128, ge=1)
        """Number of reverse steps (denoiser calls at most)."""
        grid: Literal["uniform", "cosine"] = "uniform"
        temperature: float = Field(1.0, gt=0.0)

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        mask_id, batch = self.vocab.mask_id, canvas.shape[0]
        corruption = self.objective.corruption
        grid = time_grid(self.config.steps, self.config.grid, canvas.device)
        x, nfe, probs = canvas.clone(), 0, None
        for i in range(self.config.steps):
            masked = x == mask_id
            if positions is not None:
                masked &= positions
            if not masked.any():
                break
            if probs is None:  # the denoiser ignores t, so an unchanged x_t needs no new call
                logits = net(x).double() / self.config.temperature
                probs, nfe = torch.softmax(logits, dim=-1), nfe + 1
            t, s = grid[i].expand(batch), grid[i + 1].expand(batch)
            unmask = corruption.reverse_unmask_probs(probs, x, t, s)
            stay = (1.0 - unmask.sum(-1, keepdim=True)).clamp_min(0.0)
            choice = sample_categorical(torch.cat([unmask, stay], dim=-1), generator)
            # index V (one past the real tokens) is "stay masked", which is exactly mask_id
            new_x = torch.where(masked, choice, x)
            if not torch.equal(new_x, x):
                probs = None
            x = new_x
        return SampleOutput(tokens=x, nfe=nfe)


@hookimpl
def register_samplers(register):
    register("ancestral", AncestralSampler)
