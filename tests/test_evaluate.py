"""The reported numbers: tokens, bytes, bits per byte, standard errors and perplexity, checked
against hand computations (no training); a sharded evaluation equals the unsharded one.

A stand-in objective returns known per-sequence NLLs, so every figure can be computed here
from the packed sequences alone; the real objectives, on a fixed network, check the sharding.
"""

from __future__ import annotations

import math
import threading

import pytest
import torch
from torch import nn

from tdlm.components import SequenceScores
from tdlm.data import pack
from tdlm.data.corpus import Corpus
from tdlm.data.tokenizer import trained_bpe_vocab
from tdlm.evaluate import evaluate, format_result
from tdlm.lm import LanguageModel


# 10 full sequences of 5 and a tail of 3: with batch_size 3 that is 4 batches plus the tail, so
# 2 and 3 processes both get a padded last round.
STREAM = torch.arange(53) % 17
SEQ_LEN, BATCH_SIZE = 5, 3


class KnownScores(nn.Module):
    """Sequence x's NLL is sum(x) / 100 + per_token * len(x) nats, its Monte Carlo variance
    (sum(x) / 1000)^2: known by hand, unequal across sequences and a function of x alone."""

    def __init__(self, per_token: float = 0.5):
        super().__init__()
        self.per_token = per_token

    def score(self, net, x0, *, generator, t_samples):
        sums = x0.double().sum(-1)
        return SequenceScores(nll=sums / 100 + self.per_token * x0.shape[1], is_bound=True,
                              nll_var=(sums / 1000) ** 2)


def known_model(per_token: float = 0.5) -> LanguageModel:
    return LanguageModel(nn.Identity(), KnownScores(per_token))


def packed(stream=STREAM):
    """pack()'s sequences and tail, and every sequence as a list (the tail last) for the sums."""
    sequences, tail = pack(stream.numpy(), SEQ_LEN)
    return sequences, tail, [*sequences.tolist(), tail.tolist()]


def run_evaluate(model, sequences, tail, **kwargs) -> dict:
    kwargs.setdefault("num_bytes", torch.numel)  # one byte per token unless a test says otherwise
    return evaluate(model, sequences, tail, batch_size=BATCH_SIZE, **kwargs)


def ratio_stderr(totals: list[float], counts: list[int]) -> float:
    """sqrt(n / (n - 1) * sum_i (L_i - nll * c_i)^2) / sum_i c_i, written out."""
    n, tokens = len(totals), sum(counts)
    nll = sum(totals) / tokens
    return math.sqrt(n / (n - 1) * sum((total - nll * count) ** 2 for total, count in zip(totals, counts))) / tokens


def test_every_token_of_the_split_is_scored_once_tail_included():
    sequences, tail, rows = packed()
    assert len(rows[-1]) == 3  # the tail is a real, shorter sequence
    result = run_evaluate(known_model(), sequences, tail)
    assert result["tokens"] == len(STREAM) and result["sequences"] == 11
    assert result["bytes"] == len(STREAM)
    assert result["nll_per_token"] == pytest.approx(sum(sum(r) / 100 + 0.5 * len(r) for r in rows) / len(STREAM),
                                                    rel=1e-14)


def test_without_a_tail_every_sequence_is_full():
    sequences, tail = pack(STREAM[:50].numpy(), SEQ_LEN)
    assert tail is None
    assert run_evaluate(known_model(), sequences, tail)["tokens"] == 50


def test_stderr_is_the_ratio_estimator_s_by_hand():
    sequences, tail, rows = packed()
    totals = [sum(r) / 100 + 0.5 * len(r) for r in rows]
    result = run_evaluate(known_model(), sequences, tail)
    assert result["stderr"] == pytest.approx(ratio_stderr(totals, [len(r) for r in rows]), rel=1e-12)


def test_mc_stderr_sums_the_sequences_monte_carlo_variances():
    sequences, tail, rows = packed()
    mc_variances = [(sum(r) / 1000) ** 2 for r in rows]
    result = run_evaluate(known_model(), sequences, tail)
    assert result["mc_stderr"] == pytest.approx(math.sqrt(sum(mc_variances)) / len(STREAM), rel=1e-12)


