"""Generation quality of a trained run: sample with any sampler, score, save JSON and a PNG.

    ge = GenEval("runs/quick_wikitext2", reference="runs/quick_wikitext2_ar")
    result = ge.evaluate(sampler="ancestral", options={"steps": 32}, num=16)
    json_path, png_path = write_report(result, "runs/quick_wikitext2/geneval")

The run, its reference, the training bigram set and the unigram distribution are loaded once,
so one GenEval can score many samplers (benchmarks/sampler_quality.py does). Every metric
(tdlm/studies/genmetrics.py) is computed on the generated tokens only, not on a prompt, and also on
held-out text of the same shape ("data"), the reference point for each number.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from pathlib import Path

import numpy as np
import torch

from tdlm.data import train_tokens
from tdlm.errors import TdlmError
from tdlm.files import write_atomically
from tdlm.jsontext import dumps
from tdlm.sampling.generate import SamplerBug, generate, prompt_canvas
from tdlm.sampling.select import options_label
from tdlm.studies import genmetrics
from tdlm.studies.figures import pyplot, save_figure

COLLAPSE_PROMPT_FRACTION = 4  # default frequency-collapse prompt: a quarter of the length


class GenEvalError(TdlmError, ValueError):
    """A bad request (sampler option, length, reference run); the message says what to change."""


class GenEval:
    def __init__(self, run_dir, *, reference=None, which: str = "best", device="cpu", registry=None):
        from tdlm.registry import build_registry
        from tdlm.rundir import load_run

        self.registry = registry or build_registry()
        self.device = torch.device(device)
        self.target = load_run(run_dir, which=which, device=device, registry=self.registry)
        corpus = self.target.corpus
        self.vocab = corpus.vocab
        self.reference = None
        if reference is not None:
            self.reference = load_run(reference, which=which, device=device, registry=self.registry)
            self._check_reference()
        train = np.asarray(train_tokens(corpus, self.target.cfg.data), dtype=np.int64)
        self.train_bigrams = genmetrics.train_bigram_set(train, self.vocab.size)
        self.unigram = genmetrics.unigram_distribution(np.bincount(train, minlength=self.vocab.size))
        self._cache: dict = {}

    def _check_reference(self) -> None:
        ref = self.reference
        if not ref.built.model.objective.causal:
            raise GenEvalError(f"the reference {ref.run_dir} is not an autoregressive run (its objective "
                               f"is {ref.cfg.objective.name!r}); generative perplexity needs exact likelihoods")
        ours, theirs = self.vocab, ref.corpus.vocab
        if (ours.name, ours.size) != (theirs.name, theirs.size):
            raise GenEvalError(f"the reference {ref.run_dir} uses vocabulary {theirs.name} and the run "
                               f"uses {ours.name}: text must be tokenised the same way to be scored")

    @property
    def net(self):
        return self.target.built.model.net

    @property
    def causal(self) -> bool:
        return self.target.built.model.objective.causal

    def build_sampler(self, name: str | None = None, options: dict | None = None):
        """(name, validated Config, Sampler), chosen as `tdlm sample` chooses
        (tdlm.sampling.select): no name or the run's own, its recipe options updated by
        `options`; another name, that sampler's defaults updated by `options`."""
        from tdlm.components import build_component
        from tdlm.config import RecipeError
        from tdlm.sampling.select import with_sampler

        try:  # refused here when the sampler cannot sample the run's objective
            _, components = with_sampler(self.target.cfg, self.target.components, self.registry, name, options)
        except RecipeError as exc:
            raise GenEvalError(str(exc)) from None
        sampler, objective = components["sampler"], self.target.built.model.objective
        return sampler.component.name, sampler.config, build_component(
            sampler.component.cls, sampler.config, objective=objective, vocab=self.target.built.vocab,
            context=objective.context)

    def data_windows(self, num: int, length: int, split: str = "valid") -> torch.Tensor:
        """`num` held-out windows of `length` tokens, evenly spread over the split (no randomness)."""
        stream = np.asarray(self.target.corpus.splits[split], dtype=np.int64)
        if len(stream) < length + 1:
            raise GenEvalError(f"the {split} split has {len(stream)} tokens, fewer than --length {length}")
        starts = np.linspace(0, len(stream) - length, num).astype(np.int64)
        return torch.from_numpy(np.stack([stream[s : s + length] for s in starts]))

    def text_metrics(self, tokens: torch.Tensor, start: int) -> dict:
        """Every metric of tokens[:, start:] (the rest is a prompt): reference-free ones, and
        generative perplexity when there is a reference."""
        generated = tokens[:, start:]
        result = genmetrics.sample_metrics(generated, train_bigrams=self.train_bigrams, vocab_size=self.vocab.size)
        result.update(gen_ppl=None, gen_nll_per_token=None)
        if self.reference is not None:
            ref_net = self.reference.built.model.net
            if tokens.shape[1] > ref_net.max_len:
                raise GenEvalError(f"--length {tokens.shape[1]} exceeds the reference's sequence length "
                                   f"{ref_net.max_len}")
            scored = genmetrics.generative_perplexity(ref_net, tokens.to(self.device), start=start,
                                                      bos_id=self.reference.corpus.vocab.bos_id)
            result.update(gen_ppl=scored["gen_ppl"], gen_nll_per_token=scored["gen_nll_per_token"])
        return result

    def collapse(self, num: int, length: int, prompt_ids: list[int], prompt_tokens: int | None) -> dict | None:
        """The frequency-collapse curve of the run's denoiser. None for an autoregressive run:
        its network cannot take masks, and its next-token distribution at distance d would
        depend on the tokens it sampled in between, so there is no one-pass analogue."""
        if self.causal:
            return None
        if prompt_ids:
            prompts = torch.tensor([prompt_ids], dtype=torch.long)
        else:
            size = prompt_tokens or max(1, length // COLLAPSE_PROMPT_FRACTION)
            if not 1 <= size < length:
                raise GenEvalError(f"the frequency-collapse prompt of {size} tokens leaves no mask in {length}")
            prompts = self.data_windows(num, length)[:, :size]
        return genmetrics.frequency_collapse(self.net, prompts.to(self.device), length - prompts.shape[1],
                                             mask_id=self.vocab.mask_id, unigram=self.unigram)

    def _cached(self, key, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def evaluate(self, *, sampler: str | None = None, options: dict | None = None, num: int = 16,
                 length: int | None = None, prompt: str | None = None, seed: int = 0,
                 batch_size: int | None = None, collapse_prompt_tokens: int | None = None) -> dict:
        """Sample `num` x `length` tokens and compute every metric (see the module docstring)."""
        cfg, vocab = self.target.cfg, self.vocab
        length = length or cfg.data.seq_len
        if length > cfg.data.seq_len:
            raise GenEvalError(f"--length {length} exceeds the model's sequence length {cfg.data.seq_len}")
        prompt_ids = vocab.encode(prompt) if prompt else []
        if len(prompt_ids) >= length:
            raise GenEvalError(f"the prompt is {len(prompt_ids)} tokens, not shorter than --length {length}")
        name, config, sampler_obj = self.build_sampler(sampler, options)
        start = len(prompt_ids)

        canvas = prompt_canvas(prompt_ids, num=num, length=length, mask_id=vocab.mask_id)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        try:
            made = generate(self.net, sampler_obj, canvas, generator, vocab, batch_size=batch_size, text_from=start)
        except (SamplerBug, ValueError) as exc:  # ValueError: e.g. a speculative sampler without a usable draft
            raise GenEvalError(f"sampler {name!r}: {exc}") from exc
        tokens, outputs, seconds, generated = made.tokens, made.outputs, made.seconds, made.generated_tokens

        result = {
            "run": str(self.target.run_dir),
            "checkpoint": self.target.checkpoint.name,
            "objective": self.target.components["objective"].component.name,
            "reference": str(self.reference.run_dir) if self.reference else None,
            "sampler": name,
            "options": config.model_dump(mode="json"),
            "num": num, "length": length, "prompt": prompt, "prompt_tokens": start,
            "generated_tokens": generated, "seed": seed, "device": str(self.device),
            "batch_size": batch_size or num, "batches": len(outputs),
            "collapse_prompt_tokens": collapse_prompt_tokens,
            "seconds": seconds,
            "tokens_per_s": generated / seconds if seconds > 0 else None,
            **output_counters(outputs),
        }
        result.update(self.text_metrics(tokens, start))
        result["data"] = self._cached(("data", num, length, start), lambda: self._data_metrics(num, length, start))
        result["frequency_collapse"] = self._cached(
            ("collapse", num, length, tuple(prompt_ids), collapse_prompt_tokens),
            lambda: self.collapse(num, length, prompt_ids, collapse_prompt_tokens),
        )
        result["samples"] = made.texts
        result["tokens"] = tokens[:, start:].tolist()  # the generated ids, for re-scoring
        result["id"] = settings_hash(result)
        return result

    def _data_metrics(self, num: int, length: int, start: int) -> dict:
        """The same metrics on held-out windows (their first `start` tokens as the prompt)."""
        return {"split": "valid", **self.text_metrics(self.data_windows(num, length), start)}


def output_counters(outputs) -> dict:
    """nfe, other numeric fields and the numeric entries of `stats` (e.g. a speculative sampler's
    draft calls and acceptance rate) of a sampler's outputs, averaged over the batches: what it
    took to generate one batch. List entries of `stats` are concatenated."""

    def merge(values):
        if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            mean = sum(values) / len(values)
            return int(mean) if mean == int(mean) else mean
        if all(isinstance(v, list) for v in values):
            return [item for v in values for item in v]
        return None

    counters = {}
    for field in dataclasses.fields(outputs[0]):
        values = [getattr(out, field.name) for out in outputs]
        if all(isinstance(v, dict) for v in values):
            keys = dict.fromkeys(k for v in values for k in v)
            merged = {k: merge([v[k] for v in values if k in v]) for k in keys}
            counters[field.name] = {k: v for k, v in merged.items() if v is not None}
        elif (value := merge(values)) is not None:
            counters[field.name] = value
    return counters


def settings_hash(result: dict) -> str:
    keys = ("run", "checkpoint", "reference", "sampler", "options", "num", "length", "prompt", "seed",
            "batch_size", "collapse_prompt_tokens")
    text = json.dumps({k: result[k] for k in keys}, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:10]


def write_report(result: dict, out_dir, *, png: bool = True) -> tuple[Path, Path | None]:
    """<out_dir>/geneval-<sampler>-<id>.json and (unless png=False) .png; returns both paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = out_dir / f"geneval-{result['sampler']}-{result['id']}"
    json_path, png_path = stem.with_suffix(".json"), stem.with_suffix(".png") if png else None
    result = {**result, "json": str(json_path), "png": str(png_path) if png else None}
    write_atomically(json_path, dumps(result))
    if png:
        plot_report(result, png_path)
    return json_path, png_path


BAR_METRICS = [("distinct_2", "distinct-2"), ("distinct_3", "distinct-3"),
               ("repetition_rate", "repeated\nadjacent"), ("unseen_bigram_share", "unseen\nbigrams")]


def plot_report(result: dict, path) -> None:
    """Frequency collapse (entropy and KL against distance from the prompt) and the metrics
    of the samples beside those of held-out text."""
    plt = pyplot()

    fig, (ax_h, ax_kl, ax_bar) = plt.subplots(1, 3, figsize=(14, 4.2))
    curve = result.get("frequency_collapse")
    if curve:
        ax_h.plot(curve["distance"], curve["entropy"], label="H(mu)")
        ax_h.axhline(curve["unigram_entropy"], color="gray", ls="--", label="H(train unigram)")
        ax_kl.plot(curve["distance"], curve["kl_to_unigram"], color="C1")
        entropy_top, kl_top = collapse_limits(curve)
        ax_h.set_ylim(0, entropy_top)
        ax_kl.set_ylim(0, kl_top)
        ax_h.legend(fontsize=8, loc="lower right")
        ax_h.set_title(f"frequency collapse ({curve['prompt_tokens']}-token prompt)", fontsize=10)
    else:
        for ax in (ax_h, ax_kl):
            ax.text(0.5, 0.5, "n/a for an autoregressive run", ha="center", va="center", transform=ax.transAxes)
    ax_h.set(xlabel="distance from the prompt", ylabel="entropy of mu (nats)")
    ax_kl.set(xlabel="distance from the prompt", ylabel="KL(mu || train unigram) (nats)")

    x = np.arange(len(BAR_METRICS))
    data = result.get("data") or {}
    for offset, (label, source) in ((-0.2, ("samples", result)), (0.2, ("held-out text", data))):
        values = [source.get(key) for key, _ in BAR_METRICS]
        ax_bar.bar(x + offset, [np.nan if v is None else v for v in values], width=0.4, label=label)
    ax_bar.set_xticks(x, [name for _, name in BAR_METRICS], fontsize=8)
    ax_bar.set_ylim(0, 1.2)
    ax_bar.legend(fontsize=8, ncol=2, loc="upper center")
    ax_bar.set_title(gen_ppl_title(result), fontsize=10)
    tps = result.get("tokens_per_s")
    fig.suptitle(f"{result['sampler']} {options_label(result['options'])}: NFE {result['nfe']}, "
                 f"{tps or float('nan'):.0f} tokens/s, entropy {result['unigram_entropy_bits']:.2f} bits "
                 f"(data {data.get('unigram_entropy_bits', float('nan')):.2f})", fontsize=10)
    save_figure(fig, Path(path), plt, dpi=100)


def collapse_limits(curve: dict) -> tuple[float, float]:
    """Tops of the frequency-collapse panels, whose bottoms are 0: a collapse is a fall towards
    0 bits of entropy (and a rise of the KL), so a flat curve must look flat, not be stretched
    over its noise."""
    entropy_top = 1.1 * max([*curve["entropy"], curve["unigram_entropy"]])
    kl_top = max(1.1 * max(curve["kl_to_unigram"]), 0.1 * curve["unigram_entropy"])
    return entropy_top, kl_top


def gen_ppl_title(result: dict) -> str:
    """The generative perplexity of the samples beside that of held-out text under the same
    reference (what a sampler's figure is to be read against)."""
    ppl, data_ppl = result.get("gen_ppl"), (result.get("data") or {}).get("gen_ppl")
    if ppl is None:
        return "gen ppl: no reference"
    return f"gen ppl {ppl:.1f}" + (f" (held-out text {data_ppl:.1f})" if data_ppl is not None else "")


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, spec)


def format_report(result: dict) -> str:
    """A few lines for a terminal: the samples' figures beside held-out text's."""
    data = result.get("data") or {}
    lines = [f"{result['sampler']} {options_label(result['options'])} on {result['run']} "
             f"({result['num']} x {result['generated_tokens'] // result['num']} generated tokens)",
             f"  NFE {result['nfe']}, {_fmt(result['tokens_per_s'], '.1f')} tokens/s, {result['seconds']:.2f} s",
             f"  {'':<24}{'samples':>10}{'data':>10}"]
    rows = [("gen ppl", "gen_ppl", ".2f"), ("unigram entropy (bits)", "unigram_entropy_bits", ".3f"),
            ("distinct-2", "distinct_2", ".3f"), ("distinct-3", "distinct_3", ".3f"),
            ("repeated adjacent", "repetition_rate", ".4f"), ("unseen bigrams", "unseen_bigram_share", ".4f")]
    for label, key, spec in rows:
        lines.append(f"  {label:<24}{_fmt(result.get(key), spec):>10}{_fmt(data.get(key), spec):>10}")
    stats = {k: v for k, v in (result.get("stats") or {}).items() if not isinstance(v, list)}
    if stats:
        lines.append("  sampler stats: " + ", ".join(f"{k} {_fmt(v, '.3g')}" for k, v in stats.items()))
    curve = result.get("frequency_collapse")
    if curve:
        picks = sorted({0, len(curve["distance"]) // 4, len(curve["distance"]) // 2, len(curve["distance"]) - 1})
        points = ", ".join(f"d={curve['distance'][i]}: H {curve['entropy'][i]:.2f} KL {curve['kl_to_unigram'][i]:.2f}"
                           for i in picks)
        lines.append(f"  frequency collapse (H unigram {curve['unigram_entropy']:.2f} nats): {points}")
    return "\n".join(lines)

