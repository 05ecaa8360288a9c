"""One optimizer step: the batch's micro-batches through the model and its objective, gradients
accumulated, clipped, applied. The trainer calls it each step; `tdlm bench` times it alone.

The noise of a step (t and the masks) comes from generators that are a pure function of
(seed, step, micro-batch), so a resumed run draws what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib

import torch

from tdlm.config import RecipeError, TrainingConfig
from tdlm.model import annealed_attention
from tdlm.training.distributed import configure_deepspeed, fsdp_version, unwrap
from tdlm.training.optim import build_optimizer, lr_at


def step_generator(seed: int, step: int, chunk: int, device) -> torch.Generator:
    """The noise (t and masks) of micro-batch `chunk` of one step, chunks numbered across all
    processes (process r's i-th of k micro-batches is chunk r * k + i): a pure function of
    (seed, step, chunk). One process with two micro-batches of 4 and two processes with one
    micro-batch of 4 each therefore draw the same noise for the same rows."""
    return torch.Generator(device=device).manual_seed(((seed * 1_000_003 + step) * 4099 + chunk) % 2**63)


def visible_fraction(step: int, anneal_steps: int) -> float:
    """The share of later positions a position attends to at `step` under attention annealing
    (training.attention_anneal_steps): 0 (causal) at step 0, rising linearly to 1 (full)."""
    return 1.0 if anneal_steps == 0 else min(1.0, step / anneal_steps)


def mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


class TrainStep:
    """The model, its optimizer and the accelerator that runs them, prepared together; calling it
    trains on one global step's batch (this process's rows) and returns the mean loss."""

    def __init__(self, model, training: TrainingConfig, accelerator, *, seed: int, total_steps: int):
        self.tc, self.accelerator, self.seed, self.total_steps = training, accelerator, seed, total_steps
        per_rank = training.batch_size // accelerator.num_processes
        self.micro = training.micro_batch_size or per_rank
        if per_rank % self.micro:
            raise RecipeError(f"training.micro_batch_size ({self.micro}) must divide the per-process batch ({per_rank})")
        self.fsdp = fsdp_version(accelerator)
        if training.compile:
            # the objectives call net.features (the head is applied where the loss is), so that is
            # what gets compiled; an attribute, so the state_dict keys stay the same
            model.net.features = torch.compile(model.net.features)
        optimizer = build_optimizer(model, training)
        self.deepspeed = configure_deepspeed(accelerator, self.micro, training.grad_clip)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.net = unwrap(accelerator, self.model).net  # the module the wrapped forward runs
        self.grad_norm = torch.zeros(())

    @property
    def sharded(self) -> bool:
        """Whether the optimizer state is split between processes (DeepSpeed ZeRO, FSDP): then a
        checkpoint keeps the engine's own state beside the full weights."""
        return bool(self.deepspeed or self.fsdp)

    def __call__(self, step: int, batch: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """Train on `batch` (host memory) as global step `step`: the loss (on the device, no host
        sync) and the objective's stats summed over the micro-batches."""
        acc, model = self.accelerator, self.model
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.total_steps, self.tc)
        if acc.device.type == "cuda":  # from pageable memory, .to(cuda) waits for the GPU to finish the last step
            batch = batch.pin_memory()
        batch = batch.to(acc.device, non_blocking=True)
        micro_batches = batch.split(self.micro)
        total, stats_sum = torch.zeros((), device=acc.device), {}
        fraction = visible_fraction(step, self.tc.attention_anneal_steps)
        for i, micro in enumerate(micro_batches):
            sync = i == len(micro_batches) - 1  # all-reduce gradients once, on the last micro-batch
            chunk = acc.process_index * len(micro_batches) + i
            generator = step_generator(self.seed, step, chunk, acc.device)
            acc.sync_gradients = sync  # DeepSpeed steps inside backward() whenever this is set
            # the attention pattern is drawn from the step's own generator: a resume draws it again
            with (acc.no_sync(model) if not sync else contextlib.nullcontext(),
                  annealed_attention(self.net, fraction, generator)):
                loss, stats = model(micro, generator)
                acc.backward(loss / len(micro_batches))
            total += loss.detach() / len(micro_batches)
            for key, value in stats.items():  # summed on the device; read at the next log step
                stats_sum[key] = stats_sum.get(key, 0) + value
        self.grad_norm = acc.clip_grad_norm_(model.parameters(), self.tc.grad_clip or float("inf"))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total, stats_sum
