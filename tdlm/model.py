"""One small pre-LN Transformer: bidirectional for diffusion, causal for AR; nothing else differs.

The input embedding has V + 1 rows (real tokens and the mask token); the output head scores
only the V real tokens, so the mask token can never be predicted (SUBS).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ModelConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    n_layers: int = Field(2, ge=1)
    d_model: int = Field(64, ge=8)
    n_heads: int = Field(4, ge=1)
    d_ff: int | None = Field(None, ge=1)
    """Hidden width of the MLP; default 4 * d_model."""
    positions: Literal["learned", "rope"] = "learned"
    tied_embeddings: bool = False
    """Share the input embedding with the output head (the mask row is left out of the head)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    bias: bool = True
    """Biases in the linear layers (the output head never has one)."""


def rope_tables(length: int, head_dim: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / (10000 ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    angles = torch.outer(torch.arange(length, device=device).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x[..., 0::2], x[..., 1::2]
    return torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).flatten(-2)


class SelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        if cfg.d_model % cfg.n_heads:
            raise ValueError(f"model.d_model ({cfg.d_model}) must be divisible by model.n_heads ({cfg.n_heads})")
        self.n_heads, self.causal, self.dropout = cfg.n_heads, causal, cfg.dropout
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(self, x, rope=None):
        batch, length, width = x.shape
        q, k, v = self.qkv(x).view(batch, length, 3, self.n_heads, -1).permute(2, 0, 3, 1, 4)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=self.causal, dropout_p=self.dropout if self.training else 0.0
        )
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, causal: bool):
        super().__init__()
        d_ff = cfg.d_ff or 4 * cfg.d_model
        self.ln1, self.ln2 = nn.LayerNorm(cfg.d_model), nn.LayerNorm(cfg.d_model)
        self.attn = SelfAttention(cfg, causal)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.d_model, d_ff, bias=cfg.bias),
            nn.GELU(),
            nn.Linear(d_ff, cfg.d_model, bias=cfg.bias),
            nn.Dropout(cfg.dropout),
        )

    def forward(self, x, rope=None):
        x = x + self.attn(self.ln1(x), rope)
        return x + self.mlp(self.ln2(x))


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, vocab_size: int, max_len: int, causal: bool):
        """vocab_size: V real tokens; the embedding gets one more row for the mask token."""
        super().__init__()
        self.cfg, self.vocab_size, self.max_len, self.causal = cfg, vocab_size, max_len, causal
        self.tok_emb = nn.Embedding(vocab_size + 1, cfg.d_model)
        self.pos_emb = nn.Embedding(max_len, cfg.d_model) if cfg.positions == "learned" else None
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = None if cfg.tied_embeddings else nn.Linear(cfg.d_model, vocab_size, bias=False)
        self.apply(self._init_weights)
        for name, param in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("attn.proj.weight", "mlp.2.weight")):
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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, N] token ids (mask id allowed) -> logits [B, N, V] over the real tokens."""
        length = x.shape[1]
        if length > self.max_len:
            raise ValueError(f"sequence of {length} tokens exceeds the model's max length {self.max_len}")
        h = self.tok_emb(x)
        rope = None
        if self.pos_emb is not None:
            h = h + self.pos_emb(torch.arange(length, device=x.device))
        else:
            rope = rope_tables(length, self.cfg.d_model // self.cfg.n_heads, x.device)
        h = self.drop(h)
        for block in self.blocks:
            h = block(h, rope)
        h = self.ln_f(h)
        if self.head is None:
            return F.linear(h, self.tok_emb.weight[: self.vocab_size])
        return self.head(h)
