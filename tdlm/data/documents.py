"""Document boundaries in a token stream: where an end-of-text token ends a document.

Packed training streams run documents together; a model learns where a text ends (and so when
to stop generating, `tdlm sample --stop-at-eos`) only if the stream says so. WikiText has no
end-of-text marks, but its articles are visible: each starts with a level-1 heading line
` = Title = ` (sections are ` = = Section = = `). Plain text folders often separate documents
with blank lines. `data.documents` picks the rule; the end-of-text id goes after each document,
the last one included, so the stream still decodes to the file's text plus those tokens. The
token spells no bytes (bits per byte still divides by the text's own bytes), and the extra
tokens are scored like any other: predicting where a document ends is part of modelling it.
"""

from __future__ import annotations

import re

import numpy as np

# A WikiText article title: " = Title = " with exactly one "=" on each side.
WIKITEXT_TITLE = re.compile(r" = [^=](?:.*[^=])? = \n?")


def document_ends(lines: list[str], documents: str) -> list[int]:
    """Where end-of-text tokens go under the rule `documents`: line indices i meaning "before
    line i" (len(lines): after the last line). 'as-is': none."""
    if documents == "as-is":
        return []
    blank = [not line.strip() for line in lines]
    if documents == "wikitext-titles":
        # A title stands between blank lines; a formula line like " = 1 k = " in a paragraph does not.
        starts_here = [bool(WIKITEXT_TITLE.fullmatch(line)) and (i == 0 or blank[i - 1])
                       and (i + 1 == len(lines) or blank[i + 1]) for i, line in enumerate(lines)]
    elif documents == "blank-lines":
        starts_here = [i > 0 and blank[i - 1] and not blank[i] for i in range(len(lines))]
    else:
        raise ValueError(f"unknown documents rule {documents!r}")
    ends, seen_text = [], False
    for i, line in enumerate(lines):
        if starts_here[i] and seen_text:
            ends.append(i)  # a new document starts: the one before it ends here
        seen_text = seen_text or not blank[i]
    return ends + [len(lines)] if seen_text else ends


def insert_end_of_text(line_ids: list[np.ndarray], ends: list[int], eos_id: int) -> list[np.ndarray]:
    """The lines' ids with the end-of-text id inserted before each line index in `ends`."""
    eos = np.asarray([eos_id], dtype=np.int32)
    marked, previous = [], 0
    for end in ends:
        marked += line_ids[previous:end] + [eos]
        previous = end
    return marked + line_ids[previous:]
