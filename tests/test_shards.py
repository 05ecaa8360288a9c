"""Sharded data: `tdlm data prepare`, the manifest, ShardStream and format='webdataset'.

One toy corpus is prepared once per module (BPE of 300 ids, seq_len 16, shards of 50
sequences: 12 train shards, the last one shorter) and compared with the text path's tokens.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import types
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from pydantic import ValidationError

import tdlm.data.shards
from tdlm.cli import cli
from tdlm.data import (
    BatchStream,
    DataConfig,
    DataNotFoundError,
    ShardError,
    ShardStream,
    load_corpus,
    pack,
    train_stream,
)
from tdlm.rundir import vocab_info
from toydata import write_toy_corpus

SEQ_LEN, SHARD_SIZE, BPE = 16, 50, 300
BATCH = 24  # > the last shard's 18 sequences: some batches span three shards


@pytest.fixture(autouse=True)
def no_hub_no_home_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TDLM_CACHE_DIR", str(tmp_path / "default-cache"))


def prepare(*args: str):
    return CliRunner().invoke(cli, ["data", "prepare", *args])


def prepare_args(source, out, *extra: str) -> list[str]:
    return [str(source), "--out", str(out), "--seq-len", str(SEQ_LEN), "--shard-size", str(SHARD_SIZE),
            "--tokenizer", "bpe", "--bpe-vocab-size", str(BPE), *extra]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """(corpus folder, prepared folder, cache dir), prepared through the CLI."""
    root = tmp_path_factory.mktemp("shards")
    corpus, out, cache = write_toy_corpus(root / "corpus"), root / "prepared", root / "cache"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TDLM_CACHE_DIR", str(cache))
        result = prepare(*prepare_args(corpus, out))
    assert result.exit_code == 0, result.output
    assert 'format = "webdataset"' in result.output
    return corpus, out, cache


@pytest.fixture(scope="module")
def prepared(workspace) -> Path:
    return workspace[1]


@pytest.fixture(scope="module")
def manifest(prepared) -> dict:
    return json.loads((prepared / "manifest.json").read_text())


@pytest.fixture(scope="module")
def text_corpus(workspace):
    corpus, _, cache = workspace
    cfg = DataConfig(dataset="text", path=str(corpus), tokenizer="bpe", bpe_vocab_size=BPE, seq_len=SEQ_LEN)
    return load_corpus(cfg, cache_dir=cache, progress=False)


def shard_config(folder: Path, seq_len: int = SEQ_LEN) -> DataConfig:
    return DataConfig(format="webdataset", path=str(folder), seq_len=seq_len)


def test_manifest_counts_match_the_text_path(prepared, manifest, text_corpus, workspace):
    corpus_dir = workspace[0]
    assert (manifest["seq_len"], manifest["shard_size"], manifest["version"]) == (SEQ_LEN, SHARD_SIZE, 1)
    assert manifest["tokenizer"]["name"] == text_corpus.vocab.name
    facts = manifest["tokenizer"]
    assert (facts["vocab_size"], facts["bos_id"], facts["mask_id"]) == (
        text_corpus.vocab.size, text_corpus.vocab.bos_id, text_corpus.vocab.mask_id)
    for split, entry in manifest["splits"].items():
        tokens = text_corpus.splits[split]
        n = len(tokens) // SEQ_LEN
        assert entry["tokens"] == len(tokens) and entry["sequences"] == n
        assert entry["tail"] == tokens[n * SEQ_LEN :].tolist()
        assert entry["bytes"] == len((corpus_dir / f"{split}.txt").read_bytes())
        assert [s["sequences"] for s in entry["shards"]] == [min(SHARD_SIZE, n - i) for i in range(0, n, SHARD_SIZE)]
        for shard in entry["shards"]:
            assert hashlib.sha256((prepared / shard["file"]).read_bytes()).hexdigest() == shard["sha256"]
    assert len(manifest["splits"]["train"]["shards"]) == 12
    counts = np.load(prepared / "train_token_counts.npy")
    assert np.array_equal(counts, np.bincount(text_corpus.splits["train"], minlength=text_corpus.vocab.size))


def test_shards_hold_the_packed_sequences_in_order(prepared, manifest, text_corpus):
    import webdataset  # an ordinary webdataset reader gets the same sequences

    sequences, _ = pack(text_corpus.splits["train"], SEQ_LEN)
    second = manifest["splits"]["train"]["shards"][1]
    samples = list(webdataset.WebDataset(str(prepared / second["file"]), shardshuffle=False).decode())
    assert [s["__key__"] for s in samples[:2]] == ["train-000000050", "train-000000051"]
    assert all(s["tokens.npy"].dtype == np.int32 for s in samples)
    assert np.array_equal(np.stack([s["tokens.npy"] for s in samples]), sequences[50:100].numpy())


def test_webdataset_corpus_equals_the_text_corpus(prepared, text_corpus):
    corpus = load_corpus(shard_config(prepared))
    assert set(corpus.splits) == {"valid", "test"}
    for split in ("valid", "test"):
        assert np.array_equal(corpus.splits[split], text_corpus.splits[split])
        assert corpus.num_bytes(corpus.splits[split]) == text_corpus.num_bytes(text_corpus.splits[split])
    first = text_corpus.splits["valid"][:40]
    assert corpus.vocab.decode(corpus.splits["valid"][:40]) == text_corpus.vocab.decode(first)
    shards_info, text_info = vocab_info(corpus), vocab_info(text_corpus)
    assert np.array_equal(shards_info.token_counts, text_info.token_counts)
    facts = (shards_info.size, shards_info.mask_id, shards_info.bos_id)
    assert facts == (text_info.size, text_info.mask_id, text_info.bos_id)


def test_train_stream_picks_the_format(prepared, text_corpus, workspace):
    text_cfg = DataConfig(dataset="text", path=str(workspace[0]), tokenizer="bpe", bpe_vocab_size=BPE, seq_len=SEQ_LEN)
    text_stream = train_stream(text_corpus, text_cfg, BATCH, seed=3)
    expected = BatchStream(pack(text_corpus.splits["train"], SEQ_LEN)[0], BATCH, seed=3)
    assert isinstance(text_stream, BatchStream) and torch.equal(text_stream.get(30), expected.get(30))
    shard_corpus = load_corpus(shard_config(prepared))
    stream = train_stream(shard_corpus, shard_config(prepared), BATCH, seed=3, rank=1, world_size=2)
    assert isinstance(stream, ShardStream) and stream.get(0).shape == (BATCH // 2, SEQ_LEN)
    assert stream.batches_per_epoch == expected.batches_per_epoch == 568 // BATCH
    assert stream.num_sequences == expected.num_sequences == 568


def epoch_rows(stream: ShardStream, epoch: int) -> torch.Tensor:
    steps = range(epoch * stream.batches_per_epoch, (epoch + 1) * stream.batches_per_epoch)
    return torch.cat([stream.get(step) for step in steps])


def test_shard_stream_is_independent_of_world_size(prepared):
    whole = ShardStream(prepared, BATCH, seed=5)
    halves = [ShardStream(prepared, BATCH, seed=5, rank=r, world_size=2) for r in range(2)]
    quarters = [ShardStream(prepared, BATCH, seed=5, rank=r, world_size=4) for r in range(4)]
    assert (whole.local_batch, halves[0].local_batch) == (BATCH, BATCH // 2)
    for step in range(2 * whole.batches_per_epoch + 2):  # every shard boundary and two epoch boundaries
        batch = whole.get(step)
        assert batch.dtype == torch.long and batch.shape == (BATCH, SEQ_LEN)
        assert torch.equal(torch.cat([h.get(step) for h in halves]), batch)
        assert torch.equal(torch.cat([q.get(step) for q in quarters]), batch)


def test_shard_stream_is_a_pure_function_of_seed_and_step(prepared):
    first, second = ShardStream(prepared, BATCH, seed=5), ShardStream(prepared, BATCH, seed=5)
    steps = [40, 3, 3, 27, 0, 51]  # out of order, as after a resume
    assert all(torch.equal(first.get(s), second.get(s)) for s in steps)
    fresh = [ShardStream(prepared, BATCH, seed=5).get(s) for s in steps]  # no memory of earlier calls
    assert all(torch.equal(first.get(s), f) for s, f in zip(steps, fresh))
    assert not torch.equal(ShardStream(prepared, BATCH, seed=6).get(3), first.get(3))


def test_each_epoch_is_a_shuffled_permutation_of_the_sequences(prepared, text_corpus):
    stream = ShardStream(prepared, BATCH, seed=5)
    sequences, _ = pack(text_corpus.splits["train"], SEQ_LEN)
    available = Counter(map(tuple, sequences.tolist()))
    epochs = [epoch_rows(stream, e) for e in range(3)]
    for rows in epochs:
        assert len(rows) == stream.batches_per_epoch * BATCH
        drawn = Counter(map(tuple, rows.tolist()))
        # as a multiset: no sequence drawn more often than it occurs (identical sentences may repeat)
        assert all(drawn[row] <= available[row] for row in drawn)
        assert not torch.equal(rows, sequences[: len(rows)])
    assert not torch.equal(epochs[0], epochs[1]) and not torch.equal(epochs[1], epochs[2])
    # shuffled inside shards too: rows that follow each other rarely followed each other when stored
    where = {}
    for index, row in enumerate(map(tuple, sequences.tolist())):
        where.setdefault(row, set()).add(index)
    rows = list(map(tuple, epochs[0].tolist()))
    neighbours = sum(any(i + 1 in where[b] for i in where[a]) for a, b in zip(rows, rows[1:]))
    assert neighbours < 0.2 * len(rows)
    assert stream.epoch_of(stream.batches_per_epoch) == 1.0 and stream.epoch_of(0) == 0.0


def test_shard_stream_reads_only_the_shards_it_needs(prepared, monkeypatch):
    reads, most_held = [], [0]
    real_read = tdlm.data.shards.read_shard

    def counting_read(directory, entry, manifest):
        reads.append(entry["file"])
        return real_read(directory, entry, manifest)

    monkeypatch.setattr(tdlm.data.shards, "read_shard", counting_read)
    stream = ShardStream(prepared, BATCH, seed=5)
    assert reads == []  # opening the stream reads the manifest only
    stream.get(0)
    assert 1 <= len(reads) <= 3
    reads.clear()
    for step in range(2 * stream.batches_per_epoch):
        stream.get(step)
        most_held[0] = max(most_held[0], len(stream._cache))
    assert most_held[0] <= stream.cache_size <= 3
    # a sequential pass decodes each shard once per epoch, never again
    assert len(reads) <= 2 * 12 and sorted(Counter(reads).values())[-1] <= 2


def corrupt(folder: Path, how: str) -> str:
    """Damage train shard 0 of `folder` one way; the damaged file's name."""
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    shard = manifest["splits"]["train"]["shards"][0]
    path = folder / shard["file"]
    raw = path.read_bytes()
    if how == "missing":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif how == "flipped":
        path.write_bytes(raw[:644] + bytes([raw[644] ^ 1]) + raw[645:])  # a token of sequence 0
    elif how == "not a tar":  # a consistent sha256, but no shard inside
        path.write_bytes(b"not a tar file" * 100)
        shard["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    elif how == "wrong count":
        shard["sequences"] += 1
    manifest_path.write_text(json.dumps(manifest))
    return shard["file"]


@pytest.mark.parametrize("how", ["missing", "truncated", "flipped", "not a tar", "wrong count"])
def test_a_damaged_shard_is_named(prepared, tmp_path, how):
    folder = tmp_path / "copy"
    shutil.copytree(prepared, folder)
    name = corrupt(folder, how)
    stream = ShardStream(folder, BATCH, seed=5)
    with pytest.raises(ShardError, match=name) as caught:
        for step in range(stream.batches_per_epoch):  # shard 0 is somewhere in epoch 0
            stream.get(step)
    assert "tdlm data prepare" in str(caught.value) and isinstance(caught.value, DataNotFoundError)


def test_a_damaged_valid_shard_stops_load_corpus(prepared, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(prepared, folder)
    path = folder / "valid-000001.tar"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ShardError, match="valid-000001.tar"):
        load_corpus(shard_config(folder))
    (folder / "manifest.json").unlink()
    with pytest.raises(ShardError, match="no manifest.json"):
        load_corpus(shard_config(folder))


def test_seq_len_must_match_the_shards(prepared, text_corpus):
    with pytest.raises(ShardError, match="seq_len = 16"):
        load_corpus(shard_config(prepared, seq_len=32))
    with pytest.raises(ShardError, match="seq_len = 16"):
        train_stream(text_corpus, DataConfig(format="webdataset", path=str(prepared), seq_len=32), BATCH, 0)


def test_prepare_refuses_to_overwrite(prepared, workspace, tmp_path, monkeypatch):
    corpus, _, cache = workspace
    monkeypatch.setenv("TDLM_CACHE_DIR", str(cache))
    folder = tmp_path / "again"
    shutil.copytree(prepared, folder)
    before = (folder / "manifest.json").read_bytes()
    refused = prepare(*prepare_args(corpus, folder))
    assert refused.exit_code == 2 and "not empty" in refused.output and "--force" in refused.output
    forced = prepare(*prepare_args(corpus, folder, "--force"))
    assert forced.exit_code == 0, forced.output
    assert (folder / "manifest.json").read_bytes() == before  # same input, byte-identical shards
    (folder / "notes.txt").write_text("mine")
    foreign = prepare(*prepare_args(corpus, folder, "--force"))
    assert foreign.exit_code == 2 and "notes.txt" in foreign.output
    assert (folder / "notes.txt").is_file() and (folder / "manifest.json").is_file()


def test_prepare_reports_a_bad_source_in_one_line(tmp_path):
    result = prepare(*prepare_args(tmp_path / "nowhere", tmp_path / "out"))
    assert result.exit_code == 2 and "is not a folder, 'wikitext2' or 'hf:" in result.output
    assert not (tmp_path / "out").exists()


class FakeSplit:
    def __init__(self, rows):
        self.rows, self.column_names = rows, ["text"]

    def __getitem__(self, column):
        return self.rows


def test_prepare_from_a_hugging_face_dataset(workspace, text_corpus, tmp_path, monkeypatch):
    corpus_dir = workspace[0]
    loaded = []

    def load_dataset(name, config=None):
        loaded.append((name, config))
        # rows without their "\n", as hub datasets store lines
        return {hub: FakeSplit((corpus_dir / f"{split}.txt").read_text().splitlines())
                for split, hub in (("train", "train"), ("valid", "validation"), ("test", "test"))}

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = prepare(*prepare_args("hf:someone/toy:small", tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert loaded == [("someone/toy", "small")]
    corpus = load_corpus(shard_config(tmp_path / "out"))
    assert np.array_equal(corpus.splits["test"], text_corpus.splits["test"])
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["source"] == "hf:someone/toy:small"


def test_an_unreachable_hugging_face_dataset_is_one_clear_line(tmp_path, monkeypatch):
    def load_dataset(name, config=None):
        raise ConnectionError("Couldn't reach 'someone/toy' on the Hub (LocalEntryNotFoundError)\nmore detail")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    result = prepare(*prepare_args("hf:someone/toy", tmp_path / "out"))
    assert result.exit_code == 2
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and "Hugging Face dataset 'someone/toy'" in lines[0] and "online" in lines[0]


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"format": "webdataset"}, "needs path"),
        ({"format": "webdataset", "path": "x", "max_train_tokens": 10}, "remove max_train_tokens"),
        ({"format": "tar"}, "unknown format"),
    ],
)
def test_data_config_rejects(settings, message):
    with pytest.raises(ValidationError, match=message):
        DataConfig(**settings)


def test_data_config_for_shards_survives_a_round_trip():
    cfg = DataConfig(format="webdataset", path="shards", seq_len=64)
    assert DataConfig.model_validate(cfg.model_dump()) == cfg  # a saved run's config, defaults written out
    assert DataConfig().format == "text"
