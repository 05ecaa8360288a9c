"""The output head where a loss needs it: chunked linear + cross-entropy, and `Denoised`.

A step of a small model over a GPT-2-sized vocabulary spends almost all its time in the
[B * N, V] logits, their cross-entropy and its gradient. Two facts remove most of it:

- the NELBO has no term at unmasked positions, so a diffusion objective needs the head only at
  the masked ones (`Denoised`);
- the cross-entropy of row i needs only logsumexp_v(logits_iv) and logits_i[target], so the
  logits can be made chunk by chunk and thrown away; the backward makes each chunk again
  (softmax - one-hot is all it needs) instead of keeping a [B * N, V] gradient.

`linear_cross_entropy` is exact (the same sums as `F.cross_entropy(F.linear(h, W), y)` up to
float rounding), forward and backward. On CUDA, logits that fit in memory are made whole (the
plain computation is faster there) with static shapes: every position scored over a vocabulary
padded to a multiple of 128, no host sync (`static_linear_cross_entropy`); only larger ones are
chunked. Liger's fused linear cross-entropy (`pip install -e ".[fused]"`) is used with
`TDLM_FUSED_CE=1`.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F
from torch import Tensor

# logits made at once. On a CPU a chunk that stays in cache between the matmul and the softmax
# passes is fastest (16 MB: 83 rows of a 50,257-token head); on a GPU each chunk costs kernel
# launches, so chunks are large (1 GB: the whole head of a 64 x 128 batch at once).
CHUNK_ELEMENTS = {"cpu": 2**22, "cuda": 2**28}
EVAL_CHUNK_ELEMENTS = {"cpu": 2**21, "cuda": 2**28}  # no gradient to make: smaller chunks fit better
# On a GPU, logits up to this size are made whole and scored by PyTorch's own cross-entropy:
# recomputing them in the backward costs more there than the memory (measured on an H200: the
# chunked kernel 6.0 ms against 3.9 ms for the plain one on 4,096 rows of a GPT-2 head).
PLAIN_ELEMENTS_CUDA = 2**30
# Devices where reading a tensor on the host costs nothing (no queue of work to wait for).
# Gathering the masked rows needs their count on the host, and the one-pass gradient checks the
# upstream gradient there: on a GPU both would wait for the device at every step, so there the
# head takes the static-shape path: it scores every position (the unmasked ones weighted by zero:
# the same sums) over a vocabulary padded to a multiple of VOCAB_MULTIPLE, with no host sync, so
# the step can be queued ahead and captured whole. TDLM_STATIC_HEAD=1 takes that path on a CPU too.
SYNC_FREE_DEVICES = set() if os.environ.get("TDLM_STATIC_HEAD", "0") == "1" else {"cpu"}
# Tensor-core matmuls tile the output in blocks of 64-128 columns: 50,257 GPT-2 logits leave a
# ragged last tile, 50,304 (= 393 x 128) do not. The pad logits are -inf, so they add exp(-inf)
# = 0 to every softmax sum and get zero gradient: the loss and gradients are unchanged.
VOCAB_MULTIPLE = 128


def chunk_rows(vocab_size: int, device: torch.device, sizes: dict = CHUNK_ELEMENTS) -> int:
    return max(1, sizes.get(device.type, sizes["cuda"]) // vocab_size)


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax sums in float32 at least (float64 stays float64, for exact tests)."""
    return torch.promote_types(dtype, torch.float32)


def _compute_dtype(hidden: Tensor) -> torch.dtype:
    """The dtype autocast would give the head's matmul, fixed once so the backward recomputes
    exactly the logits the forward used."""
    device = hidden.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return hidden.dtype


def _logsumexp_(logits: Tensor) -> Tensor:
    """logsumexp over the last dim, computed in place (logits is overwritten by exp(logits - max)):
    one temporary fewer than torch.logsumexp, which matters on a [rows, 50K] chunk."""
    top = logits.amax(dim=-1, keepdim=True)
    return logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(-1))


