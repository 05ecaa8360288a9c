"""The static-shape head (the GPU path): every position scored over a vocabulary padded to a
multiple of 128, the loss weighted by mask x NELBO weight. Same loss and gradients as the
gathered path and as the full-logits loop, and no operation that waits for the device."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tdlm import head
from tdlm.head import padded_logits, padded_size, static_linear_cross_entropy


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def static(monkeypatch):
    """The static path on the CPU, as on a GPU (TDLM_STATIC_HEAD=1 does the same)."""
    monkeypatch.setattr(head, "SYNC_FREE_DEVICES", set())


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


# Operations whose result the host must read (so on a GPU they wait for every queued kernel):
# a data-dependent shape (nonzero, boolean masks) or a value (.item(), equal).
HOST_SYNC_OPS = {"aten::nonzero", "aten::masked_select", "aten::_local_scalar_dense", "aten::equal",
                 "aten::is_nonzero", "aten::masked_scatter", "aten::unique_consecutive", "aten::_unique2"}


class HostSyncs(TorchDispatchMode):
    """Records the host-syncing operations run under it, boolean-mask indexing included."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name
        if name in HOST_SYNC_OPS:
            self.seen.append(name)
        if name in ("aten::index", "aten::index_put", "aten::index_put_"):
            indices = args[1] if len(args) > 1 else []
            if any(i is not None and i.dtype == torch.bool for i in indices):
                self.seen.append(f"{name} (boolean mask)")
        return func(*args, **(kwargs or {}))


def loss_and_backward(build, objective):
    torch.manual_seed(0)
    model = build(vocab_size=50, seq_len=12, objective=objective, model={"d_model": 32, "n_heads": 4}).model
    x0 = torch.randint(0, 50, (8, 12), generator=gen(0))
    with HostSyncs() as syncs:
        loss, stats = model(x0, gen(1))
        loss.backward()
    return syncs.seen


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_the_static_path_has_no_host_sync(build, static, objective):
    assert loss_and_backward(build, objective) == []


def test_the_gathered_path_is_seen_to_sync(build):
    """The detector's negative control: the CPU's own path gathers the masked rows."""
    assert loss_and_backward(build, "diffusion")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_cuda_train_steps_run_under_sync_debug_mode_error(objective):
    """On a GPU, whole train steps (forward, backward, clipping, AdamW) with any host sync an error."""
    from tdlm.studies.bench import bench_config, engine_step
    from tdlm.components import VocabInfo

    cfg, components = bench_config(vocab=50257, d_model=64, n_layers=2, n_heads=4, batch=64, seq_len=128,
                                   objective=objective, total_steps=10, seed=0)
    step = engine_step(cfg, components, VocabInfo(size=50257, mask_id=50257, bos_id=50256), torch.device("cuda"))
    batch = torch.randint(0, 50257, (64, 128)).cuda()
    step(0, batch)  # the first step sets things up (lazy init, autotuning)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for i in range(1, 4):
            loss, _ = step(i, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
