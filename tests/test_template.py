"""Infill templates, variable length at <|endoftext|>, and `tdlm sample` with both."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner
from toydata import toy_recipe, write_toy_corpus

from tdlm.cli import cli
from tdlm.sampling.template import TemplateError, cut_at_eos, format_template, parse_template, template_ids
from tdlm.builtins.samplers.autoregressive import AutoregressiveSampler



# --- parsing ----------------------------------------------------------------------------------


@pytest.mark.parametrize("text, parts", [
    ("The <mask:5> of France is Paris .", ["The ", 5, " of France is Paris ."]),
    ("<mask>", [1]),
    ("a<mask><mask:2>b", ["a", 1, 2, "b"]),
    ("<mask:12> end", [12, " end"]),
    ("no masks at all", ["no masks at all"]),
    ("", []),
    ("a < mask > <Mask> b", ["a < mask > <Mask> b"]),  # only "<mask" starts a tag
])
def test_parse_and_format_round_trip(text, parts):
    assert parse_template(text) == parts
    assert format_template(parts) == text
    assert parse_template(format_template(parts)) == parts


def test_mask_1_is_written_as_mask():
    assert parse_template("x<mask:1>y") == ["x", 1, "y"]
    assert format_template(["x", 1, "y"]) == "x<mask>y"


@pytest.mark.parametrize("text, bad, at", [
    ("The <mask:0> of", "<mask:0>", 4),
    ("The <mask:-2> of", "<mask:-2>", 4),
    ("<mask:two>", "<mask:two>", 0),
    ("ok <mask: 3>", "<mask: 3>", 3),
    ("a <mask:3", "<mask:3", 2),
    ("a <mask 3> b", "<mask 3>", 2),
    ("<mask><masks>", "<masks>", 6),
    ("a < mask > and <masked text", "<masked text", 15),
])
def test_bad_tags_are_errors_that_say_where_and_how(text, bad, at):
    with pytest.raises(TemplateError) as info:
        parse_template(text)
    message = str(info.value)
    assert f"{bad!r} at character {at}" in message
    assert "<mask> for one token" in message and "<mask:N> for N" in message


def encode_chars(text):
    return [ord(c) for c in text]


def test_template_ids_encode_each_piece_and_leave_a_spans_leading_space_to_the_model():
    ids = template_ids(parse_template("The <mask:2> of  <mask> x "), encode_chars, mask_id=-1)
    assert ids == encode_chars("The") + [-1, -1] + encode_chars(" of ") + [-1] + encode_chars(" x ")
    assert template_ids([3], encode_chars, mask_id=-1) == [-1, -1, -1]


# --- variable length --------------------------------------------------------------------------

EOS, M = 0, 9


@pytest.mark.parametrize("tokens, canvas, kept", [
    ([5, 6, 7, 0, 8, 0], [5, M, M, M, M, M], [5, 6, 7]),  # a prompt: the sample ends at the first EOS
    ([0, 6, 0, 8], [0, M, M, M], [0, 6]),  # an EOS in the prompt is the prompt's own
    ([1, 0, 4, 2, 3, 0, 5], [1, M, M, 2, M, M, M], [1, 2, 3]),  # each span of a template is cut
    ([1, 4, 2], [1, M, 2], [1, 4, 2]),  # no EOS: unchanged
])
def test_cut_at_eos(tokens, canvas, kept):
    assert cut_at_eos(torch.tensor(tokens), torch.tensor(canvas), M, EOS) == kept


def test_ar_sampler_stops_calling_the_model_once_every_row_has_ended(build, exact_next_token):
    vocab_size, eos = 4, 0
    support = torch.tensor([[1, 0, 2, 2, 3], [2, 1, 0, 1, 1], [3, 3, 3, 1, 2]])
    built = build(vocab_size=vocab_size, seq_len=5, objective="ar", sampler={"name": "ar", "stop_at_eos": True})
    mask_id = built.vocab.mask_id
    oracle = exact_next_token(support, torch.tensor([1.0, 1.0, 0.0]), vocab_size, eos)  # never the third
    out = built.sampler.sample(oracle, torch.full((200, 5), mask_id), torch.Generator().manual_seed(0))
    ended = {(1, 0, 0, 0, 0), (2, 1, 0, 0, 0)}  # padded with EOS after the first one
    assert {tuple(row) for row in out.tokens.tolist()} == ended
    assert out.nfe == 3  # column 3 and 4: every row has ended, no call

    canvas = torch.full((200, 5), mask_id)
    canvas[:, 3] = 1  # a given token starts a new span: the model is asked again after it
    out = built.sampler.sample(oracle, canvas, torch.Generator().manual_seed(0))
    assert (out.tokens[:, 3] == 1).all() and out.nfe == 4
    assert not (out.tokens == mask_id).any()


# --- the command line -------------------------------------------------------------------------


def train_tiny(tmp_path_factory, objective: str, documents: str = "blank-lines"):
    """A tiny run of `objective` on paragraphs of toy text, trained for 2 steps; yielded with the
    test cache directory set."""
    root = tmp_path_factory.mktemp("sample")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDLM_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
        corpus = write_toy_corpus(root / "corpus", paragraph=5)
        recipe = toy_recipe(root / "r.toml", corpus, root / "runs", objective=objective)
        result = CliRunner().invoke(cli, ["run", str(recipe), "--set", "training.max_steps=2",
                                          "--set", "eval.final_splits=[]", "--set", "eval.sample_num=0",
                                          "--set", f"data.documents={documents}"])
        assert result.exit_code == 0, result.output
        yield root / "runs" / "r"


@pytest.fixture(scope="module")
def trained(trained_pair):
    """A tiny diffusion run on paragraphs of toy text (data.documents = "blank-lines"): the
    session's, read-only (conftest.trained_pair)."""
    return trained_pair["diffusion"]


