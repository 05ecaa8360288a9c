"""The throughput benchmark runs, and the engine's train step neither syncs with the host nor
loops over sequences in Python (figures are printed by benchmarks/, never asserted here)."""

from __future__ import annotations

import math
from collections import Counter

import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

from tdlm import head
from tdlm.studies.bench import bench_config, engine_step, measure
from tdlm.cli import cli
from tdlm.components import VocabInfo

TINY = dict(vocab=64, d_model=16, batch=4, seq_len=16, steps=2, warmup=1, repeats=1)
# ops that read a device value on the host, or whose output shape depends on tensor values
SYNCING_OPS = ("_local_scalar_dense", "nonzero", "masked_select", "_unique", "unique_dim", "unique_consecutive",
               "is_nonzero", "equal", "repeat_interleave")


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one process-wide state: these tests pick their own device (the CPU even
    where other tests set up a GPU), as a fresh `tdlm bench` process would."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_measure_reports_both_rates_and_their_ratio(objective):
    result = measure(objective=objective, **TINY)
    assert result["engine_tokens_per_s"] > 0 and result["baseline_tokens_per_s"] > 0
    assert math.isfinite(result["ratio"]) and result["ratio"] > 0
    assert len(result["rounds"]) == 1 and result["config"]["objective"] == objective


def test_bench_command_prints_the_table():
    args = ["bench", "--device", "cpu"] + [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "ratio engine / baseline" in result.output


class Engine:
    """The TrainStep of a tiny config, stepping through one fixed batch."""

    def __init__(self, objective: str, *, batch: int = 4, micro: int | None = None, device: str = "cpu"):
        cfg, components = bench_config(vocab=64, d_model=16, n_layers=1, n_heads=2, batch=batch, seq_len=16,
                                       objective=objective, total_steps=100, seed=0)
        if micro:
            cfg = cfg.model_copy(update={"training": cfg.training.model_copy(update={"micro_batch_size": micro})})
        self.data = torch.randint(0, 64, (batch, 16), generator=torch.Generator().manual_seed(0))
        self.train_step = engine_step(cfg, components, VocabInfo(size=64, mask_id=64, bos_id=63), torch.device(device))
        self.optimizer, self.step = self.train_step.optimizer, 0


def trainer(objective: str, **kwargs) -> Engine:
    return Engine(objective, **kwargs)


def run_steps(engine, n: int) -> None:
    for _ in range(n):
        engine.train_step(engine.step, engine.data)
        engine.step += 1


class OpCounter(TorchDispatchMode):
    """Counts every aten op (backward included) that a block of code runs."""

    def __init__(self, host_scalars=()):
        super().__init__()
        self.ops, self.host_scalars = Counter(), {id(t) for t in host_scalars}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        indices = args[1] if name.startswith("index") and len(args) > 1 else ()
        if isinstance(indices, (list, tuple)) and any(getattr(i, "dtype", None) == torch.bool for i in indices):
            name = "nonzero"  # a boolean-mask index: the result's size is read on the host
        host_read = name == "_local_scalar_dense" and id(args[0]) in self.host_scalars
        if not host_read:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def step_counters(engine) -> list[torch.Tensor]:
    """AdamW's per-parameter step counts: host tensors even on a GPU (not capturable), so the
    optimizer reading them with .item() is no device sync."""
    return [state["step"] for state in engine.optimizer.state.values()]


@pytest.mark.parametrize("objective, micro", [("diffusion", None), ("ar", None), ("diffusion", 2)])
def test_train_step_never_reads_a_device_value_on_the_host(monkeypatch, objective, micro):
    # on a CPU the diffusion head gathers the masked rows (free there); on a GPU it must not
    monkeypatch.setattr(head, "SYNC_FREE_DEVICES", set())
    engine = trainer(objective, micro=micro)
    run_steps(engine, 1)  # creates the optimizer state
    counters = step_counters(engine)
    host_scalars = {id(t) for t in counters}
    calls = Counter()
    for method in ("item", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        original = getattr(torch.Tensor, method)

        def counting(self, *args, _name=method, _original=original, **kwargs):
            if id(self) not in host_scalars:
                calls[_name] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, method, counting)
    with OpCounter(counters) as seen:
        run_steps(engine, 3)
    monkeypatch.undo()
    assert seen.ops["mm"] > 0, "the counter saw no matmuls: it did not watch the step"
    assert not calls, f"train_step read tensors on the host: {dict(calls)}"
    syncing = {op: n for op, n in seen.ops.items() if op.startswith(SYNCING_OPS)}
    assert not syncing, f"train_step ran ops that wait for the device: {syncing}"


@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_train_step_runs_the_same_ops_whatever_the_batch_size(objective):
    """No per-sequence Python loop in corruption or loss: four times the sequences, the same ops."""
    counts = []
    for batch in (2, 8):
        engine = trainer(objective, batch=batch)
        run_steps(engine, 1)
        with OpCounter(step_counters(engine)) as seen:
            run_steps(engine, 1)
        counts.append(seen.ops)
    assert counts[0] == counts[1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("objective", ["diffusion", "ar"])
def test_train_step_does_not_synchronize_the_gpu(objective):
    engine = trainer(objective, device="cuda")
    run_steps(engine, 2)  # allocations and optimizer state
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run_steps(engine, 3)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def test_mfu_is_model_flops_over_the_peak_and_unknown_without_one(monkeypatch):
    result = measure(objective="diffusion", **TINY)
    assert result["peak_flops"] is None and result["engine_mfu"] is None  # a CPU has no peak in the table
    monkeypatch.setattr("tdlm.training.flops.peak_flops", lambda device, dtype: 1e12)
    result = measure(objective="diffusion", **TINY)
    assert result["flops_per_token"] > 0
    for side in ("engine", "baseline"):
        assert result[f"{side}_mfu"] == pytest.approx(result[f"{side}_tokens_per_s"] * result["flops_per_token"] / 1e12)


def test_compile_reaches_both_sides():
    """--compile: the engine's TrainStep compiles its network (training.compile), the hand-written
    loop its own (not run here: compiling on a CPU takes minutes)."""
    from tdlm.studies.bench import Baseline

    cfg, components = bench_config(vocab=64, d_model=16, n_layers=1, n_heads=2, batch=4, seq_len=16,
                                   objective="ar", total_steps=10, seed=0, compile=True)
    assert cfg.training.compile
    vocab = VocabInfo(size=64, mask_id=64, bos_id=63)
    baseline = Baseline(cfg, components, vocab, torch.device("cpu"), torch.zeros(4, 16, dtype=torch.long))
    assert isinstance(baseline.forward, torch._dynamo.eval_frame.OptimizedModule)
    step = engine_step(cfg, components, vocab, torch.device("cpu"))
    assert hasattr(step.model.net.features, "_torchdynamo_orig_callable")
