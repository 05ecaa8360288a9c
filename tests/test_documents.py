"""Document boundaries: where `data.documents` puts end-of-text tokens, in every split, in the
cache, in `--text` scoring and in shards; a model that never saw one cannot be asked to stop."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from toydata import write_toy_corpus

from tdlm.cli import cli
from tdlm.data import DataConfig, load_corpus
from tdlm.data.corpus import text_file_tokens
from tdlm.data.documents import document_ends
from tdlm.data.locate import WIKITEXT2_FILES, data_dir_candidates
from tdlm.data.manifest import data_from_manifest
from tdlm.data.tokenizer import split_lines

WIKITEXT_LIKE = [
    " \n",
    " = First article = \n",   # 1: the first title: nothing ends before it
    " \n",
    " Some text . \n",
    " \n",
    " = = A section = = \n",   # 5: a section heading, not an article
    " \n",
    " A formula line follows \n",
    " = 1 k = \n",             # 8: a title's shape inside a paragraph: not an article
    " more text \n",
    " \n",
    " = Second article = \n",  # 11: the first article ends before it
    " \n",
    " Its text . \n",
]


def test_wikitext_articles_end_before_each_later_title_and_at_the_end():
    assert document_ends(WIKITEXT_LIKE, "wikitext-titles") == [11, len(WIKITEXT_LIKE)]
    assert document_ends(WIKITEXT_LIKE, "as-is") == []
    assert document_ends([" \n", " \n"], "wikitext-titles") == []  # no text, no document


def test_blank_lines_separate_documents():
    lines = ["\n", "a\n", "b\n", "\n", " \n", "c\n", "\n", "d"]
    assert document_ends(lines, "blank-lines") == [5, 7, len(lines)]
    with pytest.raises(ValueError, match="unknown documents rule"):
        document_ends(lines, "paragraphs")


def test_wikitext2_has_its_published_article_counts():
    for directory in data_dir_candidates():
        if all((directory / f).is_file() for f in WIKITEXT2_FILES.values()):
            break
    else:
        pytest.skip("WikiText-2 not found (set TDLM_DATA_DIR)")
    counts = {split: len(document_ends(split_lines((directory / f).read_text(encoding="utf-8")), "wikitext-titles"))
              for split, f in WIKITEXT2_FILES.items()}
    assert counts == {"train": 600, "valid": 60, "test": 60}


@pytest.fixture(scope="module")
def paragraphs(tmp_path_factory):
    """A toy corpus of 5-sentence paragraphs, and the token cache folder."""
    root = tmp_path_factory.mktemp("documents")
    return write_toy_corpus(root / "corpus", paragraph=5), root / "cache"


def config(folder, documents):
    return DataConfig(dataset="text", path=str(folder), tokenizer="bpe", bpe_vocab_size=300, seq_len=32,
                      documents=documents)


def test_each_document_ends_with_one_end_of_text_and_the_text_is_kept(paragraphs):
    folder, cache = paragraphs
    plain = load_corpus(config(folder, "as-is"), cache_dir=cache, progress=False)
    marked = load_corpus(config(folder, "blank-lines"), cache_dir=cache, progress=False)  # same cache folder
    eos = marked.vocab.bos_id
    for split, sentences in (("train", 600), ("valid", 80), ("test", 80)):
        tokens = marked.splits[split]
        assert (tokens == eos).sum() == sentences // 5 and tokens[-1] == eos
        assert (plain.splits[split] == eos).sum() == 0
        assert np.array_equal(tokens[tokens != eos], plain.splits[split])
        # Each end-of-text follows a paragraph's blank line, and the next document follows it.
        text = marked.vocab.decode(tokens)
        assert text.replace("<|endoftext|>", "") == (folder / f"{split}.txt").read_text()
        assert text.count("\n\n<|endoftext|>") == sentences // 5
        # The end-of-text token spells no bytes: bits per byte divides by the text's own bytes.
        assert marked.num_bytes(tokens) == plain.num_bytes(plain.splits[split])


def test_text_scoring_marks_documents_as_the_run_did(paragraphs):
    folder, cache = paragraphs
    marked = load_corpus(config(folder, "blank-lines"), cache_dir=cache, progress=False)
    scored = text_file_tokens(folder / "test.txt", marked.vocab, cache_dir=cache, documents="blank-lines")
    assert np.array_equal(scored, marked.splits["test"])


def test_shards_record_and_keep_the_documents_rule(paragraphs, monkeypatch, tmp_path):
    folder, cache = paragraphs
    monkeypatch.setenv("TDLM_CACHE_DIR", str(cache))
    out = tmp_path / "shards"
    result = CliRunner().invoke(cli, ["data", "prepare", str(folder), "--out", str(out), "--seq-len", "32",
                                      "--shard-size", "16", "--tokenizer", "bpe", "--bpe-vocab-size", "300",
                                      "--documents", "blank-lines"])
    assert result.exit_code == 0, result.output
    assert json.loads((out / "manifest.json").read_text())["documents"] == "blank-lines"
    shards = DataConfig(format="webdataset", path=str(out), seq_len=32)
    assert data_from_manifest(shards).documents == "blank-lines"
    from_shards = load_corpus(shards, progress=False)
    from_text = load_corpus(config(folder, "blank-lines"), cache_dir=cache, progress=False)
    assert np.array_equal(from_shards.splits["test"], from_text.splits["test"])
    assert from_shards.train_token_counts[from_text.vocab.bos_id] == 600 // 5


def test_an_unknown_documents_rule_is_a_recipe_error():
    with pytest.raises(ValueError, match="unknown documents 'paragraphs'"):
        DataConfig(documents="paragraphs")
