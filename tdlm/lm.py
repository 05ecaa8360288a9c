"""Assembles a language model from a recipe: the Transformer plus the chosen components.

`LanguageModel` is the one nn.Module that training prepares, checkpoints and wraps for
multi-process runs: its forward returns the loss, so the training loop stays short, and the
corruption's learnable parameters (if any) are trained and saved with the network.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from tdlm.components import Objective, RunContext, Sampler, VocabInfo, build_component
from tdlm.config import RecipeError, RunConfig
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


def build_model(cfg: RunConfig, components: dict, vocab: VocabInfo, *,
                load_draft: Callable | None = None) -> Built:
    """Instantiate schedule -> corruption -> objective -> network -> sampler, in that order, from
    the resolved components (tdlm.config.resolve_components); the corruption, objective and
    sampler get the model's RunContext (seq_len, vocab, and `load_draft`: how to read another
    run's network, which whoever reads run directories passes, e.g. tdlm.rundir.load_draft)."""
    context = RunContext(seq_len=cfg.data.seq_len, vocab=vocab, load_draft=load_draft)

    def build(kind: str, **parts):
        resolved = components[kind]
        return build_component(resolved.component.cls, resolved.config, vocab=vocab, context=context, **parts)

    schedule = components["schedule"].component.cls(components["schedule"].config)  # a schedule takes its config only
    corruption = build("corruption", schedule=schedule)
    objective = build("objective", corruption=corruption)
    net = _build_net(cfg, vocab, objective.causal)
    sampler = build("sampler", objective=objective)
    return Built(LanguageModel(net, objective), sampler, vocab)


def _build_net(cfg: RunConfig, vocab: VocabInfo, causal: bool) -> Transformer:
    """The network; a RecipeError, before any memory is taken, when its weights alone would not
    fit in the memory free now (a typo such as model.d_model=100000 must not hang or crash the
    machine), and when allocating them fails all the same."""
    def make():
        return Transformer(cfg.model, vocab_size=vocab.size, max_len=cfg.data.seq_len, causal=causal,
                           bos_id=vocab.bos_id)

    with torch.device("meta"):  # shapes only: no memory
        parameters = make().num_parameters()
    needed, free = parameters * torch.get_default_dtype().itemsize, memory_available()
    shape = (f"model.d_model = {cfg.model.d_model}, model.n_layers = {cfg.model.n_layers}, "
             f"vocabulary {vocab.size:,}")
    if free is not None and needed > free:
        raise RecipeError(f"the model has {parameters:,} parameters ({shape}): its weights alone take "
                          f"{needed / 2**30:,.1f} GiB and this machine has {free / 2**30:,.1f} GiB free; "
                          "make it smaller (model.d_model, model.n_layers)")
    try:
        return make()
    except (torch.OutOfMemoryError, MemoryError, RuntimeError) as exc:
        if isinstance(exc, RuntimeError) and "alloc" not in str(exc) and "memory" not in str(exc):
            raise
        raise RecipeError(f"the model has {parameters:,} parameters ({shape}) and its weights could not be "
                          "allocated (out of memory); make it smaller (model.d_model, model.n_layers)") from None


def memory_available() -> int | None:
    """Bytes of memory free for a new allocation now (Linux's MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None
