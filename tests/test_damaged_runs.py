"""Foreign, damaged or unreachable files fed to every command: each ends in one line on stderr and
exit code 2 (or works, when it still can), never in a traceback; and nothing is lost."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from tdlm.cli import cli
from tdlm.training import checkpointer as ckpt


@pytest.fixture(autouse=True)
def cache_dir(trained_pair, monkeypatch):
    monkeypatch.setenv("TDLM_CACHE_DIR", str(trained_pair["cache"]))


def invoke(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def one_line_error(result, *fragments):
    """Exit code 2, no traceback, one error line on stderr holding every fragment (warnings before
    it are allowed)."""
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("tdlm: error: ")]
    assert len(errors) == 1 and errors[0] == result.stderr.strip().splitlines()[-1], result.output
    for fragment in fragments:
        assert fragment in errors[0], (fragment, errors[0])
    return errors[0]


def ok(result):
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture
def run(trained_pair, tmp_path):
    """A private copy of the trained toy diffusion run (8 steps, checkpoints 4 and 8, scored), to damage."""
    copy = tmp_path / "runs" / "diffusion"
    shutil.copytree(trained_pair["diffusion"], copy)
    return copy


def resume_args(run_dir: Path, *extra):
    """`tdlm run` of the run's own recipe (its config.toml, which names the original), resumed here."""
    return ["run", run_dir / "config.toml", "--resume", "--set", f'run.out_dir="{run_dir.parent}"', *extra]


def other_size(weights: dict) -> dict:
    """The same tensors as a model twice as wide would have them (d_model 32 -> 64)."""
    return {k: torch.zeros([2 * n if n == 32 else n for n in v.shape]) for k, v in weights.items()}


def put_other_size(run_dir: Path, step: int) -> Path:
    file = run_dir / "checkpoints" / f"step-{step:07d}" / "model.safetensors"
    save_file(other_size(load_file(file)), file)
    return file


# -- a checkpoint of another model size ---------------------------------------------------------------
def test_a_checkpoint_of_another_size_is_named_with_its_tensors(run):
    file = put_other_size(run, 8)
    for args in (["eval", run, "--t-samples", 1], ["sample", run, "--num", 1, "--length", 8]):
        one_line_error(invoke(*args), f"{file} does not fit the run's model", "net.", "(the model's: [32])",
                       "another model size", "kept steps 4, 8")
    ok(invoke("eval", run, "--t-samples", 1, "--checkpoint", 4, "--json"))  # the fix the message gives


def test_resume_falls_back_from_a_checkpoint_of_another_size(run):
    put_other_size(run, 8)
    (run / "summary.json").unlink()  # a stopped run: --resume trains on
    result = ok(invoke(*resume_args(run, "--set", "training.max_steps=10", "--set", "eval.final_splits=[]")))
    warning = next(line for line in result.stderr.splitlines() if "could not read" in line)
    assert "does not fit the run's model" in warning and "newest readable checkpoint, step-0000004" in warning
    assert (run / "checkpoints" / ".unreadable-step-0000008").is_dir()  # set aside, not deleted
    assert json.loads((run / "summary.json").read_text())["step"] == 10
    put_other_size(run, 10)
    put_other_size(run, 8)  # every kept checkpoint foreign: one line, naming them
    (run / "summary.json").unlink()
    one_line_error(invoke(*resume_args(run, "--set", "training.max_steps=12")), "no checkpoint in",
                   "can be read", "does not fit the run's model")


