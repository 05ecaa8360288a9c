"""tdlm.data: packing, stateless batches, vocabularies, token caches and finding the data.

Fast: small text folders written to tmp, plus the real WikiText-2 with GPT-2, tokenised into the
user's token cache ($TDLM_CACHE_DIR or ~/.cache/tdlm, shared with training runs) the first time
only, and skipped when the shared data dir is absent.
"""

from __future__ import annotations

import ast
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tokenizers
import torch

import tdlm.data.corpus
from tdlm.data import BatchStream, DataConfig, DataNotFoundError, load_corpus, pack
from tdlm.data.locate import WIKITEXT2_FILES, cache_root, data_dir_candidates
from tdlm.data.tokenizer import load_vocab

WIKITEXT2_TOKENS = {"train": 2_448_382, "valid": 258_659, "test": 295_877}  # the data README's GPT-2 counts
WORDS = "the cat sat on a mat naïve café Zürich 東京 🙂 = @-@ <unk> , .".split()
AWKWARD_TEXT = "Hello wörld 🙂 東京\n\n  two  spaces\ttab\r\n = Heading = \n<unk> @-@ 3.5\u2028end"


@pytest.fixture(autouse=True)
def no_hub_no_home_cache(monkeypatch, tmp_path):
    """No test reaches for the network; only the WikiText-2 test uses the user's cache, explicitly."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TDLM_CACHE_DIR", str(tmp_path / "default-cache"))


def write_text_folder(folder: Path, seed: int = 0) -> Path:
    """train/valid/test .txt of random lines over WORDS, with blank lines and no final newline."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for split, n_lines in (("train", 600), ("valid", 60), ("test", 60)):
        lines = [
            " " if rng.random() < 0.1 else " ".join(rng.choices(WORDS, k=rng.randint(3, 15))) for _ in range(n_lines)
        ]
        (folder / f"{split}.txt").write_text("\n".join(lines), encoding="utf-8")
    return folder


def text_config(folder: Path, **overrides) -> DataConfig:
    return DataConfig(dataset="text", path=str(folder), tokenizer="bpe", bpe_vocab_size=300, seq_len=16, **overrides)


@pytest.fixture(scope="session")
def text_folder(tmp_path_factory) -> Path:
    return write_text_folder(tmp_path_factory.mktemp("text"))


@pytest.fixture(scope="session")
def bpe_corpus(text_folder, tmp_path_factory):
    return load_corpus(text_config(text_folder), cache_dir=tmp_path_factory.mktemp("bpe-cache"), progress=False)


def shared_data_dir() -> Path:
    """The data dir found the way tdlm finds it, or skip."""
    for directory in data_dir_candidates():
        if all((directory / f).is_file() for f in [*WIKITEXT2_FILES.values(), "gpt2/vocab.json", "gpt2/merges.txt"]):
            return directory
    pytest.skip(f"WikiText-2 / GPT-2 files not found in {[str(d) for d in data_dir_candidates()]} (set TDLM_DATA_DIR)")


@pytest.fixture(scope="session")
def gpt2_vocab():
    shared_data_dir()
    return load_vocab(DataConfig())


# The user's own token cache (read before any test redirects it): tokenising WikiText-2 takes
# seconds, and the training runs reuse the same cache entries.
USER_CACHE = cache_root()


# ---- pack -------------------------------------------------------------------------------------


def test_pack_cuts_the_stream_into_full_sequences_and_a_tail():
    tokens = np.arange(10, dtype=np.int32)
    sequences, tail = pack(tokens, 3)
    assert sequences.shape == (3, 3) and sequences.dtype == torch.long
    assert sequences.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8]]
    assert tail.dtype == torch.long and tail.tolist() == [9]
    # Nothing added or lost: the sequences then the tail are the stream.
    assert torch.equal(torch.cat([sequences.flatten(), tail]), torch.from_numpy(tokens).long())


