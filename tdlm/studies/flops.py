"""Moved to tdlm.training.flops: the trainer reports MFU with it, and training does not import
studies. This name is kept for a while so that existing imports keep working, with a warning."""

import warnings

from tdlm.training.flops import (  # noqa: F401
    FULL_PRECISION,
    HALF_PRECISION,
    PEAK_FLOPS,
    flops_per_token,
    mfu,
    peak_flops,
)

warnings.warn("tdlm.studies.flops moved to tdlm.training.flops: import it from there", DeprecationWarning,
              stacklevel=2)