# -- tdlm report over a folder with a damaged run ----------------------------------------------------
@pytest.mark.parametrize("name, raw, said", [
    ("summary.json", b'{"status": "fin', "summary.json cannot be read"),
    ("summary.json", bytes(range(256)), "summary.json is not UTF-8 text"),
    ("config.json", b"{}", "config.json lacks training.batch_size"),
    ("config.json", b"[1, 2]", "config.json is not a JSON object"),
    ("metrics.jsonl", bytes(range(128, 256)) * 3, "metrics.jsonl cannot be read"),
])
def test_report_names_a_damaged_run_and_reports_the_others(trained_pair, tmp_path, name, raw, said):
    root = tmp_path / "runs"
    for objective in ("diffusion", "ar"):
        shutil.copytree(trained_pair[objective], root / objective)
    (root / "ar" / name).write_bytes(raw)
    result = ok(invoke("report", root, "--out", tmp_path / "out"))
    assert [line for line in result.stderr.splitlines() if said in line and str(root / "ar") in line]
    assert "| diffusion |" in result.stdout and "| ar |" not in result.stdout
    (root / "diffusion" / name).write_bytes(raw)  # every run damaged: nothing to report
    one_line_error(invoke("report", root, "--out", tmp_path / "out"), "none readable")


# -- paths that cannot be used ---------------------------------------------------------------------
def test_paths_that_cannot_be_used_are_one_line(run, tmp_path, monkeypatch):
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    for args in (["eval", tmp_path / "dangling"], ["sample", tmp_path / "dangling"], ["report", tmp_path / "dangling"]):
        one_line_error(invoke(*args), "dangling is a symbolic link to", "which does not exist")
    one_line_error(invoke("run", run / "config.toml", "--set", f'run.out_dir="{tmp_path}"', "--set", "run.name=dangling"),
                   "cannot make the run directory", "dangling is a symbolic link to")
    one_line_error(invoke("eval", run / "config.json"), "config.json is a file, not a folder")
    one_line_error(invoke("report", run, "--out", run / "config.json" / "out"), "config.json",
                   "Not a directory")
    import tdlm.training.run_lock

    def read_only(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(run / ".lock"))

    monkeypatch.setattr(tdlm.training.run_lock.os, "open", read_only)  # as in a read-only run directory (as root, too)
    one_line_error(invoke(*resume_args(run)), f"{run / '.lock'}: Permission denied")


def test_a_model_too_big_for_memory_is_refused_before_it_is_allocated(trained_pair, tmp_path):
    recipe = tmp_path / "r.toml"
    recipe.write_text((trained_pair["diffusion"] / "config.toml").read_text())
    one_line_error(invoke("run", recipe, "--set", f'run.out_dir="{tmp_path}"', "--set", "model.d_model=100000",
                          "--set", "model.n_heads=1"),
                   "parameters (model.d_model = 100000", "GiB free", "make it smaller")
    assert not (tmp_path / "r").exists()


def test_a_local_lm_eval_task_without_its_data_file_is_one_line(trained_pair, tmp_path):
    pytest.importorskip("lm_eval")
    (tmp_path / "t.yaml").write_text(f"""
task: tdlm_missing_data
dataset_path: json
dataset_kwargs:
  data_files:
    test: {tmp_path / "nothere.jsonl"}
  cache_dir: {tmp_path / "datasets"}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
""")
    one_line_error(invoke("lm-eval", trained_pair["ar"], "--tasks", "tdlm_missing_data", "--include-path", tmp_path,
                          "--device", "cpu"), "a task's data cannot be found", "nothere.jsonl", "data_files")


# -- every command fed a damaged run directory ---------------------------------------------------------
BINARY = bytes(range(256)) * 4


def _write(relative: str, raw: bytes | None):
    """A damage: `relative` (a path in the run dir) replaced by `raw`, or deleted (None)."""
    def damage(run_dir: Path) -> Path:
        path = run_dir / relative
        if raw is None:
            path.unlink()
        else:
            path.write_bytes(raw)
        return run_dir
    return damage


def _both_configs(run_dir: Path) -> Path:
    (run_dir / "config.json").write_bytes(BINARY)
    (run_dir / "config.toml").write_bytes(b"")
    return run_dir


def _other_size(run_dir: Path) -> Path:
    for step in (4, 8):
        put_other_size(run_dir, step)
    return run_dir


def _dangling(run_dir: Path) -> Path:
    shutil.rmtree(run_dir)
    run_dir.symlink_to(run_dir.parent / "nowhere")
    return run_dir


