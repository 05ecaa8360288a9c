"""Built-in objectives: the masked-diffusion NELBO and autoregressive next-token cross-entropy."""
