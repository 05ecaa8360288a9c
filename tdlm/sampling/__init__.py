"""Sampling helpers shared by the samplers and the CLI: time grids, infill templates, drafts, traces."""
