"""State-dependent masking (GenMD4) against docs/maths.md section 3.

Checks: equal weights reduce it to uniform masking (same draws, same loss); the NELBO terms' closed
forms; the RLOO gradient of the learned weights is unbiased (against an exact enumeration of the
mask patterns); the learned weights move the way theory predicts on a toy; a trained model's bound
stays above the data entropy; the reverse step; the ancestral sampler runs with it.
"""

import itertools
import math

import numpy as np
import pytest
import torch

from nets import ZeroLogits
from tdlm.components import VocabInfo
from tdlm.head import Denoised
from tdlm.model import ModelConfig, Transformer
from tdlm.builtins.objectives.diffusion import DiffusionObjective
from tdlm.builtins.schedules import CosineSchedule, LinearSchedule, PolynomialSchedule
from tdlm.builtins.corruptions.state_dependent import StateDependentMasking, frequency_weights
from tdlm.builtins.corruptions.uniform import UniformMasking



def gen(seed):
    return torch.Generator().manual_seed(seed)


def vocab_info(size, counts=None):
    return VocabInfo(size=size, mask_id=size, bos_id=0, token_counts=counts)


def state_dependent(vocab, schedule=None, **options):
    schedule = schedule or LinearSchedule(LinearSchedule.Config())
    return StateDependentMasking(StateDependentMasking.Config(**options), schedule=schedule, vocab=vocab)


def objective_of(corruption, vocab):
    # scores under the corruption's own schedule, so uniform and state-dependent share their draws
    config = DiffusionObjective.Config(eval_schedule="recipe")
    return DiffusionObjective(config, corruption=corruption, vocab=vocab)


def set_weights(corruption, w):
    """Give a learned corruption the weights w [V]."""
    with torch.no_grad():
        corruption.param.copy_(w + torch.log(-torch.expm1(-w)))
    torch.testing.assert_close(corruption.token_weights(), w.float())


def random_net(vocab_size, length, seed=0):
    """A fixed random Transformer with large weights, so predictions depend on what is masked."""
    torch.manual_seed(seed)
    cfg = ModelConfig(n_layers=1, d_model=32, n_heads=2)
    net = Transformer(cfg, vocab_size=vocab_size, max_len=length, causal=False)
    with torch.no_grad():
        net.tok_emb.weight.normal_(std=1.0)
        net.head.weight.normal_(std=0.3)
    return net.eval()


# --- equal weights: uniform masking --------------------------------------------------------------


@pytest.mark.parametrize("value, uniform_schedule", [(1.0, LinearSchedule), (2.0, PolynomialSchedule)])
def test_constant_weights_are_uniform_masking_on_the_same_draws(value, uniform_schedule):
    """w_v = 1 is uniform masking with alpha = 1 - t; w_v = 2 is uniform masking with alpha = 1 - t^2.
    Same generator, same masks, same loss and the same evaluation score."""
    V, N = 20, 16
    vocab = vocab_info(V)
    ours = objective_of(state_dependent(vocab, weights="constant", value=value), vocab)
    schedule = uniform_schedule(uniform_schedule.Config(**({"exponent": value} if value != 1.0 else {})))
    theirs = objective_of(UniformMasking(UniformMasking.Config(), schedule=schedule, vocab=vocab), vocab)
    net = random_net(V, N)
    x0 = torch.randint(0, V, (32, N), generator=gen(0))
    t = torch.rand(32, generator=gen(1)) * 0.98 + 0.01
    xt_ours, xt_theirs = ours.corruption.corrupt(x0, t, gen(2)), theirs.corruption.corrupt(x0, t, gen(2))
    assert torch.equal(xt_ours, xt_theirs)
    masked = xt_ours == vocab.mask_id
    assert 0.2 < masked.float().mean() < 0.8
    denoised = Denoised(net, xt_ours, vocab.mask_id)
    torch.testing.assert_close(
        ours.corruption.nelbo_terms(denoised, x0, xt_ours, t), theirs.corruption.nelbo_terms(denoised, x0, xt_ours, t)
    )
    (loss_ours, _), (loss_theirs, _) = ours.loss(net, x0, gen(3)), theirs.loss(net, x0, gen(3))
    torch.testing.assert_close(loss_ours, loss_theirs)
    score_ours = ours.score(net, x0, generator=gen(4), t_samples=4)
    score_theirs = theirs.score(net, x0, generator=gen(4), t_samples=4)
    torch.testing.assert_close(score_ours.nll, score_theirs.nll)