def test_pack_exact_multiple_has_no_tail_and_short_stream_no_sequences():
    sequences, tail = pack(np.arange(12, dtype=np.int32), 4)
    assert sequences.shape == (3, 4) and tail is None
    sequences, tail = pack(np.arange(3, dtype=np.int32), 4)
    assert sequences.shape == (0, 4) and tail.tolist() == [0, 1, 2]


# ---- BatchStream ------------------------------------------------------------------------------


def numbered_sequences(n: int, seq_len: int = 4) -> torch.Tensor:
    """Row i is all i, so a batch's rows name the sequences it holds."""
    return torch.arange(n).unsqueeze(1).repeat(1, seq_len)


def test_each_epoch_visits_every_sequence_once_in_the_documented_order():
    n, global_batch, seed = 23, 5, 7
    stream = BatchStream(numbered_sequences(n), global_batch, seed)
    assert stream.batches_per_epoch == 4  # the partial batch of 3 is dropped
    orders = []
    for epoch in range(3):
        rows = torch.cat([stream.get(epoch * 4 + i)[:, 0] for i in range(4)])
        assert len(set(rows.tolist())) == 20  # no sequence twice within an epoch
        expected = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        assert torch.equal(rows, expected[:20])
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])  # reshuffled each epoch
    assert stream.epoch_of(6) == pytest.approx(1.5)


def test_get_is_a_pure_function_of_seed_and_step():
    sequences = numbered_sequences(50)
    walked = BatchStream(sequences, 4, seed=3)
    walked_batches = [walked.get(step) for step in range(30)]  # crosses two epoch boundaries
    for step in (29, 0, 13, 12, 29):  # fresh streams, out of order: as after a resume
        assert torch.equal(BatchStream(sequences, 4, seed=3).get(step), walked_batches[step])
        assert torch.equal(walked.get(step), walked_batches[step])
    assert not torch.equal(BatchStream(sequences, 4, seed=4).get(0), walked_batches[0])


def test_rank_slices_concatenate_to_the_single_process_batch():
    sequences = numbered_sequences(37)
    single = BatchStream(sequences, 6, seed=1)
    ranks = [BatchStream(sequences, 6, seed=1, rank=r, world_size=2) for r in range(2)]
    for step in range(20):
        parts = [rank.get(step) for rank in ranks]
        assert all(part.shape == (3, 4) for part in parts)
        assert torch.equal(torch.cat(parts), single.get(step))


def test_batch_stream_rejects_bad_shapes():
    with pytest.raises(ValueError, match="divisible"):
        BatchStream(numbered_sequences(10), 5, seed=0, world_size=2)
    with pytest.raises(ValueError, match="only 3 sequences"):
        BatchStream(numbered_sequences(3), 4, seed=0)


# ---- vocabularies -----------------------------------------------------------------------------


@pytest.fixture(params=["gpt2", "bpe"])
def vocab(request, bpe_corpus):
    return request.getfixturevalue("gpt2_vocab") if request.param == "gpt2" else bpe_corpus.vocab


def test_token_bytes_sum_to_the_utf8_length(vocab):
    for text in (AWKWARD_TEXT, "plain ascii", " = Valkyria Chronicles III = \n", "é" * 7 + "🙂" * 3):
        ids = vocab.encode(text)
        assert int(vocab.token_bytes[ids].sum()) == len(text.encode("utf-8"))
    assert vocab.token_bytes.shape == (vocab.size,) and vocab.token_bytes.dtype == np.int64
    assert vocab.token_bytes[vocab.bos_id] == 0


def test_decode_round_trips_encode_from_any_1d_container(vocab):
    ids = vocab.encode(AWKWARD_TEXT)
    assert vocab.decode(ids) == AWKWARD_TEXT
    assert vocab.decode(np.asarray(ids, dtype=np.int32)) == AWKWARD_TEXT
    assert vocab.decode(torch.tensor(ids)) == AWKWARD_TEXT
    hello = vocab.encode("hello")
    assert vocab.decode([*hello, vocab.mask_id, *hello]) == "hello<mask>hello"
    with pytest.raises(ValueError):
        vocab.decode([vocab.model_size])


