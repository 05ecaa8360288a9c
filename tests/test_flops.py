"""Training FLOPs per token against a hand count, the GPU peak table, and MFU."""

from __future__ import annotations

import pytest
import torch

from tdlm.training.flops import flops_per_token, mfu, peak_flops
from tdlm.model import ModelConfig, Transformer


def tiny_net(*, vocab_size=10, max_len=16, **model):
    cfg = ModelConfig(**{"n_layers": 1, "d_model": 8, "n_heads": 2, **model})
    return Transformer(cfg, vocab_size=vocab_size, max_len=max_len, causal=False)


@pytest.mark.parametrize("tied", [False, True])
def test_matches_a_hand_count(tied):
    # One block at d=8: qkv 8*24+24, proj 8*8+8, mlp 8*32+32 and 32*8+8, two norms 2*16: 12*64+13*8
    # weights; the final norm 16 more. T=4, V=10.
    dense = 12 * 64 + 13 * 8 + 16
    expected = 6 * dense + 12 * 1 * 4 * 8 + 6 * 8 * 10
    counted = flops_per_token(tiny_net(tied_embeddings=tied), seq_len=4)
    assert counted["dense_parameters"] == dense
    assert counted["total"] == expected == 6192
    assert counted["forward"] * 3 == expected


def test_scales_with_sequence_length_vocabulary_and_depth():
    base = flops_per_token(tiny_net(), seq_len=4)
    longer = flops_per_token(tiny_net(), seq_len=8)
    assert longer["attention"] == 2 * base["attention"]
    assert longer["dense"] == base["dense"] and longer["head"] == base["head"]
    wider_vocab = flops_per_token(tiny_net(vocab_size=20), seq_len=4)
    assert wider_vocab["head"] == 2 * base["head"] and wider_vocab["dense"] == base["dense"]
    deeper = flops_per_token(tiny_net(n_layers=2), seq_len=4)
    assert deeper["attention"] == 2 * base["attention"]
    assert deeper["dense"] - base["dense"] == 6 * (12 * 64 + 13 * 8)


def test_the_seed_model_is_dominated_by_its_output_head():
    cfg = ModelConfig(n_layers=2, d_model=64, n_heads=4)
    with torch.device("meta"):
        net = Transformer(cfg, vocab_size=50257, max_len=128, causal=False)
    counted = flops_per_token(net, seq_len=128)
    assert counted["head"] == 6 * 64 * 50257
    assert counted["head"] > 0.9 * counted["total"]


@pytest.mark.parametrize("name, dtype, expected", [
    ("NVIDIA H100 80GB HBM3", "bf16", 989e12),
    ("NVIDIA H100 PCIe", torch.bfloat16, 756e12),
    ("NVIDIA H200", "fp16", 989e12),
    ("NVIDIA A100-SXM4-80GB", "bf16", 312e12),
    ("NVIDIA A100 80GB PCIe", "no", 19.5e12),
    ("NVIDIA L4", "bf16", 121e12),
    ("NVIDIA L40S", "bf16", 362e12),
    ("NVIDIA GeForce RTX 4090", "bf16", 165e12),
    ("NVIDIA GeForce RTX 3090", "bf16", 71e12),
    ("NVIDIA GeForce RTX 3090 Ti", "bf16", None),
    ("Some Future GPU", "bf16", None),
    ("NVIDIA H100 80GB HBM3", "int8", None),
    ("cpu", "bf16", None),
    (torch.device("cpu"), "no", None),
])
def test_peak_flops(name, dtype, expected):
    assert peak_flops(name, dtype) == expected


def test_mfu():
    assert mfu(1e6, 6e8, 1e15) == pytest.approx(0.6)
    assert mfu(1e6, 6e8, None) is None