@pytest.mark.parametrize("w", [0.3, 1.0, 2.5])
def test_equal_weights_reduce_the_terms_to_w_r_t_times_ce(w):
    """-(w/t)(log mu(x0) + 1) + sum_v (w/t) mu(v) = (w/t) * -log mu(x0) exactly, as sum_v mu(v) = 1."""
    V, N = 30, 12
    vocab = vocab_info(V)
    corruption = state_dependent(vocab, weights="constant", value=w)
    logits = 3 * torch.randn(8, N, V, generator=gen(0))
    x0 = torch.randint(0, V, (8, N), generator=gen(1))
    xt = torch.where(torch.rand(8, N, generator=gen(2)) < 0.5, vocab.mask_id, x0)
    t = torch.linspace(0.05, 1.0, 8)
    ce = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x0.flatten(), reduction="none").view(8, N)
    expected = (w / t)[:, None] * ce * (xt == vocab.mask_id)
    got = corruption.nelbo_terms(Denoised.from_logits(logits, xt, vocab.mask_id), x0, xt, t)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_learned_equal_weights_average_two_uniform_draws():
    """Learned weights draw x_t twice at the same t and train on the mean; the RLOO surrogate
    changes the gradient only, so with all w_v = 1 the loss is uniform masking's on the same two draws."""
    V, N, B = 20, 16, 32
    vocab = vocab_info(V)
    learned = objective_of(state_dependent(vocab, weights="learned", value=1.0), vocab)
    uniform = UniformMasking(UniformMasking.Config(), schedule=LinearSchedule(LinearSchedule.Config()), vocab=vocab)
    net = random_net(V, N)
    x0 = torch.randint(0, V, (B, N), generator=gen(0))
    t = torch.rand(B, generator=gen(1)) * 0.98 + 0.01
    g = gen(2)
    denoise = learned.denoiser(net)
    draws = [uniform.training_terms(denoise, x0, t, g) for _ in range(2)]
    expected = 0.5 * (draws[0] + draws[1])
    got = learned.corruption.training_terms(denoise, x0, t, gen(2))
    torch.testing.assert_close(got.sum(-1), expected.sum(-1), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(draws[0].sum(-1), draws[1].sum(-1))  # two different draws


# --- the bound with unequal weights ------------------------------------------------------------


def test_uniform_predictions_give_the_closed_form_bound():
    """With mu = 1/V, a position holding token k contributes integral_0^1 t^{w_k} [(w_k/t)(ln V - 1)
    + mean(w)/t] dt = ln V - 1 + mean(w) / w_k. That is >= the NLL of the reverse process it
    bounds, whose final token is drawn with probability w_v / sum(w): log(sum(w) / w_k)."""
    V, N, B = 6, 8, 256
    vocab = vocab_info(V)
    corruption = state_dependent(vocab, weights="learned")
    w = torch.tensor([1.0, 1.3, 1.8, 2.5, 3.5, 5.0])  # w >= 1: finite-variance estimates (see the plugin)
    set_weights(corruption, w)
    objective = objective_of(corruption, vocab)
    x0 = torch.randint(0, V, (B, N), generator=gen(0))
    scores = objective.score(ZeroLogits(V), x0, generator=gen(1), t_samples=64)
    estimate, stderr = scores.nll.sum().item(), scores.nll_var.sum().sqrt().item()
    wd = w.double()
    exact = (math.log(V) - 1 + wd.mean() / wd[x0]).sum().item()
    assert abs(estimate - exact) < 4 * stderr and stderr < 0.01 * exact
    nll_of_sampler = torch.log(wd.sum() / wd[x0]).sum().item()
    assert exact > nll_of_sampler + 10 * stderr
    assert abs(exact - B * N * math.log(V)) > 10 * stderr  # unequal weights: not ln V any more


def test_frequency_weights_mask_frequent_tokens_first():
    counts = np.array([1000, 100, 10, 1, 0])
    w = frequency_weights(counts)
    assert (w.diff() > 0).all()  # rarer tokens: larger w, still clean later
    assert w[0].item() == 1.0  # the most frequent token masks like `linear`, the others later
    smoothed = (counts + 1) / (counts.sum() + len(counts))
    torch.testing.assert_close(w, torch.from_numpy(np.log(smoothed) / np.log(smoothed[0])).float())
    vocab = vocab_info(5, counts)
    corruption = state_dependent(vocab, weights="frequency")
    torch.testing.assert_close(corruption.token_weights(), w)
    assert "fixed" in corruption.state_dict()  # data-derived: saved with the checkpoint
    assert list(corruption.parameters()) == []
    learned = state_dependent(vocab, weights="learned", init="frequency")
    torch.testing.assert_close(learned.token_weights(), w)
    assert list(learned.state_dict()) == ["param"]
    assert list(state_dependent(vocab, weights="constant").state_dict()) == []
    # frequent tokens are masked first: at t = 0.5 the most frequent is the likeliest to be masked
    probs_masked = corruption.mask_probs(torch.arange(5)[None], torch.tensor([0.5]))[0]
    assert (probs_masked.diff() < 0).all()


def test_frequency_weights_need_counts():
    with pytest.raises(ValueError, match="token_counts"):
        state_dependent(vocab_info(5), weights="frequency")
    with pytest.raises(ValueError, match="token_counts"):
        state_dependent(vocab_info(5), weights="learned", init="frequency")
    with pytest.raises(ValueError, match="entries"):
        state_dependent(vocab_info(5, np.ones(4)), weights="frequency")
    with pytest.raises(ValueError, match="learned"):
        StateDependentMasking.Config(weights="constant", init="frequency")
    state_dependent(vocab_info(5), weights="constant")  # constant weights need no counts


# --- the RLOO gradient of the learned weights ---------------------------------------------------


@pytest.mark.parametrize("schedule", [LinearSchedule, CosineSchedule])
def test_rloo_gradient_of_the_weights_is_unbiased(schedule):
    """The exact gradient of E_{x_t ~ q_w}[L(x_t; w)] at a fixed t, by enumerating all 2^N mask
    patterns, against the mean of many RLOO estimates. Dropping the score-function part (or the
    log(1 - u^w) of the clean positions in log q) is off by many standard errors."""
    V, N, t_value = 5, 3, 0.6
    vocab = vocab_info(V)
    corruption = state_dependent(vocab, schedule(schedule.Config()), weights="learned")
    set_weights(corruption, torch.tensor([0.5, 0.8, 1.2, 2.0, 1.0]))
    net = random_net(V, N, seed=1)
    for p in net.parameters():
        p.requires_grad_(False)
    mask_id = vocab.mask_id
    denoise = lambda xt: Denoised(net, xt, mask_id)  # noqa: E731
    x0 = torch.tensor([[0, 3, 1]])
    t = torch.tensor([t_value])

    def exact_gradient(score_function=True):
        patterns = torch.tensor(list(itertools.product([False, True], repeat=N)))  # [2^N, N]
        xt = torch.where(patterns, vocab.mask_id, x0)
        x0s, ts = x0.expand(len(xt), N), t.expand(len(xt))
        losses = corruption.nelbo_terms(Denoised(net, xt, mask_id), x0s, xt, ts).sum(-1)
        q = corruption.mask_probs(x0s, ts)
        if not score_function:
            q = q.detach()
        probs = torch.where(patterns, q, 1.0 - q).prod(-1)
        assert probs.sum().item() == pytest.approx(1.0, abs=1e-6)
        (grad,) = torch.autograd.grad((probs * losses).sum(), corruption.param)
        return grad.double()

    def estimates(repeats, batch):
        grads = []
        for seed in range(repeats):
            terms = corruption.training_terms(denoise, x0.expand(batch, N), t.expand(batch), gen(seed))
            (grad,) = torch.autograd.grad(terms.sum() / batch, corruption.param)
            grads.append(grad.double())
        grads = torch.stack(grads)
        return grads.mean(0), grads.std(0) / math.sqrt(repeats)

    exact = exact_gradient()
    mean, stderr = estimates(repeats=12, batch=512)
    z = (mean - exact) / stderr
    assert z.abs().max() < 4.5, (mean, exact, stderr)
    assert (exact.abs() > 10 * stderr).sum() >= 3  # the estimate is precise enough to mean something
    pathwise_only = exact_gradient(score_function=False)
    assert ((pathwise_only - exact).abs() / stderr).max() > 10

    # log q without the clean positions' log(1 - u^w): a biased gradient, and the test sees it
    masked_only = corruption.log_q
    corruption.log_q = lambda x0, xt, t: torch.where(
        xt == vocab.mask_id, corruption.token_weights()[x0] * corruption._log_mask_rate(t).float()[:, None], 0.0
    ).sum(-1)
    try:
        biased, _ = estimates(repeats=12, batch=512)
    finally:
        corruption.log_q = masked_only
    assert ((biased - exact).abs() / stderr).max() > 10


# --- learning the weights on a toy --------------------------------------------------------------

K, PAIRS = 4, 4  # tokens 0..K-1 unpredictable, K..2K-1 their copies


def pair_data(batch, generator):
    """Sequences u_1, u_1 + K, u_2, u_2 + K, ... with u_i uniform on 0..K-1: entropy PAIRS ln K."""
    u = torch.randint(0, K, (batch, PAIRS), generator=generator)
    return torch.stack([u, u + K], dim=-1).flatten(1)


@pytest.fixture(scope="module")
def trained_pairs():
    """A left-to-right (causal) Transformer trained with learned weights on `pair_data`.

    The copy u_i + K is predictable from the token just left of it; u_i is not predictable from
    anything the model can see (everything left of it is independent of it). For the NELBO, the
    reverse process should then reveal u_i before its copy: P(copy is masked before u_i in the
    forward process) = w_u / (w_u + w_copy), so minimising the bound raises w of the unpredictable
    tokens and lowers w of the predictable copies (masked first, decoded last, from context).
    (A bidirectional model sees both directions: u_i and its copy predict each other, and theory
    predicts no preference.)
    """
    torch.manual_seed(0)
    V, N = 2 * K, 2 * PAIRS
    vocab = vocab_info(V)
    corruption = state_dependent(vocab, weights="learned", value=1.0)
    objective = objective_of(corruption, vocab)
    net = Transformer(ModelConfig(n_layers=1, d_model=32, n_heads=4), vocab_size=V, max_len=N, causal=True)
    optimizer = torch.optim.Adam(
        [{"params": net.parameters(), "lr": 3e-3}, {"params": corruption.parameters(), "lr": 0.03}]
    )
    g = gen(0)
    init_x0 = pair_data(256, gen(100))
    init = objective.score(net, init_x0, generator=gen(101), t_samples=8).nll.mean().item()
    for _ in range(120):
        loss, _ = objective.loss(net, pair_data(64, g), g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    net.eval()
    return dict(net=net, objective=objective, corruption=corruption, init=init)


def test_learned_weights_favour_revealing_unpredictable_tokens_first(trained_pairs):
    w = trained_pairs["corruption"].token_weights().detach()
    unpredictable, predictable = w[:K], w[K:]
    assert unpredictable.min() > predictable.max(), w
    assert unpredictable.log().mean() - predictable.log().mean() > 0.3, w


def test_trained_nelbo_is_never_below_the_data_entropy(trained_pairs):
    objective, net = trained_pairs["objective"], trained_pairs["net"]
    x0 = pair_data(512, gen(7))
    scores = objective.score(net, x0, generator=gen(8), t_samples=16)
    nelbo = scores.nll.mean().item()
    stderr = (scores.nll.var() / len(x0) + scores.nll_var.mean() / len(x0)).sqrt().item()
    entropy = PAIRS * math.log(K)
    assert nelbo >= entropy - 3 * stderr, (nelbo, stderr, entropy)
    assert nelbo < entropy + 0.5 * (trained_pairs["init"] - entropy)  # training did something


# --- the reverse process -------------------------------------------------------------------------


def test_reverse_step_matches_the_formula_and_sums_to_at_most_one():
    V, N, B = 7, 5, 4
    vocab = vocab_info(V)
    corruption = state_dependent(vocab, weights="learned")
    w = torch.tensor([0.2, 0.5, 1.0, 1.0, 1.7, 3.0, 6.0])
    set_weights(corruption, w)
    probs = torch.softmax(torch.randn(B, N, V, generator=gen(0), dtype=torch.float64), -1)
    xt = torch.full((B, N), vocab.mask_id)
    t = torch.tensor([1.0, 0.8, 0.5, 0.3], dtype=torch.float64)
    s = torch.tensor([0.9, 0.4, 0.0, 0.29], dtype=torch.float64)
    got = corruption.reverse_unmask_probs(probs, xt, t, s)
    alpha = lambda tt: 1.0 - tt[:, None] ** w.double()  # noqa: E731 - alpha_{t,v} = 1 - t^{w_v}
    expected = probs * ((alpha(s) - alpha(t)) / (1.0 - alpha(t)))[:, None, :]
    torch.testing.assert_close(got, expected)
    total = got.sum(-1)
    assert (total <= 1.0 + 1e-12).all() and (total >= 0).all()
    torch.testing.assert_close(total[2], torch.ones(N, dtype=torch.float64))  # s = 0: all unmask
    # over a grid the steps compose to the forward marginal: masked at s with probability s^{w_v}
    grid = torch.linspace(1.0, 0.25, 6, dtype=torch.float64)
    stay = torch.ones(V, dtype=torch.float64)
    one_hot = torch.eye(V, dtype=torch.float64)[None]  # mu = delta_v at position v
    for a, b in zip(grid[:-1], grid[1:]):
        step = corruption.reverse_unmask_probs(one_hot, torch.full((1, V), vocab.mask_id), a[None], b[None])
        stay = stay * (1.0 - step[0].diagonal())
    torch.testing.assert_close(stay, 0.25 ** w.double())


def test_ancestral_sampler_runs_with_it(build):
    sampler = {"name": "ancestral", "steps": 8}
    built = build(vocab_size=12, seq_len=10, corruption={"name": "state-dependent"}, sampler=sampler)
    assert isinstance(built.model.objective.corruption, StateDependentMasking)
    set_weights(built.model.objective.corruption, torch.linspace(0.3, 3.0, 12))
    net = built.model.net.eval()
    canvas = torch.full((4, 10), built.vocab.mask_id)
    canvas[:, :3] = torch.tensor([1, 2, 3])
    out = built.sampler.sample(net, canvas, gen(0))
    assert out.tokens.shape == (4, 10) and (out.tokens < 12).all() and (out.tokens >= 0).all()
    assert torch.equal(out.tokens[:, :3], canvas[:, :3])
    assert 1 <= out.nfe <= 8


def test_recipe_section_builds_it(build):
    section = {"name": "state-dependent", "weights": "constant", "value": 2.0}
    built = build(vocab_size=12, seq_len=10, corruption=section)
    corruption = built.model.objective.corruption
    torch.testing.assert_close(corruption.token_weights(), torch.full((12,), 2.0))
    assert "corruption.param" not in dict(built.model.named_parameters())
    learned = build(vocab_size=12, seq_len=10, corruption="state-dependent").model
    assert "objective.corruption.param" in dict(learned.named_parameters())  # trained with the model


# --- recipes and runs ------------------------------------------------------------------------------


def test_a_run_trains_evaluates_and_samples(tmp_path, monkeypatch):
    """End to end through the CLI: learned weights initialised from the train split's counts,
    saved with the checkpoint and loaded back for `tdlm eval` and `tdlm sample`."""
    import json

    from click.testing import CliRunner
    from safetensors.torch import load_file
    from toydata import toy_recipe, write_toy_corpus

    from tdlm.cli import cli

    monkeypatch.setenv("TDLM_CACHE_DIR", str(tmp_path / "cache"))
    corpus = write_toy_corpus(tmp_path / "toy")
    extra = '[corruption]\nname = "state-dependent"\nweights = "learned"\ninit = "frequency"\n'
    recipe = toy_recipe(tmp_path / "r.toml", corpus, tmp_path / "runs", extra=extra)
    result = CliRunner().invoke(cli, ["run", str(recipe)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    run_dir = tmp_path / "runs" / "r"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["test"]["is_bound"]
    evaluated = CliRunner().invoke(cli, ["eval", str(run_dir), "--split", "test", "--json", "--t-samples", "2"])
    assert evaluated.exit_code == 0, evaluated.output
    assert math.isfinite(json.loads(evaluated.stdout)["nll_per_token"])
    sample_args = ["sample", str(run_dir), "--num", "2", "--length", "12", "--json", "--option", "steps=6"]
    sampled = CliRunner().invoke(cli, sample_args)
    assert sampled.exit_code == 0, sampled.output
    assert len(json.loads(sampled.stdout)["samples"]) == 2
    saved = [load_file(path) for path in run_dir.rglob("model.safetensors")]
    assert saved
    w = torch.nn.functional.softplus(saved[0]["objective.corruption.param"])
    assert torch.isfinite(w).all() and w.min() > 0.5 and w.max() > 1.5  # frequency-shaped, min about 1
