"""Training FLOPs per token of tdlm's Transformer, the peak FLOP/s of common GPUs, and MFU.

Convention (PaLM, Chowdhery et al. 2022, appendix B; Chinchilla, Hoffmann et al. 2022,
appendix F): a matmul with N weights costs 2N FLOPs per token forward and 4N backward, so
training costs 6N per token for the N weights of the blocks, plus

- attention: the QK^T and AV matmuls, 2 * 2 * T * d per layer per token forward, so
  12 * L * T * d for forward + backward. No discount for the causal mask: both objectives are
  charged the full T x T product (PaLM does the same), so AR and diffusion MFU compare;
- the output head: 6 * d * V (its weights are a matmul whether or not they are tied to the
  input embedding, which itself is a lookup and costs nothing).

Layer norms, biases, GELU and softmax are left out (their parameters are in N, their
elementwise work is a few per cent at these widths). Evaluation and sampling are not counted.
"""

from __future__ import annotations

import re

# Dense (no 2:4 sparsity) tensor-core peaks in FLOP/s, from NVIDIA's datasheets and
# whitepapers: bf16 with fp32 accumulation (fp16 is the same on these parts), and plain fp32
# (no TF32), which is what a run without mixed precision gets. Matched in order against
# torch.cuda.get_device_name(), so the more specific names come first.
PEAK_FLOPS = [
    # (name pattern, bf16/fp16, fp32)
    (r"H100.*(PCIe|PCIE)", 756e12, 51e12),
    (r"H100.*NVL", 835e12, 60e12),
    (r"H100", 989e12, 67e12),  # SXM5 ("NVIDIA H100 80GB HBM3")
    (r"H200.*NVL", 835e12, 60e12),
    (r"H200", 989e12, 67e12),
    (r"A100", 312e12, 19.5e12),  # SXM4 and PCIe, 40 and 80 GB
    (r"L40S", 362e12, 91.6e12),
    (r"\bL4\b", 121e12, 30.3e12),
    (r"RTX 4090", 165e12, 82.6e12),
    (r"RTX 3090(?! Ti)", 71e12, 35.6e12),
]

HALF_PRECISION = {"bf16", "bfloat16", "fp16", "float16", "half"}
FULL_PRECISION = {"no", "fp32", "float32", "float"}


def flops_per_token(net, seq_len: int) -> dict:
    """Forward + backward FLOPs per trained token of a tdlm.model.Transformer at `seq_len`.

    Returns the parts and their sum: {"total", "forward", "dense", "attention", "head",
    "dense_parameters"}; "dense_parameters" is N, the weights of the blocks and the final
    norm (no embeddings, no output head).
    """
    cfg = net.cfg
    embeddings = net.tok_emb.weight.numel() + (net.pos_emb.weight.numel() if net.pos_emb is not None else 0)
    head = net.head.weight.numel() if net.head is not None else 0
    dense_parameters = net.num_parameters() - embeddings - head
    parts = {
        "dense": 6 * dense_parameters,
        "attention": 12 * cfg.n_layers * seq_len * cfg.d_model,
        "head": 6 * cfg.d_model * net.vocab_size,
    }
    total = sum(parts.values())
    return {"total": total, "forward": total // 3, **parts, "dense_parameters": dense_parameters}


def peak_flops(device, dtype) -> float | None:
    """Peak dense FLOP/s of one device for matmuls in `dtype` ("bf16", "fp16", "no"/"fp32" or a
    torch.dtype); None for a CPU, an unknown GPU or an unknown dtype.

    `device` is a torch.device, "cuda[:i]"/"cpu", or a GPU's name as torch reports it.
    """
    name = _gpu_name(device)
    precision = str(dtype).removeprefix("torch.").lower()
    if name is None or precision not in HALF_PRECISION | FULL_PRECISION:
        return None
    for pattern, half, full in PEAK_FLOPS:
        if re.search(pattern, name):
            return half if precision in HALF_PRECISION else full
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilisation: achieved training FLOP/s over the peak. `peak` is the sum over
    every process's device (peak_flops(...) * processes) when tokens_per_s counts all of them."""
    if not peak:
        return None
    return tokens_per_s * flops_per_token / peak


def _gpu_name(device) -> str | None:
    """The GPU model a peak figure is looked up by (None on a CPU)."""
    text = str(device)
    if text == "cpu" or text.startswith(("cpu:", "mps")):
        return None
    if text == "cuda" or text.startswith("cuda:"):
        import torch

        from tdlm.training.distributed import device_name

        return device_name(device) if torch.cuda.is_available() else None
    return text  # already a device name, e.g. "NVIDIA H100 80GB HBM3"
