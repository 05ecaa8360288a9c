"""The `ar` sampler's next-token distribution (temperature, top-k, top-p), in one place.

`ar` draws from it and `ar-speculative` verifies against it: that sampler is exact only because
both use this very function (docs/maths.md sections 5.9 and 5.10).
"""

from __future__ import annotations

import torch
from torch import Tensor


def next_token_probs(logits: Tensor, *, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """p(. | x_<i) [..., V] float64, normalised: the softmax of logits / temperature, cut to the
    top_k most likely tokens and/or the nucleus of mass top_p (None: no cut)."""
    probs = filter_probs(torch.softmax(logits.double() / temperature, dim=-1), top_k, top_p)
    return probs / probs.sum(-1, keepdim=True)


def filter_probs(probs: Tensor, top_k: int | None, top_p: float | None) -> Tensor:
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
