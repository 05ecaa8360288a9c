"""The steps since the last train log record: how many, their summed loss and the objective's
summed stats, kept on the device and read at the next log step (one host sync per window).
Its training seconds are the clock's (tdlm.training.clock)."""

from __future__ import annotations

import torch

from tdlm.training.checkpoint_state import OpenWindow


class LogWindow:
    def __init__(self, device):
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.steps = 0
        self.stats: dict[str, torch.Tensor] = {}

    def add(self, loss: torch.Tensor, stats: dict) -> None:
        """One step's loss and stats (tensors on the device: nothing is read to the host)."""
        self.loss += loss
        for key, value in stats.items():
            self.stats[key] = self.stats.get(key, 0) + value
        self.steps += 1

    def to_save(self, accelerator, seconds: float) -> OpenWindow | None:
        """The window as a checkpoint keeps it when a stop comes between log steps; None when it
        holds no step. Called on every process: it reduces over them."""
        if not self.steps:
            return None
        return OpenWindow(steps=self.steps, seconds=seconds,
                          loss_sum=accelerator.reduce(self.loss, reduction="mean").item(),
                          stats={k: accelerator.reduce(v, reduction="sum").cpu() for k, v in self.stats.items()})

    def restore(self, window: OpenWindow, accelerator) -> None:
        """Continue the window a checkpoint kept: the loss sum (the mean over processes) on every
        process, the stats (sums over processes) on the main one."""
        self.steps = window.steps
        self.loss.fill_(window.loss_sum)
        if accelerator.is_main_process:
            self.stats = {k: v.to(accelerator.device) for k, v in window.stats.items()}
