"""The static-shape head (the GPU path): every position scored over a vocabulary padded to a
multiple of 128, the loss weighted by mask x NELBO weight. Same loss and gradients as the
gathered path and as the plain computation. (That the train step on this path never waits for
the device is tests/test_bench.py's test_train_step_never_reads_a_device_value_on_the_host.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tdlm import head
from tdlm.head import padded_logits, padded_size, static_linear_cross_entropy


def gen(seed):
    return torch.Generator().manual_seed(seed)


def test_padded_sizes():
    assert [padded_size(v) for v in (1, 50, 128, 129, 50257)] == [128, 128, 128, 256, 50304]


@pytest.mark.parametrize("vocab", [50, 128, 300])
def test_padded_head_gives_the_plain_loss_and_gradients(vocab):
    hidden = torch.randn(37, 16, generator=gen(0), dtype=torch.float64)
    weight = torch.randn(vocab, 16, generator=gen(1), dtype=torch.float64)
    targets = torch.randint(0, vocab, (37,), generator=gen(2))
    row_weight = torch.rand(37, generator=gen(3), dtype=torch.float64) * (torch.rand(37, generator=gen(4)) < 0.5)
    results = []
    for ours in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if ours:
            logits = padded_logits(h, w)
            assert logits.shape == (37, padded_size(vocab)) and torch.isinf(logits[:, vocab:]).all()
            y = static_linear_cross_entropy(h, w, targets, row_weight)
        else:
            y = F.cross_entropy(F.linear(h, w), targets, reduction="none") * row_weight
        grads = torch.autograd.grad(y.sum(), (h, w))
        results.append((y.detach(), *grads))
    for a, b in zip(*results):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_static_path_gives_the_gathered_paths_loss_and_gradients(build, monkeypatch, objective):
    """The engine's model on the CPU: gathered (masked rows only, chunked) against static (every
    row, padded vocabulary), same noise; float32 tolerances."""
    x0 = torch.randint(0, 50, (8, 12), generator=gen(0))
    results = []
    for devices in ({"cpu"}, set()):
        monkeypatch.setattr(head, "SYNC_FREE_DEVICES", devices)
        torch.manual_seed(0)
        model = build(vocab_size=50, seq_len=12, objective=objective, model={"d_model": 32, "n_heads": 4}).model
        loss, _ = model(x0, gen(1))
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (gathered, gathered_grads), (static, static_grads) = results
    torch.testing.assert_close(static, gathered, rtol=1e-6, atol=0)
    for name, grad in gathered_grads.items():
        scale = grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(static_grads[name], grad, rtol=1e-5, atol=1e-5 * scale)
