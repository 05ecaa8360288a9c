"""The output head's kernels against the plain full-logits computation, on one device.

For a GPT-2-sized head (V = 50,257, d = 64, the rows a 64 x 128 batch gives), compares the
per-row cross-entropy and the gradients of hidden states and head weight under a per-row
weighted sum (as the NELBO weights them) of: tdlm's chunked kernel, and on CUDA the fused
kernel tdlm uses when it is installed (Liger), each against F.cross_entropy(F.linear(h, W)).
Float32, and bf16 autocast on CUDA. Prints JSON: the largest relative errors and the time of
each (forward + backward, after a warm-up).

    python benchmarks/head_check.py --device cuda
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time

import torch
import torch.nn.functional as F

from tdlm import head


def plain(hidden, weight, targets):
    return F.cross_entropy(F.linear(hidden, weight).float(), targets, reduction="none")


def own(hidden, weight, targets):
    return head._ChunkedLinearCrossEntropy.apply(hidden, weight, targets, head._compute_dtype(hidden))


def fused(hidden, weight, targets):
    kernel = head._fused_kernel()
    dtype = head._compute_dtype(hidden)
    return kernel(hidden.to(dtype), weight.to(dtype), targets, reduction="none").float()


def run(fn, hidden, weight, targets, upstream, autocast):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    with autocast():
        ce = fn(h, w, targets)
    (ce * upstream).sum().backward()
    return ce.detach().float(), h.grad.float(), w.grad.float()


def seconds(fn, args, device, repeats=5):
    run(fn, *args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        run(fn, *args)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rows", type=int, default=4096, help="rows scored (a half-masked 64 x 128 batch)")
    args = parser.parse_args()
    device = torch.device(args.device)
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.rows, 64, device=device, generator=g)
    weight = 0.05 * torch.randn(50257, 64, device=device, generator=g)
    targets = torch.randint(0, 50257, (args.rows,), device=device, generator=g)
    upstream = torch.rand(args.rows, device=device, generator=g)
    kernels = {"tdlm_chunked": own}
    if device.type == "cuda" and head.fused_available():
        kernels["liger_fused"] = fused
    precisions = {"float32": contextlib.nullcontext}
    if device.type == "cuda":
        precisions["bf16_autocast"] = lambda: torch.autocast("cuda", dtype=torch.bfloat16)
    report = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "rows": args.rows, "vocab": 50257, "fused_available": head.fused_available(), "results": []}
    for precision, autocast in precisions.items():
        inputs = (hidden, weight, targets, upstream, autocast)
        reference = run(plain, *inputs)
        row = {"precision": precision, "plain_seconds": seconds(plain, inputs, device)}
        for name, fn in kernels.items():
            ce, gh, gw = run(fn, *inputs)
            row[name] = {"ce_rel_err": rel(ce, reference[0]), "grad_hidden_rel_err": rel(gh, reference[1]),
                         "grad_weight_rel_err": rel(gw, reference[2]), "seconds": seconds(fn, inputs, device)}
        report["results"].append(row)
    print(json.dumps(report, indent=2))
    # a kernel that disagrees with the plain computation must not train anything: exit 1
    tolerance = {"float32": 1e-4, "bf16_autocast": 5e-2}
    worst = max((value for row in report["results"] for name in kernels
                 for key, value in row[name].items() if key.endswith("rel_err") and value > tolerance[row["precision"]]),
                default=None)
    if worst is not None:
        raise SystemExit(f"a kernel is off by {worst:.2e} relative to the plain computation")


if __name__ == "__main__":
    main()
