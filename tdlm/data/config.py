"""The `[data]` section of a recipe: which corpus, which tokenizer, how long the sequences are.

Two formats. "text" tokenises WikiText-2 or a folder of text on first use (cached). "webdataset"
reads shards that `tdlm data prepare` wrote: `path` is that folder, and the tokenizer, the
corpus and the token counts all come from its manifest.json. So a recipe switched to shards
(`--set data.format=webdataset --set data.path=DIR`) may keep its `dataset`, `tokenizer` and
`bpe_vocab_size`: the manifest's replace them when the run starts (the run's config.json
records the manifest's, and a recipe value the manifest overrides is reported).
`max_train_tokens` cannot be honoured by shards and is an error (`--set
data.max_train_tokens=none` removes it); `seq_len` must equal the shards' (checked when they
are opened).

    [data]
    format = "webdataset"
    path = "shards/wikitext2-gpt2-128"   # from: tdlm data prepare wikitext2 --out ... --seq-len 128
    seq_len = 128
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMATS = ("text", "webdataset")
DATASETS = ("wikitext2", "text")
TOKENIZERS = ("gpt2", "bpe")
# How documents are marked in the token stream (tdlm.data.documents).
DOCUMENTS = ("as-is", "wikitext-titles", "blank-lines")
# Settings that a webdataset folder fixes in its manifest: taken from it when the run starts
# (tdlm.data.manifest.data_from_manifest).
MANIFEST_FIELDS = ("dataset", "tokenizer", "bpe_vocab_size", "documents")
# Settings that shards cannot honour: a recipe must leave them unset.
NOT_FOR_SHARDS = ("max_train_tokens",)


class DataConfig(BaseModel):
    # Frozen like the other recipe sections: a resolved config is saved with the run, so it
    # must not change after validation.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    format: str = "text"
    """'text' (tokenise `dataset` on first use) or 'webdataset' (shards written by
    `tdlm data prepare`, streamed during training; `path` is their folder)."""
    dataset: str = "wikitext2"
    """'wikitext2' (WikiText-2 v1, tokenized splits) or 'text' (a folder holding train.txt,
    valid.txt and test.txt)."""
    path: str | None = None
    """For dataset='text': the folder (required). For 'wikitext2': a data dir to use instead of
    $TDLM_DATA_DIR / ../shared/data (it holds wikitext-2/ and gpt2/). For format='webdataset':
    the folder `tdlm data prepare` wrote (required)."""
    tokenizer: str = "gpt2"
    """'gpt2' (the GPT-2 BPE from gpt2/vocab.json + merges.txt) or 'bpe' (a byte-level BPE
    trained on the train split, cached)."""
    bpe_vocab_size: int = Field(4096, ge=260)
    """Vocabulary of the trained BPE, <|endoftext|> included (tokenizer='bpe' only). At least
    the 256 byte symbols plus a few merges."""
    seq_len: int = Field(128, ge=2)
    """Tokens per training sequence; the token stream is cut into sequences of this length."""
    max_train_tokens: int | None = Field(None, ge=1)
    """Keep only the first this many train tokens (quick runs); valid/test are never cut."""
    documents: str = "as-is"
    """Where an end-of-text token ends a document, in every split: 'as-is' (only where the text
    has a literal <|endoftext|>), 'wikitext-titles' (after each WikiText article: an article
    starts at a ` = Title = ` line) or 'blank-lines' (after each run of text that blank lines
    separate). A model learns to stop (`tdlm sample --stop-at-eos`) only from marked documents."""

    @field_validator("format", "dataset", "tokenizer", "documents")
    @classmethod
    def _known_choice(cls, value: str, info) -> str:
        allowed = {"format": FORMATS, "dataset": DATASETS, "tokenizer": TOKENIZERS, "documents": DOCUMENTS}[info.field_name]
        if value not in allowed:
            raise ValueError(f"unknown {info.field_name} {value!r}; allowed: {', '.join(map(repr, allowed))}")
        return value

    @model_validator(mode="after")
    def _webdataset_reads_its_manifest(self) -> DataConfig:
        if self.format != "webdataset":
            return self
        if self.path is None:
            raise ValueError("format='webdataset' needs path: the folder `tdlm data prepare` wrote")
        conflicting = [name for name in NOT_FOR_SHARDS if getattr(self, name) is not None]
        if conflicting:
            raise ValueError(
                f"format='webdataset' streams every train sequence of the shards: remove {', '.join(conflicting)} "
                f"(e.g. --set data.{conflicting[0]}=none), or prepare shards from less text"
            )
        return self

    @model_validator(mode="after")
    def _text_needs_path(self) -> DataConfig:
        if self.format == "text" and self.dataset == "text" and self.path is None:
            raise ValueError("dataset='text' needs path: a folder holding train.txt, valid.txt and test.txt")
        return self
