"""Sweeps: the shipped sweep files resolve, bad ones fail at load time, and runs are skipped,
resumed, restarted and launched as they should be (a fake runner; one tiny real sweep)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from toydata import toy_recipe, write_toy_corpus

from tdlm.cli import cli
from tdlm.config import parse_override, toml_value
from tdlm.studies.sweep import SweepError, load_sweep, run_sweep, subprocess_runner

ROOT = Path(__file__).resolve().parent.parent
SWEEPS = sorted((ROOT / "recipes" / "sweeps").glob("*.toml"))
# Train tokens of WikiText-2 under each tokenizer (the cached streams' lengths).
WIKITEXT2_TRAIN_TOKENS = {"gpt2": 2_448_382, "bpe": 3_058_089}


@pytest.fixture(scope="module")
def shipped():
    from tdlm.registry import build_registry

    registry = build_registry()
    return {path.stem: load_sweep(path, registry) for path in SWEEPS}


def test_the_three_sweeps_ship():
    assert {p.stem for p in SWEEPS} >= {"epochs_wikitext2", "sizes_wikitext2", "epochs_quick"}


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.stem)
def test_every_run_of_a_shipped_sweep_resolves(shipped, path):
    sweep = shipped[path.stem]
    assert sweep.runs and len({r.name for r in sweep.runs}) == len(sweep.runs)
    for run in sweep.runs:  # load_sweep validated each; check what it hands to `tdlm run`
        assert run.cfg.run.name == run.name and Path(run.cfg.run.out_dir) / run.name == run.run_dir
        assert run.non_embedding_parameters
    objectives = {run.cfg.objective.name for run in sweep.runs}
    assert objectives == {"diffusion", "ar"}  # every shipped sweep compares the two


@pytest.mark.parametrize("name, epochs", [("epochs_wikitext2", [5, 10, 20, 50, 100]), ("epochs_quick", [1, 4, 16, 64])])
def test_epoch_sweeps_hold_compute_fixed_and_divide_the_data(shipped, name, epochs):
    sweep = shipped[name]
    assert [r.name for r in sweep.runs] == [f"{o}-ep{e}" for o in ("diffusion", "ar") for e in epochs]
    budgets = set()
    for run in sweep.runs:
        cfg, expected = run.cfg, int(run.name.rsplit("ep", 1)[1])
        global_batch = cfg.training.batch_size * cfg.data.seq_len
        tokens_seen = cfg.training.max_steps * global_batch
        budgets.add((tokens_seen, cfg.training.batch_size))
        unique = cfg.data.max_train_tokens
        assert unique % global_batch == 0  # whole batches: the epochs are exact
        assert tokens_seen / unique == expected
        assert unique >= 4 * global_batch  # even the most repeated run has a few batches per epoch
        assert unique <= WIKITEXT2_TRAIN_TOKENS[cfg.data.tokenizer]
    assert len(budgets) == 1  # the same steps and batch for every run


def test_epochs_quick_is_the_quick_recipes_at_a_cpu_budget(shipped):
    runs = shipped["epochs_quick"].runs
    assert {r.base.name for r in runs} == {"quick_wikitext2.toml", "quick_wikitext2_ar.toml"}
    assert {r.cfg.training.max_steps for r in runs} == {256}  # ~4 min diffusion, ~2 min AR on 2 cores


def test_size_ladder_names_match_the_non_embedding_parameters(shipped):
    runs = shipped["sizes_wikitext2"].runs
    assert len(runs) == 10
    stated = {"1m": 1e6, "3m": 3e6, "10m": 10e6, "30m": 30e6, "100m": 100e6}
    for run in runs:
        size = stated[re.search(r"size(\d+m)$", run.name).group(1)]
        assert abs(run.non_embedding_parameters - size) <= 0.25 * size, (run.name, run.non_embedding_parameters)
    comments = (ROOT / "recipes/sweeps/sizes_wikitext2.toml").read_text()
    for run in runs:  # the sizes stated in the file's comment are the real ones
        assert f"{run.non_embedding_parameters:,}" in comments


# -- sweep files that must fail at load time -------------------------------------------------
def write_sweep(folder: Path, body: str, *, bases=("diffusion", "ar")) -> Path:
    corpus = folder / "corpus"
    if not corpus.exists():
        write_toy_corpus(corpus)
    for objective in bases:
        toy_recipe(folder / f"toy_{objective}.toml", corpus, folder / "unused", objective=objective)
    names = ", ".join(f'"toy_{o}.toml"' for o in bases)
    path = folder / "s.toml"
    path.write_text(f'[sweep]\nname = "s"\nbases = [{names}]\n' + body)
    return path


@pytest.mark.parametrize("body, message", [
    ('[grid]\n"training.max_step" = [1, 2]\n', "unknown key 'training.max_step' (did you mean 'max_steps'?)"),
    ('[grid]\n"corruption.name" = ["uniform", "unifrom"]\n', "unknown corruption 'unifrom'"),
    ('[fixed]\n"model.n_heads" = 5\n', "d_model (32) must be divisible by n_heads (5)"),
    ('[grid]\n"training.lr" = []\n', "grid key 'training.lr' has no values"),
    ('[grid]\n"training" = [1]\n', "is not of the form section.key"),
    ('[fixed]\n"run.name" = "x"\n', "run.name is set by the sweep"),
    ('[fixed]\n"training.lr" = 0.1\n[grid]\n"training.lr" = [0.2]\n', "training.lr set in more than one"),
    ('[[zip]]\n"model.d_model" = [32, 64]\n"model.n_heads" = [2]\n', "its lists differ in length"),
    ('[[zip]]\nlabels = ["a", "a"]\n"model.d_model" = [32, 64]\n', "two runs would be named 'diffusion-a'"),
    ('[[zip]]\nlabels = ["a/b"]\n"model.d_model" = [32]\n', "run name 'diffusion-a/b' may hold only"),
    ('[grids]\n"training.lr" = [1]\n', "unknown key 'grids' (did you mean 'grid'?)"),
    ('[grid]\n"training.lr" = 0.1\n', "grid.training.lr: Input should be a valid list"),
])
def test_a_bad_sweep_fails_before_anything_runs(tmp_path, body, message):
    with pytest.raises(SweepError) as caught:
        load_sweep(write_sweep(tmp_path, body))
    assert message in str(caught.value)
    assert "\n" not in str(caught.value)


def test_base_and_bases_are_exclusive(tmp_path):
    path = write_sweep(tmp_path, "")
    path.write_text(path.read_text().replace('name = "s"', 'name = "s"\nbase = "toy_ar.toml"'))
    with pytest.raises(SweepError, match="exactly one of base"):
        load_sweep(path)


def test_names_from_the_grid_and_zip(tmp_path):
    body = ('[fixed]\ntraining.max_steps = 4\n'  # an unquoted dotted key works too
            '[grid]\n"training.lr" = [0.001, 3e-05]\n"data.max_train_tokens" = [204800, 5000]\n'
            '[[zip]]\n"model.d_model" = [32, 64]\n"model.n_heads" = [2, 4]\n')
    sweep = load_sweep(write_sweep(tmp_path, body))
    names = [r.name for r in sweep.runs]
    assert len(names) == 2 * 2 * 2 * 2
    assert names[0] == "diffusion-lr0.001-tokens205k-d32-h2" and names[-1] == "ar-lr3e-05-tokens5000-d64-h4"
    last = sweep.runs[-1]
    assert last.varied == ("training.lr=3e-05", "data.max_train_tokens=5000", "model.d_model=64", "model.n_heads=4")
    assert last.overrides[0] == "training.max_steps=4" and last.cfg.training.max_steps == 4
    assert last.overrides[-2:] == ('run.out_dir="runs/s"', f'run.name="{last.name}"')


def test_bases_with_one_objective_are_named_by_file_and_one_base_not_at_all(tmp_path):
    path = write_sweep(tmp_path, '[grid]\n"training.lr" = [0.001]\n', bases=("diffusion",))
    assert [r.name for r in load_sweep(path).runs] == ["lr0.001"]
    shutil.copy(tmp_path / "toy_diffusion.toml", tmp_path / "other.toml")
    path.write_text(path.read_text().replace('bases = ["toy_diffusion.toml"]', 'bases = ["toy_diffusion.toml", "other.toml"]'))
    assert [r.name for r in load_sweep(path).runs] == ["toy_diffusion-lr0.001", "other-lr0.001"]


def test_a_grid_can_set_a_field_to_none(tmp_path):
    sweep = load_sweep(write_sweep(tmp_path, '[grid]\n"training.grad_clip" = ["none", 0.5]\n', bases=("ar",)))
    assert [(r.name, r.cfg.training.grad_clip) for r in sweep.runs] == [("gradclipnone", None), ("gradclip0.5", 0.5)]


@pytest.mark.parametrize("value", [3, -2, 0.0003, 1e-05, 1e16, True, False, "uniform", 'a "quoted" \\ path',
                                   "été", "new\nline 🙂", [0.9, 0.95], {"steps": 8, "grid": "cosine"},
                                   {"a key": "x"}, float("inf")])
def test_override_values_survive_the_command_line(value):
    _, parsed = parse_override(f"k={toml_value(value)}")
    assert parsed == value and type(parsed) is type(value)


# -- running, skipping, resuming, launching --------------------------------------------------
@pytest.fixture()
def toy_sweep(tmp_path, monkeypatch):
    """A 2 x 2 sweep of toy runs, with the working directory where its runs/ go."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TDLM_CACHE_DIR", str(tmp_path / "cache"))
    return write_sweep(tmp_path, '[[zip]]\nlabels = ["small", "big"]\n"model.d_model" = [32, 64]\n')


