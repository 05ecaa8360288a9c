"""Moved to tdlm.components.kernel (the components layer, where the samplers live); this old path
re-exports it. Plugins import `ReverseKernel`, `reverse_kernel` and `denoiser_probs` from tdlm.plugin."""

from tdlm.components.kernel import ReverseKernel, denoiser_probs, reverse_kernel

__all__ = ["ReverseKernel", "denoiser_probs", "reverse_kernel"]