def test_bits_per_byte_divides_the_nats_by_the_bytes_of_the_scored_text(tmp_path):
    """The real byte count (Corpus.num_bytes, from the tokenizer's token lengths) of a text
    whose UTF-8 size is known: multi-byte characters, and a tail."""
    (tmp_path / "train.txt").write_text("the cat sees a dog .\nthe dog sees a cat .\n" * 20)
    vocab = trained_bpe_vocab(tmp_path / "train.txt", 300, cache_dir=tmp_path / "cache")
    text = "Zoë's café: 3 €, naïve 🙂 — ok.\nthe cat sees a dog .\n"
    assert len(text) == 52 and len(text.encode("utf-8")) == 62  # ë é ï: 2 bytes, € —: 3, 🙂: 4
    stream = torch.tensor(vocab.encode(text))
    corpus = Corpus(vocab, {"valid": stream.numpy()})
    sequences, tail, rows = packed(stream)
    assert tail is not None
    result = run_evaluate(known_model(), sequences, tail, num_bytes=corpus.num_bytes)
    assert result["bytes"] == 62 and result["tokens"] == len(stream)
    nats = sum(sum(r) / 100 + 0.5 * len(r) for r in rows)
    assert result["bits_per_byte"] == pytest.approx(nats / (math.log(2) * 62), rel=1e-14)


def test_perplexity_and_its_interval_follow_from_the_nll_and_stderr():
    sequences, tail, _ = packed()
    result = run_evaluate(known_model(), sequences, tail)
    nll, stderr = result["nll_per_token"], result["stderr"]
    assert stderr > 0
    assert result["ppl"] == math.exp(nll)
    assert result["ppl_ci95"] == [math.exp(nll - 1.96 * stderr), math.exp(nll + 1.96 * stderr)]
    assert "ppl" in format_result(result) and "± " in format_result(result)


def test_one_sequence_has_an_unknown_stderr_never_a_certain_looking_0():
    """The data error is measured from the spread between sequences: one sequence has none."""
    sequences, _, _ = packed()
    result = run_evaluate(known_model(), sequences[:1], None)
    assert result["sequences"] == 1 and result["stderr"] is None and result["ppl_ci95"] is None
    assert result["mc_stderr"] > 0  # the Monte Carlo part alone is still known
    text = format_result(result)
    assert "± ?" in text and "stderr unknown: 1 sequence(s) scored" in text and "95% CI" not in text
    two = run_evaluate(known_model(), sequences[:2], None)
    assert two["stderr"] > 0 and len(two["ppl_ci95"]) == 2


def test_an_overflowing_perplexity_is_inf_not_an_error():
    sequences, tail, _ = packed()
    result = run_evaluate(known_model(per_token=1000.0), sequences, tail)
    assert result["nll_per_token"] > 1000
    assert result["ppl"] == math.inf and result["ppl_ci95"][1] == math.inf
    assert "ppl <= inf" in format_result(result)


# -- sharding ---------------------------------------------------------------------------------
def simulate_shards(world_size: int, score) -> list[dict]:
    """`score(shard, all_reduce_sum)` run by `world_size` threads, one per simulated process,
    with an all-reduce that sums what every process passed to its i-th call."""
    barrier = threading.Barrier(world_size, timeout=60)
    sent = [[] for _ in range(world_size)]
    results, errors = [None] * world_size, []

    def process(rank: int) -> None:
        def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
            sent[rank].append(tensor.clone())
            call = len(sent[rank]) - 1
            barrier.wait()  # every process has sent its call-th tensor
            return sum(sent[r][call] for r in range(world_size))

        try:
            results[rank] = score((rank, world_size), all_reduce_sum)
        except Exception as exc:  # reported below; the others stop at the barrier
            errors.append(exc)
            barrier.abort()

    threads = [threading.Thread(target=process, args=(rank,)) for rank in range(world_size)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise errors[0]
    return results


class FixedNet(nn.Module):
    """Logits looked up from a fixed random table by (position, input id): no training needed."""

    def __init__(self, vocab_size: int, seq_len: int):
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.register_buffer("table", torch.randn(seq_len, vocab_size + 1, vocab_size, generator=generator))

    def forward(self, x):
        return self.table[torch.arange(x.shape[1]), x]


@pytest.mark.parametrize("world_size", [2, 3])
def test_padding_rounds_add_no_tokens_bytes_or_nats(world_size):
    sequences, tail, _ = packed()
    alone = run_evaluate(known_model(), sequences, tail)
    shards = simulate_shards(world_size, lambda shard, reduce: run_evaluate(
        known_model(), sequences, tail, shard=shard, all_reduce_sum=reduce))
    for result in shards:
        assert result["tokens"] == result["bytes"] == len(STREAM)
        assert result == alone


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_a_sharded_evaluation_equals_the_unsharded_one_bit_for_bit(build, objective, world_size):
    vocab_size = int(STREAM.max()) + 1
    built = build(vocab_size=vocab_size, seq_len=SEQ_LEN, objective=objective)
    model = LanguageModel(FixedNet(vocab_size, SEQ_LEN), built.model.objective)
    sequences, tail, _ = packed()

    def score(shard=(0, 1), all_reduce_sum=None):
        return run_evaluate(model, sequences, tail, t_samples=4, shard=shard, all_reduce_sum=all_reduce_sum)

    alone = score()
    assert alone["tokens"] == len(STREAM)
    for result in simulate_shards(world_size, score):
        assert result == alone
