"""Small stand-in networks shared by the tests."""

from __future__ import annotations

import torch
from torch import nn


class ZeroLogits(nn.Module):
    """Uniform predictions over V tokens."""

    def __init__(self, vocab_size):
        super().__init__()
        self.vocab_size = vocab_size

    def forward(self, x):
        return torch.zeros(*x.shape, self.vocab_size)


class Spy(nn.Module):
    """Wraps a net and records the canvas it is called with."""

    def __init__(self, net):
        super().__init__()
        self.net, self.seen = net, []

    def forward(self, x):
        self.seen.append(x.clone())
        return self.net(x)