@pytest.fixture(scope="module")
def trained_ar(trained_pair):
    """A tiny autoregressive run, the same way (the `ar` sampler refuses a diffusion run)."""
    return trained_pair["ar"]


@pytest.fixture(autouse=True)
def cache_dir(toy_cache):
    """Token and tokenizer caches in the session's temporary folder, where the runs were trained."""


def sample_json(run_dir, *args):
    result = CliRunner().invoke(cli, ["sample", str(run_dir), "--json", *args])
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def test_sample_fills_only_the_templates_spans(trained):
    run_dir = trained
    template = "the cat <mask:3> the ball .<mask:2>"
    out = sample_json(run_dir, "--template", template, "--num", "3", "--sampler", "confidence", "--option", "steps=2")
    assert len(out["samples"]) == 3 and out["nfe"] == 2 and out["generated_tokens"] == 3 * 5
    assert out["seconds"] > 0 and out["tokens_per_s"] == pytest.approx(15 / out["seconds"])
    for text in out["samples"]:
        assert text.startswith("the cat") and " the ball ." in text and "<mask>" not in text
        assert len(text) > len("the cat the ball .")


def test_semi_ar_nested_options_from_the_command_line(trained):
    run_dir = trained
    out = sample_json(run_dir, "--length", "12", "--sampler", "semi-ar", "--option", "block=4",
                      "--option", "inner=threshold", "--option", "inner_options={tau=1.0, max_steps=2}")
    assert out["sampler"] == "semi-ar" and out["nfe"] == 3 * 2  # 3 blocks, at most 2 steps each
    dotted = sample_json(run_dir, "--length", "12", "--sampler", "semi-ar", "--option", "block=4",
                         "--option", "inner_options.steps=1")
    assert dotted["nfe"] == 3


def test_stop_at_eos_cuts_the_text_and_reaches_the_ar_sampler(trained, trained_ar, monkeypatch):
    run_dir = trained
    out = sample_json(run_dir, "--prompt", "the cat", "--stop-at-eos", "--num", "3", "--sampler", "confidence",
                      "--option", "steps=4")
    assert all(text.startswith("the cat") and "<|endoftext|>" not in text for text in out["samples"])

    seen = []

    def record(self, net, canvas, generator, *, positions=None):
        seen.append(self.config.stop_at_eos)
        return original(self, net, canvas, generator, positions=positions)

    original = AutoregressiveSampler.sample
    monkeypatch.setattr(AutoregressiveSampler, "sample", record)
    sample_json(trained_ar, "--template", "the<mask:2> .", "--sampler", "ar", "--stop-at-eos", "--num", "1")
    sample_json(trained_ar, "--template", "the<mask:2> .", "--sampler", "ar", "--num", "1")
    assert seen == [True, False]


def test_stop_at_eos_is_refused_for_a_model_that_never_saw_an_end_of_text(tmp_path_factory):
    for run_dir in train_tiny(tmp_path_factory, "ar", documents="as-is"):
        result = CliRunner().invoke(cli, ["sample", str(run_dir), "--stop-at-eos", "--prompt", "the cat"])
        assert result.exit_code == 2 and "never saw an end-of-text token" in result.output, result.output
        assert "data.documents = 'wikitext-titles'" in result.output
        assert CliRunner().invoke(cli, ["sample", str(run_dir), "--prompt", "the cat"]).exit_code == 0


@pytest.mark.parametrize("args, message", [
    (["--template", "the <mask:0>"], "bad mask tag '<mask:0>' at character 4"),
    (["--template", "no spans here"], "has no <mask>"),
    (["--template", "<mask>", "--prompt", "x"], "--template sets the whole canvas"),
    (["--template", "<mask:500>"], "more than the model's sequence length 32"),
    (["--option", "steps"], "--option 'steps' is not of the form key=value"),
    (["--sampler", "semi-ar", "--option", "inner_options={stepz=1}"], "unknown key 'stepz'"),
])
def test_bad_sample_arguments_are_one_line_errors(trained, args, message):
    run_dir = trained
    result = CliRunner().invoke(cli, ["sample", str(run_dir), *args])
    assert result.exit_code == 2 and message in result.output, result.output