def test_mask_id_is_an_extra_id_that_no_text_encodes_to(vocab):
    assert vocab.mask_id == vocab.size and vocab.model_size == vocab.size + 1
    ids = vocab.encode(AWKWARD_TEXT + "<mask> [MASK] <|endoftext|>" + "".join(map(chr, range(1, 300))))
    assert max(ids) < vocab.size and vocab.mask_id not in ids
    assert vocab.encode("<|endoftext|>") == [vocab.bos_id]


def test_gpt2_vocab_has_the_published_ids(gpt2_vocab):
    assert (gpt2_vocab.size, gpt2_vocab.bos_id, gpt2_vocab.name) == (50257, 50256, "gpt2")
    assert gpt2_vocab.encode("Hello world") == [15496, 995]


# ---- corpora and caches -----------------------------------------------------------------------


def test_text_dataset_with_a_trained_bpe(bpe_corpus, text_folder):
    vocab = bpe_corpus.vocab
    assert vocab.name.startswith("bpe300-") and 257 < vocab.size <= 300
    for split, tokens in bpe_corpus.splits.items():
        text = (text_folder / f"{split}.txt").read_text(encoding="utf-8")
        assert tokens.dtype == np.int32 and tokens.ndim == 1
        assert vocab.decode(tokens) == text  # lines joined exactly as in the file
        assert bpe_corpus.num_bytes(tokens) == len(text.encode("utf-8"))


def test_max_train_tokens_cuts_train_only(bpe_corpus, text_folder, tmp_path):
    cut = load_corpus(text_config(text_folder, max_train_tokens=100), cache_dir=tmp_path, progress=False)
    assert np.array_equal(cut.splits["train"], bpe_corpus.splits["train"][:100])
    assert np.array_equal(cut.splits["valid"], bpe_corpus.splits["valid"])


def test_second_load_uses_the_cache_and_a_changed_file_does_not(tmp_path, monkeypatch):
    folder, cache = write_text_folder(tmp_path / "text"), tmp_path / "cache"
    first = load_corpus(text_config(folder), cache_dir=cache, progress=False)

    def must_not_tokenize(*args, **kwargs):
        raise AssertionError("re-tokenised although the cache holds these tokens")

    with monkeypatch.context() as patch:
        patch.setattr(tdlm.data.corpus, "tokenize_lines", must_not_tokenize)
        patch.setattr("tdlm.data.tokenizer.trainers.BpeTrainer", must_not_tokenize)
        second = load_corpus(text_config(folder), cache_dir=cache, progress=False)
    assert second.vocab.name == first.vocab.name
    assert all(np.array_equal(first.splits[s], second.splits[s]) for s in first.splits)

    (folder / "valid.txt").write_text("a different valid split", encoding="utf-8")
    changed = load_corpus(text_config(folder), cache_dir=cache, progress=False)
    assert changed.vocab.decode(changed.splits["valid"]) == "a different valid split"
    assert changed.vocab.name == first.vocab.name  # the BPE is trained on train only
    assert np.array_equal(changed.splits["train"], first.splits["train"])


def test_missing_data_lists_every_path_looked_at(tmp_path):
    nowhere, cache = tmp_path / "nowhere", tmp_path / "cache"
    with pytest.raises(DataNotFoundError) as error:
        load_corpus(DataConfig(path=str(nowhere)), cache_dir=cache, progress=False)
    message = str(error.value)
    assert isinstance(error.value, FileNotFoundError)
    for split in ("train", "valid", "test"):
        assert str(nowhere / f"wikitext-2/wiki.{split}.tokens") in message
        assert str(cache / "hub" / f"wikitext-2/wiki.{split}.tokens") in message
    assert "HF_HUB_OFFLINE" in message and "TDLM_DATA_DIR" in message

    write_text_folder(tmp_path / "text")
    (tmp_path / "text" / "valid.txt").unlink()
    with pytest.raises(DataNotFoundError, match=r"valid\.txt \(missing\)"):
        load_corpus(text_config(tmp_path / "text"), cache_dir=cache, progress=False)


