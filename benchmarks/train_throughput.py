"""Training tokens/s of the tdlm engine vs a minimal hand-written PyTorch loop, as a ratio.

The same model, batch and seed on both sides, alternating in rounds; see tdlm/studies/bench.py for
what each side runs. The options are those of `tdlm bench` (this script runs that command):

    python benchmarks/train_throughput.py --vocab 4096 --d-model 64 --batch 64 --seq-len 128
    python benchmarks/train_throughput.py --objective ar --json
    python benchmarks/train_throughput.py --vocab 50258 --steps 5 --warmup 1   # the seed's tiny model

From Python: `from tdlm.studies.bench import measure; measure(vocab=4096, steps=20)` returns a dict.
"""

from tdlm.studies.bench import format_result, measure  # noqa: F401  (importable from here too)
from tdlm.cli import cli

if __name__ == "__main__":  # through the command group: its one handler turns errors into one line
    import sys

    cli(["bench", *sys.argv[1:]], prog_name="python benchmarks/train_throughput.py")
