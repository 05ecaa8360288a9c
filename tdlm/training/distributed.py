"""What changes when a run has more than one process: the accelerator, stop agreement, sharded eval.

The same `tdlm run` works under `python -m tdlm run`, `torchrun` and `accelerate launch`
(DDP or DeepSpeed): the launcher sets WORLD_SIZE/RANK, accelerate picks the engine, and the
recipe alone fixes the global batch, the data order and the noise of every step.
"""

from __future__ import annotations

import contextlib
import os

import torch


def launched_world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def using_deepspeed() -> bool:
    return os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"


def using_fsdp() -> bool:
    return os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"


def make_accelerator(mixed_precision: str):
    """An Accelerator for however this process was launched.

    Without a GPU, accelerate treats a torchrun/`accelerate launch` worker as a lone process
    unless told it is on CPU (each worker would then train alone and all of them would write
    one run directory); `cpu=True` makes it a MULTI_CPU (DDP over gloo) run instead.
    DeepSpeed on CPU takes the gloo backend explicitly. FSDP on CPU: see _fsdp_on_cpu.
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    multi_process_cpu = launched_world_size() > 1 and not torch.cuda.is_available()
    handlers = []
    if multi_process_cpu and using_deepspeed():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed.ops

        # DeepSpeed would first compile a shared-memory all-reduce (~100 s); only its inference uses it
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        # without gloo named here, every DeepSpeed process on a CPU believes it is rank 0 of 1
        handlers.append(InitProcessGroupKwargs(backend="gloo"))
    cpu = multi_process_cpu and not using_deepspeed()
    accelerator = Accelerator(cpu=cpu, mixed_precision=mixed_precision, kwargs_handlers=handlers)
    if multi_process_cpu and using_fsdp():
        _fsdp_on_cpu(accelerator)
    return accelerator


def _fsdp_on_cpu(accelerator) -> None:
    """Make a multi-process CPU (gloo) run an FSDP one, as `accelerate launch` with an FSDP config
    does on GPUs. accelerate 1.x turns FSDP on only for accelerator devices (in AcceleratorState,
    the switch sits in the MULTI_GPU/NPU/XPU branch; a CPU run is MULTI_CPU and stays DDP), while
    torch's fully_shard and distributed checkpointing work over gloo. So the distributed type is
    set here, with the plugin accelerate would have built from the launcher's FSDP_* variables:
    launch/cpu_fsdp.yaml then runs the same FSDP2 code path as launch/fsdp.yaml, on a laptop."""
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()


def fsdp_version(accelerator) -> int:
    """2 (or 1) when the run shards its parameters with FSDP, 0 when it does not."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.FSDP:
        return 0
    return int(accelerator.state.fsdp_plugin.fsdp_version)


@contextlib.contextmanager
def gathered_parameters(model):
    """The whole parameters of a sharded model while the block runs: evaluation and sampling call
    `net.features` and `net.head_weight` directly (not LanguageModel.forward), and read the head's
    weight outside any module's forward.

    FSDP2 gathers a module's shards around that module's forward only, so the parameters the root
    unit owns (embeddings, final norm, head) would stay sharded; the blocks, FSDP units of their
    own, still gather around their forward. DeepSpeed ZeRO-3 leaves every parameter above its
    persistence threshold (a GPT-2 head: 3.2M weights at d = 64) an empty placeholder outside a
    forward: all are gathered. Any other model: nothing to do."""
    if any(hasattr(p, "ds_id") for p in model.parameters()):  # ZeRO-3's partitioned parameters
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(model.parameters())):
            yield
        return
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch without FSDP2
        FSDPModule = ()
    if not isinstance(model, FSDPModule):
        yield
        return
    model.unshard()
    try:
        yield
    finally:
        model.reshard()


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
        return self.each(requested)[0]

    def each(self, *flags: bool) -> list[bool]:
        """For each flag, whether any process raised it: one round-trip for all of them."""
        if self.group is None:
            return [bool(flag) for flag in flags]
        import torch.distributed as dist

        tensor = torch.tensor([int(flag) for flag in flags], dtype=torch.int32)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.group)
        return [bool(v) for v in tensor.tolist()]


def configure_deepspeed(accelerator, micro_batch: int, grad_clip: float | None) -> int:
    """Fill what accelerate cannot infer without a dataloader into the DeepSpeed config (before
    prepare) and return the ZeRO stage, or 0 when the run does not use DeepSpeed.

    Gradient accumulation stays with tdlm's micro-batch loop (DeepSpeed's own count stays 1) and
    clipping moves into the engine: under DeepSpeed `clip_grad_norm_` only reports the norm.
    """
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return 0
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_clipping"] = grad_clip or 0.0  # 0 turns clipping off; "auto" would become 1.0
    stage = int(config.get("zero_optimization", {}).get("stage", 0))
    if stage not in (1, 2, 3):
        raise ValueError(f"DeepSpeed ZeRO stage {stage}: tdlm runs stages 1-3; for plain data parallelism "
                         "use a DDP config (launch/multi_gpu.yaml)")
    return stage


def unwrap(accelerator, model):
    """The module inside DDP's (or DeepSpeed's) wrapper. accelerate's unwrap_model imports
    DeepSpeed whenever it is installed (and DeepSpeed prints an accelerator warning on import), so
    it is called only in a DeepSpeed run."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        return accelerator.unwrap_model(model)
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def from_main(accelerator, value):
    """The main process's `value` (any picklable object), on every process: a decision taken by the
    main process alone (the run directory, a check of gathered weights) that all must act on."""
    if accelerator.num_processes == 1:
        return value
    from accelerate.utils import broadcast_object_list

    box = [value]
    broadcast_object_list(box, from_process=0)
    return box[0]


def device_name(device) -> str:
    """What a run or a benchmark reports it ran on: the GPU's name, or the CPU and torch's threads."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
