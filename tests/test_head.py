"""The output head applied only where the loss is, in chunks: same loss and gradients as the
plain full-logits computation."""

import pytest
import torch
import torch.nn.functional as F

from tdlm import head
from tdlm.head import Denoised, linear_cross_entropy, linear_cross_entropy_and_argmax



def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows for a 50-token head: several chunks and a ragged last one."""
    monkeypatch.setitem(head.CHUNK_ELEMENTS, "cpu", 7 * 50)
    monkeypatch.setitem(head.EVAL_CHUNK_ELEMENTS, "cpu", 7 * 50)


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight), targets, reduction="none")


@pytest.mark.parametrize("rows", [1, 7, 23])
def test_chunked_cross_entropy_and_gradients_equal_the_plain_ones(small_chunks, rows):
    hidden = torch.randn(rows, 16, generator=gen(0), dtype=torch.float64)
    weight = torch.randn(50, 16, generator=gen(1), dtype=torch.float64)
    targets = torch.randint(0, 50, (rows,), generator=gen(2))
    upstream = torch.randn(rows, generator=gen(3), dtype=torch.float64)  # a weighted sum, as the NELBO's
    grads = []
    for fn in (plain, linear_cross_entropy):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        ce = fn(h, w, targets)
        (ce.double() * upstream).sum().backward()
        grads.append((ce.detach().double(), h.grad, w.grad))
    (ce_plain, gh_plain, gw_plain), (ce_ours, gh_ours, gw_ours) = grads
    torch.testing.assert_close(ce_ours, ce_plain, rtol=1e-6, atol=0)
    torch.testing.assert_close(gh_ours, gh_plain, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw_ours, gw_plain, rtol=1e-5, atol=1e-7)


def test_float32_head_matches_within_tolerance():
    """The engine's own dtype: a GPT-2-sized chunking (several chunks of 41 rows)."""
    hidden = torch.randn(700, 32, generator=gen(0))
    weight = 0.1 * torch.randn(50_000, 32, generator=gen(1))
    targets = torch.randint(0, 50_000, (700,), generator=gen(2))
    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ce1, ce2 = plain(h1, w1, targets), linear_cross_entropy(h2, w2, targets)
    ce1.mean().backward()
    ce2.mean().backward()
    torch.testing.assert_close(ce2, ce1, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(h2.grad, h1.grad, rtol=1e-5, atol=1e-8)
    torch.testing.assert_close(w2.grad, w1.grad, rtol=1e-5, atol=1e-9)


def test_argmax_version_for_evaluation(small_chunks):
    hidden, weight = torch.randn(30, 8, generator=gen(0)), torch.randn(50, 8, generator=gen(1))
    targets = torch.randint(0, 50, (30,), generator=gen(2))
    ce, argmax = linear_cross_entropy_and_argmax(hidden, weight, targets)
    torch.testing.assert_close(ce, plain(hidden, weight, targets))
    assert torch.equal(argmax, F.linear(hidden, weight).argmax(-1))


def test_no_masked_position_still_gives_a_graph():
    weight = torch.randn(50, 8, requires_grad=True)
    ce = linear_cross_entropy(torch.zeros(0, 8), weight, torch.zeros(0, dtype=torch.long))
    ce.sum().backward()
    assert ce.shape == (0,) and torch.equal(weight.grad, torch.zeros_like(weight))


def tiny_net(build, objective, vocab_size=50, seq_len=12):
    torch.manual_seed(0)
    return build(vocab_size=vocab_size, seq_len=seq_len, objective=objective, model={"d_model": 32, "n_heads": 4})


@pytest.mark.parametrize("gather_on", [{"cpu"}, set()], ids=["gathered", "all-positions"])
def test_denoised_cross_entropy_is_the_full_logits_one_at_masked_positions(build, small_chunks, monkeypatch,
                                                                          gather_on):
    monkeypatch.setattr(head, "SYNC_FREE_DEVICES", gather_on)  # set(): as on a GPU
    net = tiny_net(build, "diffusion").model.net
    x0 = torch.randint(0, 50, (6, 12), generator=gen(0))
    xt = torch.where(torch.rand(6, 12, generator=gen(1)) < 0.5, 50, x0)
    logits = net(xt)
    expected = F.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(6, 12) * (xt == 50)
    torch.testing.assert_close(Denoised(net, xt, 50).cross_entropy(x0), expected, rtol=1e-6, atol=1e-6)
    log_probs = Denoised(net, xt, 50).masked_log_probs()
    torch.testing.assert_close(log_probs, torch.log_softmax(logits[xt == 50], -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_training_loss_and_gradients_equal_the_full_head_loop(build, small_chunks, objective):
    """The engine's loss against the loss written out on the full [B, N, V] logits (what the
    benchmark's hand-written loop computes), same noise: values within 1e-6, gradients 1e-5."""
    built = tiny_net(build, objective)
    model, vocab = built.model, built.vocab
    x0 = torch.randint(0, 50, (8, 12), generator=gen(0))
    loss, _ = model(x0, gen(1))
    loss.backward()
    engine_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()

    net, g = model.net, gen(1)
    if objective == "ar":
        inputs = torch.cat([torch.full_like(x0[:, :1], vocab.bos_id), x0[:, :-1]], dim=1)
        reference = F.cross_entropy(net(inputs).flatten(0, 1), x0.flatten())
    else:  # the objective's own draws, replayed: stratified t, masks, linear-schedule weight 1/t
        batch = x0.shape[0]
        u = torch.rand((), generator=g, dtype=torch.float64)
        t = ((u + torch.arange(batch, dtype=torch.float64) / batch) % 1.0).float()
        t = 1e-3 + (1.0 - 1e-3) * t
        xt = model.objective.corruption.corrupt(x0, t, g)
        ce = F.cross_entropy(net(xt).flatten(0, 1), x0.flatten(), reduction="none").view_as(x0)
        reference = (ce * (xt == vocab.mask_id) / t[:, None]).sum() / x0.numel()
    reference.backward()
    torch.testing.assert_close(loss, reference, rtol=1e-6, atol=0)
    for name, p in model.named_parameters():  # within 1e-5 of the tensor's largest gradient
        scale = p.grad.abs().max().item()
        assert scale > 0, name
        torch.testing.assert_close(engine_grads[name], p.grad, rtol=1e-5, atol=1e-5 * scale)


@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("upstream", ["sum", "mean", "per-row"])
def test_one_pass_and_recomputed_gradients_are_exact(small_chunks, weighted, upstream):
    """A sum or mean of the weighted cross-entropies takes the gradient made in the forward pass;
    any other upstream gradient recomputes the chunks. Both equal the plain computation's, and a
    second backward (retain_graph) gives the same again."""
    hidden = torch.randn(23, 16, generator=gen(0), dtype=torch.float64)
    weight = torch.randn(50, 16, generator=gen(1), dtype=torch.float64)
    targets = torch.randint(0, 50, (23,), generator=gen(2))
    row_weight = torch.rand(23, generator=gen(3), dtype=torch.float64) * 5 if weighted else None
    factors = torch.randn(23, generator=gen(4), dtype=torch.float64)

    def reduce(y):
        return {"sum": y.sum(), "mean": y.mean(), "per-row": (y * factors).sum()}[upstream]

    results = []
    for fn in ("plain", "ours"):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fn == "plain":
            y = plain(h, w, targets) * (1.0 if row_weight is None else row_weight)
        else:
            y = linear_cross_entropy(h, w, targets, row_weight)
        loss = reduce(y)
        grads = torch.autograd.grad(loss, (h, w), retain_graph=True)
        again = torch.autograd.grad(loss, (h, w))
        torch.testing.assert_close(again, grads, rtol=0, atol=0)
        results.append((y.detach(), *grads))
    for ours, reference in zip(results[1], results[0]):
        torch.testing.assert_close(ours, reference, rtol=1e-6, atol=1e-12)
