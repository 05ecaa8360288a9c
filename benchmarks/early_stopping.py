"""Early stopping on a finer validation grid: each model's best validation figure over the
validation curves of several run directories that train the same model with the same schedule
and seed (e.g. the full run, validated every 128 steps, and a copy stopped early with
`--stop-at`, validated every 16 steps), and the test figure of that best checkpoint.

    python benchmarks/early_stopping.py \
        d256:ar=runs/sizes_quick/ar-d256,runs/sizes_quick_early/ar-d256-early \
        d256:diffusion=runs/sizes_quick/diffusion-d256,runs/sizes_quick_early/diffusion-d256-early \
        --tests early_d256.json,early_diff_d256.json --out results.json

Each argument is LABEL:OBJECTIVE=RUN[,RUN...]. The runs of one model must agree wherever their
grids meet (checked: the same model and data give the same validation figure at the same step).
The test figure is read from the run whose `best` checkpoint is the overall best: its summary.json
when its own final test scored `best` there, else the `tdlm eval RUN --which best --split test
--json` output given with --tests (in argument order of the runs that need one).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tdlm.training.monitor import read_metrics


def validation(run_dir: Path) -> dict[int, tuple[float, float]]:
    """step -> (NLL or NELBO per token, its standard error) of the run's periodic validations."""
    return {r["step"]: (r["nll_per_token"], r.get("stderr") or 0.0) for r in read_metrics(run_dir, "val")}


def best_of(runs: list[Path]) -> tuple[int, float, float, Path]:
    """(step, figure, stderr, run) of the lowest validation figure over the runs' merged curves."""
    merged: dict[int, tuple[float, float, Path]] = {}
    for run in runs:
        for step, (value, stderr) in validation(run).items():
            if step in merged and abs(merged[step][0] - value) > 1e-6:
                raise SystemExit(f"{run} and {merged[step][2]} disagree at step {step}: not the same training")
            merged.setdefault(step, (value, stderr, run))
    step = min(merged, key=lambda s: merged[s][0])
    return step, *merged[step]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", help="LABEL:OBJECTIVE=RUN[,RUN...]")
    parser.add_argument("--tests", default="", help="tdlm eval --json outputs, comma-separated, for the "
                                                    "best runs without a final test of `best`")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here too")
    args = parser.parse_args()
    tests = [Path(p) for p in args.tests.split(",") if p]
    rows = []
    for spec in args.models:
        label, _, runs = spec.partition("=")
        runs = [Path(p) for p in runs.split(",")]
        step, value, stderr, run = best_of(runs)
        summary = json.loads((run / "summary.json").read_text())
        epochs = step * summary["tokens_seen"] / max(summary["step"], 1) / summary["train_tokens"]
        if summary.get("status") == "finished" and summary.get("checkpoint", "").endswith(f"{step:07d}"):
            test = summary["test"]
        else:
            path = tests.pop(0)
            text = path.read_text()
            test = json.loads(text[text.index("{"):])
            if test.get("checkpoint") != f"step-{step:07d}":
                raise SystemExit(f"{path} scored {test.get('checkpoint')}, not the best checkpoint of {run} "
                                 f"(step-{step:07d})")
        rows.append({"model": label, "run": str(run), "best_step": step, "best_epochs": round(epochs, 1),
                     "valid": value, "valid_stderr": stderr, "test": test["nll_per_token"],
                     "test_stderr": test["stderr"], "is_bound": test.get("is_bound")})
        print(f"{label:24s} best valid {value:.3f} ± {stderr:.3f} at step {step} ({epochs:.0f} epochs) -> "
              f"test {test['nll_per_token']:.3f} ± {test['stderr']:.3f}  [{run}]")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
