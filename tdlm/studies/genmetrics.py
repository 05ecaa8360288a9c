"""Metrics of generated text, and the frequency-collapse diagnostic (docs/maths.md section 6).

Sample metrics take the generated tokens as a 2-D array [B, L] (numpy or torch) or a list of
1-D arrays; n-grams never cross from one sample into the next.

- unigram entropy: H of the pooled token distribution of all samples (nats; / ln 2 for bits).
  Low values mean a few tokens dominate; it depends on the number of tokens, so compare it
  with held-out text of the same size.
- distinct-n: unique n-grams / total n-grams over all samples (1 = no n-gram repeats).
- repetition rate: the share of adjacent pairs (x_{i-1}, x_i) with x_i == x_{i-1}.
- unseen-bigram share: the share of generated bigrams (with multiplicity) that never occur in
  the training stream. With the repetition rate, the "marginal trap": committing many tokens
  at once from per-position marginals makes pairs no sentence contains.
- generative perplexity: exp of the mean NLL per generated token under a reference
  autoregressive model, each token predicted from BOS and everything before it (the prompt
  included, which is not scored).
- frequency collapse: for prompts followed by masks, the entropy of the denoiser's mu at
  each distance from the prompt and its KL to the training unigram distribution. Predictions
  far from any context collapse to the unigram marginal: entropy up, KL down to 0.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

LN2 = math.log(2.0)


def as_rows(samples) -> list[np.ndarray]:
    """[B, L] tensor / array, or a list of 1-D sequences -> list of int64 numpy rows."""
    if isinstance(samples, Tensor):
        samples = samples.detach().cpu().numpy()
    if isinstance(samples, np.ndarray) and samples.ndim == 2:
        return [row.astype(np.int64) for row in samples]
    if isinstance(samples, np.ndarray) and samples.ndim != 1 and samples.dtype != object:
        raise ValueError(f"samples must be [B, L] or a list of 1-D sequences, not shape {samples.shape}")
    rows = [np.asarray(row.cpu() if isinstance(row, Tensor) else row, dtype=np.int64) for row in samples]
    if any(row.ndim != 1 for row in rows):
        raise ValueError("every sample must be a 1-D sequence of token ids")
    return rows


def ngrams(rows: list[np.ndarray], n: int) -> np.ndarray:
    """Every n-gram of every row, [count, n] int64 (none across rows)."""
    if n < 1:
        raise ValueError(f"n must be >= 1, not {n}")
    parts = [np.lib.stride_tricks.sliding_window_view(row, n) for row in rows if len(row) >= n]
    return np.concatenate(parts) if parts else np.empty((0, n), dtype=np.int64)


def unigram_entropy(samples) -> float:
    """Entropy (nats) of the empirical distribution of all tokens of all samples."""
    tokens = np.concatenate(as_rows(samples) or [np.empty(0, np.int64)])
    if tokens.size == 0:
        return float("nan")
    _, counts = np.unique(tokens, return_counts=True)
    p = counts / counts.sum()
    return max(0.0, float(-(p * np.log(p)).sum()))  # no -0.0 for a single token


def distinct_n(samples, n: int) -> float:
    """Unique n-grams / total n-grams over all samples (nan when there is none)."""
    grams = ngrams(as_rows(samples), n)
    if len(grams) == 0:
        return float("nan")
    return len(np.unique(grams, axis=0)) / len(grams)


def repetition_rate(samples) -> float:
    """Share of adjacent positions with x_i == x_{i-1} (nan when no sample has two tokens)."""
    pairs = ngrams(as_rows(samples), 2)
    if len(pairs) == 0:
        return float("nan")
    return float((pairs[:, 0] == pairs[:, 1]).mean())


def bigram_codes(rows, vocab_size: int) -> np.ndarray:
    """Bigrams (a, b) as a * V + b, int64 (V^2 fits easily for any real vocabulary)."""
    pairs = ngrams(as_rows(rows), 2)
    return pairs[:, 0] * np.int64(vocab_size) + pairs[:, 1]


def train_bigram_set(stream, vocab_size: int) -> np.ndarray:
    """The sorted distinct bigram codes of a 1-D token stream (the training split)."""
    stream = np.asarray(stream, dtype=np.int64)
    return np.unique(stream[:-1] * np.int64(vocab_size) + stream[1:])


def unseen_bigram_share(samples, train_bigrams: np.ndarray, vocab_size: int) -> float:
    """Share of the samples' bigrams (counted with multiplicity) absent from `train_bigrams`."""
    codes = bigram_codes(samples, vocab_size)
    if len(codes) == 0:
        return float("nan")
    return float((~np.isin(codes, train_bigrams)).mean())


