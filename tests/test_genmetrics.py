"""Generation metrics on hand-made tokens, generative perplexity against the AR objective's own
NLL, the frequency-collapse curve on a known denoiser, and `tdlm gen-eval` end to end."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from tdlm.studies import genmetrics as gm
from tdlm.cli import cli


LN2 = math.log(2.0)


# --- sample metrics, by hand ------------------------------------------------------------------

def test_distinct_n_counts_ngrams_within_samples_only():
    samples = [[1, 2, 1, 2], [1, 2, 3]]  # bigrams 12 21 12 | 12 23: 3 unique of 5
    assert gm.distinct_n(samples, 2) == pytest.approx(3 / 5)
    assert gm.distinct_n(samples, 3) == 1.0  # 121 212 | 123; "2 1" across the boundary is no n-gram
    assert gm.distinct_n(torch.tensor([[4, 4, 4, 4]]), 2) == pytest.approx(1 / 3)
    assert gm.distinct_n(np.array([[7, 8], [8, 7]]), 1) == pytest.approx(2 / 4)
    assert math.isnan(gm.distinct_n([[1, 2]], 3))  # no trigram at all


def test_repetition_rate_is_the_share_of_adjacent_equal_pairs():
    assert gm.repetition_rate([[5, 5, 5, 1], [2, 2]]) == pytest.approx(3 / 4)
    assert gm.repetition_rate(torch.tensor([[1, 2, 3], [3, 2, 1]])) == 0.0
    assert gm.repetition_rate([[3, 4], [4, 3]]) == 0.0  # the 4 | 4 across samples is not adjacent
    assert math.isnan(gm.repetition_rate([[1], [2]]))


def test_unseen_bigram_share_against_the_training_stream():
    train = np.array([0, 1, 2, 0, 1], dtype=np.int32)  # bigrams 01 12 20 (01 twice)
    codes = gm.train_bigram_set(train, vocab_size=3)
    assert codes.tolist() == [0 * 3 + 1, 1 * 3 + 2, 2 * 3 + 0]
    # 01 seen, 11 unseen, 12 seen | 22 unseen: counted with multiplicity
    assert gm.unseen_bigram_share([[0, 1, 1, 2], [2, 2]], codes, 3) == pytest.approx(2 / 4)
    assert gm.unseen_bigram_share([[0, 1, 2, 0, 1]], codes, 3) == 0.0
    big = 50_257  # a * V + b must not overflow for a GPT-2 sized vocabulary
    assert gm.unseen_bigram_share([[big - 1, big - 2]], gm.train_bigram_set([big - 1, big - 2], big), big) == 0.0


def test_unigram_entropy_of_the_pooled_tokens():
    assert gm.unigram_entropy([[0, 0], [1, 2]]) == pytest.approx(1.5 * LN2)  # p = 1/2, 1/4, 1/4
    assert gm.unigram_entropy(torch.tensor([[3, 3, 3]])) == 0.0
    metrics = gm.sample_metrics([[0, 0, 1, 2]], train_bigrams=np.array([0]), vocab_size=3)
    assert metrics["unigram_entropy_bits"] == pytest.approx(1.5)
    assert metrics["repetition_rate"] == pytest.approx(1 / 3)
    assert metrics["unseen_bigram_share"] == pytest.approx(2 / 3)  # 00 seen (code 0); 01, 12 not
    assert metrics["distinct_2"] == 1.0 and metrics["distinct_3"] == 1.0


def test_unigram_distribution_is_smoothed():
    assert gm.unigram_distribution([1, 0, 3]).tolist() == pytest.approx([2 / 7, 1 / 7, 4 / 7])
    assert gm.unigram_distribution([1, 0, 3], pseudo_count=0.0).tolist() == pytest.approx([1 / 4, 0, 3 / 4])


# --- generative perplexity ----------------------------------------------------------------------

def test_generative_perplexity_equals_the_ar_objectives_exact_nll(build):
    built = build(vocab_size=40, seq_len=12, objective="ar", sampler="ar", model={"d_model": 32, "n_heads": 2})
    net, objective = built.model.net.eval(), built.model.objective
    tokens = torch.randint(0, 40, (5, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        nll = objective.token_nll(net, tokens).double()
        scores = objective.score(net, tokens, generator=torch.Generator(), t_samples=1)
    result = gm.generative_perplexity(net, tokens, bos_id=built.vocab.bos_id, batch_size=2)
    assert result["gen_ppl"] == pytest.approx(math.exp(scores.nll.sum().item() / tokens.numel()), rel=1e-5)
    assert result["scored_tokens"] == tokens.numel()
    # with a prompt: the prompt is context, and only the continuation is scored
    prompted = gm.generative_perplexity(net, tokens, bos_id=built.vocab.bos_id, start=4)
    assert prompted["gen_nll_per_token"] == pytest.approx(nll[:, 4:].mean().item(), rel=1e-5)
    assert prompted["scored_tokens"] == 5 * 8


def test_generative_perplexity_under_a_known_distribution(exact_next_token):
    support = torch.tensor([[1, 2, 3, 4], [1, 3, 2, 4]])
    oracle = exact_next_token(support, torch.tensor([0.25, 0.75]), vocab_size=5, bos_id=0)
    result = gm.generative_perplexity(oracle, support[:1], bos_id=0)
    assert result["gen_ppl"] == pytest.approx(4 ** (1 / 4))  # p(sequence) = 1/4 over 4 tokens
    # given the prompt [1, 2] the rest is certain
    assert gm.generative_perplexity(oracle, support[:1], bos_id=0, start=2)["gen_ppl"] == pytest.approx(1.0)


# --- frequency collapse -------------------------------------------------------------------------

class FixedPrediction(nn.Module):
    """Predicts the same distribution at every position; checks it is fed prompt + masks."""

    def __init__(self, probs, prompt_len, mask_id):
        super().__init__()
        self.logits, self.prompt_len, self.mask_id = torch.tensor(probs).log(), prompt_len, mask_id

    def forward(self, x):
        assert (x[:, self.prompt_len:] == self.mask_id).all() and (x[:, : self.prompt_len] != self.mask_id).all()
        return self.logits.float().expand(*x.shape, -1)


def test_frequency_collapse_is_zero_kl_for_unigram_predictions():
    unigram = gm.unigram_distribution([5, 1, 2, 0])
    net = FixedPrediction(unigram, prompt_len=3, mask_id=4)
    prompts = torch.tensor([[0, 1, 2], [2, 2, 0]])
    curve = gm.frequency_collapse(net, prompts, 6, mask_id=4, unigram=unigram)
    assert curve["distance"] == [1, 2, 3, 4, 5, 6] and curve["prompt_tokens"] == 3
    entropy = -(unigram * np.log(unigram)).sum()
    assert curve["entropy"] == pytest.approx([entropy] * 6, abs=1e-6)
    assert curve["kl_to_unigram"] == pytest.approx([0.0] * 6, abs=1e-6)
    assert curve["unigram_entropy"] == pytest.approx(entropy)


def test_frequency_collapse_kl_by_hand():
    unigram = np.array([0.5, 0.25, 0.25])
    net = FixedPrediction([1 / 3] * 3, prompt_len=1, mask_id=3)
    curve = gm.frequency_collapse(net, torch.tensor([[0]]), 2, mask_id=3, unigram=unigram)
    kl = (math.log((1 / 3) / 0.5) + 2 * math.log((1 / 3) / 0.25)) / 3
    assert curve["kl_to_unigram"] == pytest.approx([kl, kl], rel=1e-6)
    assert curve["entropy"] == pytest.approx([math.log(3)] * 2, rel=1e-6)


# --- tdlm gen-eval end to end -------------------------------------------------------------------

@pytest.fixture(scope="module")
def runs(trained_pair):
    """The session's tiny diffusion run (sampler ancestral, steps = 8) and its AR reference on the
    toy corpus (same BPE), with the session's token cache; read-only (conftest.trained_pair)."""
    with pytest.MonkeyPatch.context() as cache:
        cache.setenv("TDLM_CACHE_DIR", str(trained_pair["cache"]))
        yield trained_pair["diffusion"], trained_pair["ar"]


