"""The one way tdlm writes JSON for a reader: every `--json` output and the JSON reports.

JSON has no NaN or infinity (Python's json module would write the invalid literals `NaN` and
`Infinity`, which strict parsers reject): a figure that is not a finite number is written as
null, meaning "no finite value" (an unknown standard error, the perplexity of a diverged model).
The dump itself is strict (allow_nan=False), so nothing slips through.
"""

from __future__ import annotations

import json
import math


def finite(value):
    """`value` with every float that is NaN or infinite replaced by None, in dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(v) for v in value]
    return value


def dumps(value, *, default=None, indent: int | None = 2, **kwargs) -> str:
    """Strict JSON text of `value` (see the module docstring); `default` as json.dumps's, its
    results cleaned the same way."""
    clean = None if default is None else (lambda obj: finite(default(obj)))
    return json.dumps(finite(value), default=clean, indent=indent, allow_nan=False, **kwargs)
