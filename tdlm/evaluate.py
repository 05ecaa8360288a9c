"""Scoring held-out text: a valid NELBO (diffusion) or the exact NLL (AR), with error bars.

Both objectives score the same packed sequences and every token in them (the AR model gets a
BOS so that the first token is predicted too). Figures are per REAL token, never per masked
token. With L_i the NLL in nats of sequence i (summed over its tokens; a NELBO estimate for
diffusion), c_i its number of tokens and n the number of sequences (the last, shorter one
included):

    nll_per_token = sum_i L_i / sum_i c_i
    stderr        = sqrt(n / (n - 1) * sum_i (L_i - nll_per_token * c_i)^2) / sum_i c_i
    mc_stderr     = sqrt(sum_i Var_MC(L_i)) / sum_i c_i
    bits_per_byte = sum_i L_i / (ln 2 * UTF-8 bytes of the scored tokens)
    ppl           = exp(nll_per_token), 95% interval exp(nll_per_token -/+ 1.96 stderr)

`stderr` is that of a ratio estimator over sequences (the delta method), so it covers both the
spread of the data and the Monte Carlo noise of the diffusion bound. It needs n >= 2: with one
sequence there is no spread to measure, so `stderr` and `ppl_ci95` are None (null in JSON) and the
printed figure says why, never a 0 that would look certain. `mc_stderr` is the Monte
Carlo part alone, Var_MC(L_i) being the objective's estimate of the variance of L_i (the
variance of the K t samples over K). A perplexity too large for a float is inf.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm.auto import tqdm

from tdlm.errors import DataError

LN2 = math.log(2.0)


class EvaluationStopped(Exception):
    """`evaluate`'s `stop` said to stop (a SIGTERM during the final scoring): nothing is returned."""


def _batches(sequences: torch.Tensor, tail: torch.Tensor | None, batch_size: int) -> list[tuple[int, torch.Tensor]]:
    """(index of the first sequence, batch) pairs; the last partial sequence is scored too, on its own."""
    batches = [(start, sequences[start : start + batch_size]) for start in range(0, len(sequences), batch_size)]
    if tail is not None and len(tail) > 0:
        batches.append((len(sequences), tail[None, :]))
    return batches


def _exp(x: float) -> float:
    """exp(x), or inf where it overflows: a diverged model still gets its figures reported."""
    try:
        return math.exp(x)
    except OverflowError:
        return math.inf


