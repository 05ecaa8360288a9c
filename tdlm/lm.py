"""Assembles a language model from a recipe: the Transformer plus the chosen components.

`LanguageModel` is the one nn.Module that training prepares, checkpoints and wraps for
multi-process runs: its forward returns the loss, so the training loop stays short, and the
corruption's learnable parameters (if any) are trained and saved with the network.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from tdlm.components import Objective, RunContext, Sampler, VocabInfo, build_component
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
    """Instantiate schedule -> corruption -> objective -> network -> sampler, in that order; the
    corruption, objective and sampler get the model's RunContext (seq_len, vocab)."""
    (schedule_c, schedule_opts) = components["schedule"]
    (corruption_c, corruption_opts) = components["corruption"]
    (objective_c, objective_opts) = components["objective"]
    (sampler_c, sampler_opts) = components["sampler"]
    context = RunContext(seq_len=cfg.data.seq_len, vocab=vocab)
    schedule = schedule_c.cls(schedule_opts)
    corruption = build_component(corruption_c.cls, corruption_opts, schedule=schedule, vocab=vocab, context=context)
    objective = build_component(objective_c.cls, objective_opts, corruption=corruption, vocab=vocab, context=context)
    net = Transformer(cfg.model, vocab_size=vocab.size, max_len=cfg.data.seq_len, causal=objective.causal,
                      bos_id=vocab.bos_id)
    sampler = build_component(sampler_c.cls, sampler_opts, objective=objective, vocab=vocab, context=context)
    return Built(LanguageModel(net, objective), sampler, vocab)
