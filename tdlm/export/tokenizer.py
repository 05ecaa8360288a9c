"""A run's tokenizer as Hugging Face tokenizer files: tokenizer.json plus its two small configs.

tdlm's vocabulary is a byte-level BPE (GPT-2's or one trained on the run's text) whose
end-of-text token is special, plus the mask id V, which no text encodes to and the tokenizer
itself does not know. The exported tokenizer adds "<mask>" as a special token at exactly id V,
so `PreTrainedTokenizerFast(tokenizer_file=...)` / AutoTokenizer give tdlm's ids for any text and
`mask_token_id` is the id the model's embedding reserves for it.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Tokenizer

from tdlm.data.tokenizer import END_OF_TEXT, MASK_TEXT
from tdlm.export.folder import ExportError


def tokenizer_json(vocab) -> str:
    """The run's tokenizer with "<mask>" as a special token at id V (vocab.mask_id)."""
    tokenizer = Tokenizer.from_str(vocab.tokenizer.to_str())  # a copy: the run's stays as it is
    tokenizer.add_special_tokens([AddedToken(MASK_TEXT, special=True, normalized=False)])
    got = tokenizer.token_to_id(MASK_TEXT)
    if got != vocab.mask_id or tokenizer.get_vocab_size(with_added_tokens=True) != vocab.model_size:
        raise ExportError(f"the tokenizer {vocab.name} already holds a {MASK_TEXT!r} token (id {got}), so the mask "
                          f"cannot be given its own id {vocab.mask_id}: this run's tokenizer cannot be exported")
    return tokenizer.to_str(pretty=True)


def tokenizer_files(vocab, seq_len: int) -> dict[str, str]:
    """File name -> text: tokenizer.json, tokenizer_config.json, special_tokens_map.json."""
    special = {"bos_token": END_OF_TEXT, "eos_token": END_OF_TEXT, "mask_token": MASK_TEXT}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "model_max_length": seq_len,  # the longest sequence the network takes
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,  # decode gives the text back as tdlm decodes it
    }
    return {"tokenizer.json": tokenizer_json(vocab),
            "tokenizer_config.json": json.dumps(config, indent=2) + "\n",
            "special_tokens_map.json": json.dumps(special, indent=2) + "\n"}
