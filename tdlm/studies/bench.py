"""Training throughput: the engine's train step against a minimal hand-written PyTorch loop.

Both sides train the same Transformer (same config, same initial weights) on the same fixed
batch, in one process, taking turns (step by step on a CPU) so that load from other
processes hits both alike. The engine side runs `tdlm.training.step.TrainStep` itself, the
code `tdlm run` runs each step; the baseline is the loop one would write by hand: the full
[B, N, V] logits, the loss maths inline, plain AdamW, `clip_grad_norm_`, no accelerate. The
ratio is what the engine's head (only at masked positions, chunked linear + cross-entropy)
buys, net of what its structure (plugins, accelerate, per-step generators) costs.

    tdlm bench --recipe recipes/tiny_wikitext2.toml --steps 5    # the seed's tiny model
    tdlm bench --suite                                           # tiny and quick, diffusion and AR
    tdlm bench --vocab 4096 --d-model 64 --objective ar --steps 10
    tdlm bench --device cuda --recipe recipes/small_wikitext2.toml --compile   # tokens/s and MFU, compiled

Both sides report tokens/s and MFU: model FLOPs per token (tdlm.training.flops, the same count
for both: the engine's saving is skipped work, not fewer model FLOPs) over the device's peak.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import time

import torch
import torch.nn.functional as F


# The recipes `--suite` measures: the seed's tiny model and the quick CPU model, each objective.
SUITE = ("recipes/tiny_wikitext2.toml", "recipes/tiny_wikitext2_ar.toml",
         "recipes/quick_wikitext2.toml", "recipes/quick_wikitext2_ar.toml")


GPT2_VOCAB = 50257


def recipe_settings(path: str) -> dict:
    """measure()'s keyword arguments for the model, batch, vocabulary and objective of a recipe."""
    from tdlm.config import read_recipe

    cfg = read_recipe(path)
    vocab = GPT2_VOCAB if cfg.data.tokenizer == "gpt2" else cfg.data.bpe_vocab_size
    return {"vocab": vocab, "batch": cfg.training.batch_size, "seq_len": cfg.data.seq_len,
            "objective": cfg.objective.name, "model": cfg.model.model_dump()}


def recipe_steps(path: str) -> int:
    """The training steps `tdlm run` would take: max_steps, or epochs of the (cached) train split."""
    from tdlm.config import read_recipe
    from tdlm.data import load_corpus, train_stream

    cfg = read_recipe(path)
    if cfg.training.max_steps:
        return cfg.training.max_steps
    stream = train_stream(load_corpus(cfg.data, progress=False), cfg.data, cfg.training.batch_size, cfg.run.seed)
    return math.ceil(cfg.training.epochs * stream.batches_per_epoch)


def bench_config(*, vocab: int, d_model: int, n_layers: int, n_heads: int, batch: int, seq_len: int,
                 objective: str, total_steps: int, seed: int, model: dict | None = None, compile: bool = False):
    """The RunConfig and resolved components a recipe with these settings would give
    (`model`: the whole [model] section, e.g. a recipe's; it overrides the three sizes;
    `compile`: training.compile)."""
    from tdlm.config import RunConfig, resolve_components
    from tdlm.registry import build_registry

    cfg = RunConfig.model_validate({
        "run": {"name": "bench", "seed": seed},
        "data": {"seq_len": seq_len},
        "model": model or {"n_layers": n_layers, "d_model": d_model, "n_heads": n_heads},
        "objective": {"name": objective},
        "training": {"batch_size": batch, "max_steps": total_steps, "log_every": total_steps, "compile": compile},
    })
    return cfg, resolve_components(cfg, build_registry())


def engine_step(cfg, components, vocab, device: torch.device):
    """The TrainStep `tdlm run` would build for this config, on `device`, in one process."""
    from accelerate import Accelerator

    from tdlm.lm import build_model
    from tdlm.training.step import TrainStep, mixed_precision

    tc = cfg.training
    precision = mixed_precision(tc.mixed_precision) if device.type == "cuda" else "no"
    accelerator = Accelerator(mixed_precision=precision, cpu=device.type == "cpu")
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg, components, vocab).model
    return TrainStep(model, tc, accelerator, seed=cfg.run.seed, total_steps=tc.max_steps)


