"""Ancestral sampling (random remasking) over a time grid 1 = t_0 > ... > t_T = 0 (docs/maths.md section 5)."""

from typing import Literal

import torch
from pydantic import Field

from tdlm.plugin import ComponentConfig, SampleOutput, Sampler, denoiser_probs, hookimpl, reverse_kernel, time_grid


class AncestralSampler(Sampler):
    """The model's own reverse chain: from t = 1 (all masked) to 0 in `steps` steps, each masked
    position unmasking with the reverse-process probability and its token drawn from the
    denoiser (docs/maths.md, samplers). `nfe` counts the real forward passes."""

    causal = False  # a masked-diffusion denoiser
    needs_corruption = ("reverse_unmask_probs",)  # the reverse step (checked when a recipe is resolved)

    class Config(ComponentConfig):
        steps: int = Field(128, ge=1)
        """Number of reverse steps (denoiser calls at most)."""
        grid: Literal["uniform", "cosine"] = "uniform"
        """The time grid t_0 = 1 > ... > t_T = 0: uniform steps, or cosine (finer near t = 0)."""
        temperature: float = Field(1.0, gt=0.0)
        """Divides the denoiser's logits before the tokens are drawn; 1.0 is the model's own chain."""

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        mask_id, batch = self.vocab.mask_id, canvas.shape[0]
        corruption = self.objective.corruption
        grid = time_grid(self.config.steps, self.config.grid, canvas.device)
        x, nfe, probs = canvas.clone(), 0, None
        stale = torch.ones(batch, dtype=torch.bool, device=canvas.device)  # rows whose x changed
        for i in range(self.config.steps):
            masked = x == mask_id
            if positions is not None:
                masked &= positions
            if not masked.any():
                break
            # the denoiser ignores t, so only the rows whose x_t changed need a new call
            rows = stale.nonzero(as_tuple=True)[0]
            if len(rows):
                new = denoiser_probs(net(x[rows]), self.config.temperature)
                if probs is None:
                    probs = new.new_empty(batch, *new.shape[1:])
                probs[rows], nfe = new, nfe + 1
            kernel = reverse_kernel(corruption, probs, x, grid[i].expand(batch), grid[i + 1].expand(batch))
            y = kernel.draw(x, masked, generator)
            stale = (y != x).any(-1)
            x = y
            if stale.any():
                self.record(x)
        return SampleOutput(tokens=x, nfe=nfe)


@hookimpl
def register_samplers(register):
    register("ancestral", AncestralSampler)
