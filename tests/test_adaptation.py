"""AR -> diffusion adaptation (docs/init_from.md): Dream's shifted prediction (`model.shift_logits`)
and DiffuLLaMA's attention annealing (`training.attention_anneal_steps`).

- the NELBO of a shifted denoiser is still a bound: on a vocabulary and length small enough to
  enumerate, the model's exact likelihood (its any-order reveal process) and the exact NELBO are
  computed and the bound holds for every sequence, and `tdlm eval`'s estimator agrees with it;
- started from an AR model, with the causal attention of annealing's step 0, the shifted denoiser's
  prediction at a masked position with its left context observed is the AR model's next-token one;
- sampling reads each position's logits at that position.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from tdlm.model import annealed_attention
from tdlm.training.step import visible_fraction

V, N = 3, 3


def gen(seed):
    return torch.Generator().manual_seed(seed)


def shifted(build, **kw):
    return build(vocab_size=kw.pop("vocab_size", V), seq_len=kw.pop("seq_len", N), bos_id=kw.pop("bos_id", 1),
                 model={"n_layers": 2, "d_model": 16, "n_heads": 2, "shift_logits": True, **kw.pop("model", {})}, **kw)


def random_weights(net, seed, std=0.6):
    """Far from uniform predictions, so that the bound has a gap and a mismatch shows."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, std)
    return net.eval()


def exact_figures(net, mask_id):
    """For every x in V^N: -log p(x) of the model's own continuous-time reverse process (tokens
    revealed one at a time in a uniformly random order, each from mu at the current canvas), and
    the exact NELBO sum over masks M of -log mu(x_i | x with M masked) / (|M| C(N, |M|)). Both
    read `net(x)`, the logits the samplers read."""
    support = torch.tensor(list(itertools.product(range(V), repeat=N)))
    masks = [m for r in range(1, N + 1) for m in itertools.combinations(range(N), r)]
    canvases = torch.stack([torch.where(torch.isin(torch.arange(N), torch.tensor(m)), mask_id, x)
                            for x in support for m in masks])
    with torch.no_grad():
        logp = torch.log_softmax(net(canvases).double(), -1).view(len(support), len(masks), N, V)
    index = {m: k for k, m in enumerate(masks)}
    nelbo = torch.zeros(len(support), dtype=torch.float64)
    likelihood = torch.zeros(len(support), dtype=torch.float64)
    for s, x in enumerate(support.tolist()):
        for m in masks:
            ce = -sum(logp[s, index[m], i, x[i]] for i in m)
            nelbo[s] += ce / (len(m) * math.comb(N, len(m)))
        for order in itertools.permutations(range(N)):  # reveal order[0] first
            log_prob = 0.0
            for k, i in enumerate(order):
                log_prob += logp[s, index[tuple(sorted(order[k:]))], i, x[i]]
            likelihood[s] += log_prob.exp() / math.factorial(N)
    return support, -likelihood.log(), nelbo, likelihood.sum()


def test_the_nelbo_of_a_shifted_denoiser_bounds_its_exact_nll(build):
    built = shifted(build)
    net = random_weights(built.model.net, seed=3)
    support, nll, nelbo, total = exact_figures(net, built.vocab.mask_id)
    # the denoiser's outputs are proper distributions over the real tokens: the model is one over V^N
    assert abs(total.item() - 1.0) < 1e-9
    assert (nelbo >= nll - 1e-9).all() and (nelbo - nll).max() > 0.05  # a bound, and not a tight one here
    # tdlm's estimator (score: features + head at the masked positions) estimates that very NELBO
    repeats = 8
    scores = built.model.objective.score(net, support.repeat_interleave(repeats, 0), generator=gen(1), t_samples=64)
    estimate = scores.nll.view(-1, repeats).mean(1)
    stderr = (scores.nll_var.view(-1, repeats).sum(1) / repeats**2).sqrt()
    z = (estimate - nelbo) / stderr
    assert z.abs().max() < 4.5, (estimate, nelbo, stderr)


