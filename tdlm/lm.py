"""Assembles a language model from a recipe: the Transformer plus the chosen components.

`LanguageModel` is the one nn.Module that training prepares, checkpoints and wraps for
multi-process runs: its forward returns the loss, so the training loop stays short, and the
corruption's learnable parameters (if any) are trained and saved with the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tdlm.components import Objective, Sampler, VocabInfo
from tdlm.config import RunConfig
from tdlm.model import Transformer


class LanguageModel(nn.Module):
    def __init__(self, net: Transformer, objective: Objective):
        super().__init__()
        self.net, self.objective = net, objective

    def forward(self, x0: torch.Tensor, generator: torch.Generator | None = None):
        return self.objective.loss(self.net, x0, generator)


@dataclass
class Built:
    model: LanguageModel
    sampler: Sampler
    vocab: VocabInfo


def build_model(cfg: RunConfig, components: dict, vocab: VocabInfo) -> Built:
    """Instantiate schedule -> corruption -> objective -> network -> sampler, in that order."""
    (schedule_c, schedule_opts) = components["schedule"]
    (corruption_c, corruption_opts) = components["corruption"]
    (objective_c, objective_opts) = components["objective"]
    (sampler_c, sampler_opts) = components["sampler"]
    schedule = schedule_c.cls(schedule_opts)
    corruption = corruption_c.cls(corruption_opts, schedule=schedule, vocab=vocab)
    objective = objective_c.cls(objective_opts, corruption=corruption, vocab=vocab)
    net = Transformer(cfg.model, vocab_size=vocab.size, max_len=cfg.data.seq_len, causal=objective.causal)
    sampler = sampler_c.cls(sampler_opts, objective=objective, vocab=vocab)
    return Built(LanguageModel(net, objective), sampler, vocab)
