"""What changes when a run has more than one process: the accelerator, stop agreement, sharded eval.

The same `tdlm run` works under `python -m tdlm run`, `torchrun` and `accelerate launch`
(DDP or DeepSpeed): the launcher sets WORLD_SIZE/RANK, accelerate picks the engine, and the
recipe alone fixes the global batch, the data order and the noise of every step.
"""

from __future__ import annotations

import os

import torch


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def make_accelerator(mixed_precision: str):
    """An Accelerator for however this process was launched.

    Without a GPU, accelerate treats a torchrun/`accelerate launch` worker as a lone process
    unless told it is on CPU (each worker would then train alone and all of them would write
    one run directory); `cpu=True` makes it a MULTI_CPU (DDP over gloo) run instead.
    DeepSpeed on CPU takes the gloo backend explicitly.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    multi_process_cpu = launched_world_size() > 1 and not torch.cuda.is_available()
    handlers = []
    if multi_process_cpu and using_deepspeed():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    cpu = multi_process_cpu and not using_deepspeed()
    return Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers)


class StopAgreement:
    """Ranks agree on stopping at the same step: a SIGTERM that reaches one rank (or reaches them
    at different steps) stops all of them after the same step, so every rank enters the
    checkpoint save together instead of one waiting in an all-reduce the others never join.

    The flag travels over a gloo group on the CPU, so agreeing every step costs a host
    round-trip between processes but never a GPU synchronisation.
    """

    def __init__(self, num_processes: int):
        self.group = None
        if num_processes > 1:
            import torch.distributed as dist

            self.group = dist.new_group(backend="gloo")

    def any(self, requested: bool) -> bool:
        if self.group is None:
            return requested
        import torch.distributed as dist

        flag = torch.tensor([int(requested)], dtype=torch.int32)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())
