"""The training loop: data -> corruption -> model -> objective -> step -> eval -> sample.

`Trainer.fit` is the whole loop; each thing it does is a named method below it, and the parts
decide for themselves: the evaluator and the checkpointer when they are due, the clock where
the time went (tdlm.training.clock), the checkpoint state what a resume needs
(tdlm.training.checkpoint_state). The batch of global step s and the noise of step s are pure
functions of (seed, s), so a resumed run continues exactly where an uninterrupted one would be.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from tdlm.config import RecipeError, RunConfig, check_warmup, resolved_dict, to_toml
from tdlm.data import load_corpus, train_stream
from tdlm.data.manifest import ShardError
from tdlm.data.record import check_record, data_record, write_record
from tdlm.errors import DataError, RunError, RunInterrupted, TrainingDiverged, WriteError  # noqa: F401 - tests import it from here
from tdlm.evaluate import EvaluationStopped
from tdlm.files import write_atomically
from tdlm.init_from import start_from, with_resolved_source
from tdlm.lm import build_model
from tdlm.training import checkpointer as ckpt
from tdlm.training.checkpoint_state import TrainingState, rng_state, set_rng_state
from tdlm.training.clock import SessionClock
from tdlm.training.distributed import StopAgreement, device_name, from_main, gathered_parameters, make_accelerator, unwrap
from tdlm.training.evaluator import Evaluator
from tdlm.training.flops import flops_per_token, mfu, peak_flops
from tdlm.training.interrupts import StopSignals
from tdlm.training.log_window import LogWindow
from tdlm.training.monitor import RunLogger, read_metrics, rewrite_metrics
from tdlm.training.run_files import check_resume_config, with_manifest, write_config, write_run_files
from tdlm.training.run_lock import claim_run_dir
from tdlm.training.step import TrainStep, mixed_precision
from tdlm.vocab_info import vocab_info


class Trainer:
    def __init__(self, cfg: RunConfig, components: dict, *, resume: bool = False, stop_at: int | None = None,
                 started: float | None = None, load_draft=None):
        # `started`: when the command began (time.perf_counter()), so the start-up counts its imports
        self.clock = SessionClock(started)
        # how the sampler of the periodic samples reads a draft run, if it drafts with one: the command
        # passes tdlm.rundir.load_draft (training does not import the runs layer that loads whole runs)
        self.load_draft = load_draft
        self.accelerator = make_accelerator(mixed_precision(cfg.training.mixed_precision))
        # shards fix the corpus and the tokenizer: the saved config (and a resume's check) say which
        warn = (lambda line: tqdm.write(line, file=sys.stderr)) if self.accelerator.is_main_process else None
        cfg = with_resolved_source(with_manifest(cfg, warn=warn))  # config.json records the source's absolute path
        self.cfg, self.tc, self.stop_at = cfg, cfg.training, stop_at
        self.run_dir = Path(cfg.run.out_dir) / cfg.run.name
        self.signals = StopSignals(echo=tqdm.write)  # until fit() ends: a stop never cuts a checkpoint write
        self.signals.install()
        try:
            self.lock = self._claim_run_dir(resume, components)  # held until fit() ends, or the process does
            self._set_up(components, resume)
        except BaseException as exc:
            self.signals.restore()
            self.release_run_dir(discard_if_empty=True)
            if isinstance(exc, RunInterrupted):
                raise self._interrupted(exc) from None
            raise

    def _set_up(self, components: dict, resume: bool) -> None:
        cfg, acc = self.cfg, self.accelerator
        acc.wait_for_everyone()  # every process has looked at the run directory before the first writes to it
        with acc.main_process_first():  # one process tokenises into the cache; the others then read it
            self.corpus = load_corpus(cfg.data, progress=cfg.logging.progress and acc.is_main_process)
        self.vocab = self.corpus.vocab
        self._check_splits()
        record = data_record(self.corpus, cfg.data)
        if resume:  # the data and tokenizer must be those the run was trained with
            check_record(self.run_dir, self.corpus, cfg.data, action="--resume", current=record)
        torch.manual_seed(cfg.run.seed)  # identical initial weights on every process
        self.components = components
        self.vocab_info = vocab_info(self.corpus)  # counts the train tokens: once
        self.built = build_model(cfg, components, self.vocab_info, load_draft=self.load_draft)
        if getattr(self.built.sampler.config, "draft", None) is not None and self.load_draft is None:
            # found now, not at the first evaluation's sample after minutes of training
            raise RunError(f"the sampler drafts from the run {self.built.sampler.config.draft!r} and this Trainer was "
                           "given no load_draft to read it: pass load_draft=tdlm.rundir.load_draft (tdlm run does)")
        self.source = None  # a resume loads the run's own checkpoint below, never the source
        if cfg.training.init_from and not resume:
            self.source = start_from(self.built.model, cfg, record)  # record: data.json names the source
        net = self.built.model.net  # sized before prepare(): ZeRO-3 leaves empty placeholders in the module
        self.sizes = {"parameters": net.num_parameters(), "non_embedding_parameters": net.num_parameters(non_embedding=True)}
        self.flops_per_token = flops_per_token(net, cfg.data.seq_len)["total"]
        self.stream = train_stream(self.corpus, cfg.data, self.tc.batch_size, cfg.run.seed,
                                   rank=acc.process_index, world_size=acc.num_processes)
        self.tokens_per_step = self.tc.batch_size * cfg.data.seq_len
        self.total_steps = self.tc.max_steps or math.ceil(self.tc.epochs * self.stream.batches_per_epoch)
        try:  # epochs: the length is known only now that the data is
            check_warmup(self.tc.warmup_steps, self.total_steps)
        except ValueError as exc:
            raise RecipeError(str(exc)) from None
        self.train_step = TrainStep(self.built.model, self.tc, acc, seed=cfg.run.seed, total_steps=self.total_steps)
        self.model, self.optimizer, self.deepspeed = self.train_step.model, self.train_step.optimizer, self.train_step.deepspeed
        self.evaluator = Evaluator(cfg, self.corpus, acc, total_steps=self.total_steps,
                                   stop=lambda: self.stop_agreement.any(self.stop_requested))
        # a sharded engine (DeepSpeed, FSDP) saves its own optimizer state beside the gathered weights
        self.checkpointer = ckpt.Checkpointer(self.run_dir, acc, deepspeed=self.train_step.sharded,
                                              every=self.tc.checkpoint_every)
        self.step = 0
        self.window = LogWindow(acc.device)
        if resume:
            self._resume()
            if acc.is_main_process and self.resume_changes:  # allowed ones (checked in _claim_run_dir)
                write_config(self.run_dir, resolved_dict(cfg, components))
        else:
            self._check_stop_at()
            if acc.is_main_process:
                write_run_files(self.run_dir, cfg, components)
                write_record(self.run_dir, record)
        self.logger = RunLogger(self.run_dir, tensorboard=cfg.logging.tensorboard, enabled=acc.is_main_process)
        self.logger.text(self.step, "config", to_toml(resolved_dict(cfg, components)))
        self.stop_agreement = StopAgreement(acc.num_processes)
        self._prefetched = None  # (step, batch) read ahead, so a damaged shard stops before the step

    def _check_splits(self) -> None:
        """Every split the run scores must hold text: an empty one would fail only after training."""
        data = self.cfg.data
        where = data.path if data.format == "webdataset" or data.dataset == "text" else data.dataset
        for split in dict.fromkeys(["valid", *self.cfg.eval.final_splits]):
            if len(self.corpus.splits[split]) == 0:
                use = "every eval scores it" if split == "valid" else "eval.final_splits scores it"
                raise DataError(f"the {split} split of {where} holds no tokens, and {use}: give it text"
                                + ("" if split == "valid" else f" or leave {split} out of eval.final_splits"))

    @property
    def stop_requested(self) -> bool:
        """Whether a signal asked this process for a clean stop (tdlm.training.interrupts)."""
        return self.signals.requested

    # -- the loop -----------------------------------------------------------------------------
    def fit(self) -> dict:
        try:
            return self._loop()
        except RunInterrupted as exc:
            raise self._interrupted(exc) from None
        except WriteError as exc:  # metrics, summary: the checkpoints say it in their own words
            kept, then = self._where_it_stands()
            raise WriteError(f"{exc.what}: {Path(exc.path).name} was not written and the run stopped at step "
                             f"{self.step} (it {kept}); {exc.fix}, then {then}",
                             path=exc.path, what=exc.what, fix=exc.fix, errno=exc.errno) from exc
        finally:
            self.signals.restore()
            self.release_run_dir()

    def _interrupted(self, exc: RunInterrupted) -> RunInterrupted:
        """`exc` with where the run stands, read after the stop's cleanup."""
        kept, then = self._where_it_stands()
        return RunInterrupted(f"{exc}; the run {kept}: {then}", exc.signum)

    def _where_it_stands(self) -> tuple[str, str]:
        """(what the run keeps, what to do next), in words."""
        step = ckpt.last_step(self.run_dir)
        if step is None:
            return "has no checkpoint yet", "start it again with tdlm run RECIPE"
        return f"keeps its last checkpoint, step {step}", "continue with tdlm run RECIPE --resume"

    def _loop(self) -> dict:
        self.clock.start_loop()
        self._announce()
        self.signals.start_training()
        shown = self.cfg.logging.progress and self.accelerator.is_main_process
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not shown, desc=self.cfg.run.name,
                   dynamic_ncols=True)
        try:
            if self.stop_agreement.any(self._read_ahead() is not None):
                raise self._data_damaged(saved=False)  # no step of this session is lost
            while self.step < self.total_steps:
                with self.clock.step():
                    loss, stats = self.run_step()
                self.window.add(loss, stats)
                self.step += 1
                bar.update(1)
                at_eval = self.evaluator.should_run(self.step)
                # the next step's batch is read now: a damaged shard stops the run here, with a checkpoint
                asked, damaged = self.stop_agreement.each(self.stop_requested, self._read_ahead() is not None)
                stopping = asked or damaged or self.step == self.stop_at
                at_ckpt = self.checkpointer.due(self.step, evaluated=at_eval)  # a stop saves too (below)
                # a stop between log steps logs nothing: its checkpoint carries the open window, and
                # the next session logs it where an uninterrupted run would
                logging = self.step % self.tc.log_every == 0 or at_ckpt
                if logging or stopping:
                    with self.clock.paused():  # the window times training only: not the log, eval and save
                        if logging:
                            self.log_train(bar)
                        if at_eval:
                            self.evaluate_and_sample()
                        if at_ckpt or stopping:
                            self.save()
                            stopping = stopping or self.signals.urgent  # a second signal waited for this save
                if stopping:
                    summary = self.finish("stopped", bar)
                    if damaged:
                        raise self._data_damaged(saved=True)
                    return summary
            return self.finish("finished", bar)
        finally:
            bar.close()
            self.logger.close()

    def release_run_dir(self, *, discard_if_empty: bool = False) -> None:
        if getattr(self, "lock", None) is not None:
            self.lock.release(discard_if_empty=discard_if_empty)
            self.lock = None

    def _read_ahead(self) -> Exception | None:
        """Read the batch of the next step now (kept for train_step); the error if its data
        cannot be read (a damaged or vanished shard)."""
        self.data_problem = None
        if self.step < self.total_steps:
            try:
                self._prefetched = (self.step, self.stream.get(self.step))
            except (ShardError, OSError) as exc:
                self.data_problem = exc
        return self.data_problem

    def _data_damaged(self, *, saved: bool) -> DataError:
        problem = self.data_problem
        what = str(problem) if isinstance(problem, ShardError) else (
            f"reading the train data failed ({type(problem).__name__}: {problem})" if problem is not None
            else "another process could not read its train data (see its message)")
        done = (f"training stopped at step {self.step} and saved a checkpoint there" if saved
                else f"training stopped before step {self.step + 1}, nothing lost")
        return DataError(f"{what.rstrip('.')}; {done}: once the data is whole, continue with tdlm run RECIPE --resume")

    def run_step(self) -> tuple[torch.Tensor, dict]:
        """Train one step on its batch (TrainStep): the loss (on the device) and the objective's stats."""
        return self.train_step(self.step, self._batch())

    def _batch(self) -> torch.Tensor:
        """This step's batch: the one read ahead, else read now."""
        ahead, self._prefetched = self._prefetched, None
        return ahead[1] if ahead is not None and ahead[0] == self.step else self.stream.get(self.step)

    # -- what the loop calls -----------------------------------------------------------------
    def check_run_dir(self) -> None:
        """A RunError on every process when the run directory was removed while training (checked
        before each write: logs and checkpoints would otherwise go into a half-made new one)."""
        removed = self.lock.removed() if self.lock is not None else None
        if from_main(self.accelerator, removed):
            raise RunError(f"run directory {self.run_dir} was removed while training; nothing more can be saved "
                           "(start the run again)")

    def log_train(self, bar) -> None:
        """Log the window's mean loss, the learning rate, gradient norm, tokens/s and epoch (and the
        objective's loss by t), then open the next window."""
        self.check_run_dir()
        window = self.window
        seconds = self.clock.close_window(window.steps)
        tokens_per_s = window.steps * self.tokens_per_step / max(seconds, 1e-9)
        loss = self.accelerator.reduce(window.loss / window.steps, reduction="mean").item()  # the window's host sync
        if not math.isfinite(loss):
            raise self.checkpointer.diverged(f"training loss became {loss} by step {self.step}")
        metrics = {"loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                   "grad_norm": float(self.train_step.grad_norm), "tokens_per_s": tokens_per_s,
                   "epoch": self.stream.epoch_of(self.step)}
        self.logger.log(self.step, metrics, "train")
        if "bucket_loss" in window.stats:  # the NELBO integrand per token by t, this window
            sums = self.accelerator.reduce(window.stats["bucket_loss"], reduction="sum").tolist()
            counts = self.accelerator.reduce(window.stats["bucket_count"], reduction="sum").tolist()
            self.logger.log(self.step, {f"loss_t{i / len(sums):.1f}": s / c
                                        for i, (s, c) in enumerate(zip(sums, counts)) if c}, "train_by_t")
        window.reset()
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}")

    def evaluate_and_sample(self) -> dict:
        """The periodic validation figure (logged; it decides `best`) and samples."""
        with self.clock.phase("eval_s"):
            model = unwrap(self.accelerator, self.model)
            with gathered_parameters(model):
                result = self.evaluator.validate(model)
            if not math.isfinite(result["nll_per_token"]):  # NaN weights: nothing to sample or save
                raise self.checkpointer.diverged(f"the validation figure became {result['nll_per_token']} "
                                                 f"at step {self.step}")
            self.logger.log(self.step, _scalars(result), "val")
            by_t = {f"masked_ce_t{b['t'][0]:.1f}": b["masked_ce"]
                    for b in result.get("t_buckets", []) if b["masked_ce"] is not None}
            if by_t:
                self.logger.log(self.step, by_t, "val_by_t")
            with gathered_parameters(model):  # on every process: engines that shard weights need all in the forward
                self.samples = self.sample_text(model)
            for i, text in enumerate(self.samples):
                self.logger.text(self.step, f"sample/{i}", text)
        return result

    def sample_text(self, model, num: int | None = None) -> list[str]:
        num = self.cfg.eval.sample_num if num is None else num
        if num == 0:
            return []
        from tdlm.sampling.generate import generate, prompt_canvas

        canvas = prompt_canvas([], num=num, length=self.cfg.data.seq_len, mask_id=self.vocab.mask_id)
        generator = torch.Generator(device=self.accelerator.device).manual_seed(self.cfg.eval.seed)
        model.eval()
        texts = generate(model.net, self.built.sampler, canvas, generator, self.vocab).texts
        model.train()
        return texts

    def save(self) -> None:
        """A full-weights checkpoint any single process can load (`tdlm eval`, `tdlm sample`), plus
        what resuming needs (the checkpointer writes it)."""
        self.check_run_dir()
        with self.clock.phase("save_s"):
            # stopped between log steps: the next session logs this window (reduced on every process)
            window = self.window.to_save(self.accelerator, self.clock.window_seconds)

            def state() -> TrainingState:  # on the main process, once the weights are gathered
                return TrainingState(
                    step=self.step, best=self.evaluator.best, rng=rng_state(), engine=self.engine_name(),
                    processes=self.accelerator.num_processes, total_steps=self.total_steps, window=window,
                    train_seconds=self.clock.train_seconds, timed_steps=self.clock.timed_steps,
                    wall_seconds=self.clock.wall_seconds(), sessions=self.clock.sessions,
                    val_nll=self.evaluator.last.get("nll_per_token"),
                    optimizer=None if self.train_step.sharded else self.optimizer.state_dict())

            best, self.evaluator.is_best = self.evaluator.is_best, False
            with self.signals.saving(self.step):  # a second signal waits for the checkpoint to be whole
                self.checkpointer.save(self.model, self.step, state, best=best)

    def engine_name(self) -> str:
        if self.deepspeed:
            return f"deepspeed-zero{self.deepspeed}"
        if self.train_step.fsdp:
            return f"fsdp{self.train_step.fsdp}"
        return "ddp" if self.accelerator.num_processes > 1 else "single"

    def finish(self, status: str, bar) -> dict:
        """Score the best checkpoint on the full valid and test splits and write summary.json."""
        acc = self.accelerator
        bar.close()
        summary = {"status": status, "step": self.step, "total_steps": self.total_steps,
                   "tokens_seen": self.step * self.tokens_per_step,
                   "train_tokens": self.stream.num_sequences * self.cfg.data.seq_len,  # unique, as packed
                   "epochs": self.stream.epoch_of(self.step),
                   **self.sizes, "engine": self.engine_name(),
                   "device": device_name(acc.device), "processes": acc.num_processes,
                   **self._throughput(), "sessions": self.clock.sessions,
                   "wall_time_s": self.clock.wall_seconds()}
        if status == "finished":
            with self.clock.phase("final_scoring_s"):
                summary = self._score_best(summary)
        summary["timing"] = self.clock.timing()
        if acc.is_main_process:
            write_atomically(self.run_dir / "summary.json", json.dumps(summary, indent=2))
        acc.wait_for_everyone()
        return summary

    def _score_best(self, summary: dict) -> dict:
        """`summary` with the best checkpoint's final scores on eval.final_splits and a sample, or
        marked stopped when a signal stopped the scoring."""
        acc = self.accelerator
        # the best weights, in a plain copy of the model on every process (the trained module
        # may be partitioned by ZeRO-3); processes share the scoring as in training
        model = build_model(self.cfg, self.components, self.vocab_info).model.to(acc.device)
        best_dir = ckpt.checkpoint_dir(self.run_dir, "best")
        ckpt.load_weights(model, best_dir)
        summary["checkpoint"] = best_dir.name
        try:
            for split in self.cfg.eval.final_splits:
                summary[split] = self.evaluator.score_split(model, split, progress=self.cfg.logging.progress,
                                                            stoppable=True)
                self.logger.log(self.step, _scalars(summary[split]), f"final_{split}")
        except EvaluationStopped:  # the checkpoint is saved: --resume scores it again
            summary = {k: v for k, v in summary.items() if k not in ("valid", "test", "checkpoint")}
            summary["status"] = "stopped"
            if acc.is_main_process:
                tqdm.write("tdlm: stopped during the final scoring; the checkpoint is saved, and "
                           "--resume scores it", file=sys.stderr)
        if summary["status"] == "finished":
            summary["samples"] = self.sample_text(model)
        summary["wall_time_s"] = self.clock.wall_seconds()
        return summary

    def _throughput(self) -> dict:
        """Training tokens/s over every session of the run (eval and saving excluded), the seconds
        they took, FLOPs per token and MFU."""
        acc, per_token = self.accelerator, self.flops_per_token
        seconds, steps = self.clock.training_time(open_steps=self.window.steps)  # a stop's open window too
        rate = steps * self.tokens_per_step / seconds if seconds else None
        peak = peak_flops(acc.device, acc.mixed_precision)
        return {"train_tokens_per_s": rate, "train_seconds": seconds, "flops_per_token": per_token,
                "mfu": mfu(rate, per_token, peak * acc.num_processes) if rate and peak else None}

    # -- set-up helpers ----------------------------------------------------------------------
    def _claim_run_dir(self, resume: bool, components: dict):
        """The main process locks the run directory and checks it (and, on --resume, that the
        recipe still describes the saved run); every process raises the same error if not."""
        acc, lock, problem = self.accelerator, None, None
        self.resume_changes = {}
        if acc.is_main_process:
            try:
                lock = claim_run_dir(self.run_dir, resume=resume, echo=tqdm.write)
                if resume:
                    self.resume_changes = check_resume_config(self.run_dir, self.cfg, components)
            except Exception as exc:  # raised on every process below, not on this one alone
                if lock is not None:
                    lock.release()
                problem = exc
        problem = from_main(acc, problem)
        if problem is not None:
            raise problem
        return lock

    def _resume(self) -> None:
        acc = self.accelerator
        # last, or (when it cannot be read) the newest readable one; DeepSpeed reads its engine state instead
        sharded = self.train_step.sharded
        path, saved, weights, skipped = ckpt.readable_checkpoint(
            self.run_dir, weights=not sharded, expected=unwrap(acc, self.model).state_dict())
        state = TrainingState.from_saved(saved)
        if sharded or state.sharded:
            if state.engine != self.engine_name() or state.processes != acc.num_processes:
                raise RecipeError(
                    f"--resume: {path} was written by {state.processes} process(es) with {state.engine}; this run "
                    f"has {acc.num_processes} with {self.engine_name()}. DeepSpeed checkpoints resume only on the "
                    "same engine and process count (their optimizer state is sharded per process; FSDP's too); a plain run "
                    "resumes on any number of processes. The weights load anywhere: tdlm eval / tdlm sample."
                )
            acc.load_state(str(path / "engine"))
        else:
            unwrap(acc, self.model).load_state_dict(weights)
            self.optimizer.load_state_dict(state.optimizer)
        set_rng_state(state.rng)
        self.step, self.evaluator.best = state.step, state.best
        if skipped:
            self._fall_back(path, state, skipped)
        if self.step > self.total_steps:
            raise RunError(f"--resume: the run is at step {self.step}, past the recipe's {self.total_steps} steps "
                           "(training.max_steps / training.epochs); it can be made longer, not shorter")
        self._check_stop_at()
        self.clock.continue_run(state)
        if state.window is not None:  # the window a stop between log steps left open
            self.window.restore(state.window, acc)
        if acc.is_main_process:
            before = self.total_steps if state.total_steps is None else state.total_steps
            if before != self.total_steps:
                tqdm.write(f"tdlm: warning: the run had {before} steps and now has {self.total_steps}: the learning-rate "
                           f"schedule decays over the new total from step {self.step} on, so this run is no longer "
                           "the one an uninterrupted run of either length would be", file=sys.stderr)
            if self.resume_changes:
                tqdm.write("tdlm: resuming with changed settings (now in config.json): " + "; ".join(
                    f"{k}: {json.dumps(a)} -> {json.dumps(b)}" for k, (a, b) in self.resume_changes.items()),
                    file=sys.stderr)
            # drop records the interrupted run wrote after this checkpoint, and the final scoring of a
            # run at its end (this session scores it again: a SIGTERM may have cut it short)
            rescoring = self.step == self.total_steps
            rewrite_metrics(self.run_dir, [r for r in read_metrics(self.run_dir) if r["step"] < self.step or (
                r["step"] == self.step and not (rescoring and r["kind"].startswith("final_")))])

    def _fall_back(self, path, state: TrainingState, skipped: list[str]) -> None:
        """`last` could not be read and the run resumes from `path`: the unreadable directories
        newer than it are set aside (a later save of their step must not find them), `last`
        names `path`, and so does `best` if it named one of them."""
        acc, root = self.accelerator, self.run_dir / "checkpoints"
        acc.wait_for_everyone()  # every process has read its checkpoint before anything moves
        if acc.is_main_process:
            moved = [ckpt.set_aside(p) for p in ckpt.step_dirs(self.run_dir) if int(p.name[5:]) > self.step]
            best = ckpt._pointer_or_none(root, "best")
            if best is None or not (root / best["dir"]).is_dir():
                val = state.val_nll
                self.evaluator.best = val if val is not None else math.inf  # the next eval that beats it is best
                ckpt.point(self.run_dir, "best", path, self.step, val_nll=val)
            ckpt.point(self.run_dir, "last", path, self.step)
            tqdm.write(f"tdlm: warning: could not read {'; '.join(skipped)}; resuming from the newest readable "
                       f"checkpoint, {path.name}" + (f" (set aside: {', '.join(p.name for p in moved)})" if moved else ""),
                       file=sys.stderr)
        self.evaluator.best = from_main(acc, self.evaluator.best)
        acc.wait_for_everyone()

    def _check_stop_at(self) -> None:
        if self.stop_at is not None and self.stop_at <= self.step:
            where = f"is at step {self.step} already (its last checkpoint)" if self.step else "starts at step 0"
            raise RunError(f"--stop-at {self.stop_at}: the run {where}; give a later step")

    def _announce(self) -> None:
        if self.accelerator.is_main_process:
            tqdm.write(
                f"tdlm: {self.cfg.run.name} -> {self.run_dir} | {self.cfg.objective.name} objective | "
                f"{self.sizes['parameters']:,} parameters ({self.sizes['non_embedding_parameters']:,} non-embedding) | "
                f"vocab {self.vocab.size:,} | {self.stream.num_sequences:,} train sequences of {self.cfg.data.seq_len} | "
                f"{self.total_steps:,} steps ({self.total_steps / self.stream.batches_per_epoch:.2f} epochs) | "
                f"{self.accelerator.num_processes} process(es) ({self.engine_name()}) on {device_name(self.accelerator.device)}"
                + (f" | resuming at step {self.step} (session {self.clock.sessions})" if self.clock.sessions > 1 else "")
                + (f" | weights from {self.source.checkpoint}" if self.source else "")
            )


def _scalars(result: dict) -> dict:
    keys = ("nll_per_token", "ppl", "bits_per_byte", "stderr", "masked_accuracy", "next_token_accuracy")
    return {k: result[k] for k in keys if result.get(k) is not None}  # an unknown stderr is not logged


def train(cfg: RunConfig, components: dict, *, resume: bool = False, stop_at: int | None = None,
          started: float | None = None, load_draft=None) -> dict:
    return Trainer(cfg, components, resume=resume, stop_at=stop_at, started=started, load_draft=load_draft).fit()
