"""Left-to-right sampling from an autoregressive model with temperature, top-k and top-p."""

import torch
from pydantic import Field

from tdlm.plugin import (ComponentConfig, SampleOutput, Sampler, hookimpl, last_position_logits, next_token_probs,
                         sample_categorical)


class AutoregressiveSampler(Sampler):
    """Left to right, one token per model call, from the AR model's next-token distribution."""

    causal = True  # a causal network, left to right
    supports_stop_at_eos = True  # Config.stop_at_eos: no calls for a span once it has its end-of-text

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
        cfg, mask_id, eos_id = self.config, self.vocab.mask_id, self.vocab.bos_id
        x = canvas.clone()
        inputs = torch.cat([torch.full_like(x[:, :1], self.vocab.bos_id), x], dim=1)
        ended = torch.zeros_like(x[:, 0], dtype=torch.bool)  # the row's current span has its EOS
        nfe = 0
        for j in range(x.shape[1]):
            masked = x[:, j] == mask_id
            to_fill = masked if positions is None else masked & positions[:, j]
            if cfg.stop_at_eos:
                ended &= masked  # a given token ends the span; the next span starts afresh
                x[:, j] = torch.where(to_fill & ended, eos_id, x[:, j])
                inputs[:, j + 1] = x[:, j]
                to_fill &= ~ended
            if not to_fill.any():
                continue
            # the head at the last position only: the others' logits would be thrown away
            logits = last_position_logits(net, inputs[:, : j + 1])
            nfe += 1
            probs = next_token_probs(logits, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p)
            x[:, j] = torch.where(to_fill, sample_categorical(probs, generator), x[:, j])
            inputs[:, j + 1] = x[:, j]
            ended |= to_fill & (x[:, j] == eos_id)
            self.record(x)
        return SampleOutput(tokens=x, nfe=nfe)


@hookimpl
def register_samplers(register):
    register("ar", AutoregressiveSampler)
