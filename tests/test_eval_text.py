"""`tdlm eval --text FILE` / `--data SOURCE`: any text, scored like a split of the run's own data."""

import json

import pytest
from click.testing import CliRunner

from tdlm.cli import cli



@pytest.fixture(scope="module")
def trained(trained_pair):
    """The session's toy diffusion run (8 steps, read-only: conftest.trained_pair), its corpus and
    the token cache it was trained with."""
    return trained_pair["diffusion"], trained_pair["corpus"], trained_pair["cache"]


@pytest.fixture(autouse=True)
def cache_dir(trained, monkeypatch):
    monkeypatch.setenv("TDLM_CACHE_DIR", str(trained[2]))


def evaluate(*args):
    result = CliRunner().invoke(cli, ["eval", *map(str, args), "--json"])
    return result


def test_a_file_with_the_test_split_s_text_gives_the_test_split_s_figures(trained, tmp_path):
    run, corpus, _ = trained
    copy = tmp_path / "held_out.txt"
    copy.write_bytes((corpus / "test.txt").read_bytes())
    split = json.loads(evaluate(run, "--split", "test").output)
    text = json.loads(evaluate(run, "--text", copy).output)
    assert text["source"] == str(copy) and text["split"] == "text:held_out.txt"
    for key in ("tokens", "bytes", "sequences", "nll_per_token", "stderr", "mc_stderr", "ppl", "bits_per_byte"):
        assert text[key] == split[key], key


def test_data_folder_and_several_files(trained, tmp_path):
    run, corpus, _ = trained
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "test.txt").write_text("the cat likes the city .\n" * 40)
    (tmp_path / "b.txt").write_text("a song follows my friend .\n" * 7 + "the end")  # no final newline
    folder = json.loads(evaluate(run, "--data", tmp_path / "other").output)
    both = json.loads(evaluate(run, "--text", tmp_path / "other" / "test.txt", "--text", tmp_path / "b.txt").output)
    assert isinstance(both, list) and len(both) == 2
    assert folder["nll_per_token"] == both[0]["nll_per_token"] and folder["source"] == str(tmp_path / "other")
    assert both[1]["bytes"] == len((tmp_path / "b.txt").read_bytes())  # every byte scored, the tail too


@pytest.mark.parametrize("content, message", [
    (None, "no such file"),
    (b"", "is empty"),
    (b"\n \n", "is empty"),
    (b"abc\x00\x01\x02", "looks binary"),
    ("caf\u00e9 cr\u00e8me\n".encode("latin-1"), "is not UTF-8"),
])
def test_unusable_files_are_one_line_errors(trained, tmp_path, content, message):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    result = evaluate(trained[0], "--text", path)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_unknown_data_source_is_one_line(trained, tmp_path):
    result = evaluate(trained[0], "--data", tmp_path / "nowhere")
    assert result.exit_code == 2 and "test.txt" in result.output


def strict_json(text: str):
    """JSON as a strict parser reads it: NaN and Infinity are not JSON."""
    def refuse(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(text, parse_constant=refuse)


def test_one_sequence_has_no_stderr_and_its_json_is_strict(trained, tmp_path):
    """A single line is one sequence: no spread between sequences, so the data error is unknown
    (null), not 0.0 beside a Monte Carlo stderr that is not."""
    path = tmp_path / "one_line.txt"
    path.write_text("the cat likes the ball .\n")
    result = evaluate(trained[0], "--text", path, "--t-samples", 64)
    assert result.exit_code == 0, result.output
    scored = strict_json(result.stdout)
    assert scored["sequences"] == 1 and scored["stderr"] is None and scored["ppl_ci95"] is None
    assert scored["mc_stderr"] > 0
    printed = CliRunner().invoke(cli, ["eval", str(trained[0]), "--text", str(path)])
    assert "stderr unknown: 1 sequence(s)" in printed.stdout and "± ?" in printed.stdout


def test_json_output_never_holds_nan_or_infinity(trained, tmp_path, monkeypatch):
    import tdlm.evaluate

    real = tdlm.evaluate.evaluate

    def diverged(*args, **kwargs):
        return {**real(*args, **kwargs), "ppl": float("inf"), "bits_per_byte": float("nan")}

    monkeypatch.setattr(tdlm.evaluate, "evaluate", diverged)
    result = evaluate(trained[0], "--t-samples", 1)
    assert result.exit_code == 0, result.output
    scored = strict_json(result.stdout)
    assert scored["ppl"] is None and scored["bits_per_byte"] is None