class Baseline:
    """The hand-written loop: the same network class, the loss written out, plain AdamW."""

    def __init__(self, cfg, components, vocab, device: torch.device, batch: torch.Tensor):
        from tdlm.model import Transformer

        self.vocab, self.device, self.batch = vocab, device, batch
        objective = components["objective"]
        # what the objective declares: the AR loss for a causal one, else the NELBO with t ~ U[t_eps, 1]
        self.causal = objective.component.cls.causal
        self.t_eps = objective.component.cls.training_t_min(objective.config)
        self.grad_clip = cfg.training.grad_clip or float("inf")
        torch.manual_seed(cfg.run.seed)
        self.net = Transformer(cfg.model, vocab_size=vocab.size, max_len=cfg.data.seq_len,
                               causal=self.causal).to(device)
        tc = cfg.training
        self.optimizer = torch.optim.AdamW(self.net.parameters(), lr=tc.lr, betas=tc.betas,
                                           weight_decay=tc.weight_decay)
        self.generator = torch.Generator(device=device).manual_seed(cfg.run.seed)
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()  # what the engine's "auto" picks
        self.autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
        self.forward = torch.compile(self.net) if tc.compile else self.net  # as the engine: the network, not the loss

    def loss(self, x0: torch.Tensor) -> torch.Tensor:
        if self.causal:
            inputs = torch.cat([torch.full_like(x0[:, :1], self.vocab.bos_id), x0[:, :-1]], dim=1)
            logits = self.forward(inputs)
            return F.cross_entropy(logits.flatten(0, 1).float(), x0.flatten())
        # masked diffusion, linear schedule: stratified t, mask w.p. t, CE / t at masked positions
        batch, device = x0.shape[0], x0.device
        u = torch.rand((), generator=self.generator, device=device, dtype=torch.float64)
        t = ((u + torch.arange(batch, device=device, dtype=torch.float64) / batch) % 1.0).float()
        t = self.t_eps + (1.0 - self.t_eps) * t
        masked = torch.rand(x0.shape, generator=self.generator, device=device) < t[:, None]
        logits = self.forward(torch.where(masked, self.vocab.mask_id, x0))
        ce = F.cross_entropy(logits.flatten(0, 1).float(), x0.flatten(), reduction="none").view_as(x0)
        return (ce * masked / t[:, None]).sum() / x0.numel()

    def train_step(self) -> torch.Tensor:
        x0 = to_device(self.batch, self.device)
        with self.autocast():
            loss = self.loss(x0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss.detach()


def to_device(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cuda":  # pinned, so the copy does not wait for the GPU
        return batch.pin_memory().to(device, non_blocking=True)
    return batch.to(device)


def _timed(step_fn, steps: int, device: torch.device) -> float:
    """Seconds for `steps` steps, ending with one host sync, as at a logging interval."""
    running = torch.zeros((), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        running += step_fn()
    loss = running.item() / steps
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    if not math.isfinite(loss):
        raise RuntimeError(f"the benchmark's training loss became {loss}")
    return seconds


def measure(*, vocab: int = 4096, d_model: int = 64, n_layers: int = 2, n_heads: int = 4, batch: int = 64,
            seq_len: int = 128, steps: int = 20, warmup: int = 3, objective: str = "diffusion",
            device: str = "cpu", repeats: int = 3, seed: int = 0, threads: int | None = None,
            chunk: int | None = None, model: dict | None = None, fused: bool = False, compile: bool = False,
            log=None) -> dict:
    """Training tokens/s of TrainStep and of the hand-written loop: the median over
    `repeats` rounds of `steps` timed steps each (after `warmup` untimed ones), and the ratio
    engine / baseline: the median over all turns of the two sides' speed ratio in that turn
    (`ratio_of_medians` is the plain ratio of the two medians; it moves with the load).

    Within a round the two sides take turns every `chunk` steps, the first to go alternating,
    so that load from other processes falls on both alike. Default chunk: 1 on a CPU (a step
    there is synchronous, so timing one step costs nothing); all `steps` on a GPU, where
    timing a chunk ends in a sync that would hide the queueing ahead a real run relies on.
    `threads`: torch's CPU threads while it runs. `model`: a whole [model] section (a recipe's)
    in place of the three sizes. `fused=True`: on CUDA the engine uses Liger's fused linear +
    cross-entropy where it is installed (as TDLM_FUSED_CE=1 does). `compile=True`: torch.compile on
    both sides' network (training.compile for the engine). `log(str)` hears of each round.
    """
    if steps < 1 or repeats < 1 or warmup < 0 or (chunk is not None and chunk < 1):
        raise ValueError(f"need steps, repeats, chunk >= 1 and warmup >= 0, got {steps=}, {repeats=}, "
                         f"{chunk=}, {warmup=}")
    if objective not in ("diffusion", "ar"):
        raise ValueError(f"objective must be 'diffusion' or 'ar', got {objective!r}")
    device = torch.device(device)
    chunk = chunk or (1 if device.type == "cpu" else steps)
    from tdlm import head

    before, fused_before = torch.get_num_threads(), head.USE_FUSED
    if threads:
        torch.set_num_threads(threads)
    head.USE_FUSED = fused
    try:
        return _measure(vocab=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, batch=batch,
                        seq_len=seq_len, steps=steps, warmup=warmup, objective=objective, device=device,
                        repeats=repeats, seed=seed, chunk=chunk, model=model, compile=compile, log=log)
    finally:
        torch.set_num_threads(before)
        head.USE_FUSED = fused_before


def _measure(*, vocab, d_model, n_layers, n_heads, batch, seq_len, steps, warmup, objective, device, repeats,
             seed, chunk, model, compile, log) -> dict:
    from tdlm.components import VocabInfo
    from tdlm.training.flops import flops_per_token, mfu, peak_flops
    from tdlm.training.distributed import device_name, unwrap

    cfg, components = bench_config(vocab=vocab, d_model=d_model, n_layers=n_layers, n_heads=n_heads, batch=batch,
                                   seq_len=seq_len, objective=objective, seed=seed, model=model,
                                   total_steps=repeats * (steps + warmup), compile=compile)
    info = VocabInfo(size=vocab, mask_id=vocab, bos_id=vocab - 1)
    data = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(seed))
    train_step = engine_step(cfg, components, info, device)
    baseline = Baseline(cfg, components, info, device, data)
    engine_net = unwrap(train_step.accelerator, train_step.model).net
    for (name, a), b in zip(engine_net.state_dict().items(), baseline.net.state_dict().values()):
        if not torch.equal(a, b):
            raise AssertionError(f"engine and baseline start from different weights ({name})")

    step = 0

    def engine():
        nonlocal step
        loss, _ = train_step(step, data)  # the same host batch at every step
        step += 1
        return loss

    sides = {"engine": engine, "baseline": baseline.train_step}
    rounds, pairs = [], []  # pairs: baseline / engine seconds of each turn, the two run back to back
    for r in range(repeats):
        for _ in range(warmup):
            for step_fn in sides.values():
                step_fn()
        seconds = dict.fromkeys(sides, 0.0)
        for turn, start in enumerate(range(0, steps, chunk)):
            order = list(sides) if (r + turn) % 2 == 0 else list(sides)[::-1]
            took = {side: _timed(sides[side], min(chunk, steps - start), device) for side in order}
            pairs.append(took["baseline"] / took["engine"])
            for side in sides:
                seconds[side] += took[side]
        figures = {side: steps * batch * seq_len / s for side, s in seconds.items()}
        figures["ratio"] = figures["engine"] / figures["baseline"]
        rounds.append(figures)
        if log:
            log(f"round {r + 1}/{repeats}: engine {figures['engine']:,.0f} tok/s, "
                f"baseline {figures['baseline']:,.0f} tok/s, ratio {figures['ratio']:.3f}")
    engine = statistics.median(f["engine"] for f in rounds)
    base = statistics.median(f["baseline"] for f in rounds)
    per_token = flops_per_token(engine_net, seq_len)["total"]
    peak = peak_flops(device, train_step.accelerator.mixed_precision)
    return {
        "config": {"vocab": vocab, "d_model": cfg.model.d_model, "n_layers": cfg.model.n_layers,
                   "n_heads": cfg.model.n_heads, "batch": batch, "seq_len": seq_len, "steps": steps, "warmup": warmup,
                   "objective": objective, "repeats": repeats, "chunk": chunk, "seed": seed,
                   "model": cfg.model.model_dump()},
        "fused_head": head_kernel(device),
        "device": device_name(device),
        "mixed_precision": train_step.accelerator.mixed_precision,
        "parameters": engine_net.num_parameters(),
        "engine_tokens_per_s": engine,
        "baseline_tokens_per_s": base,
        "flops_per_token": per_token,
        "peak_flops": peak,  # None: a CPU or a GPU not in tdlm.training.flops.PEAK_FLOPS
        "engine_mfu": mfu(engine, per_token, peak),
        "baseline_mfu": mfu(base, per_token, peak),
        "compiled": compile,
        # paired: each turn's two sides ran back to back, so a change of load cancels out
        "ratio": statistics.median(pairs),
        "ratio_of_medians": engine / base,
        "turns": len(pairs),
        "rounds": rounds,
    }


def format_result(result: dict) -> str:
    c = result["config"]
    lines = [
        f"train throughput: {c['objective']}, vocab {c['vocab']:,}, d_model {c['d_model']}, {c['n_layers']} layers, "
        f"batch {c['batch']} x {c['seq_len']}, {result['parameters']:,} parameters, on {result['device']} "
        f"(mixed precision: {result['mixed_precision']}; head: {result['fused_head']})",
        f"{c['repeats']} rounds of {c['steps']} timed steps (+{c['warmup']} warm-up) per side, "
        f"taking turns every {c['chunk']} step(s)" + ("; torch.compile on both" if result.get("compiled") else ""),
        f"model FLOPs per token {result['flops_per_token']:,}; peak "
        + (f"{result['peak_flops'] / 1e12:,.0f} TFLOP/s" if result["peak_flops"] else "unknown (MFU: unknown)"),
        "",
        f"{'':<10}{'tokens/s (median)':>20}{'ms/step':>10}{'MFU':>9}",
    ]
    for side in ("engine", "baseline"):
        rate, share = result[f"{side}_tokens_per_s"], result[f"{side}_mfu"]
        lines.append(f"{side:<10}{rate:>20,.0f}{1000 * c['batch'] * c['seq_len'] / rate:>10.1f}"
                     f"{'unknown' if share is None else f'{100 * share:.1f}%':>9}")
    per_round = ", ".join(f"{f['ratio']:.3f}" for f in result["rounds"])
    lines.append(f"\nratio engine / baseline: {result['ratio']:.3f}   (median of {result['turns']} paired turns; "
                 f"ratio of the medians {result['ratio_of_medians']:.3f}; per round: {per_round})")
    return "\n".join(lines)


def head_kernel(device: torch.device) -> str:
    """Which linear + cross-entropy the engine ran: a fused CUDA kernel or tdlm's chunked one."""
    from tdlm import head

    if device.type == "cuda" and head.USE_FUSED and head.fused_available():
        return "liger fused"
    return "plain where it fits, else chunked" if device.type == "cuda" else "tdlm chunked"


def suite(recipes=SUITE, *, project: bool = True, **settings) -> list[dict]:
    """measure() for each recipe's model, batch and objective; with `project`, each result gets
    the recipe's training steps and their projected wall time at the engine's speed (training
    steps only: evaluation and the final scoring come on top)."""
    results = []
    for path in recipes:
        result = measure(**{**settings, **recipe_settings(path)})
        result["recipe"] = path
        if project:
            steps = recipe_steps(path)
            c = result["config"]
            result["recipe_steps"] = steps
            result["projected_train_seconds"] = steps * c["batch"] * c["seq_len"] / result["engine_tokens_per_s"]
        results.append(result)
    return results


def format_suite(results: list[dict]) -> str:
    lines = [f"engine vs hand-written full-head loop, on {results[0]['device']} "
             f"(head: {results[0]['fused_head']}); ratios are medians of paired turns", "",
             f"{'recipe':<36}{'objective':>10}{'engine s/step':>15}{'baseline s/step':>17}{'ratio':>8}"
             f"{'steps':>8}{'projected':>11}"]
    for r in results:
        c = r["config"]
        tokens = c["batch"] * c["seq_len"]
        projected = r.get("projected_train_seconds")
        lines.append(f"{r['recipe']:<36}{c['objective']:>10}{tokens / r['engine_tokens_per_s']:>15.3f}"
                     f"{tokens / r['baseline_tokens_per_s']:>17.3f}{r['ratio']:>8.2f}"
                     f"{r.get('recipe_steps', ''):>8}"
                     f"{'' if projected is None else f'{projected / 60:.1f} min':>11}")
    return "\n".join(lines)