def fake_history(run_dir: Path, state: str) -> None:
    """Leave a run directory as a finished, checkpointed or checkpoint-less run would."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.json").write_text("{}")
    if state in ("finished", "stopped"):
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.json").write_text('{"step": 4}')
    if state == "finished":
        (run_dir / "summary.json").write_text('{"status": "finished"}')


def test_dry_run_lists_names_status_sizes_and_overrides(toy_sweep):
    fake_history(Path("runs/s/diffusion-small"), "finished")
    fake_history(Path("runs/s/diffusion-big"), "stopped")
    fake_history(Path("runs/s/ar-small"), "aborted")
    result = CliRunner().invoke(cli, ["sweep", str(toy_sweep), "--dry-run"])
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines()[2:]}
    assert rows["diffusion-small"][1:3] == ["finished", "0.02M"]
    assert rows["diffusion-big"][1] == "stopped" and rows["ar-small"][1] == "aborted" and rows["ar-big"][1] == "new"
    assert rows["ar-big"][-2:] == ["toy_ar.toml", "model.d_model=64"]
    only = CliRunner().invoke(cli, ["sweep", str(toy_sweep), "--dry-run", "--only", "ar-*"])
    assert "diffusion-small" not in only.output and "ar-big" in only.output
    nothing = CliRunner().invoke(cli, ["sweep", str(toy_sweep), "--only", "zz*"])
    assert nothing.exit_code == 2 and "matches no run" in nothing.output


def test_runs_skip_resume_restart_and_survive_a_failure(toy_sweep):
    fake_history(Path("runs/s/diffusion-small"), "finished")
    fake_history(Path("runs/s/diffusion-big"), "stopped")
    fake_history(Path("runs/s/ar-small"), "aborted")
    calls = []

    def runner(args):
        calls.append(args)
        name = json.loads(next(a for a in args if a.startswith("run.name=")).partition("=")[2])
        if name == "ar-small":
            return 1  # crashes; the sweep goes on
        (Path("runs/s") / name).mkdir(parents=True, exist_ok=True)
        (Path("runs/s") / name / "summary.json").write_text('{"status": "finished"}')
        return 0

    outcome = run_sweep(load_sweep(toy_sweep).runs, runner=runner, echo=lambda line: None)
    assert outcome == {"finished": ["diffusion-big", "ar-big"], "skipped": ["diffusion-small"],
                       "failed": ["ar-small"], "stopped": []}
    assert [a[-1] == "--resume" for a in calls] == [True, False, False]  # only the checkpointed one resumes
    assert calls[0][0] == "toy_diffusion.toml" and "model.d_model=64" in calls[0]
    assert list(Path("runs/s/.aborted").iterdir()) == [Path("runs/s/.aborted/ar-small-1")]  # set aside, not deleted


def test_a_failed_run_makes_the_command_fail_at_the_end(toy_sweep, monkeypatch):
    monkeypatch.setattr("tdlm.studies.sweep.subprocess_runner", lambda args: 3)
    result = CliRunner().invoke(cli, ["sweep", str(toy_sweep), "--only", "ar-*"])
    assert result.exit_code == 1
    assert "0 finished, 0 skipped, 2 failed, 0 stopped" in result.output
    assert "failed: ar-big" in result.output


def test_the_subprocess_runner_reports_exit_codes():
    assert subprocess_runner(["--help"]) == 0
    assert subprocess_runner(["--no-such-option"]) == 2


def test_emit_accelerate_commands(toy_sweep):
    fake_history(Path("runs/s/ar-big"), "finished")
    fake_history(Path("runs/s/ar-small"), "stopped")
    result = CliRunner().invoke(cli, ["sweep", str(toy_sweep), "--emit", "accelerate", "--launch-config", "launch/x.yaml"])
    lines = result.output.splitlines()
    assert len(lines) == 4
    assert lines[0] == ("accelerate launch --config_file launch/x.yaml -m tdlm run toy_diffusion.toml "
                        "--set model.d_model=32 --set 'run.out_dir=\"runs/s\"' --set 'run.name=\"diffusion-small\"'")
    assert lines[2].endswith("--resume") and lines[3].startswith("# finished: accelerate launch")


def test_emit_slurm_writes_a_requeue_safe_array_script(toy_sweep, tmp_path):
    result = CliRunner().invoke(cli, ["sweep", str(toy_sweep), "--emit", "slurm", "--gpus", "1", "--time", "01:00:00"])
    assert result.exit_code == 0, result.output
    script = tmp_path / "runs/s/launch/slurm_array.sh"
    text = script.read_text()
    assert "@@" not in text.replace("@@...@@", "")
    assert "#SBATCH --array=0-3" in text and "#SBATCH --time=01:00:00" in text
    assert "#SBATCH --signal=B:TERM@120" in text and "#SBATCH --requeue" in text
    commands = (tmp_path / "runs/s/launch/commands.tsv").read_text().splitlines()
    assert commands[1].startswith("runs/s/diffusion-big\ttoy_diffusion.toml --set model.d_model=64")
    if shutil.which("bash") is None:
        pytest.skip("no bash to run the script with")
    # Array task 1 with a checkpoint on disk and a stand-in `python` that waits for SIGTERM:
    # the script must resume, pass the time-limit signal on once, and requeue itself.
    fake_history(tmp_path / "runs/s/diffusion-big", "stopped")
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    log = tmp_path / "stub.log"
    (stubs / "python").write_text(f'#!/bin/bash\necho "python $*" >> {log}\n'
                                  f'trap \'echo TERM >> {log}; exit 0\' TERM\nfor i in $(seq 100); do sleep 0.05; done\n')
    (stubs / "scontrol").write_text(f'#!/bin/bash\necho "scontrol $*" >> {log}\n')
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    text = re.sub(r'export PATH=".*?:', f'export PATH="{stubs}:', text)
    env = {"PATH": "/usr/bin:/bin", "SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_JOB_ID": "77", "SLURM_GPUS_ON_NODE": "1"}
    job = subprocess.Popen(["bash", "-c", text], env=env)
    for _ in range(100):  # wait until the stand-in run has started
        if log.exists():
            break
        subprocess.run(["sleep", "0.05"])
    job.send_signal(15)
    assert job.wait(timeout=10) == 0
    lines = log.read_text().splitlines()
    assert lines[0].startswith("python -m tdlm run toy_diffusion.toml --set model.d_model=64")
    assert lines[0].endswith("--resume")
    assert lines[1:] == ["TERM", "scontrol requeue 77_1"]


def test_a_tiny_sweep_trains_for_real_then_skips_what_is_done(toy_sweep):
    """Two toy runs through the real `tdlm run` command (in this process, to stay fast)."""

    def in_process(args):
        return CliRunner().invoke(cli, ["run", *args], catch_exceptions=False).exit_code

    runs = load_sweep(toy_sweep).select(("*-small",))
    outcome = run_sweep(runs, runner=in_process, echo=lambda line: None)
    assert outcome["finished"] == ["diffusion-small", "ar-small"]
    for run in runs:
        summary = json.loads((run.run_dir / "summary.json").read_text())
        assert summary["status"] == "finished" and summary["step"] == 8
        assert json.loads((run.run_dir / "config.json").read_text())["model"]["d_model"] == 32
    assert run_sweep(runs, runner=in_process, echo=lambda line: None)["skipped"] == ["diffusion-small", "ar-small"]
