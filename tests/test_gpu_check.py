"""benchmarks/gpu_check.sh runs its whole logic on a CPU (SMOKE=1): every default step exits 0 and
leaves the small summaries the GPU run is read from. Slow (a few minutes on 2 cores): run it with
`pytest -m slow tests/test_gpu_check.py` after changing the script."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_gpu_check_smoke_runs_every_step(tmp_path, wikitext2_files):
    """On WikiText-2 as the GPU run (its tokens cached where tdlm caches them: once)."""
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {**os.environ, "SMOKE": "1", "OUT": str(out), "RUNS": str(runs),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    steps = [line.split(",") for line in (out / "logs" / "steps.csv").read_text().splitlines()[1:]]
    failed = {name: (out / "logs" / f"{name}.log").read_text()[-1500:] for name, code, _ in steps if code != "0"}
    assert not failed, failed
    names = {name for name, _, _ in steps}
    assert {"bench_tiny_wikitext2", "bench_tiny_wikitext2_ar", "tiny_diffusion", "tiny_ar", "small_eager",
            "small_compiled", "dist_plain", "dist_zero2", "dist_zero3", "dist_fsdp", "dist_fsdp_eval",
            "dist_curves", "sweep_jobs"} <= names
    assert not names & {"small_bench", "kernel_check"}  # optional steps stay out unless ONLY names them
    assert json.loads((out / "bench_tiny_wikitext2.json").read_text())["engine_tokens_per_s"] > 0
    curves = json.loads((out / "dist_loss_curves.json").read_text())
    assert set(curves["runs"]) == {"plain_4", "zero2_4", "zero3_4", "fsdp_4"}
    assert all(r["test_nll_per_token"] for r in curves["runs"].values())
    assert (out / "dist_loss_curves.png").stat().st_size > 0
    timing = json.loads((out / "summaries" / "tiny_wikitext2.summary.json").read_text())["timing"]
    assert timing["startup_s"] > 0
    assert len(json.loads((out / "sweep_jobs.json").read_text())) == 4
    assert not list(out.rglob("*.safetensors"))  # small files only
