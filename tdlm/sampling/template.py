"""Infill templates and generated spans: what `tdlm sample --template` and `--stop-at-eos` use.

A template is text with masked spans: `<mask:N>` stands for N tokens to generate, `<mask>` for
one. `"The<mask:3> of France is Paris ."` asks for 3 tokens between "The" and " of France".
The text pieces are tokenized on their own and kept exactly; the canvas is as long as the text
tokens plus the masks. A literal "<mask" cannot be written in a template.

Byte-level BPE (GPT-2's and the trained one) puts a space in front of the word that follows it
(" capital" is one token), so one space right before a span is left for the model to generate,
as the first token's leading space: "The <mask:3> of" is filled like "The<mask:3> of".
"""

from __future__ import annotations

import re
from typing import Callable, Sequence

import torch

from tdlm.errors import TdlmError

TAG = re.compile(r"<mask(?::([0-9]+))?>")
MAX_SPAN_DIGITS = 9  # a span of a billion tokens is more than any model's canvas: refused as written
TAG_START = "<mask"
SYNTAX = "write <mask> for one token to generate or <mask:N> for N of them (N >= 1)"

Part = str | int  # literal text, or the number of tokens of a masked span


class TemplateError(TdlmError, ValueError):
    """A template that cannot be parsed; the message says where and what the syntax is."""


def parse_template(text: str) -> list[Part]:
    """'The <mask:3> of France' -> ['The ', 3, ' of France']: text pieces and span lengths."""
    parts: list[Part] = []
    pos = 0
    while (start := text.find(TAG_START, pos)) >= 0:
        match = TAG.match(text, start)
        if match is not None and match.group(1) is not None and len(match.group(1).lstrip("0")) > MAX_SPAN_DIGITS:
            raise TemplateError(f"template: the span at character {start} asks for a {len(match.group(1))}-digit "
                                "number of tokens, more than any canvas holds")
        if match is None or (match.group(1) is not None and int(match.group(1)) < 1):
            close = text.find(">", start, start + 24)
            bad = text[start : close + 1] if close >= 0 else text[start : start + 12]
            raise TemplateError(f"template: bad mask tag {bad!r} at character {start}; {SYNTAX}")
        if start > pos:
            parts.append(text[pos:start])
        parts.append(int(match.group(1) or 1))
        pos = match.end()
    if pos < len(text):
        parts.append(text[pos:])
    return parts


def format_template(parts: Sequence[Part]) -> str:
    """The inverse of parse_template (`<mask:1>` is written `<mask>`)."""
    return "".join(p if isinstance(p, str) else "<mask>" if p == 1 else f"<mask:{p}>" for p in parts)


def template_ids(parts: Sequence[Part], encode: Callable[[str], list[int]], mask_id: int) -> list[int]:
    """Token ids of a parsed template: each text piece encoded on its own, mask_id for each masked token."""
    ids: list[int] = []
    for i, part in enumerate(parts):
        if isinstance(part, int):
            ids += [mask_id] * part
            continue
        span_follows = i + 1 < len(parts) and isinstance(parts[i + 1], int)
        if span_follows and part.endswith(" "):  # the span's first token brings the space
            part = part[:-1]
        ids += encode(part) if part else []
    return ids


def cut_at_eos(tokens: torch.Tensor, canvas: torch.Tensor, mask_id: int, eos_id: int) -> list[int]:
    """One row's ids with each generated span cut at its first end-of-text token.

    A span is a run of positions that were masked in `canvas`; from its first generated EOS to
    the span's end is dropped. With a prompt there is one span, so the sample ends at its first
    generated EOS; the prompt's and the template's own tokens are always kept.
    """
    kept, stopped = [], False
    for token, given in zip(tokens.tolist(), canvas.tolist()):
        if given != mask_id:
            kept.append(token)
            stopped = False
        elif not stopped and token == eos_id:
            stopped = True
        elif not stopped:
            kept.append(token)
    return kept
