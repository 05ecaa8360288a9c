"""The configuration of a tdlm model exported for Hugging Face transformers (`tdlm export`).

Standalone on purpose: this file is copied into every exported folder and loaded there with
`trust_remote_code=True` by people who do not have tdlm, so it imports only transformers.
The option names and meanings are tdlm's `[model]` recipe section (tdlm.model.ModelConfig).
"""

from transformers import PretrainedConfig


class TdlmConfig(PretrainedConfig):
    """A tdlm Transformer: bidirectional (masked diffusion) or causal (autoregressive).

    vocab_size is V, the real tokens the head scores; the input embedding has V + 1 rows, the
    last one (id V, `mask_id`) the mask token of diffusion models, which the head never
    scores (not `mask_token_id`: transformers expects those within the V scored ids).
    `eot_id` is the end-of-text token, also bos/eos. `d_ff` is the MLP width as trained
    (resolved from tdlm's default rule). `shift_logits` (a denoiser started from an AR model):
    the network reads `bos_id` (the end-of-text id) before the sequence and gives position j
    the output of the slot before it.
    """

    model_type = "tdlm"
    attribute_map = {  # the standard names other tools read
        "hidden_size": "d_model",
        "num_hidden_layers": "n_layers",
        "num_attention_heads": "n_heads",
        "intermediate_size": "d_ff",
        "max_position_embeddings": "max_len",
    }

    def __init__(self, vocab_size=50257, n_layers=2, d_model=64, n_heads=4, d_ff=256, positions="rope",
                 norm="layernorm", mlp="gelu", tied_embeddings=False, dropout=0.0, bias=True, max_len=128,
                 causal=False, objective="diffusion", mask_id=None, eot_id=None, shift_logits=False, bos_id=None,
                 **kwargs):
        self.vocab_size, self.n_layers, self.d_model, self.n_heads, self.d_ff = vocab_size, n_layers, d_model, n_heads, d_ff
        self.positions, self.norm, self.mlp, self.tied_embeddings = positions, norm, mlp, tied_embeddings
        self.dropout, self.bias, self.max_len, self.causal, self.objective = dropout, bias, max_len, causal, objective
        self.mask_id = vocab_size if mask_id is None else mask_id
        self.eot_id = eot_id
        self.shift_logits = shift_logits
        self.bos_id = eot_id if bos_id is None and shift_logits else bos_id  # the token of the BOS slot
        kwargs.setdefault("bos_token_id", eot_id)  # tdlm's AR models start from end-of-text
        kwargs.setdefault("eos_token_id", eot_id)
        # the tied head is the embedding without its mask row: the model does that itself, so
        # transformers must not tie (or untie) anything
        kwargs["tie_word_embeddings"] = False
        super().__init__(**kwargs)
