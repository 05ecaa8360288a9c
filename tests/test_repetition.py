"""The repetition analysis of `tdlm report`: best-so-far curves, the crossover, C_crit, the plots."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from click.testing import CliRunner

from test_report import BATCH, SEQ_LEN, fabricate_run
from tdlm.cli import cli
from tdlm.studies.report import find_runs
from tdlm.studies.repetition import best_so_far, c_crit, crossing, repetition_lines, repetition_pairs

UNIQUE = 16_384  # 4 batches of 32 x 128 tokens: step s is epoch s / 4
STEPS = (64, 128, 192, 256)


def write_curve(run: Path, nlls: list[float], stderr: float | None = 0.01) -> None:
    records = []
    for step, nll in zip(STEPS, nlls):
        records.append({"step": step, "kind": "train", "loss": 7.0, "epoch": step * BATCH * SEQ_LEN / UNIQUE})
        records.append({"step": step, "kind": "val", "nll_per_token": nll,
                        **({} if stderr is None else {"stderr": stderr})})  # unknown: not logged
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def pair(root: Path, diffusion: list[float], ar: list[float], stderr: float | None = 0.01) -> Path:
    epochs = STEPS[-1] * BATCH * SEQ_LEN / UNIQUE
    write_curve(fabricate_run(root / "diffusion-u16k", objective="diffusion", epochs=epochs,
                              test_nll=min(diffusion)), diffusion, stderr)
    write_curve(fabricate_run(root / "ar-u16k", objective="ar", epochs=epochs, test_nll=min(ar)), ar, stderr)
    return root


def test_best_so_far_keeps_what_early_stopping_keeps(tmp_path):
    root = pair(tmp_path / "r", diffusion=[6.5, 6.2, 6.0, 5.9], ar=[5.5, 5.7, 6.1, 6.4])
    (diffusion, ar), = repetition_pairs(find_runs([root]))
    points = best_so_far(ar)
    assert [p.nll for p in points] == [5.5, 5.7, 6.1, 6.4]
    assert [p.best_nll for p in points] == [5.5] * 4 and {p.best_step for p in points} == {64}
    assert [p.epochs for p in points] == [16, 32, 48, 64]
    assert points[-1].flops == pytest.approx(256 * BATCH * SEQ_LEN * 6e6)  # summary's flops_per_token


def test_the_crossover_needs_two_standard_errors_below_ars_best(tmp_path):
    # AR's best is 5.5 at step 64 whatever it does later; the diffusion bound passes below it at
    # step 192 (5.45: only 0.05 below, within 2 SE = 0.057) and clearly at 256 (5.40).
    root = pair(tmp_path / "r", diffusion=[6.5, 5.6, 5.45, 5.40], ar=[5.5, 5.7, 6.1, 6.4], stderr=0.02)
    (diffusion, ar), = repetition_pairs(find_runs([root]))
    cross = crossing(diffusion, ar)
    assert cross is not None and cross.step == 256 and cross.epochs == 64
    assert cross.ar == 5.5 and cross.diffusion == 5.40 and cross.stderr == pytest.approx(math.hypot(0.02, 0.02))


def test_an_unknown_standard_error_shows_no_crossover(tmp_path):
    # one validation sequence: the trainer logs no stderr, and a 1.1-nat gap is still not "shown"
    root = pair(tmp_path / "r", diffusion=[6.5, 5.6, 5.0, 4.4], ar=[5.5, 5.7, 6.1, 6.4], stderr=None)
    runs = find_runs([root])
    assert crossing(*repetition_pairs(runs)[0]) is None
    table = "\n".join(repetition_lines(runs))
    assert "none within the runs" in table and "| 5.500 ± ? (16) | 4.400 ± ? (64) |" in table


def test_no_crossover_is_said_plainly(tmp_path):
    root = pair(tmp_path / "r", diffusion=[6.5, 6.2, 6.0, 5.9], ar=[5.5, 5.7, 6.1, 6.4])
    runs = find_runs([root])
    assert crossing(*repetition_pairs(runs)[0]) is None
    table = "\n".join(repetition_lines(runs))
    assert "none within the runs" in table and "| 5.500 ± 0.010 (16) | 5.900 ± 0.010 (64) |" in table


def test_a_model_best_at_its_first_validation_is_flagged(tmp_path):
    """A large model on few unique tokens can overfit before its first validation: its best
    figure is then an upper limit, and a crossover against it may be an artefact of the grid."""
    root = pair(tmp_path / "r", diffusion=[6.5, 6.2, 6.0, 5.9], ar=[6.3, 6.7, 7.1, 7.4], stderr=0.02)
    runs = find_runs([root])
    assert crossing(*repetition_pairs(runs)[0]) is not None  # what the grid alone would say
    table = "\n".join(repetition_lines(runs))
    assert ("- Caution: AR run ar-u16k is best at its first validation (step 64, 16 epochs): its optimum may come "
            "earlier, so its best figure here is only an upper limit and a crossover against it may be an artefact "
            "of the grid") in table
    assert "Caution: diffusion" not in table
    calm = "\n".join(repetition_lines(find_runs([pair(tmp_path / "s", diffusion=[6.5, 6.2, 6.0, 5.9],
                                                          ar=[5.7, 5.5, 6.1, 6.4])])))
    assert "Caution" not in calm


def test_c_crit_is_the_published_fit():
    assert c_crit(1_000_000) == pytest.approx(2.12e15)
    assert c_crit(2_448_382) == pytest.approx(2.12e15 * 2.448382 ** 2.174)  # all of WikiText-2: ~1.5e16
    assert 1.4e16 < c_crit(2_448_382) < 1.6e16


def test_report_writes_the_repetition_table_and_plots(tmp_path):
    root = pair(tmp_path / "r", diffusion=[6.5, 5.6, 5.45, 5.40], ar=[5.5, 5.7, 6.1, 6.4], stderr=0.02)
    out = tmp_path / "out"
    result = CliRunner().invoke(cli, ["report", str(root), "--out", str(out)])
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    assert "## Repetition: when does the diffusion bound drop below AR?" in markdown
    assert "| 64 epochs, 6.29e+12 (AR 5.500 vs <= 5.400 ± 0.028) |" in markdown
    assert (out / "repetition.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](repetition.png)" in markdown
