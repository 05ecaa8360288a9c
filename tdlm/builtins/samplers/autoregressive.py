"""Left-to-right sampling from an autoregressive model with temperature, top-k and top-p."""

import torch
from pydantic import Field

from tdlm import hookimpl
from tdlm.components import ComponentConfig, SampleOutput, Sampler, sample_categorical
from tdlm.head import last_position_logits


def filter_probs(probs: torch.Tensor, top_k: int | None, top_p: float | None) -> torch.Tensor:
    """Zero all but the k most likely tokens and/or the smallest set holding mass top_p."""
    if top_k is not None and top_k < probs.shape[-1]:
        kth = probs.topk(top_k, dim=-1).values[..., -1:]
        probs = torch.where(probs < kth, 0.0, probs)
    if top_p is not None and top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs
        sorted_probs = torch.where(mass_before >= top_p * sorted_probs.sum(-1, keepdim=True), 0.0, sorted_probs)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return probs


class AutoregressiveSampler(Sampler):
    """Left to right, one token per model call, from the AR model's next-token distribution."""

    class Config(ComponentConfig):
        temperature: float = Field(1.0, gt=0.0)
        """Divides the logits before the draw; 1.0 samples the model's own distribution."""
        top_k: int | None = Field(None, ge=1)
        """Draw only among the k most likely tokens (none: all)."""
        top_p: float | None = Field(None, gt=0.0, le=1.0)
        """Draw only from the smallest set of most likely tokens holding this mass (nucleus; none: all)."""
        stop_at_eos: bool = False
        """Once a row has generated <|endoftext|> (vocab.bos_id), fill the rest of that masked span
        with it without asking the model, and make no call for a column where no row needs one.
        `tdlm sample --stop-at-eos` sets it."""

    @torch.no_grad()
    def sample(self, net, canvas, generator, *, positions=None):
        mask_id, eos_id = self.vocab.mask_id, self.vocab.bos_id
        x = canvas.clone()
        inputs = torch.cat([torch.full_like(x[:, :1], self.vocab.bos_id), x], dim=1)
        ended = torch.zeros_like(x[:, 0], dtype=torch.bool)  # the row's current span has its EOS
        nfe = 0
        for j in range(x.shape[1]):
            masked = x[:, j] == mask_id
            to_fill = masked if positions is None else masked & positions[:, j]
            if self.config.stop_at_eos:
                ended &= masked  # a given token ends the span; the next span starts afresh
                x[:, j] = torch.where(to_fill & ended, eos_id, x[:, j])
                inputs[:, j + 1] = x[:, j]
                to_fill &= ~ended
            if not to_fill.any():
                continue
            # the head at the last position only: the others' logits would be thrown away
            logits = last_position_logits(net, inputs[:, : j + 1]).double() / self.config.temperature
            nfe += 1
            probs = filter_probs(torch.softmax(logits, -1), self.config.top_k, self.config.top_p)
            x[:, j] = torch.where(to_fill, sample_categorical(probs, generator), x[:, j])
            inputs[:, j + 1] = x[:, j]
            ended |= to_fill & (x[:, j] == eos_id)
            self.record(x)
        return SampleOutput(tokens=x, nfe=nfe)


@hookimpl
def register_samplers(register):
    register("ar", AutoregressiveSampler)