def test_unreachable_hub_fails_fast_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.delenv("HF_DATASETS_OFFLINE")
    for proxy in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(proxy, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    with pytest.raises(DataNotFoundError, match="127.0.0.1:9 unreachable"):
        load_corpus(DataConfig(path=str(tmp_path / "nowhere")), cache_dir=tmp_path / "cache", progress=False)


def test_hub_copy_is_kept_in_the_cache_and_reused_offline(tmp_path, monkeypatch, bpe_corpus):
    """The hub path with fake clients: rows as the hub serves them ("" for blank lines)."""
    rows = ["", " = Title = \n", "", " Body , with <unk> . \n"]
    fake_datasets = type(sys)("datasets")
    fake_datasets.load_dataset = lambda *args, **kwargs: {s: {"text": rows} for s in ("train", "validation", "test")}
    cfg, cache = DataConfig(path=str(tmp_path / "nowhere")), tmp_path / "cache"
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "datasets", fake_datasets)
        patch.setattr(tokenizers.Tokenizer, "from_pretrained", lambda name: bpe_corpus.vocab.tokenizer)
        patch.setattr("tdlm.data.locate._hub_skip_reason", lambda offline_vars: None)
        corpus = load_corpus(cfg, cache_dir=cache, progress=False)
    file_text = " \n = Title = \n \n Body , with <unk> . \n"  # as in the original wiki.*.tokens
    assert (cache / "hub" / WIKITEXT2_FILES["train"]).read_text(encoding="utf-8") == file_text
    assert corpus.vocab.decode(corpus.splits["test"]) == file_text
    assert corpus.vocab.size == bpe_corpus.vocab.size  # the tokenizer came from the (fake) hub

    again = load_corpus(cfg, cache_dir=cache, progress=False)  # real clients, HF_HUB_OFFLINE=1
    assert np.array_equal(again.splits["train"], corpus.splits["train"])


def test_wikitext2_gpt2_has_the_published_token_counts(monkeypatch):
    data_dir = shared_data_dir()
    corpus = load_corpus(DataConfig(), cache_dir=USER_CACHE, progress=False)
    assert {split: len(tokens) for split, tokens in corpus.splits.items()} == WIKITEXT2_TOKENS
    assert corpus.vocab.decode(corpus.splits["train"][:20]).startswith(" \n = Valkyria Chronicles III = \n")
    assert corpus.num_bytes(corpus.splits["valid"]) == (data_dir / WIKITEXT2_FILES["valid"]).stat().st_size

    monkeypatch.setattr(tdlm.data.corpus, "tokenize_lines", lambda *a, **k: pytest.fail("cache missed"))
    cached = load_corpus(DataConfig(max_train_tokens=1000), cache_dir=USER_CACHE, progress=False)
    assert np.array_equal(cached.splits["train"], corpus.splits["train"][:1000])


# ---- config and import ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({"dataset": "wikitext103"}, "'wikitext2', 'text'"),
        ({"tokenizer": "sentencepiece"}, "'gpt2', 'bpe'"),
        ({"dataset": "text"}, "needs path"),
        ({"bpe_vocab_size": 100}, "greater than or equal to 260"),
        ({"seq_len": 1}, "greater than or equal to 2"),
        ({"seqlen": 64}, "Extra inputs are not permitted"),
    ],
)
def test_config_rejects_bad_values_naming_what_is_allowed(fields, expected):
    with pytest.raises(ValueError, match=expected):
        DataConfig(**fields)


def test_importing_tdlm_data_loads_neither_torch_nor_tokenizers():
    script = (
        "import sys, tdlm; before = set(sys.modules); import tdlm.data; "
        "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))"
    )
    repo = Path(__file__).resolve().parent.parent
    new = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=repo).stdout
    assert not {"torch", "tokenizers", "datasets", "tqdm"} & set(ast.literal_eval(new)), new
