"""Text from a trained model: the one function `tdlm sample`, `tdlm gen-eval` and the trainer's
periodic samples call.

    canvas = prompt_canvas(vocab.encode("The cat"), num=4, length=64, mask_id=vocab.mask_id)
    generator = torch.Generator(device="cuda").manual_seed(0)
    out = generate(built.model.net, built.sampler, canvas, generator, vocab)
    out.texts, out.outputs[0].nfe, out.tokens_per_s
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from tdlm.components import SampleOutput, Sampler, check_steps
from tdlm.errors import TdlmError
from tdlm.sampling.template import cut_at_eos


class SamplerBug(TdlmError, RuntimeError):
    """A sampler left a masked position or changed a given token: a bug in that sampler."""


@dataclass
class Generated:
    canvas: Tensor  # [num, L] long on the CPU: what the sampler was given
    tokens: Tensor  # [num, L] long on the CPU: the canvas with every masked position filled
    texts: list[str]  # one decoded text per row
    outputs: list[SampleOutput]  # the sampler's output for each batch (nfe, stats)
    seconds: float  # the sampler's wall time, all batches
    generated_tokens: int  # the positions the sampler filled (masked in the canvas)

    @property
    def tokens_per_s(self) -> float:
        return self.generated_tokens / max(self.seconds, 1e-9)


def prompt_canvas(prompt_ids: list[int], *, num: int, length: int, mask_id: int) -> Tensor:
    """[num, length]: the prompt's ids, then masks up to `length`."""
    row = list(prompt_ids) + [mask_id] * (length - len(prompt_ids))
    return torch.tensor(row, dtype=torch.long).expand(num, -1).contiguous()


def generate(net: nn.Module, sampler: Sampler, canvas: Tensor, generator: torch.Generator, vocab, *,
             batch_size: int | None = None, stop_at_eos: bool = False, text_from: int = 0) -> Generated:
    """Fill the masked positions of `canvas` [num, L] with `sampler` and decode every row.

    The rows are sampled on the generator's device (the sampler's draws must be on the device
    the canvas is on), `batch_size` rows per sampler call (default: all at once). Each text is
    decoded from column `text_from` on (gen-eval leaves its prompt out); with `stop_at_eos`
    each generated span is cut at its first end-of-text token (`vocab.bos_id`) first.
    `vocab`: a tokenizer vocabulary (tdlm.data.Vocab: `mask_id`, `bos_id`, `decode`).
    """
    canvas = canvas.cpu()
    if getattr(sampler, "config", None) is not None:  # the canvas may be shorter than the model's seq_len
        check_steps(sampler.config, canvas.shape[1])
    device = generator.device
    outputs, seconds = [], 0.0
    for rows in canvas.split(batch_size or len(canvas)):
        _synchronize(device)
        began = time.perf_counter()
        outputs.append(sampler.sample(net, rows.to(device), generator))
        _synchronize(device)
        seconds += time.perf_counter() - began
    tokens = torch.cat([out.tokens.cpu() for out in outputs])
    check_filled(tokens, canvas, vocab.mask_id)
    rows = [cut_at_eos(row, canvas[i], vocab.mask_id, vocab.bos_id) if stop_at_eos else row.tolist()
            for i, row in enumerate(tokens)]
    texts = [vocab.decode(row[text_from:]) for row in rows]
    return Generated(canvas, tokens, texts, outputs, seconds, int((canvas == vocab.mask_id).sum()))


def check_filled(tokens: Tensor, canvas: Tensor, mask_id: int) -> None:
    """Raise SamplerBug unless `tokens` keeps every given token of `canvas` and has no mask left."""
    given = canvas != mask_id
    if (tokens == mask_id).any() or not torch.equal(tokens[given], canvas[given]):
        raise SamplerBug("the sampler left masked positions or changed given tokens: a bug in the sampler")


def _synchronize(device: torch.device) -> None:
    """Wait for the device, so that the wall time is the sampler's and not the queue's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
