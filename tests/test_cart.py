"""CART context-adaptive weighting (docs/maths.md section 4): the weights, and that only training changes."""

import pytest
import torch

from tdlm.components import VocabInfo
from tdlm.head import Denoised
from tdlm.model import ModelConfig, Transformer
from tdlm.builtins.corruptions.cart import CARTMasking, cart_kernel, cart_weights
from tdlm.builtins.objectives.diffusion import DiffusionObjective
from tdlm.builtins.schedules import CosineSchedule, LinearSchedule
from tdlm.builtins.corruptions.uniform import UniformMasking


V, N = 20, 12
VOCAB = VocabInfo(size=V, mask_id=V, bos_id=0)


def gen(seed):
    return torch.Generator().manual_seed(seed)


def objective(corruption_cls, schedule_cls=LinearSchedule, **options):
    schedule = schedule_cls(schedule_cls.Config())
    corruption = corruption_cls(corruption_cls.Config(**options), schedule=schedule, vocab=VOCAB)
    return DiffusionObjective(DiffusionObjective.Config(), corruption=corruption, vocab=VOCAB)


def random_net(seed=0):
    torch.manual_seed(seed)
    net = Transformer(ModelConfig(n_layers=1, d_model=32, n_heads=2), vocab_size=V, max_len=N, causal=False)
    with torch.no_grad():
        net.tok_emb.weight.normal_(std=1.0)
        net.head.weight.normal_(std=0.3)
    return net.eval()


def test_weights_match_a_hand_computed_example():
    # positions 0 1 2 3 4 = masked, clean, masked, masked, clean; p = 0.3
    masked = torch.tensor([[True, False, True, True, False]])
    c = cart_weights(masked, 0.3)
    # n = 0: clean i = 1 (|n-i| = 1) and i = 4 (4): 0.5 * (0.3 + 0.3 * 0.7^3)
    # n = 2: i = 1 (1), i = 4 (2): 0.5 * (0.3 + 0.3 * 0.7); n = 3 likewise (2 and 1)
    expected = torch.tensor([0.5 * (0.3 + 0.3 * 0.7**3), 0.5 * (0.3 + 0.3 * 0.7), 0.5 * (0.3 + 0.3 * 0.7)])
    torch.testing.assert_close(c[0, [0, 2, 3]], expected)
    assert cart_weights(torch.ones(1, 5, dtype=torch.bool), 0.3).abs().max() == 0  # no clean context
    # p = 1: only the two neighbours count, 0.5 each
    torch.testing.assert_close(cart_weights(masked, 1.0)[0, [0, 2, 3]], torch.tensor([0.5, 0.5, 0.5]))


def test_weights_match_the_definition_on_random_masks():
    p = 0.3
    masked = torch.rand(16, N, generator=gen(0)) < 0.6
    c = cart_weights(masked, p)
    for b in range(16):
        for n in range(N):
            reference = 0.5 * sum(p * (1 - p) ** (abs(n - i) - 1) for i in range(N) if i != n and not masked[b, i])
            assert c[b, n].item() == pytest.approx(reference, rel=1e-6, abs=1e-7)
    kernel = cart_kernel(N, p)
    assert torch.equal(kernel, kernel.T) and kernel.diagonal().abs().max() == 0
    assert (c <= 1.0).all()  # at most 0.5 * 2 * sum_k p (1-p)^k = 1


def test_training_terms_are_cart_weighted_masked_ce():
    cart = objective(CARTMasking).corruption
    net = random_net()
    x0 = torch.randint(0, V, (32, N), generator=gen(1))
    t = torch.rand(32, generator=gen(2)) * 0.98 + 0.01
    terms = cart.training_terms(lambda xt: Denoised(net, xt, VOCAB.mask_id), x0, t, gen(3))
    xt = cart.corrupt(x0, t, gen(3))  # the same draw
    masked = xt == VOCAB.mask_id
    ce = torch.nn.functional.cross_entropy(net(xt).flatten(0, 1), x0.flatten(), reduction="none").view_as(masked)
    expected = cart_weights(masked, 0.3) * ce * masked
    torch.testing.assert_close(terms, expected)
    assert (terms[~masked] == 0).all() and (terms[masked] >= 0).all() and (terms[masked] > 0).any()
    all_masked = masked.all(-1)  # no clean context anywhere: weight 0, whatever the CE
    assert all_masked.any() and (terms[all_masked] == 0).all()


@pytest.mark.parametrize("schedule", [LinearSchedule, CosineSchedule])
def test_eval_is_uniforms_and_training_loss_is_not(schedule):
    """objective.score (what `tdlm eval` reports) is the uniform NELBO, bit for bit; the loss is not."""
    net = random_net()
    x0 = torch.randint(0, V, (16, N), generator=gen(4))
    cart, uniform = objective(CARTMasking, schedule), objective(UniformMasking, schedule)
    scores_cart = cart.score(net, x0, generator=gen(5), t_samples=8)
    scores_uniform = uniform.score(net, x0, generator=gen(5), t_samples=8)
    assert scores_cart.is_bound
    assert torch.equal(scores_cart.nll, scores_uniform.nll) and torch.equal(scores_cart.nll_var, scores_uniform.nll_var)
    (loss_cart, stats_cart), (loss_uniform, _) = cart.loss(net, x0, gen(6)), uniform.loss(net, x0, gen(6))
    assert stats_cart["bucket_count"].sum() == 16
    # same masks, weights c_n <= 1 instead of w(t) >= 1: a much smaller loss
    assert loss_cart.item() < 0.5 * loss_uniform.item()
    assert loss_cart.item() > 0


def test_p_changes_the_loss_and_gets_gradients():
    net = random_net()
    x0 = torch.randint(0, V, (16, N), generator=gen(7))
    loss_a, _ = objective(CARTMasking, p=0.3).loss(net, x0, gen(8))
    loss_b, _ = objective(CARTMasking, p=0.9).loss(net, x0, gen(8))
    assert loss_a.item() != pytest.approx(loss_b.item(), rel=1e-3)
    net.train()
    loss_a.backward()
    assert net.head.weight.grad is not None and net.head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError):
        CARTMasking.Config(p=0.0)


def test_recipe_section_builds_it_and_the_sampler_runs(build):
    sampler = {"name": "ancestral", "steps": 4}
    built = build(vocab_size=12, seq_len=10, corruption={"name": "cart", "p": 0.5}, sampler=sampler)
    corruption = built.model.objective.corruption
    assert isinstance(corruption, CARTMasking) and corruption.config.p == 0.5
    out = built.sampler.sample(built.model.net.eval(), torch.full((2, 10), built.vocab.mask_id), gen(0))
    assert out.tokens.shape == (2, 10) and (out.tokens < 12).all()
