"""`tdlm report` on fabricated run directories: the table, the CSV, the plots and the answer line."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from tdlm.cli import cli
from tdlm.studies.report import comparison_lines, find_runs, pairs, plot_final, sort_runs, write_report

STEPS, BATCH, SEQ_LEN = 256, 32, 128
TOKENS_SEEN = STEPS * BATCH * SEQ_LEN


def fabricate_run(folder: Path, *, objective: str, epochs: float, test_nll: float | None, valid_nll: float = None,
                  stderr: float = 0.01, status: str | None = "finished", new_summary_fields: bool = True,
                  n_layers: int = 2, params: int = 921_088) -> Path:
    """A run directory as the trainer leaves it: config.json, metrics.jsonl, summary.json."""
    folder.mkdir(parents=True)
    train_tokens = round(TOKENS_SEEN / epochs)
    config = {"run": {"name": folder.name, "seed": 42, "out_dir": str(folder.parent)},
              "data": {"dataset": "wikitext2", "tokenizer": "bpe", "seq_len": SEQ_LEN, "max_train_tokens": train_tokens},
              "model": {"n_layers": n_layers, "d_model": 128, "n_heads": 4},
              "objective": {"name": objective},
              "sampler": {"name": "ancestral" if objective == "diffusion" else "ar"},
              "training": {"batch_size": BATCH, "max_steps": STEPS, "eval_every": 64}}
    (folder / "config.json").write_text(json.dumps(config))
    batches_per_epoch = STEPS / epochs
    last_step = STEPS if status else STEPS // 2
    records = []
    for step in range(64, last_step + 1, 64):
        records.append({"step": step, "kind": "train", "loss": 7.0, "epoch": step / batches_per_epoch})
        records.append({"step": step, "kind": "val", "nll_per_token": (test_nll or 6.0) + 1.0 * (1 - step / STEPS),
                        "stderr": 0.1})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if status is None:  # still training: a checkpoint, no summary
        (folder / "checkpoints").mkdir()
        (folder / "checkpoints" / "last.json").write_text(json.dumps({"step": last_step}))
        return folder
    summary = {"status": status, "step": STEPS, "total_steps": STEPS, "tokens_seen": TOKENS_SEEN,
               "parameters": params + 600_000, "non_embedding_parameters": params, "device": "cpu", "processes": 1,
               "wall_time_s": 229.0}
    if new_summary_fields:
        summary.update(epochs=epochs, train_tokens=train_tokens, flops_per_token=6e6, mfu=None)
    for split, nll in (("test", test_nll), ("valid", valid_nll)):
        if nll is not None and status == "finished":
            summary[split] = {"nll_per_token": nll, "stderr": stderr, "ppl": 2.718281828 ** nll, "bits_per_byte": nll / 2.4,
                              "is_bound": objective == "diffusion", "tokens": 360_590}
    (folder / "summary.json").write_text(json.dumps(summary))
    return folder


# AR overfits as its unique data shrinks; the diffusion bound keeps improving and passes it at 64 epochs.
SWEEP = {1: (6.40, 5.00), 4: (6.20, 4.95), 16: (5.90, 5.10), 64: (5.40, 5.60)}


@pytest.fixture()
def sweep_dir(tmp_path) -> Path:
    root = tmp_path / "runs" / "epochs_quick"
    for epochs, (diffusion, ar) in SWEEP.items():
        fabricate_run(root / f"diffusion-ep{epochs}", objective="diffusion", epochs=epochs, test_nll=diffusion)
        fabricate_run(root / f"ar-ep{epochs}", objective="ar", epochs=epochs, test_nll=ar,
                      new_summary_fields=epochs != 4)  # an older summary.json: epochs from metrics.jsonl
    fabricate_run(root / "diffusion-ep256", objective="diffusion", epochs=256, test_nll=None, status=None)
    (root / ".aborted" / "ar-ep1-1").mkdir(parents=True)  # set aside by the sweep: not a run to report
    (root / ".aborted" / "ar-ep1-1" / "config.json").write_text("{}")
    return root


def test_finds_every_run_and_reads_old_and_new_summaries(sweep_dir):
    runs = sort_runs(find_runs([sweep_dir]))
    assert [r.name for r in runs] == ["diffusion-ep1", "diffusion-ep4", "diffusion-ep16", "diffusion-ep64",
                                      "diffusion-ep256", "ar-ep1", "ar-ep4", "ar-ep16", "ar-ep64"]
    old = next(r for r in runs if r.name == "ar-ep4")
    assert "epochs" not in old.summary
    assert old.epochs == pytest.approx(4) and old.train_tokens == TOKENS_SEEN // 4
    unfinished = next(r for r in runs if r.name == "diffusion-ep256")
    assert unfinished.status == "stopped" and not unfinished.finished and unfinished.final("test") is None


def test_pairs_twins_and_answers_the_epochs_question(sweep_dir):
    runs = find_runs([sweep_dir])
    found = pairs(runs, "test")
    assert [(d.name, a.name) for d, a in found] == [(f"diffusion-ep{e}", f"ar-ep{e}") for e in SWEEP]
    lines = "\n".join(comparison_lines(runs))
    assert "1 epoch," in lines and "AR is lower than the diffusion bound" in lines
    assert "64 epochs" in lines and "the diffusion bound is lower" in lines
    assert "first at 64 epochs, of 1, 4, 16, 64" in lines


def test_no_overtaking_and_noise_are_worded_as_such(tmp_path):
    fabricate_run(tmp_path / "a" / "diffusion-ep1", objective="diffusion", epochs=1, test_nll=5.01, stderr=0.02)
    fabricate_run(tmp_path / "a" / "ar-ep1", objective="ar", epochs=1, test_nll=5.00, stderr=0.02)
    fabricate_run(tmp_path / "a" / "diffusion-ep8", objective="diffusion", epochs=8, test_nll=6.0)
    fabricate_run(tmp_path / "a" / "ar-ep8", objective="ar", epochs=8, test_nll=5.0)
    lines = "\n".join(comparison_lines(find_runs([tmp_path / "a"])))
    assert "within two standard errors" in lines
    assert "at none of the epoch counts run (1, 8)" in lines


def test_report_files_table_and_csv(sweep_dir, tmp_path):
    out = tmp_path / "report"
    result = CliRunner().invoke(cli, ["report", str(sweep_dir), "--out", str(out)])
    assert result.exit_code == 0, result.output
    markdown = (out / "report.md").read_text()
    assert markdown in result.output
    row = next(line for line in markdown.splitlines() if line.startswith("| diffusion-ep64 "))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:7] == ["diffusion-ep64", "diffusion", "finished", "921K", "16.4K", "1.05M", "64"]
    assert cells[7] == "5.400 ± 0.010" and cells[8].startswith("<= 221.4")
    assert "valid NELBO" not in markdown  # no run has final valid figures: no empty columns
    assert "| ar-ep64 | ar | finished |" in markdown and "| 270.4 |" in markdown  # exact: no <=
    assert "Not finished (left out of the final-value plots): diffusion-ep256." in markdown
    assert "aborted" not in markdown
    rows = list(csv.DictReader(io.StringIO((out / "report.csv").read_text())))
    assert len(rows) == 9
    ar64 = next(r for r in rows if r["run"] == "ar-ep64")
    assert float(ar64["test_nll_per_token"]) == 5.6 and ar64["test_is_bound"] == "False"
    assert float(ar64["epochs"]) == 64 and int(ar64["train_tokens"]) == TOKENS_SEEN // 64
    for png in ("valid_curves.png", "final_vs_epochs.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and f"]({png})" in markdown
    assert not (out / "final_vs_parameters.png").exists()  # one size only: nothing to plot against


def test_a_size_ladder_plots_against_parameters(tmp_path):
    for layers, params in ((2, 1_000_000), (4, 2_000_000), (8, 4_000_000)):
        for objective, nll in (("diffusion", 6.0 - layers / 10), ("ar", 5.0 - layers / 20)):
            fabricate_run(tmp_path / "sizes" / f"{objective}-L{layers}", objective=objective, epochs=5,
                          test_nll=nll, n_layers=layers, params=params)
    runs = find_runs([tmp_path / "sizes"])
    assert plot_final(runs, tmp_path / "e.png", x="epochs") is None
    assert plot_final(runs, tmp_path / "p.png", x="parameters") == tmp_path / "p.png"
    assert len(pairs(runs, "test")) == 3


def test_no_runs_is_a_one_line_error(tmp_path):
    result = CliRunner().invoke(cli, ["report", str(tmp_path)])
    assert result.exit_code == 2 and "no runs (folders with a config.json)" in result.output


def test_reads_the_trainers_own_files(tmp_path):
    """A real run directory from this repository's runs/ (skipped where none was trained)."""
    real = Path(__file__).resolve().parent.parent / "runs" / "quick_wikitext2"
    if not (real / "summary.json").exists():
        pytest.skip("no trained quick_wikitext2 run here")
    markdown, _ = write_report([real], tmp_path)
    assert "| quick_wikitext2 | diffusion | finished |" in markdown