def _a_file(run_dir: Path) -> Path:
    shutil.rmtree(run_dir)
    run_dir.write_text("not a run\n")
    return run_dir


DAMAGES = {
    **{f"{name}-{kind}": _write(name, raw)
       for name in ("config.json", "config.toml", "summary.json", "metrics.jsonl", "data.json",
                    "checkpoints/best.json", "checkpoints/last.json")
       for kind, raw in (("missing", None), ("empty", b""), ("binary", BINARY))},
    "both-configs": _both_configs,
    "safetensors-other-size": _other_size,
    "dangling-symlink": _dangling,
    "a-file": _a_file,
}


def _commands(run_dir: Path, recipe: Path, tmp: Path) -> dict[str, list]:
    return {
        "eval": ["eval", run_dir, "--t-samples", 1, "--json"],
        "sample": ["sample", run_dir, "--num", 1, "--length", 8, "--json"],
        "gen-eval": ["gen-eval", run_dir, "--num", 2, "--length", 8, "--out", tmp / "geneval", "--json"],
        "report": ["report", run_dir.parent, "--out", tmp / "report"],
        "run --resume": ["run", recipe, "--resume", "--set", f'run.out_dir="{run_dir.parent}"'],
        "sweep --dry-run": ["sweep", tmp / "sweep" / "s.toml", "--dry-run"],
    }


@pytest.mark.parametrize("damage", DAMAGES)
def test_every_command_fed_a_damaged_run_works_or_says_one_line(damage, trained_pair, tmp_path):
    """Each command that takes a run directory either still works (exit 0) or ends in one line on
    stderr (exit 2), whatever is damaged; never a traceback."""
    original = trained_pair["diffusion"]
    recipe = tmp_path / "diffusion.toml"  # the run's own recipe, kept apart from the damage
    recipe.write_text((original / "config.toml").read_text())
    sweep = tmp_path / "sweep"  # a sweep whose one run is the damaged one
    sweep.mkdir()
    (sweep / "s.toml").write_text(f'[sweep]\nname = "diffusion"\nbase = "{recipe}"\nout_dir = "{tmp_path}"\n')
    outcomes = {}
    for command, args in _commands(tmp_path / "diffusion" / "diffusion", recipe, tmp_path).items():
        run_dir = tmp_path / "diffusion" / "diffusion"  # fresh for each command (a resume changes it)
        if run_dir.is_symlink() or run_dir.is_file():
            run_dir.unlink()
        elif run_dir.exists():
            shutil.rmtree(run_dir)
        shutil.copytree(original, run_dir)
        DAMAGES[damage](run_dir)
        result = invoke(*args)
        assert "Traceback" not in result.output, (command, result.output)
        assert result.exception is None or isinstance(result.exception, SystemExit), (command, result.exception)
        if result.exit_code == 2:
            one_line_error(result)
        else:
            assert result.exit_code == 0, (command, result.exit_code, result.output)
        outcomes[command] = result.exit_code
    if damage in ("config.toml-missing", "summary.json-missing", "metrics.jsonl-empty"):
        assert outcomes["eval"] == outcomes["sample"] == 0  # damage that does not matter to them


def test_a_saved_config_without_its_sections_is_damaged_not_the_default_recipe(trained_pair, tmp_path):
    """An empty config.toml (or a `{}` config.json) would otherwise read as the default recipe,
    i.e. as another run."""
    from tdlm.config import RecipeError
    from tdlm.rundir import read_run_config

    run_dir = tmp_path / "diffusion"
    shutil.copytree(trained_pair["diffusion"], run_dir)
    (run_dir / "config.json").write_text("{}")
    assert read_run_config(run_dir).data.dataset == "text"  # the copy in config.toml, with a warning
    (run_dir / "config.toml").write_bytes(b"")
    with pytest.raises(RecipeError, match="settings are lost"):
        read_run_config(run_dir)
