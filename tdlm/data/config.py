"""The `[data]` section of a recipe: which corpus, which tokenizer, how long the sequences are."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

DATASETS = ("wikitext2", "text")
TOKENIZERS = ("gpt2", "bpe")


class DataConfig(BaseModel):
    # Frozen like the other recipe sections: a resolved config is saved with the run, so it
    # must not change after validation.
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    dataset: str = "wikitext2"
    """'wikitext2' (WikiText-2 v1, tokenized splits) or 'text' (a folder holding train.txt,
    valid.txt and test.txt)."""
    path: str | None = None
    """For dataset='text': the folder (required). For 'wikitext2': a data dir to use instead of
    $TDLM_DATA_DIR / ../shared/data (it holds wikitext-2/ and gpt2/)."""
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

    @field_validator("dataset")
    @classmethod
    def _known_dataset(cls, value: str) -> str:
        if value not in DATASETS:
            raise ValueError(f"unknown dataset {value!r}; allowed: {', '.join(map(repr, DATASETS))}")
        return value

    @field_validator("tokenizer")
    @classmethod
    def _known_tokenizer(cls, value: str) -> str:
        if value not in TOKENIZERS:
            raise ValueError(f"unknown tokenizer {value!r}; allowed: {', '.join(map(repr, TOKENIZERS))}")
        return value

    @model_validator(mode="after")
    def _text_needs_path(self) -> DataConfig:
        if self.dataset == "text" and self.path is None:
            raise ValueError("dataset='text' needs path: a folder holding train.txt, valid.txt and test.txt")
        return self