def batch_generator(seed: int, batch_index: int, device) -> torch.Generator:
    """The mask draws of eval batch i: fixed by (seed, i) alone, so the figures do not depend on
    how many processes share the batches."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + batch_index)


@torch.no_grad()
def evaluate(
    model,
    sequences: torch.Tensor,
    tail: torch.Tensor | None = None,
    *,
    num_bytes: Callable[[torch.Tensor], int],
    t_samples: int = 8,
    batch_size: int = 32,
    seed: int = 1234,
    device: torch.device | str = "cpu",
    progress: bool = False,
    split: str = "valid",
    shard: tuple[int, int] = (0, 1),
    all_reduce_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
    stop: Callable[[], bool] | None = None,
) -> dict:
    """Score every token of `sequences` [n, N] (and the optional tail) with `model.objective`.

    `model` is a LanguageModel (net + objective); `num_bytes(tokens)` gives the UTF-8 bytes the
    tokens spell, for bits per byte. With `shard=(rank, world_size)` this process scores batches
    rank, rank + world_size, ... and `all_reduce_sum` (a sum over processes) combines the
    per-sequence figures, so every process returns the single-process result. Every process
    runs the same number of forward passes (the last round is padded with a batch whose
    figures are discarded): engines that gather sharded weights in the forward need that.
    `stop`, called before each round (on every process alike: it may be a collective), ends the
    scoring early with EvaluationStopped when it returns True.
    """
    net, objective = model.net, model.objective
    rank, world_size = shard
    batches = _batches(sequences, tail, batch_size)
    if not batches:
        raise DataError(f"nothing to score: the {split} text holds no tokens")
    was_training = model.training
    model.eval()
    n = sum(len(x0) for _, x0 in batches)
    totals = torch.zeros(n, dtype=torch.float64)
    counts = torch.zeros(n, dtype=torch.float64)
    variances = torch.zeros(n, dtype=torch.float64)
    extras, has_variance, is_bound, estimator = {}, False, None, None
    scored_bytes = torch.zeros((), dtype=torch.float64)
    rounds = math.ceil(len(batches) / world_size)
    for round_ in tqdm(range(rounds), disable=not progress, desc=f"eval {split}", leave=False):
        if stop is not None and stop():
            model.train(was_training)
            raise EvaluationStopped(f"scoring {split} stopped after {round_} of {rounds} batches")
        index = round_ * world_size + rank
        padding = index >= len(batches)
        start, x0 = batches[index % len(batches)]
        scores = objective.score(net, x0.to(device), generator=batch_generator(seed, index, device), t_samples=t_samples)
        keep = 0.0 if padding else 1.0
        for key, value in sorted(scores.extras.items()):
            extras[key] = extras.get(key, 0) + keep * value.double().cpu()
        is_bound, estimator = scores.is_bound, scores.estimator
        if padding:
            continue
        rows = slice(start, start + len(x0))
        totals[rows] = scores.nll.double().cpu()
        counts[rows] = x0.shape[1]
        if scores.nll_var is not None:
            variances[rows], has_variance = scores.nll_var.double().cpu(), True
        scored_bytes += num_bytes(x0)
    model.train(was_training)
    if world_size > 1:
        totals, counts, variances, scored_bytes = (all_reduce_sum(v) for v in (totals, counts, variances, scored_bytes))
        extras = {key: all_reduce_sum(value) for key, value in extras.items()}
    scored_bytes = scored_bytes.item()

    tokens = counts.sum().item()
    nll = totals.sum().item() / tokens
    n = len(totals)
    residuals = totals - nll * counts
    # the spread between sequences measures the error; one sequence has none to measure: unknown, not 0
    stderr = math.sqrt((residuals**2).sum().item() * n / (n - 1)) / tokens if n >= 2 else None
    result = {
        "objective": type(objective).__name__,
        "split": split,
        "sequences": n,
        "tokens": int(tokens),
        "bytes": int(scored_bytes),
        "nll_per_token": nll,
        "stderr": stderr,
        "ppl": _exp(nll),
        "ppl_ci95": None if stderr is None else [_exp(nll - 1.96 * stderr), _exp(nll + 1.96 * stderr)],
        "bits_per_byte": totals.sum().item() / (LN2 * scored_bytes),
        "is_bound": is_bound,
    }
    if has_variance:
        result["t_samples"] = t_samples
        if estimator is not None:
            result["estimator"] = estimator
        result["mc_stderr"] = math.sqrt(variances.sum().item()) / tokens
    if "bucket_masked" in extras:
        masked = extras["bucket_masked"]
        result["masked_accuracy"] = (extras["bucket_correct"].sum() / masked.sum()).item()
        result["t_buckets"] = [
            {
                "t": [i / 10, (i + 1) / 10],
                "masked_tokens": int(masked[i]),
                "masked_ce": (extras["bucket_ce"][i] / masked[i]).item() if masked[i] else None,
                "masked_accuracy": (extras["bucket_correct"][i] / masked[i]).item() if masked[i] else None,
            }
            for i in range(len(masked))
        ]
    if "next_token_correct" in extras:
        result["next_token_accuracy"] = extras["next_token_correct"].item() / tokens
    return result


def format_result(result: dict) -> str:
    """A short human-readable summary of `evaluate`'s result."""
    kind = "NELBO (bound)" if result["is_bound"] else "NLL (exact)"
    known = result["stderr"] is not None
    lines = [
        f"{result['split']}: {kind} {result['nll_per_token']:.4f}"
        + (f" ± {result['stderr']:.4f}" if known else " ± ?") + " nats/token"
        f" | ppl{' <=' if result['is_bound'] else ''} {result['ppl']:.2f}"
        + (f" (95% CI {result['ppl_ci95'][0]:.2f}-{result['ppl_ci95'][1]:.2f})" if known else "")
        + f" | {result['bits_per_byte']:.4f} bits/byte | {result['tokens']:,} tokens"
    ]
    if not known:
        lines.append(f"  stderr unknown: {result['sequences']} sequence(s) scored, and the error of the data is "
                     "measured from the spread between sequences (score more text for an interval)")
    if "mc_stderr" in result:
        drawn = f" ({result['estimator']} t)" if "estimator" in result else ""
        lines.append(f"  {result['t_samples']} t-samples/sequence{drawn}, Monte Carlo stderr {result['mc_stderr']:.4f}")
    if "t_buckets" in result:  # only objectives that return the bucket_* extras
        lines[-1] += f"; masked-token accuracy {result['masked_accuracy']:.3f}"
        cells = [
            f"{b['t'][0]:.1f}-{b['t'][1]:.1f}: {b['masked_ce']:.2f}"
            for b in result["t_buckets"] if b["masked_ce"] is not None
        ]
        lines.append("  masked-token CE by t: " + ", ".join(cells))
    if "next_token_accuracy" in result:
        lines.append(f"  next-token accuracy {result['next_token_accuracy']:.3f}")
    return "\n".join(lines)
