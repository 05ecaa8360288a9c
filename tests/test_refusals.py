"""Work that cannot succeed is refused up front, in one line (exit code 2), and messages say what
happened and the one thing to do: no silent hours of sampling, no shards of 0 sequences, no run
that is all warm-up, no advice that points in a circle."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_damaged_runs import invoke, ok, one_line_error

from tdlm.cli import cli  # noqa: F401 - invoke runs it


@pytest.fixture(autouse=True)
def cache_dir(trained_pair, monkeypatch):
    monkeypatch.setenv("TDLM_CACHE_DIR", str(trained_pair["cache"]))


@pytest.fixture
def recipe(trained_pair, tmp_path) -> Path:
    """The toy diffusion run's own recipe, training into tmp_path/runs."""
    path = tmp_path / "r.toml"
    text = (trained_pair["diffusion"] / "config.toml").read_text()
    path.write_text(text.replace(str(trained_pair["diffusion"].parent), str(tmp_path / "runs")))
    return path


REFUSED = {
    "prepare-0-sequences": (lambda c, tmp, run: ["data", "prepare", c, "--out", tmp / "shards", "--seq-len", 100000,
                                                 "--shard-size", 10, "--tokenizer", "bpe", "--bpe-vocab-size", 300],
                            "is 9,", "tokens, fewer than one sequence of --seq-len 100000", "0 sequences"),
    "steps-billion": (lambda c, tmp, run: ["sample", run, "--num", 1, "--option", "steps=1000000000"],
                      "steps = 1,000,000,000", "32-token canvas", "steps <= 32,768"),
    "inner-steps-billion": (lambda c, tmp, run: ["sample", run, "--num", 1, "--sampler", "semi-ar", "--option",
                                                 "inner_options={steps=1000000000}"], "inner_options.steps"),
    "temperature-inf": (lambda c, tmp, run: ["sample", run, "--option", "temperature=inf"],
                        "sampler.temperature", "finite number"),
    "temperature-nan": (lambda c, tmp, run: ["sample", run, "--option", "temperature=nan"],
                        "sampler.temperature", "finite number"),
    "temperature-0": (lambda c, tmp, run: ["sample", run, "--option", "temperature=0"],
                      "sampler.temperature", "greater than 0"),
}


@pytest.mark.parametrize("name", REFUSED)
def test_work_that_cannot_succeed_is_refused(name, trained_pair, tmp_path):
    build, *fragments = REFUSED[name]
    one_line_error(invoke(*build(trained_pair["corpus"], tmp_path, trained_pair["diffusion"])), *fragments)
    assert not (tmp_path / "shards").exists()  # nothing half-written


def test_a_warm_up_longer_than_the_run_is_refused_naming_both_keys(recipe, tmp_path):
    one_line_error(invoke("run", recipe, "--check", "--set", "training.warmup_steps=8"),
                   "training.warmup_steps = 8", "8 steps", "training.max_steps")
    epochs = ["--set", "training.max_steps=none", "--set", "training.epochs=0.1", "--set", "training.warmup_steps=5"]
    one_line_error(invoke("run", recipe, *epochs), "training.warmup_steps = 5", "training.epochs")
    assert not (tmp_path / "runs" / "diffusion").exists()
    ok(invoke("run", recipe, "--check", "--set", "training.warmup_steps=7"))


def test_a_recipe_with_endless_sampler_steps_is_refused_before_training(recipe, tmp_path):
    one_line_error(invoke("run", recipe, "--set", "sampler.steps=1000000000"), "steps = 1,000,000,000")
    assert not (tmp_path / "runs" / "diffusion" / "checkpoints").exists()


# -- messages that say what happened and the one thing to do ----------------------------------------
@pytest.fixture
def run(trained_pair, tmp_path):
    copy = tmp_path / "runs" / "diffusion"
    shutil.copytree(trained_pair["diffusion"], copy)
    return copy


def test_a_finished_run_whose_checkpoints_were_deleted_gets_one_way_forward(run, recipe):
    shutil.rmtree(run / "checkpoints")
    for args in (["run", recipe, "--resume"], ["run", recipe]):
        line = one_line_error(invoke(*args), "finished run whose checkpoints were deleted", "--set run.name=")
        assert "--resume" not in line  # neither "start it without --resume" nor "continue it with --resume"
    assert (run / "summary.json").exists()  # not overwritten


def test_a_bit_flipped_in_a_token_cache_entry_is_seen_and_rebuilt(tmp_path, capsys):
    import numpy as np
    from toydata import write_toy_corpus

    from tdlm.data import DataConfig, load_corpus

    corpus = write_toy_corpus(tmp_path / "corpus")
    cfg = DataConfig(dataset="text", path=str(corpus), tokenizer="bpe", bpe_vocab_size=300, seq_len=32)
    first = load_corpus(cfg, cache_dir=tmp_path / "cache", progress=False)
    (entry,) = (tmp_path / "cache" / "tokens").glob("valid-*.npy")
    raw = bytearray(entry.read_bytes())
    raw[-4] ^= 1  # one id becomes another valid id: a well-formed .npy with wrong tokens
    entry.write_bytes(bytes(raw))
    again = load_corpus(cfg, cache_dir=tmp_path / "cache", progress=False)
    warning = [line for line in capsys.readouterr().err.splitlines() if "is damaged" in line]
    assert len(warning) == 1 and "checksum" in warning[0] and entry.name in warning[0]
    assert np.array_equal(first.splits["valid"], again.splits["valid"])
    assert np.array_equal(np.load(entry), first.splits["valid"])  # the same name: the same tokens, kept
    load_corpus(cfg, cache_dir=tmp_path / "cache", progress=False)
    assert "is damaged" not in capsys.readouterr().err  # rebuilt on disk


def test_the_printed_continue_command_can_be_pasted_into_a_shell(recipe, tmp_path):
    import shlex

    splits = 'eval.final_splits=["valid","test"]'
    result = ok(invoke("run", recipe, "--stop-at", 2, "--set", splits, "--set", "eval.sample_num=0"))
    line = next(line for line in result.stdout.splitlines() if "continue with: " in line)
    words = shlex.split(line.split("continue with: ", 1)[1])
    assert words == ["tdlm", "run", str(recipe), "--resume", "--set", splits, "--set", "eval.sample_num=0"]


def test_a_recipe_saved_with_a_byte_order_mark_reads(recipe):
    recipe.write_bytes(b"\xef\xbb\xbf" + recipe.read_bytes())
    ok(invoke("run", recipe, "--check"))


@pytest.mark.parametrize("path, said", [(lambda tmp: tmp, "is a folder"), (lambda tmp: "/dev/null", "is not a regular file"),
                                        (lambda tmp: tmp / "nowhere.txt", ": no such file")])
def test_text_that_is_not_a_file_says_what_it_is(trained_pair, tmp_path, path, said):
    one_line_error(invoke("eval", trained_pair["diffusion"], "--text", path(tmp_path)), said)


def test_a_run_directory_removed_while_training_ends_in_one_line(recipe, tmp_path, monkeypatch):
    from tdlm.training.trainer import Trainer

    real_step, run_dir = Trainer.run_step, tmp_path / "runs" / "diffusion"

    def step(self):
        if self.step == 3:
            shutil.rmtree(run_dir)  # rm -rf from another shell
        return real_step(self)

    monkeypatch.setattr(Trainer, "run_step", step)
    one_line_error(invoke("run", recipe, "--set", "eval.final_splits=[]"),
                   f"run directory {run_dir} was removed while training; nothing more can be saved")
    assert not run_dir.exists()  # nothing written into a half-made new one
