"""What a checkpoint's state.pt holds beside the weights: the trainer's state, as named fields.

state.pt stays what it always was, a plain dict saved by torch.save (tdlm.training.checkpointer
reads and writes it): `TrainingState.saved()` gives that dict key for key, and
`TrainingState.from_saved` reads it back, checkpoints of earlier tdlm versions included (they
lack the totals and the window: those start from their defaults). So the format on disk does
not change, and a resumed run continues bit for bit where an uninterrupted one would be.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class OpenWindow:
    """The log window a stop between log steps left open: the next session logs it where an
    uninterrupted run would."""

    steps: int
    seconds: float  # its training seconds
    loss_sum: float  # the summed loss, its mean over processes
    stats: dict  # the objective's summed stats (name -> CPU tensor), summed over processes

    def saved(self) -> dict:
        return {"steps": self.steps, "seconds": self.seconds, "loss_sum": self.loss_sum, "stats": self.stats}


@dataclass
class TrainingState:
    step: int
    """The step the weights were saved after."""
    best: float
    """The best periodic validation figure so far (it decides which checkpoint is `best`)."""
    rng: dict
    """The torch (and CUDA) generator states (rng_state)."""
    engine: str = "single"
    """single, ddp, fsdpN or deepspeed-zeroN: sharded engines resume only on their own kind."""
    processes: int | None = None
    total_steps: int | None = None
    """The run's length when it was saved (a resume may change it, with a warning)."""
    window: OpenWindow | None = None
    train_seconds: float = 0.0
    """Training seconds over every session so far (no evaluation, no saving), and their steps."""
    timed_steps: int = 0
    wall_seconds: float = 0.0
    """Wall seconds over every session so far, each from its loop's start to its last save."""
    sessions: int = 1
    val_nll: float | None = None
    """The last periodic validation figure; the pointers (last.json, best.json) carry it too."""
    optimizer: dict | None = None
    """The optimizer's state dict; None under an engine that saves its own (DeepSpeed, FSDP)."""

    def saved(self) -> dict:
        """The dict state.pt holds, with the keys and order tdlm has always written."""
        state = {"step": self.step, "best": self.best, "rng": self.rng, "engine": self.engine,
                 "processes": self.processes, "total_steps": self.total_steps,
                 "window": self.window.saved() if self.window is not None else None,
                 "train_seconds": self.train_seconds, "timed_steps": self.timed_steps,
                 "wall_seconds": self.wall_seconds, "sessions": self.sessions,
                 "pointer_info": {"val_nll": self.val_nll}}
        if self.optimizer is not None:
            state["optimizer"] = self.optimizer
        return state

    @classmethod
    def from_saved(cls, state: dict) -> TrainingState:
        """A state.pt's dict (checkpointer.load_state) as a TrainingState. `step`, `best` and
        `rng` are in every trainer's checkpoint; the rest have defaults for older ones."""
        window = state.get("window")
        return cls(step=state["step"], best=state["best"], rng=state["rng"], engine=state.get("engine", "single"),
                   processes=state.get("processes"), total_steps=state.get("total_steps"),
                   window=OpenWindow(**window) if window else None,
                   train_seconds=state.get("train_seconds", 0.0), timed_steps=state.get("timed_steps", 0),
                   wall_seconds=state.get("wall_seconds", 0.0), sessions=state.get("sessions", 1),
                   val_nll=state.get("pointer_info", {}).get("val_nll"), optimizer=state.get("optimizer"))

    @property
    def sharded(self) -> bool:
        """Whether an engine that shards the optimizer state per process wrote it."""
        return self.engine.startswith(("deepspeed", "fsdp"))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
