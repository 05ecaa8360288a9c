"""tdlm's models for Hugging Face transformers, without remote code.

An exported folder (`tdlm export`) carries its own copy of `configuration_tdlm.py` and
`modeling_tdlm.py`, for `from_pretrained(..., trust_remote_code=True)` where tdlm is not
installed. Where it is, `tdlm.hf.register()` tells transformers' Auto classes about the same
classes, and a folder then loads without trust_remote_code:

    import tdlm.hf
    tdlm.hf.register()
    model = AutoModelForMaskedLM.from_pretrained("exported/diffusion")   # or AutoModelForCausalLM

Importing this package imports nothing heavy; register() imports transformers.
"""

from __future__ import annotations

from pathlib import Path

STANDALONE_FILES = ("configuration_tdlm.py", "modeling_tdlm.py")
"""The files copied into every exported folder: torch and transformers only, no tdlm import."""
HERE = Path(__file__).resolve().parent


def standalone_sources() -> dict[str, str]:
    """File name -> the text of each standalone file, as it is copied into an exported folder."""
    return {name: (HERE / name).read_text(encoding="utf-8") for name in STANDALONE_FILES}


def register() -> None:
    """Register TdlmConfig with AutoConfig and the models with AutoModelForMaskedLM (diffusion) and
    AutoModelForCausalLM (AR), for model_type "tdlm". Calling it again does nothing more."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

    from tdlm.hf.configuration_tdlm import TdlmConfig
    from tdlm.hf.modeling_tdlm import TdlmForCausalLM, TdlmForMaskedLM

    AutoConfig.register(TdlmConfig.model_type, TdlmConfig, exist_ok=True)
    AutoModelForMaskedLM.register(TdlmConfig, TdlmForMaskedLM, exist_ok=True)
    AutoModelForCausalLM.register(TdlmConfig, TdlmForCausalLM, exist_ok=True)
