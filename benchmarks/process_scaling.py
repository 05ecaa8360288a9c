"""Training tokens/s of one process vs N processes (DDP) on this machine, as a ratio.

Both sides run the same recipe with the same global batch for the same steps, through the real
`tdlm run` (N processes via torchrun, which is how `accelerate launch` starts workers too). One
process gets every core as torch threads; N processes get cores / N threads each. The rate
is that of the training windows after the first (start-up and the first steps excluded),
read from each run's metrics.jsonl; sides alternate in rounds so drifting machine load hits both.

    python benchmarks/process_scaling.py                                   # quick recipe, 2 processes
    python benchmarks/process_scaling.py recipes/quick_wikitext2_ar.toml --steps 40
    python benchmarks/process_scaling.py --processes 4 --set model.d_model=256
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import click

ROOT = Path(__file__).resolve().parent.parent


def timed_run(recipe: str, processes: int, steps: int, log_every: int, overrides: tuple, out_dir: Path,
              name: str) -> float:
    """Mean tokens/s of the training windows after the first."""
    cores = os.cpu_count() or 1
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, cores // processes))}
    args = ["run", recipe, "--stop-at", str(steps), "--set", f"run.out_dir={out_dir}", "--set", f"run.name={name}",
            "--set", f"training.log_every={log_every}", "--set", "training.eval_every=1000000",
            "--set", "logging.progress=false", "--set", "logging.tensorboard=false",
            *[arg for o in overrides for arg in ("--set", o)]]
    if processes == 1:
        env = {k: v for k, v in env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
        command = [sys.executable, "-m", "tdlm", *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
                   "-m", "tdlm", *args]
    subprocess.run(command, env=env, check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    records = [json.loads(line) for line in (out_dir / name / "metrics.jsonl").read_text().splitlines()]
    rates = [r["tokens_per_s"] for r in records if r["kind"] == "train"][1:]
    if not rates:
        raise click.ClickException(f"--steps {steps} gives no training window after the first; raise it")
    return statistics.mean(rates)


@click.command()
@click.argument("recipe", default="recipes/quick_wikitext2.toml")
@click.option("--processes", type=click.IntRange(min=2), default=2, show_default=True)
@click.option("--steps", type=click.IntRange(min=2), default=30, show_default=True)
@click.option("--log-every", type=click.IntRange(min=1), default=5, show_default=True)
@click.option("--rounds", type=click.IntRange(min=1), default=2, show_default=True)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Recipe overrides for both sides.")
@click.option("--json", "as_json", is_flag=True)
def main(recipe, processes, steps, log_every, rounds, overrides, as_json):
    rates = {1: [], processes: []}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(rounds):
            for n in (1, processes):
                rates[n].append(timed_run(recipe, n, steps, log_every, overrides, Path(tmp), f"p{n}-r{round_}"))
    one, many = statistics.median(rates[1]), statistics.median(rates[processes])
    result = {"recipe": recipe, "overrides": list(overrides), "steps": steps, "cores": os.cpu_count(),
              "tokens_per_s": {"1": one, str(processes): many}, "ratio": many / one,
              "per_round": {str(k): v for k, v in rates.items()}}
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    click.echo(f"{recipe}: 1 process {one:,.0f} tok/s | {processes} processes {many:,.0f} tok/s | "
               f"ratio {processes}/1 = {many / one:.3f} (median of {rounds} rounds, {os.cpu_count()} cores)")


if __name__ == "__main__":
    main()