def test_twins_differ_in_hue_and_groups_in_shade_and_labels_say_each_word_once(tmp_path, sweep_dir):
    from tdlm.studies.report import run_colours

    for name, objective in (("diffusion", "diffusion"), ("ar", "ar")):
        fabricate_run(tmp_path / "pair" / name, objective=objective, epochs=1, test_nll=5.0)
    twins = {r.name: r for r in find_runs([tmp_path / "pair"])}
    labels = [run.legend_label for run in twins.values()]
    assert sorted(labels) == ["ar (exact NLL)", "diffusion (NELBO, a bound)"]
    colours = run_colours(list(twins.values()))
    blue, red = colours["diffusion"], colours["ar"]
    assert blue[2] > blue[0] and red[0] > red[2]  # diffusion blue, AR red: twins never share a colour

    runs = find_runs([tmp_path / "pair"]) + find_runs([sweep_dir])
    colours = run_colours(runs)
    assert len(set(colours.values())) == len({(r.key(), r.is_diffusion) for r in runs})
    for run in runs:
        words = run.legend_label.replace(":", " ").replace("(", " ").split()
        assert words.count(run.objective) == 1, run.legend_label


def test_close_tick_values_are_thinned_so_their_labels_do_not_overlap():
    from tdlm.studies.report import spaced_ticks

    assert spaced_ticks([1, 4, 16, 64]) == [1, 4, 16, 64]
    assert spaced_ticks([1_000_000, 1_050_000, 1_100_000, 2_000_000, 2_010_000]) == [1_000_000, 2_010_000]
    assert spaced_ticks([1, 1.1, 3, 9, 9.5]) == [1, 3, 9.5]


def test_a_diffusion_run_named_after_its_ar_source_keeps_that_word_in_its_label(tmp_path):
    fabricate_run(tmp_path / "r" / "quick_from_ar", objective="diffusion", epochs=2, test_nll=4.5)
    fabricate_run(tmp_path / "r" / "quick_ar", objective="ar", epochs=2, test_nll=3.8)
    labels = {r.name: r.group_label for r in find_runs([tmp_path / "r"])}
    assert labels == {"quick_from_ar": "quick_from_ar", "quick_ar": "quick"}
