"""Sampling helpers shared by the samplers and the commands: time grids, the ancestral reverse
kernel, the AR next-token distribution, drafts, the choice of sampler, generation, infill
templates and traces."""
