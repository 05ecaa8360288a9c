"""Evaluation during and after training: when to score, what, and which score is the best.

The trainer asks `should_run(step)` after each step; the evaluator knows its cadence (every
`training.eval_every` steps and at the last step), scores the valid split's first
`training.eval_sequences` sequences, and keeps the best figure, which names the `best` checkpoint.
Every process scores its share of the batches and all of them get the gathered result.
"""

from __future__ import annotations

import math

from tdlm.data import pack
from tdlm.evaluate import evaluate


class Evaluator:
    def __init__(self, cfg, corpus, accelerator, *, total_steps: int, stop=None):
        self.cfg, self.corpus, self.accelerator, self.total_steps = cfg, corpus, accelerator, total_steps
        self.every, self.limit = cfg.training.eval_every, cfg.training.eval_sequences
        self.valid, self.valid_tail = pack(corpus.splits["valid"], cfg.data.seq_len)
        self.stop = stop  # () -> bool: any process asked to stop (ends a stoppable scoring early)
        self.best, self.is_best, self.last = math.inf, False, {}

    def should_run(self, step: int) -> bool:
        return step % self.every == 0 or step == self.total_steps

    def validate(self, model) -> dict:
        """The periodic figure: the first `eval_sequences` valid sequences (all, and the tail,
        when that is 0/None); updates the best."""
        seqs = self.valid[: self.limit] if self.limit else self.valid
        result = self.score(model, seqs, self.valid_tail if len(seqs) == 0 else None, "valid")
        self.last = result
        self.is_best = result["nll_per_token"] < self.best
        self.best = min(self.best, result["nll_per_token"])
        return result

    def score_split(self, model, split: str, *, progress: bool = False, stoppable: bool = False) -> dict:
        """A whole split, its last partial sequence included (the final figures)."""
        seqs, tail = pack(self.corpus.splits[split], self.cfg.data.seq_len)
        return self.score(model, seqs, tail, split, progress=progress, stoppable=stoppable)

    def score(self, model, sequences, tail, split: str, *, progress: bool = False, stoppable: bool = False) -> dict:
        """`stoppable`: a SIGTERM (on any process) ends the scoring early with EvaluationStopped."""
        acc, ec = self.accelerator, self.cfg.eval
        return evaluate(model, sequences, tail, num_bytes=self.corpus.num_bytes, t_samples=ec.t_samples,
                        batch_size=ec.batch_size, seed=ec.seed, device=acc.device, split=split,
                        progress=progress and acc.is_main_process,
                        shard=(acc.process_index, acc.num_processes),
                        all_reduce_sum=lambda t: acc.reduce(t.to(acc.device), reduction="sum").cpu(),
                        stop=self.stop if stoppable else None)