class _Workspace:
    """One reusable [rows, V] buffer per (device, dtype, V): a fresh 16 MB chunk at every step
    is fresh pages from the kernel (page faults were a third of the CPU time of a step)."""

    buffers: dict = {}

    @classmethod
    def get(cls, rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> Tensor:
        key = (device, dtype, vocab)
        buffer = cls.buffers.get(key)
        if buffer is None or buffer.shape[0] < rows:
            buffer = cls.buffers[key] = torch.empty(rows, vocab, dtype=dtype, device=device)
        return buffer[:rows]


def _logits_into(buffer: Tensor, h: Tensor, w: Tensor) -> Tensor:
    """h @ w.T written into `buffer` (no allocation) when the dtypes allow it."""
    if buffer.dtype == h.dtype == w.dtype:
        return torch.mm(h, w.t(), out=buffer)
    return buffer.copy_(F.linear(h, w))


def _chunks(hidden: Tensor, w: Tensor, dtype: torch.dtype, acc: torch.dtype, sizes: dict = CHUNK_ELEMENTS):
    """(rows, h, logits) per chunk of `hidden`: the chunk's logits in the reused buffer, autocast off
    (the dtype was fixed once, so a backward can make exactly the same logits again)."""
    rows = chunk_rows(w.shape[0], hidden.device, sizes)
    buffer = _Workspace.get(min(rows, hidden.shape[0]), w.shape[0], acc, hidden.device)
    with torch.autocast(hidden.device.type, enabled=False):
        for start in range(0, hidden.shape[0], rows):
            part = slice(start, start + rows)
            h = hidden[part].to(dtype)
            yield part, h, _logits_into(buffer[: h.shape[0]], h, w)


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """y_i = row_weight_i * CE_i, chunk by chunk.

    When gradients are wanted, the forward pass also makes them, for the case that every y_i
    gets the same upstream gradient c (a sum or a mean of the y_i, as every tdlm loss is): then
    d/dlogits_i = c * row_weight_i * (softmax_i - onehot_i) is known while the chunk's softmax is
    at hand, and the backward only scales. Any other upstream gradient makes the chunks again
    (exact either way). That is one pass over the [M, V] logits instead of two.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, row_weight, dtype, eager):
        w, acc = weight.to(dtype), _accumulate_dtype(dtype)
        ce = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
        lse = torch.empty_like(ce)
        grad_hidden = torch.empty(hidden.shape, dtype=acc, device=hidden.device) if eager else None
        grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device) if eager else None
        for part, h, logits in _chunks(hidden, w, dtype, acc):
            target_logit = logits.gather(1, targets[part, None]).squeeze(1)  # before the in-place lse
            lse[part] = _logsumexp_(logits)  # logits now holds exp(logits - max)
            ce[part] = lse[part] - target_logit
            if eager:
                probs = logits.div_(logits.sum(-1, keepdim=True))
                probs[torch.arange(len(probs), device=h.device), targets[part]] -= 1.0
                if row_weight is not None:
                    probs.mul_(row_weight[part, None].to(acc))
                grad_hidden[part] = (probs.to(dtype) @ w).to(acc)
                grad_weight.addmm_(probs.t(), h.to(acc))
        ctx.save_for_backward(hidden, weight, targets, lse, row_weight, grad_hidden, grad_weight)
        ctx.dtype = dtype
        return ce if row_weight is None else ce * row_weight.to(acc)

    @staticmethod
    def backward(ctx, grad_y):
        hidden, weight, targets, lse, row_weight, grad_hidden, grad_weight = ctx.saved_tensors
        if grad_hidden is not None and torch.equal(grad_y, grad_y[:1].expand_as(grad_y)):
            c = grad_y[0]  # out of place: a second backward (retain_graph) must find the saved ones
            return (grad_hidden * c).to(hidden.dtype), (grad_weight * c).to(weight.dtype), None, None, None, None
        return _recomputed_gradients(ctx, grad_y, hidden, weight, targets, lse, row_weight)


def _recomputed_gradients(ctx, grad_y, hidden, weight, targets, lse, row_weight):
    """The backward for any upstream gradient: the chunks' softmax made again."""
    dtype = ctx.dtype
    w, acc = weight.to(dtype), _accumulate_dtype(dtype)
    upstream = grad_y if row_weight is None else grad_y * row_weight
    grad_hidden = torch.empty_like(hidden)
    grad_weight = torch.zeros(weight.shape, dtype=acc, device=weight.device)
    for part, h, logits in _chunks(hidden, w, dtype, acc):
        # d ce_i / d logits_i = softmax_i - onehot(target_i), times the incoming gradient
        grad_logits = logits.sub_(lse[part, None]).exp_()
        grad_logits[torch.arange(len(grad_logits), device=h.device), targets[part]] -= 1.0
        grad_logits.mul_(upstream[part, None].to(acc))
        grad_hidden[part] = (grad_logits.to(dtype) @ w).to(hidden.dtype)
        grad_weight.addmm_(grad_logits.t(), h.to(acc))
    return grad_hidden, grad_weight.to(weight.dtype), None, None, None, None


# TDLM_FUSED_CE=1 asks for Liger's fused kernel on CUDA. Off by default: per-row losses
# (reduction="none", which the NELBO's weights need) make it recompute in the backward, and on an
# H200 it took 219 ms against 3.9 ms for the plain computation (benchmarks/head_check.py).
USE_FUSED = os.environ.get("TDLM_FUSED_CE", "0") == "1"


def fused_available() -> bool:
    return _fused_kernel() is not None


@functools.cache  # a failed import is not retried at every step
def _fused_kernel():
    try:
        from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    except ImportError:
        return None
    return liger_fused_linear_cross_entropy


def linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor, row_weight: Tensor | None = None, *,
                         fused: bool = True) -> Tensor:
    """row_weight * -log softmax(hidden @ weight.T)[targets] per row: [M] float32 (float64 for
    float64 inputs), without the [M, V] logits.

    hidden [M, d], weight [V, d], targets [M] long, row_weight [M] (no gradient; None: 1).
    Differentiable in hidden and weight; fastest when the result is summed (or averaged) with
    one factor for all rows, as the NELBO and the AR loss are. `fused=False` keeps Liger's kernel
    out even when TDLM_FUSED_CE=1.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32) + 0.0 * weight.sum()  # keeps the graph
    if row_weight is not None and row_weight.requires_grad:
        return row_weight * linear_cross_entropy(hidden, weight, targets, fused=fused)
    if hidden.is_cuda and fused and USE_FUSED and torch.is_grad_enabled() and _fused_kernel() is not None:
        scale = 1.0 if row_weight is None else row_weight
        dtype = _compute_dtype(hidden)
        return scale * _fused_kernel()(hidden.to(dtype), weight.to(dtype), targets, reduction="none").float()
    if hidden.device.type not in SYNC_FREE_DEVICES and hidden.shape[0] * weight.shape[0] <= PLAIN_ELEMENTS_CUDA:
        return static_linear_cross_entropy(hidden, weight, targets, row_weight)
    eager = (torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad)
             and hidden.device.type in SYNC_FREE_DEVICES)
    return _ChunkedLinearCrossEntropy.apply(hidden, weight, targets, row_weight, _compute_dtype(hidden), eager)


def padded_size(vocab: int) -> int:
    return -(-vocab // VOCAB_MULTIPLE) * VOCAB_MULTIPLE


def _pad_bias(vocab: int, padded: int, device: torch.device) -> Tensor:
    """[padded] float32: 0 for the real tokens, -inf for the pad columns (made once per size and device)."""
    key = (vocab, padded, device)
    bias = _PAD_BIAS.get(key)
    if bias is None:
        bias = _PAD_BIAS[key] = torch.cat([torch.zeros(vocab, device=device),
                                           torch.full((padded - vocab,), -torch.inf, device=device)])
    return bias


_PAD_BIAS: dict = {}


def padded_logits(hidden: Tensor, weight: Tensor) -> Tensor:
    """hidden @ weight.T over the vocabulary padded to a multiple of VOCAB_MULTIPLE: [M, V_pad], the
    pad columns -inf (the -inf bias rides in the matmul's epilogue). In autocast's dtype."""
    vocab = weight.shape[0]
    padded = padded_size(vocab)
    if padded == vocab:
        return F.linear(hidden, weight)
    w = F.pad(weight, (0, 0, 0, padded - vocab))  # zero rows; their gradient is sliced away
    return F.linear(hidden, w, _pad_bias(vocab, padded, hidden.device).to(_compute_dtype(hidden)))


def row_cross_entropy(logits: Tensor, targets: Tensor) -> Tensor:
    """-log softmax(logits)[target] per row, summed in float32 at least from logits of any dtype (bf16 logits
    are read, not copied, once compiled: torch.compile fuses the cast, the max, the exp-sum and the gather)."""
    acc = _accumulate_dtype(logits.dtype)
    return torch.logsumexp(logits.to(acc), dim=-1) - logits.gather(1, targets[:, None]).squeeze(1).to(acc)


def static_linear_cross_entropy(hidden: Tensor, weight: Tensor, targets: Tensor,
                                row_weight: Tensor | None = None) -> Tensor:
    """linear_cross_entropy with static shapes and no host sync: every row scored over the padded
    vocabulary, times `row_weight` (for a masked loss: the mask times the NELBO weight, so a row
    outside the loss counts 0 x its finite cross-entropy). [M] float32."""
    ce = row_cross_entropy(padded_logits(hidden, weight), targets)
    return ce if row_weight is None else ce * row_weight


@torch.no_grad()
def linear_cross_entropy_and_argmax(hidden: Tensor, weight: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Evaluation: the cross-entropy [M] float32 and the argmax [M] of each row's logits, in chunks."""
    dtype = _compute_dtype(hidden)
    w, acc = weight.to(dtype), _accumulate_dtype(dtype)
    ce = torch.empty(hidden.shape[0], dtype=acc, device=hidden.device)
    argmax = torch.empty(hidden.shape[0], dtype=torch.long, device=hidden.device)
    for part, _, logits in _chunks(hidden, w, dtype, acc, EVAL_CHUNK_ELEMENTS):
        top, best = logits.max(dim=-1, keepdim=True)  # the argmax and logsumexp's shift in one pass
        argmax[part] = best.squeeze(1)
        target_logit = logits.gather(1, targets[part, None]).squeeze(1)
        ce[part] = logits.sub_(top).exp_().sum(-1).log_().add_(top.squeeze(1)) - target_logit
    return ce, argmax


class Denoised:
    """The denoiser's prediction mu(. | x_t), computed only at the masked positions of x_t.

    What a corruption's `nelbo_terms` receives. Most corruptions need only the per-position
    cross-entropy -log mu(x0_n | x_t) (`cross_entropy`); one whose bound involves the whole
    distribution asks for it at the masked positions (`masked_log_probs`). A network with
    `features` and `head_weight` (tdlm's Transformer) never builds the full logits; any other
    `net(x) -> logits [B, N, V]` works too, through its full logits.
    """

    def __init__(self, net, xt: Tensor, mask_id: int):
        self.xt, self.masked = xt, xt == mask_id
        if hasattr(net, "features"):
            self._hidden, self._weight, self._logits = net.features(xt), net.head_weight, None
        else:
            self._hidden, self._weight, self._logits = None, None, net(xt)
        self._eval: tuple[Tensor, Tensor, Tensor] | None = None

    @classmethod
    def from_logits(cls, logits: Tensor, xt: Tensor, mask_id: int) -> "Denoised":
        """Wrap logits [B, N, V] already computed (tests, hand-written estimators)."""
        return cls(lambda _: logits, xt, mask_id)

    def scatter(self, values: Tensor) -> Tensor:
        """[M] values at the masked positions (row-major order) -> [B, N], zero elsewhere."""
        out = torch.zeros(self.masked.shape, dtype=values.dtype, device=values.device)
        return out.masked_scatter(self.masked, values)

    def masked_cross_entropy(self, x0: Tensor, weight: Tensor | None = None) -> Tensor:
        """weight * -log mu(x0_n | x_t) at the masked positions, in row-major order: [M] float32.
        `weight` broadcasts to [B, N] (None: 1)."""
        row_weight = None if weight is None else weight.expand(x0.shape)[self.masked]
        if self._eval is not None and self._eval[0] is x0:
            return self._eval[1] if row_weight is None else row_weight * self._eval[1]
        targets = x0[self.masked]
        if self._logits is not None:
            ce = F.cross_entropy(self._logits[self.masked].float(), targets, reduction="none")
            return ce if row_weight is None else row_weight * ce
        return linear_cross_entropy(self._hidden[self.masked], self._weight, targets, row_weight)

    def cross_entropy(self, x0: Tensor, weight: Tensor | None = None) -> Tensor:
        """weight * -log mu(x0_n | x_t): [B, N] float32, zero where x_t is not masked.

        Pass the per-position factor the corruption multiplies the cross-entropy by (its NELBO
        weight, broadcastable to [B, N], without gradient) as `weight` rather than multiplying
        afterwards: the loss's gradient is then made in the same pass over the head.
        """
        if self._hidden is not None and self._hidden.device.type not in SYNC_FREE_DEVICES and self._eval is None:
            row_weight = None if weight is None else weight.expand(x0.shape).flatten()
            ce = linear_cross_entropy(self._hidden.flatten(0, 1), self._weight, x0.flatten(), row_weight)
            return ce.view(x0.shape) * self.masked
        return self.scatter(self.masked_cross_entropy(x0, weight))

    def masked_log_probs(self) -> Tensor:
        """log mu(. | x_t) at the masked positions: [M, V] float32 (this one is materialised)."""
        logits = self._logits[self.masked] if self._logits is not None else F.linear(self._hidden[self.masked], self._weight)
        return F.log_softmax(logits.float(), dim=-1)

    @torch.no_grad()
    def masked_scores(self, x0: Tensor) -> tuple[Tensor, Tensor]:
        """Evaluation: the cross-entropy [M] and whether the argmax is x0 [M] at the masked
        positions, in one pass over the head; `cross_entropy(x0)` then reuses the former."""
        targets = x0[self.masked]
        if self._logits is not None:
            logits = self._logits[self.masked].float()
            ce, argmax = F.cross_entropy(logits, targets, reduction="none"), logits.argmax(-1)
        else:
            ce, argmax = linear_cross_entropy_and_argmax(self._hidden[self.masked], self._weight, targets)
        self._eval = (x0, ce, argmax == targets)
        return ce, argmax == targets


def all_positions_scores(net, inputs: Tensor, targets: Tensor, *, with_argmax: bool = False):
    """AR: the cross-entropy [B, N] of `targets` under net(inputs) at every position (and, for
    evaluation, the argmax [B, N]), never materialising [B, N, V] for tdlm's Transformer."""
    if not hasattr(net, "features"):
        logits = net(inputs).float()
        ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(targets.shape)
        return (ce, logits.argmax(-1)) if with_argmax else ce
    hidden = net.features(inputs).flatten(0, 1)
    if with_argmax:
        ce, argmax = linear_cross_entropy_and_argmax(hidden, net.head_weight, targets.flatten())
        return ce.view(targets.shape), argmax.view(targets.shape)
    return linear_cross_entropy(hidden, net.head_weight, targets.flatten()).view(targets.shape)


def last_position_logits(net, x: Tensor) -> Tensor:
    """net(x)[:, -1] [B, V], with the head applied to the last position only."""
    if hasattr(net, "features"):
        return F.linear(net.features(x)[:, -1], net.head_weight)
    return net(x)[:, -1]
