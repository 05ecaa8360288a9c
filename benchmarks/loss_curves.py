"""Training-loss curves of several runs against a reference run: a PNG, a CSV of the curves and a
JSON of how far each run strays from the reference (largest and mean absolute difference of the
logged training loss, step by step) with its `tdlm eval` test figure when one was saved.

    python benchmarks/loss_curves.py RUNS/plain_200 RUNS/zero2_200 RUNS/zero3_200 RUNS/fsdp_200 \
        --evals OUT/logs --out OUT/loss_curves

The first run is the reference. `--evals DIR`: where `<run name>_eval.log` holds `tdlm eval --json`
output (benchmarks/gpu_check.sh writes them so).
"""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from tdlm.training.monitor import read_metrics


def curve(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(run_dir, "train")}


def eval_figure(evals: Path | None, name: str) -> float | None:
    path = evals / f"{name}_eval.log" if evals else None
    if path is None or not path.exists():
        return None
    text = path.read_text()
    try:
        return json.loads(text[text.index("{"):])["nll_per_token"]
    except (ValueError, KeyError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories; the first is the reference")
    parser.add_argument("--out", type=Path, required=True, help="output prefix (.png, .csv, .json are added)")
    parser.add_argument("--evals", type=Path, default=None, help="folder of <run name>_eval.log files")
    args = parser.parse_args()
    curves = {run.name: curve(run) for run in args.runs if (run / "metrics.jsonl").exists()}
    if not curves:
        raise SystemExit(f"loss_curves: none of {', '.join(map(str, args.runs))} has a metrics.jsonl")
    reference_name = args.runs[0].name
    reference = curves.get(reference_name, {})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    steps = sorted(set().union(*curves.values()))
    with open(args.out.with_suffix(".csv"), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", *curves])
        for step in steps:
            writer.writerow([step, *(c.get(step, "") for c in curves.values())])
    report = {}
    for name, c in curves.items():
        shared = [s for s in c if s in reference]
        gaps = [abs(c[s] - reference[s]) for s in shared]
        report[name] = {"steps": len(c), "final_loss": c[max(c)] if c else None,
                        "max_abs_diff_vs_reference": max(gaps) if gaps else None,
                        "mean_abs_diff_vs_reference": sum(gaps) / len(gaps) if gaps else None,
                        "test_nll_per_token": eval_figure(args.evals, name)}
    args.out.with_suffix(".json").write_text(json.dumps({"reference": reference_name, "runs": report}, indent=2))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("loss_curves: matplotlib is missing; wrote the CSV and JSON only")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, c in curves.items():
        xs = sorted(c)
        ax.plot(xs, [c[s] for s in xs], label=name, linewidth=2.5 if name == reference_name else 1.2,
                linestyle="-" if name == reference_name else "--")
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_title(f"training loss against {reference_name}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out.with_suffix(".png"), dpi=120)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
