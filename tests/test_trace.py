"""The denoising trace: samplers record each step's canvas, and the picture is drawn from them."""

import numpy as np
import pytest
import torch
from toydata import template_canvas

from tdlm.sampling.trace import commit_steps, draw_trace


V, N = 20, 16


@pytest.mark.parametrize("sampler", [
    {"name": "ancestral", "steps": 8},
    {"name": "confidence", "steps": 4},
    {"name": "semi-ar", "block": 4, "inner": "threshold", "inner_options": {"tau": 0.5}},
])
def test_recorded_frames_only_unmask_and_end_at_the_output(build, sampler):
    torch.manual_seed(0)
    built = build(vocab_size=V, seq_len=N, sampler=sampler)
    mask_id = built.vocab.mask_id
    canvas, _ = template_canvas(mask_id, V, N, batch=3)
    built.sampler.trace = []
    out = built.sampler.sample(built.model.net.eval(), canvas, torch.Generator().manual_seed(0))
    frames = [canvas] + built.sampler.trace
    assert len(frames) >= 3
    for before, after in zip(frames, frames[1:]):
        kept = before != mask_id
        assert torch.equal(after[kept], before[kept])  # committed tokens stay
        assert (after == mask_id).sum() < (before == mask_id).sum()  # each recorded step commits
    assert torch.equal(frames[-1], out.tokens)


def test_commit_steps_says_when_each_position_was_filled():
    m = 9
    frames = [np.array([m, m, 1, m]), np.array([5, m, 1, m]), np.array([5, m, 1, 7]), np.array([5, 2, 1, 7])]
    assert commit_steps(frames, m).tolist() == [1, 3, 0, 2]


@pytest.mark.parametrize("suffix", [".png", ".gif"])
def test_trace_pictures_are_written(tmp_path, suffix):
    m = 9
    frames = [np.array([m, m, 1, m]), np.array([5, m, 1, m]), np.array([5, 2, 1, 7])]
    path = draw_trace(frames, m, lambda ids: f" t{ids[0]}", tmp_path / f"trace{suffix}", title="toy:")
    assert path.exists() and path.stat().st_size > 1000
    assert path.read_bytes()[:4] == (b"\x89PNG" if suffix == ".png" else b"GIF8")
