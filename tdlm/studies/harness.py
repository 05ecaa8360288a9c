"""A trained run as an lm-evaluation-harness model, registered there as "tdlm".

Imported only when asked for (`tdlm lm-eval`, or `import tdlm.studies.harness` before calling
`lm_eval.simple_evaluate(model="tdlm", model_args={"run": ...})`): it needs the optional
`lm-eval` package (`pip install -e ".[lm-eval]"`).

What answers each request:

- loglikelihood(context, continuation). The canvas is the context's tokens then the
  continuation's, the context cut from the left to fit the run's seq_len. AR: the exact
  sum of log p(token | BOS, the tokens before it) over the continuation; `is_greedy`: each
  continuation token is the argmax. Diffusion: minus the conditional NELBO, a bound
  (log p(continuation | context) >= the figure; docs/maths.md section 1.12): only the
  continuation's positions are masked, at K stratified t, with the NELBO's weights, by the
  estimator of `tdlm eval` (the mask draws of batch i seeded by (seed, i)). `is_greedy`: the
  one-step argmax decoding of the fully masked continuation (the `confidence` sampler with
  steps = 1) gives it back; a masked model has no single greedy order, this is the one-call one.
- loglikelihood_rolling(text): minus tdlm's own figure for the whole text, tokenised as
  `tdlm eval --text` tokenises a file and packed at seq_len (the tail scored too), with the
  same seed: the number `tdlm eval --text` gives for a file holding the text (for a run with
  data.documents set, that also scores the end-of-text token it adds after each document;
  here, as in lm-eval, the text alone is scored). Each packed sequence starts afresh, as in
  training (not lm-eval's overlapping windows).
- generate_until(context, gen_kwargs): the run's sampler (or the one asked for) fills
  `max_gen_toks` masks after the context, which it keeps fixed; the text is cut at the first
  end-of-text token and at the first `until` string. The sampler's own options decide how it
  draws: the request's temperature or do_sample are not applied (for greedy decoding choose
  e.g. `ar` with top_k = 1, or `confidence`).

Accuracy from diffusion figures compares bounds, not likelihoods.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from pathlib import Path

import torch
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm.auto import tqdm

from tdlm.components import implements
from tdlm.errors import TdlmError

log = logging.getLogger(__name__)

DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's Hugging Face model's default
GEN_KWARGS_USED = {"until", "max_gen_toks"}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load(run_dir, *, which: str, device: str, sampler: tuple | None):
    """The run (tdlm.rundir.load_run), every problem a TdlmError."""
    from tdlm.rundir import load_run

    try:
        loaded = load_run(run_dir, which=which, device=device, sampler=sampler, action="scoring it with lm-eval")
    except FileNotFoundError as exc:
        if isinstance(exc, TdlmError):
            raise
        raise TdlmError(f"{run_dir}: {exc}") from None
    return loaded  # its sampler fits its objective: load_run resolved them


@register_model("tdlm")
class TdlmLM(LM):
    """A tdlm run directory answering lm-eval's requests (see the module docstring)."""

    def __init__(self, run: str, checkpoint: str = "best", device: str | None = None, t_samples: int | None = None,
                 seed: int | None = None, batch_size: int | str | None = None, sampler: str | None = None,
                 sampler_options: dict | None = None, max_batch_size=None):
        # max_batch_size: lm-eval's simple_evaluate may pass it (for its batch-size search); unused
        super().__init__()
        chosen = (sampler, sampler_options or {}) if sampler or sampler_options else None
        self._device = str(device or default_device())
        self.loaded = load(run, which=checkpoint, device=self._device, sampler=chosen)
        cfg = self.loaded.cfg
        self.net, self.objective = self.loaded.built.model.net, self.loaded.built.model.objective
        self.vocab, self.seq_len = self.loaded.corpus.vocab, cfg.data.seq_len
        self.t_samples = int(t_samples or cfg.eval.t_samples)
        self.seed = cfg.eval.seed if seed is None else int(seed)
        # lm-eval may hand "auto" (its own batch-size search): tdlm's eval batch size then
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else cfg.eval.batch_size
        self.is_bound = not self.objective.causal

    # -- tokens ----------------------------------------------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(context ids, continuation ids) as lm-eval's Hugging Face model cuts them: the
        context's trailing spaces go to the continuation, and the continuation's ids are those
        of the whole text after the context's."""
        spaces = len(context) - len(context.rstrip(" "))
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.vocab.encode(context + continuation)
        context_ids = self.vocab.encode(context)
        return context_ids, whole[len(context_ids):]

    def text_tokens(self, text: str):
        """The ids of `text` as `tdlm eval --text` tokenises a file holding it (line by line),
        without the end-of-text tokens a run with data.documents adds after each document:
        lm-eval's rolling figure is that of the text alone."""
        from tdlm.data.corpus import tokenize_lines
        from tdlm.data.tokenizer import split_lines

        return tokenize_lines(self.vocab, split_lines(text), progress=False)

    # -- loglikelihood ---------------------------------------------------------------------
    def canvas(self, context: list[int], continuation: list[int]) -> list[int]:
        """Context then continuation, the context cut from the left to fit seq_len."""
        if len(continuation) > self.seq_len:
            raise TdlmError(f"a continuation of {len(continuation)} tokens is longer than the run's sequence "
                            f"length {self.seq_len}: this model cannot score it")
        keep = self.seq_len - len(continuation)
        return context[max(len(context) - keep, 0):] + continuation

    def check_scorable(self) -> None:
        """Refuse, in one line, an objective this adapter has no conditional estimator for."""
        objective = self.objective
        if objective.causal and not implements(type(objective), "shifted_inputs"):
            raise TdlmError(f"objective {type(objective).__name__} is causal but has no shifted_inputs: "
                            "tdlm lm-eval cannot score a continuation with it")
        if not objective.causal and not objective.score_takes_maskable:
            raise TdlmError(f"objective {type(objective).__name__} cannot score a continuation given a context "
                            "(it does not declare score_takes_maskable)")

    @torch.no_grad()
    def score_batch(self, rows: list[list[int]], continuation_lengths: list[int],
                    batch_index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(continuation | context) (AR) or minus its bound (diffusion) [B] float64, and
        is_greedy [B] bool, for equally long canvases ending in their continuations."""
        from tdlm.evaluate import batch_generator
        from tdlm.head import Denoised, all_positions_scores

        x0 = torch.tensor(rows, dtype=torch.long, device=self._device)
        lengths = torch.tensor(continuation_lengths, device=self._device)
        maskable = torch.arange(x0.shape[1], device=self._device) >= (x0.shape[1] - lengths)[:, None]
        if self.objective.causal:
            nll, argmax = all_positions_scores(self.net, self.objective.shifted_inputs(x0), x0, with_argmax=True)
            logp = -(nll.double() * maskable).sum(-1)
            return logp, ((argmax == x0) | ~maskable).all(-1)
        scores = self.objective.score(self.net, x0, generator=batch_generator(self.seed, batch_index, self._device),
                                      t_samples=self.t_samples, maskable=maskable)
        if not maskable.any():
            return -scores.nll, torch.ones(len(rows), dtype=torch.bool, device=self._device)
        masked = torch.where(maskable, self.vocab.mask_id, x0)
        denoised = Denoised(self.net, masked, self.vocab.mask_id)
        _, hit = denoised.masked_scores(x0)
        return -scores.nll, (denoised.scatter(hit) | ~maskable).all(-1)

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        self.check_scorable()
        canvases = []
        for request in requests:
            context, continuation = self.encode_pair(*request.args)
            canvases.append((self.canvas(context, continuation), len(continuation)))
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        batches = self.batches(canvases, key=lambda item: len(item[0]))
        for batch_index, indices in enumerate(tqdm(batches, disable=disable_tqdm, desc="tdlm loglikelihood")):
            if not canvases[indices[0]][0]:  # nothing in the canvas: log p of nothing is 0
                logp, greedy = [0.0] * len(indices), [True] * len(indices)
            else:
                logp, greedy = self.score_batch([canvases[i][0] for i in indices],
                                                [canvases[i][1] for i in indices], batch_index)
                logp, greedy = logp.tolist(), greedy.tolist()
            for i, value, is_greedy in zip(indices, logp, greedy):
                results[i] = (value, bool(is_greedy))
                self.cache_hook.add_partial("loglikelihood", requests[i].args, results[i])
        return results

    def batches(self, items: list, key) -> list[list[int]]:
        """Indices of `items` in batches of equal key (canvas length: a bidirectional model sees
        padding), longest first, at most batch_size each; the order depends on the items only."""
        groups = defaultdict(list)
        for i, item in enumerate(items):
            groups[key(item)].append(i)
        return [indices[start:start + self.batch_size]
                for _, indices in sorted(groups.items(), key=lambda kv: kv[0], reverse=True)
                for start in range(0, len(indices), self.batch_size)]

    # -- loglikelihood_rolling -------------------------------------------------------------
    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from tdlm.data import pack
        from tdlm.evaluate import evaluate

        results = []
        for request in tqdm(requests, disable=disable_tqdm, desc="tdlm loglikelihood_rolling"):
            tokens = self.text_tokens(request.args[0])
            if len(tokens) == 0:
                results.append(0.0)
                continue
            sequences, tail = pack(tokens, self.seq_len)
            scored = evaluate(self.loaded.built.model, sequences, tail, num_bytes=self.loaded.corpus.num_bytes,
                              t_samples=self.t_samples, batch_size=self.batch_size, seed=self.seed,
                              device=self._device, split="lm-eval")
            results.append(-scored["nll_per_token"] * scored["tokens"])
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, results[-1])
        return results

    # -- generate_until --------------------------------------------------------------------
    def generation_canvas(self, context: str, max_gen_toks: int) -> tuple[list[int], int]:
        """(context ids cut from the left, number of masks): the masks and the context fit seq_len."""
        ids = self.vocab.encode(context)
        masks = max(1, min(max_gen_toks, self.seq_len - (1 if ids else 0)))
        keep = self.seq_len - masks
        return ids[max(len(ids) - keep, 0):], masks

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tdlm.evaluate import batch_generator
        from tdlm.sampling.generate import generate

        sampler, mask_id = self.loaded.built.sampler, self.vocab.mask_id
        sampler.set_stop_at_eos()  # the text is cut at its end-of-text: e.g. ar makes no calls after it
        prepared, ignored = [], set()
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            ids, masks = self.generation_canvas(context, int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)))
            prepared.append((ids, masks, until))
            ignored |= set(gen_kwargs) - GEN_KWARGS_USED
        if ignored:
            log.warning("tdlm: generate_until samples with the run's sampler and its options; the requests' %s "
                        "are not applied", ", ".join(sorted(ignored)))
        results: list[str | None] = [None] * len(requests)
        batches = self.batches(prepared, key=lambda item: (len(item[0]), item[1]))
        for batch_index, indices in enumerate(tqdm(batches, disable=disable_tqdm, desc="tdlm generate_until")):
            ids, masks, _ = prepared[indices[0]]
            canvas = torch.tensor([prepared[i][0] + [mask_id] * masks for i in indices])
            out = generate(self.net, sampler, canvas, batch_generator(self.seed, batch_index, self._device), self.vocab,
                           stop_at_eos=True, text_from=len(ids))  # the continuation's text, cut at its end-of-text
            for i, text in zip(indices, out.texts):
                results[i] = cut_at_first(text, prepared[i][2])
                self.cache_hook.add_partial("generate_until", requests[i].args, results[i])
        return results


def cut_at_first(text: str, stops: list[str]) -> str:
    """`text` up to the first occurrence of any of `stops` (empty strings ignored)."""
    ends = [text.find(stop) for stop in stops if stop and stop in text]
    return text[: min(ends)] if ends else text


# -- running tasks ---------------------------------------------------------------------------
def task_manager(names: list[str], include_path: str | Path | None):
    """lm-eval's TaskManager holding every task of `names` (glob patterns allowed). Indexing
    lm-eval's own ~15,000 tasks takes seconds: skipped when the include path holds them all."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise TdlmError(f"--include-path {include_path}: no such folder (give a folder of task YAML files)")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(local.match_tasks([name]) for name in names):
            return local
    manager = TaskManager(include_path=None if include_path is None else str(include_path))
    missing = [name for name in names if not manager.match_tasks([name])]
    if missing:
        where = f" in lm-eval or {include_path}" if include_path else " in lm-eval (local tasks: --include-path DIR)"
        raise TdlmError(f"unknown task(s) {', '.join(missing)}{where}; list them with: lm-eval ls tasks")
    return manager


def run_tasks(run_dir, tasks: list[str], *, include_path=None, limit: int | None = None, which: str = "best",
              t_samples: int | None = None, seed: int | None = None, device: str | None = None,
              batch_size: int | None = None, sampler: str | None = None, sampler_options: dict | None = None) -> dict:
    """Evaluate a run on lm-eval tasks: lm-eval's result dict (results, configs, versions,
    n-samples ...) with what was scored added under "tdlm"."""
    from lm_eval import simple_evaluate

    if not tasks:
        raise TdlmError("no task given: --tasks NAME[,NAME ...]")
    manager = task_manager(tasks, include_path)
    lm = TdlmLM(run=str(run_dir), checkpoint=which, device=device, t_samples=t_samples, seed=seed,
                batch_size=batch_size, sampler=sampler, sampler_options=sampler_options)
    try:
        results = simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager, log_samples=False)
    except FileNotFoundError as exc:  # a local task's data_files (datasets says which)
        if isinstance(exc, TdlmError):
            raise
        where = f" in {include_path}" if include_path else ""
        raise TdlmError(f"a task's data cannot be found ({str(exc).strip() or type(exc).__name__}): fix the "
                        f"data_files of its task YAML{where}") from None
    results["tdlm"] = {
        "run": str(run_dir),
        "checkpoint": lm.loaded.checkpoint.name,
        "objective": type(lm.objective).__name__,
        "is_bound": lm.is_bound,
        "t_samples": lm.t_samples if lm.is_bound else None,
        "seed": lm.seed,
        "sampler": lm.loaded.components["sampler"].component.name,
        "device": lm.device,
    }
    return results
