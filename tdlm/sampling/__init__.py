"""Sampling as the commands use it: the choice of sampler, generation, infill templates and
traces. The helpers the samplers themselves share (time grids, the ancestral reverse kernel, the
AR next-token distribution, drafts) live in the components layer (tdlm.components); the old
modules here (grids, kernel, next_token, draft) re-export them."""