def sample_metrics(samples, *, train_bigrams: np.ndarray | None = None, vocab_size: int | None = None) -> dict:
    """Every reference-free metric of a set of samples, as a flat dict of floats."""
    entropy = unigram_entropy(samples)
    result = {
        "unigram_entropy_nats": entropy,
        "unigram_entropy_bits": entropy / LN2,
        "distinct_2": distinct_n(samples, 2),
        "distinct_3": distinct_n(samples, 3),
        "repetition_rate": repetition_rate(samples),
    }
    if train_bigrams is not None:
        result["unseen_bigram_share"] = unseen_bigram_share(samples, train_bigrams, vocab_size)
    return result


@torch.no_grad()
def reference_nll(net: nn.Module, tokens: Tensor, *, bos_id: int, start: int = 0,
                  batch_size: int = 16) -> Tensor:
    """Per-token NLL [B, L - start] (float64) of tokens[:, start:] under a causal `net`.

    Position i is predicted from [BOS, x_0 .. x_{i-1}]: the standard way to score text with
    an autoregressive model; the first `start` tokens (a prompt) are context, not scored.
    """
    if not 0 <= start < tokens.shape[1]:
        raise ValueError(f"start {start} leaves nothing to score in {tokens.shape[1]} tokens")
    out = []
    for chunk in tokens.split(batch_size):
        inputs = torch.cat([torch.full_like(chunk[:, :1], bos_id), chunk[:, :-1]], dim=1)
        logprobs = torch.log_softmax(net(inputs).float(), dim=-1)
        picked = logprobs.gather(-1, chunk[..., None]).squeeze(-1)
        out.append(-picked[:, start:].double())
    return torch.cat(out)


def generative_perplexity(net: nn.Module, tokens: Tensor, *, bos_id: int, start: int = 0,
                          batch_size: int = 16) -> dict:
    """exp(mean NLL per scored token) of tokens[:, start:] under a reference causal model."""
    nll = reference_nll(net, tokens, bos_id=bos_id, start=start, batch_size=batch_size)
    per_token = nll.mean().item()
    return {"gen_ppl": math.exp(per_token), "gen_nll_per_token": per_token, "scored_tokens": nll.numel()}


def unigram_distribution(counts, pseudo_count: float = 1.0) -> np.ndarray:
    """Training unigram probabilities [V] with add-`pseudo_count` smoothing (no zero, so KL is finite)."""
    counts = np.asarray(counts, dtype=np.float64) + pseudo_count
    return counts / counts.sum()


@torch.no_grad()
def frequency_collapse(net: nn.Module, prompts: Tensor, num_masks: int, *, mask_id: int,
                       unigram, batch_size: int = 16) -> dict:
    """One forward pass on [prompt, mask x num_masks]: at distance d = 1 .. num_masks from the
    prompt (d = 1 is the first mask), the entropy of mu and KL(mu || unigram), in nats,
    averaged over the prompts [B, P]."""
    log_u = torch.as_tensor(np.log(np.asarray(unigram, dtype=np.float64)), device=prompts.device)
    entropy = torch.zeros(num_masks, dtype=torch.float64, device=prompts.device)
    kl = torch.zeros_like(entropy)
    for chunk in prompts.split(batch_size):
        masks = torch.full((len(chunk), num_masks), mask_id, dtype=chunk.dtype, device=chunk.device)
        logits = net(torch.cat([chunk, masks], dim=1))[:, chunk.shape[1]:]
        log_mu = torch.log_softmax(logits.double(), dim=-1)
        mu = log_mu.exp()
        entropy -= (mu * log_mu).sum(-1).sum(0)
        kl += (mu * (log_mu - log_u)).sum(-1).sum(0)
    count = len(prompts)
    u = log_u.exp()
    return {
        "prompt_tokens": prompts.shape[1],
        "distance": list(range(1, num_masks + 1)),
        "entropy": (entropy / count).tolist(),
        "kl_to_unigram": (kl / count).clamp_min(0.0).tolist(),  # clamp: float round-off only
        "unigram_entropy": float(-(u * log_u).sum()),
    }
