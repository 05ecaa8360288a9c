"""A tdlm Transformer for Hugging Face transformers: the network of an exported run (`tdlm export`).

Standalone on purpose: this file is copied into every exported folder and loaded there with
`trust_remote_code=True` by people who do not have tdlm, so it imports only torch and
transformers (and its sibling configuration file). It computes exactly what tdlm.model does
(tests compare the logits to 1e-5), with the same module names, so the folder's
model.safetensors, written with tdlm's own state_dict names (`net.` the network, `objective.`
tdlm's component state such as learned masking weights, unused here), loads as it is.

- TdlmForMaskedLM (objective "diffusion"): bidirectional. input_ids may hold `mask_id`
  (= vocab_size); logits [B, N, V] are the denoiser's prediction of the clean token at every
  position, over the V real tokens (never the mask). Sampling is a diffusion chain, not
  `generate()`: see diffusion_config.json and tdlm's samplers. With `shift_logits` (a denoiser
  started from an AR model) the network itself reads [bos_id, x_0 .. x_{N-1}] (N + 1 positions)
  and the logits of position j are those of the slot holding x_{j-1}; input_ids and logits are
  still [B, N]: pass the sequence alone, without a BOS.
- TdlmForCausalLM (objective "ar"): causal; logits at position i predict token i + 1, the
  sequence starting from `bos_token_id` (end-of-text), as tdlm trains it. No key/value cache:
  each step of `generate()` reads the whole prefix again (fine at these sizes).

Neither takes padding: every position of input_ids is attended to.
"""

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutput, MaskedLMOutput

from .configuration_tdlm import TdlmConfig


def rope_tables(length, head_dim, device):
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x, cos, sin):
    """Rotate interleaved pairs (x[0::2], x[1::2]) by the float32 angles; keep x's dtype."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, config, causal):
        super().__init__()
        self.n_heads, self.causal, self.dropout = config.n_heads, causal, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=config.bias)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=config.bias)

    def forward(self, x, rope=None):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


def make_norm(config):
    if config.norm == "rmsnorm":
        return nn.RMSNorm(config.d_model, eps=1e-5)
    return nn.LayerNorm(config.d_model)


class SwiGLU(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.gate = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.up = nn.Linear(config.d_model, config.d_ff, bias=config.bias)
        self.down = nn.Linear(config.d_ff, config.d_model, bias=config.bias)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


def make_mlp(config):
    if config.mlp == "swiglu":
        return SwiGLU(config)
    return nn.Sequential(  # the indices are weight names (mlp.0, mlp.2)
        nn.Linear(config.d_model, config.d_ff, bias=config.bias),
        nn.GELU(),
        nn.Linear(config.d_ff, config.d_model, bias=config.bias),
        nn.Dropout(config.dropout),
    )


class Block(nn.Module):
    def __init__(self, config, causal):
        super().__init__()
        self.ln1, self.ln2 = make_norm(config), make_norm(config)
        self.attn = SelfAttention(config, causal)
        self.mlp = make_mlp(config)

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln1(x), rope)
        return x + self.mlp(self.ln2(x))


class TdlmTransformer(nn.Module):
    """tdlm.model.Transformer: embeddings (V + 1 rows: the mask token last), pre-norm blocks, a
    final norm and a head over the V real tokens (the embedding without its mask row when tied)."""

    def __init__(self, config):
        super().__init__()
        self.vocab_size, self.max_len, self.config = config.vocab_size, config.max_len, config
        self.bos_id = None
        if config.shift_logits:
            if config.bos_id is None:
                raise ValueError("shift_logits needs bos_id, the token of the first slot, in config.json")
            self.bos_id = config.bos_id
        self.tok_emb = nn.Embedding(config.vocab_size + 1, config.d_model)
        self.pos_emb = nn.Embedding(config.max_len, config.d_model) if config.positions == "learned" else None
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config, config.causal) for _ in range(config.n_layers))
        self.ln_f = make_norm(config)
        self.head = None if config.tied_embeddings else nn.Linear(config.d_model, config.vocab_size, bias=False)

    @property
    def head_weight(self):
        return self.tok_emb.weight[: self.vocab_size] if self.head is None else self.head.weight

    def forward(self, input_ids):
        """input_ids [B, N] -> the final normalised hidden states [B, N, d]: with shift_logits, those
        of the slots [BOS, x_0 .. x_{N-2}] of the input [BOS, x_0 .. x_{N-1}]."""
        if input_ids.shape[1] > self.max_len:
            raise ValueError(f"sequence of {input_ids.shape[1]} tokens exceeds the model's max length {self.max_len}")
        if self.bos_id is not None:
            input_ids = torch.cat([torch.full_like(input_ids[:, :1], self.bos_id), input_ids], dim=1)
        length = input_ids.shape[1]
        h = self.tok_emb(input_ids)
        rope = None
        if self.pos_emb is not None:
            h = h + self.pos_emb(torch.arange(length, device=input_ids.device))
        else:
            rope = rope_tables(length, self.config.d_model // self.config.n_heads, input_ids.device)
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, rope)
        h = self.ln_f(h)
        # the last slot (x_{N-1}) predicts nothing, but every other slot attends to it
        return h[:, :-1] if self.bos_id is not None else h


class TdlmPreTrainedModel(PreTrainedModel):
    config_class = TdlmConfig
    base_model_prefix = "net"
    # tdlm's component state (e.g. learned per-token masking weights) rides in the same file
    _keys_to_ignore_on_load_unexpected = [r"^objective\."]
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def get_input_embeddings(self):
        return self.net.tok_emb

    def _logits(self, input_ids, attention_mask):
        if attention_mask is not None and not bool(attention_mask.bool().all()):
            raise ValueError("tdlm models take no padding: every position is attended to; "
                             "pass sequences of one length (attention_mask all ones or None)")
        return F.linear(self.net(input_ids), self.net.head_weight)


class TdlmForMaskedLM(TdlmPreTrainedModel):
    """The masked-diffusion denoiser: logits of the clean token at every position."""

    def __init__(self, config):
        super().__init__(config)
        self.net = TdlmTransformer(config)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, labels=None, return_dict=None, **kwargs):
        """labels [B, N]: the clean tokens where a loss is wanted, -100 elsewhere (the loss is the
        mean cross-entropy there, not tdlm's NELBO, which weighs each position by its time)."""
        logits = self._logits(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=logits)


class TdlmForCausalLM(TdlmPreTrainedModel, GenerationMixin):
    """The autoregressive model: logits at position i are p(token i + 1 | tokens 0..i)."""

    def __init__(self, config):
        super().__init__(config)
        self.net = TdlmTransformer(config)
        self.post_init()

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        return {"input_ids": input_ids[:, -self.config.max_len:]}  # no cache: the whole (recent) prefix

    def forward(self, input_ids, attention_mask=None, labels=None, return_dict=None, **kwargs):
        """labels [B, N]: usually input_ids; shifted here (position i scored against token i + 1)."""
        logits = self._logits(input_ids, attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten(), ignore_index=-100)
        return CausalLMOutput(loss=loss, logits=logits)