def gen_eval(*args):
    return CliRunner().invoke(cli, ["gen-eval", *map(str, args)], catch_exceptions=False)


KEYS = {"run", "checkpoint", "objective", "reference", "sampler", "options", "num", "length", "prompt",
        "prompt_tokens", "generated_tokens", "seed", "seconds", "tokens_per_s", "nfe", "gen_ppl",
        "gen_nll_per_token", "unigram_entropy_nats", "unigram_entropy_bits", "distinct_2", "distinct_3",
        "repetition_rate", "unseen_bigram_share", "data", "frequency_collapse", "samples", "tokens",
        "id", "json", "png"}


def test_gen_eval_writes_json_and_png(runs, tmp_path):
    from tdlm.rundir import load_run

    target, reference = runs
    out = gen_eval(target, "--reference", reference, "--num", 3, "--length", 16, "--option", "steps=4",
                   "--prompt", "the cat", "--out", tmp_path, "--device", "cpu", "--json")
    assert out.exit_code == 0, out.output
    result = json.loads(out.stdout)
    assert KEYS <= set(result)
    saved = json.loads(open(result["json"]).read())
    assert saved == result and result["json"].startswith(str(tmp_path))
    assert open(result["png"], "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert result["sampler"] == "ancestral" and result["options"]["steps"] == 4 and 1 <= result["nfe"] <= 4
    assert result["prompt_tokens"] > 0 and result["generated_tokens"] == 3 * (16 - result["prompt_tokens"])
    assert math.isfinite(result["gen_ppl"]) and result["gen_ppl"] > 1 and result["tokens_per_s"] > 0
    for key in ("distinct_2", "distinct_3", "repetition_rate", "unseen_bigram_share"):
        assert 0 <= result[key] <= 1 and 0 <= result["data"][key] <= 1
    curve = result["frequency_collapse"]
    assert curve["prompt_tokens"] == result["prompt_tokens"] and len(curve["entropy"]) == 16 - curve["prompt_tokens"]
    assert all(k >= 0 for k in curve["kl_to_unigram"])

    # generative perplexity is the AR reference's own exact NLL of [prompt, generated tokens]
    ref = load_run(reference)
    vocab = ref.corpus.vocab
    tokens = torch.tensor([vocab.encode("the cat") + row for row in result["tokens"]])
    with torch.no_grad():
        nll = ref.built.model.objective.token_nll(ref.built.model.net, tokens)[:, result["prompt_tokens"]:]
    assert result["gen_ppl"] == pytest.approx(math.exp(nll.double().mean().item()), rel=1e-5)

    # the same settings give the same samples and the same file name
    again = json.loads(gen_eval(target, "--reference", reference, "--num", 3, "--length", 16, "--option",
                                "steps=4", "--prompt", "the cat", "--out", tmp_path, "--json").stdout)
    assert again["tokens"] == result["tokens"] and again["json"] == result["json"]


def test_gen_eval_text_report_and_an_ar_run(runs, tmp_path):
    target, reference = runs
    out = gen_eval(reference, "--num", 2, "--length", 12, "--out", tmp_path)  # an AR run, no reference
    assert out.exit_code == 0, out.output
    assert "gen ppl" in out.output and "saved" in out.output
    (saved,) = tmp_path.glob("geneval-ar-*.json")
    result = json.loads(saved.read_text())
    assert result["frequency_collapse"] is None and result["gen_ppl"] is None and result["nfe"] == 12
    assert (tmp_path / saved.name.replace(".json", ".png")).exists()
    # default folder: RUN_DIR/geneval (of a copy: the shared run is read-only)
    target = shutil.copytree(target, tmp_path / "copy" / target.name)
    assert gen_eval(target, "--num", 1, "--length", 8, "--option", "steps=2").exit_code == 0
    assert list((target / "geneval").glob("geneval-ancestral-*.png"))


def test_gen_eval_reports_bad_requests(runs, tmp_path):
    target, reference = runs
    bad_reference = gen_eval(target, "--reference", target, "--num", 1, "--length", 8, "--out", tmp_path)
    assert bad_reference.exit_code == 2 and "not an autoregressive run" in bad_reference.output
    bad_option = gen_eval(target, "--option", "stepz=3", "--num", 1, "--out", tmp_path)
    assert bad_option.exit_code == 2 and "did you mean 'steps'" in bad_option.output
    too_long = gen_eval(target, "--length", 64, "--num", 1, "--out", tmp_path)
    assert too_long.exit_code == 2 and "sequence length" in too_long.output


def test_sampler_counters_are_averaged_over_batches():
    from tdlm.components import SampleOutput
    from tdlm.studies.geneval import output_counters

    outs = [SampleOutput(torch.zeros(1, 2), nfe=4, stats={"draft_calls": 8, "acceptance_rate": 0.5, "rows": [1]}),
            SampleOutput(torch.zeros(1, 2), nfe=6, stats={"draft_calls": 8, "acceptance_rate": 1.0, "rows": [2]})]
    assert output_counters(outs) == {"nfe": 5, "stats": {"draft_calls": 8, "acceptance_rate": 0.75, "rows": [1, 2]}}


def sampler_quality_module():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "sampler_quality.py"
    spec = importlib.util.spec_from_file_location("sampler_quality", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_a_sampler_line_hidden_under_an_identical_one_says_so():
    bench = sampler_quality_module()
    rows = [{"sampler": "ancestral", "nfe": 16, "gen_ppl": 90.0}, {"sampler": "ancestral", "nfe": 128, "gen_ppl": 80.0},
            {"sampler": "confidence", "nfe": 16, "gen_ppl": 120.0},
            {"sampler": "remdm", "nfe": 128, "gen_ppl": 80.0}, {"sampler": "remdm", "nfe": 16, "gen_ppl": 90.0},
            {"sampler": "threshold", "nfe": 9, "gen_ppl": None}]
    assert bench.sampler_lines(rows, "gen_ppl") == [
        ("ancestral", [(16, 90.0), (128, 80.0)]), ("confidence", [(16, 120.0)]),
        ("remdm (same points as ancestral)", [(16, 90.0), (128, 80.0)])]


def test_sampler_quality_benchmark_runs_and_checks_the_threshold_target(runs, tmp_path, capsys):
    bench = sampler_quality_module()
    target, reference = runs
    code = bench.main([str(target), "--reference", str(reference), "--samplers", "ancestral,confidence,threshold",
                       "--steps", "12,3", "--length", "12", "--num", "2", "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["sampler"], r["setting"]) for r in rows[:4]] == [
        ("ancestral", "steps=12"), ("ancestral", "steps=3"), ("confidence", "steps=12"), ("confidence", "steps=3")]
    assert len(rows) == 4 + len(bench.THRESHOLD_TAUS) and all(r["gen_ppl"] > 1 for r in rows)
    table = (tmp_path / "table.md").read_text()
    assert "| held-out text |" in table and "threshold vs one token per step" in table
    assert (tmp_path / "sampler_quality.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "settings").glob("*.json"))) == len(rows)
    assert "target (<= 10% gen ppl" in capsys.readouterr().out


def test_the_benchmark_compares_samplers_at_temperature_1_whatever_the_recipe_samples_at(runs, tmp_path):
    """A recipe may print cooler samples (quick_wikitext2: 0.7); the benchmark's rows are the
    model's own distribution, so that ancestral and speculative sample the same chain."""
    bench = sampler_quality_module()
    target, reference = runs
    cooler = tmp_path / "cooler"
    shutil.copytree(target, cooler)
    config = json.loads((cooler / "config.json").read_text())
    config["sampler"]["temperature"] = 0.7
    (cooler / "config.json").write_text(json.dumps(config))
    code = bench.main([str(cooler), "--reference", str(reference), "--samplers", "ancestral,confidence", "--steps", "4",
                       "--length", "8", "--num", "1", "--out", str(tmp_path / "out"), "--device", "cpu"])
    assert code == 0
    rows = json.loads((tmp_path / "out" / "results.json").read_text())["rows"]
    assert [(r["sampler"], r["setting"]) for r in rows] == [("ancestral", "steps=4"), ("confidence", "steps=4")]
    for settings in (tmp_path / "out" / "settings").glob("*.json"):
        assert json.loads(settings.read_text())["options"]["temperature"] == 1.0, settings.name


def test_collapse_panels_start_at_zero_and_the_title_gives_the_held_out_gen_ppl():
    from tdlm.studies.geneval import collapse_limits, gen_ppl_title

    flat = {"entropy": [5.31, 5.33, 5.32], "unigram_entropy": 6.0, "kl_to_unigram": [0.001, 0.002]}
    entropy_top, kl_top = collapse_limits(flat)
    assert entropy_top == pytest.approx(6.6) and kl_top == pytest.approx(0.6)  # noise stays small on the page
    assert collapse_limits({**flat, "kl_to_unigram": [2.0, 3.0]})[1] == pytest.approx(3.3)
    assert gen_ppl_title({"gen_ppl": 91.04, "data": {"gen_ppl": 60.55}}) == "gen ppl 91.0 (held-out text 60.5)"
    assert gen_ppl_title({"gen_ppl": 91.04, "data": {}}) == "gen ppl 91.0"
    assert gen_ppl_title({"gen_ppl": None}) == "gen ppl: no reference"