@pytest.fixture(scope="module")
def ar_and_adapted(build):
    """An AR model trained on sequences x_{i+1} = 2 x_i + 1 mod 11 (so its greedy continuation
    depends on the context), and a shifted diffusion model started from its weights."""
    vocab, length = 11, 12
    ar = build(vocab_size=vocab, seq_len=length, bos_id=4, objective="ar", model={"n_layers": 2, "d_model": 16, "n_heads": 2})
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(ar.model.parameters(), lr=1e-2)
    g = gen(0)
    for _ in range(150):
        x0 = torch.randint(0, vocab, (32, 1), generator=g)
        for _ in range(length - 1):
            x0 = torch.cat([x0, (2 * x0[:, -1:] + 1) % vocab], dim=1)
        loss, _ = ar.model(x0, g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ar.model.net.eval()
    adapted = shifted(build, vocab_size=vocab, seq_len=length, bos_id=4)
    adapted.model.net.load_state_dict(ar.model.net.state_dict())  # what training.init_from copies
    adapted.model.net.eval()
    return ar, adapted


def test_started_from_ar_the_shifted_denoiser_predicts_the_next_token_at_step_0(ar_and_adapted):
    ar, adapted = ar_and_adapted
    x0 = torch.randint(0, 11, (6, 12), generator=gen(0))
    mask_id = adapted.vocab.mask_id
    with torch.no_grad():
        expected = torch.log_softmax(ar.model.net(ar.model.objective.shifted_inputs(x0)), -1)  # p(x_j | x_<j)
        for j in (0, 1, 5, 11):
            # position j and a random half of those after it masked; everything before j observed
            later = torch.rand(6, 12, generator=gen(j)) < 0.5
            masked = (torch.arange(12) == j) | (later & (torch.arange(12) > j))
            xt = torch.where(masked, mask_id, x0)
            with annealed_attention(adapted.model.net, visible_fraction(0, 300)):  # the trainer's step 0
                got = torch.log_softmax(adapted.model.net(xt), -1)
            torch.testing.assert_close(got[:, j], expected[:, j], atol=1e-5, rtol=0)
            # with the full attention the model ends with, the masked canvas to the right counts too
            full = torch.log_softmax(adapted.model.net(xt), -1)
            assert (full[:, j] - expected[:, j]).abs().max() > 1e-3


def test_sampling_a_shifted_model_reads_each_positions_own_logits(ar_and_adapted, registry):
    """One position at a time, left to right, argmax: the adapted model under causal attention
    writes exactly the AR model's greedy continuation."""
    from tdlm.components import build_component

    ar, adapted = ar_and_adapted
    canvas = torch.full((4, 12), adapted.vocab.mask_id)
    canvas[:, :3] = torch.randint(0, 11, (4, 3), generator=gen(2))
    greedy_cls = registry.get("sampler", "ar").cls
    greedy = build_component(greedy_cls, greedy_cls.Config(top_k=1), objective=ar.model.objective, vocab=ar.vocab,
                             context=None)
    expected = greedy.sample(ar.model.net, canvas.clone(), gen(0)).tokens
    semi_cls = registry.get("sampler", "semi-ar").cls
    options = semi_cls.Config.model_validate({"block": 1, "inner": "confidence", "inner_options": {"steps": 1}},
                                             context={"registry": registry})
    left_to_right = build_component(semi_cls, options, objective=adapted.model.objective, vocab=adapted.vocab,
                                    context=None)
    with annealed_attention(adapted.model.net, 0.0):
        got = left_to_right.sample(adapted.model.net, canvas.clone(), gen(0)).tokens
    assert torch.equal(got, expected)
    assert not torch.equal(expected[:, 3:], torch.roll(expected, -1, 1)[:, 3:])  # the check can tell a shift


def test_annealing_opens_the_attention_from_causal_to_full(build):
    assert [visible_fraction(s, 100) for s in (0, 25, 100, 400)] == [0.0, 0.25, 1.0, 1.0]
    assert visible_fraction(0, 0) == 1.0  # off: full attention from the start
    net = shifted(build, seq_len=63).model.net
    length = 64  # 63 tokens and the BOS slot
    net.attention_override = (0.25, gen(0))
    visible = net._visible(length, "cpu")
    net.attention_override = None
    below = torch.ones(length, length, dtype=torch.bool).tril()
    assert visible[below].all()  # every position sees itself and the ones before it
    share = visible[~below].float().mean().item()
    assert abs(share - 0.25) < 0.03, share
    x = torch.randint(0, V, (2, 63), generator=gen(1))
    with torch.no_grad():
        plain = net(x)
        with annealed_attention(net, 1.0):  # after the annealing: the network's own, full attention
            torch.testing.assert_close(net(x), plain)
        with annealed_attention(net, 0.25, gen(2)):
            assert not torch.allclose(net(x), plain)
        torch.testing.assert_close(net(x), plain)  # evaluation after a training step: full attention again


def test_the_first_position_is_predicted_from_the_bos_slot(build):
    """Position 0 has no slot before it in x: it reads a BOS slot, as the AR model's first prediction did."""
    net = random_weights(shifted(build, seq_len=5, bos_id=2).model.net, seed=1)
    x = torch.randint(0, V, (3, 5), generator=gen(4))
    with torch.no_grad(), annealed_attention(net, 0.0):
        first = net(x)[:, 0]
        other = x.clone()
        other[:, 0] = (x[:, 0] + 1) % V  # under causal attention position 0 sees only the BOS slot
        torch.testing.assert_close(net(other)[:, 0], first)
        assert net(x).shape == (3, 5, V)
