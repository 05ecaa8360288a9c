"""One small pre-norm Transformer: bidirectional for diffusion, causal for AR; nothing else differs.

The input embedding has V + 1 rows (real tokens and the mask token); the output head scores
only the V real tokens, so the mask token can never be predicted (SUBS).

`features(x)` returns the final hidden states and `head_weight` the [V, d] output matrix, so an
objective can apply the head only where its loss is (the masked positions of a diffusion step)
and in chunks, never building the full [B, N, V] logits; `forward(x)` is the plain logits.

`shift_logits` (Dream's shifted prediction, for a denoiser started from an AR model): the network
reads [BOS, x_0 .. x_{N-1}] and the output for position j is the hidden state of slot j, which
holds x_{j-1} (BOS for j = 0), exactly where an AR model predicts x_j. It lives here, in the
network, so that every reader of `features` or `forward` (training, scoring, every sampler, an
export) gets the output of position j at position j.
"""

from __future__ import annotations

import contextlib
import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    n_layers: int = Field(2, ge=1)
    d_model: int = Field(64, ge=8)
    n_heads: int = Field(4, ge=1)
    d_ff: int | None = Field(None, ge=1)
    """Hidden width of the MLP; default 4 * d_model (gelu), or 8/3 * d_model rounded up to a
    multiple of 64 (swiglu: the same parameter count as gelu's, LLaMA's rule)."""
    positions: Literal["learned", "rope"] = "rope"
    """rope: rotary position embeddings. A bidirectional (diffusion) model with learned absolute
    positions finds its neighbours slowly and learns almost no context in a short budget."""
    norm: Literal["layernorm", "rmsnorm"] = "layernorm"
    mlp: Literal["gelu", "swiglu"] = "gelu"
    tied_embeddings: bool = False
    """Share the input embedding with the output head (the mask row is left out of the head)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    """Biases in the linear layers (the output head never has one)."""
    shift_logits: bool = False
    """Dream's shifted prediction, for a diffusion model started from an AR one
    (`training.init_from`): the output for position j comes from the slot before it (a BOS slot for
    j = 0), where the AR model predicted token j. It adds no parameter. Needs rope positions (the
    BOS slot makes N + 1 of them) and a diffusion objective (an AR objective shifts its own input)."""

    @model_validator(mode="after")
    def _heads_fit(self):
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_heads ({self.n_heads})")
        if self.positions == "rope" and (self.d_model // self.n_heads) % 2:
            raise ValueError(f"rope needs an even head size; d_model / n_heads = {self.d_model // self.n_heads}")
        if self.shift_logits and self.positions != "rope":
            raise ValueError("shift_logits needs positions = 'rope': its BOS slot makes seq_len + 1 positions, "
                             "one more than a learned position table has")
        return self


def rope_tables(length: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs of x by the float32 angle tables; the result keeps x's dtype (a bf16 model,
    as DeepSpeed runs it, must not get float32 queries next to bf16 values)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2).to(x.dtype)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.n_heads, self.causal, self.dropout = cfg.n_heads, causal, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x, rope=None, visible=None):
        """`visible` (bool [L, L], optional): which keys each query sees, in place of the layer's own
        causal or full attention (attention annealing)."""
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=visible, is_causal=self.causal and visible is None,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


def mlp_width(cfg: ModelConfig) -> int:
    if cfg.d_ff:
        return cfg.d_ff
    if cfg.mlp == "swiglu":
        return 64 * math.ceil(8 * cfg.d_model / 3 / 64)
    return 4 * cfg.d_model


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=1e-5)
    return nn.LayerNorm(cfg.d_model)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer, 2020)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d_ff = mlp_width(cfg)
        self.gate = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.up = nn.Linear(cfg.d_model, d_ff, bias=cfg.bias)
        self.down = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x):
        return self.drop(self.down(F.silu(self.gate(x)) * self.up(x)))


def make_mlp(cfg: ModelConfig) -> nn.Module:
    if cfg.mlp == "swiglu":
        return SwiGLU(cfg)
    d_ff = mlp_width(cfg)
    return nn.Sequential(  # indices are state_dict keys (mlp.0, mlp.2) of saved runs: keep them
        nn.Linear(cfg.d_model, d_ff, bias=cfg.bias),
        nn.GELU(),
        nn.Linear(d_ff, cfg.d_model, bias=cfg.bias),
        nn.Dropout(cfg.dropout),
    )


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        self.ln1, self.ln2 = make_norm(cfg), make_norm(cfg)
        self.attn = SelfAttention(cfg, causal)
        self.mlp = make_mlp(cfg)

    def forward(self, x, rope=None, visible=None):
        x = x + self.attn(self.ln1(x), rope, visible)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, vocab_size: int, max_len: int, causal: bool, bos_id: int | None = None):
        """vocab_size: V real tokens; the embedding gets one more row for the mask token.
        bos_id: the token of the BOS slot (cfg.shift_logits only)."""
        super().__init__()
        if cfg.shift_logits and bos_id is None:
            raise ValueError("shift_logits needs the BOS id of its first slot")
        self.cfg, self.vocab_size, self.max_len, self.causal = cfg, vocab_size, max_len, causal
        self.bos_id = bos_id if cfg.shift_logits else None
        self.attention_override: tuple[float, torch.Generator | None] | None = None
        """Set by `annealed_attention` during training; None: the network's own attention."""
        self.tok_emb = nn.Embedding(vocab_size + 1, cfg.d_model)
        self.pos_emb = nn.Embedding(max_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal) for _ in range(cfg.n_layers))
        self.ln_f = make_norm(cfg)
        self.head = None if cfg.tied_embeddings else nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight", "mlp.down.weight")):
                nn.init.normal_(param, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding: bool = False) -> int:
        total = sum(p.numel() for p in self.parameters())
        if non_embedding:
            total -= self.tok_emb.weight.numel()
            total -= self.pos_emb.weight.numel() if self.pos_emb is not None else 0
        return total

    @property
    def head_weight(self) -> torch.Tensor:
        """[V, d]: logits = features(x) @ head_weight.T (the tied head leaves out the mask row)."""
        if self.head is None:
            return self.tok_emb.weight[: self.vocab_size]
        return self.head.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N] token ids (mask id allowed) -> logits [B, N, V] over the real tokens."""
        return F.linear(self.features(x), self.head_weight)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N] -> the final normalised hidden states [B, N, d] that the head reads: with
        shift_logits, those of the slots [BOS, x_0 .. x_{N-2}] of the input [BOS, x_0 .. x_{N-1}]."""
        if x.shape[1] > self.max_len:
            raise ValueError(f"sequence of {x.shape[1]} tokens exceeds the model's max length {self.max_len}")
        if self.bos_id is not None:
            x = torch.cat([torch.full_like(x[:, :1], self.bos_id), x], dim=1)
        length = x.shape[1]
        h = self.tok_emb(x)
        rope = None
        if self.pos_emb is not None:
            h = h + self.pos_emb(torch.arange(length, device=x.device))
        else:
            rope = rope_tables(length, self.cfg.d_model // self.cfg.n_heads, x.device)
        h = self.drop(h)
        visible = self._visible(length, x.device)
        for block in self.blocks:
            h = block(h, rope, visible)
        h = self.ln_f(h)
        # the last slot (x_{N-1}) predicts nothing, but every other slot attends to it
        return h[:, :-1] if self.bos_id is not None else h

    def _visible(self, length: int, device) -> torch.Tensor | None:
        """The annealed attention pattern (None: the network's own). Each query sees every key up to
        itself and each later key with probability `fraction`, one draw for the whole batch
        (DiffuLLaMA); fraction 0 is the causal pattern."""
        if self.attention_override is None:
            return None
        fraction, generator = self.attention_override
        causal = torch.ones(length, length, dtype=torch.bool, device=device).tril()
        if fraction <= 0.0:
            return causal
        future = torch.rand(length, length, generator=generator, device=device) < fraction
        return causal | future


@contextlib.contextmanager
def annealed_attention(net: Transformer, fraction: float, generator: torch.Generator | None = None):
    """Within it, `net` attends causally plus to each later position with probability `fraction`
    (drawn from `generator` at every forward): DiffuLLaMA's attention annealing from an AR model's
    causal attention (fraction 0) to full attention (fraction 1, the network's own; nothing is
    changed then). Only training uses it: evaluation and sampling always see the network's own
    attention."""
    if fraction >= 1.0:
        yield net
        return
    before, net.attention_override = net.attention_override, (float(fraction), generator)
    try:
        yield net
    finally:
        net.attention_override = before
