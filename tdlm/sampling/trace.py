"""A picture of one sequence being denoised: the canvas step by step, new tokens highlighted.

`tdlm sample RUN --trace denoise.png` draws, for the first sample, a strip of when each position
was committed (which step) and the canvas as text at a few steps, masked positions as grey
blocks and the tokens committed since the previous snapshot in colour. `--trace denoise.gif`
animates every recorded step instead. The frames come from `Sampler.record` (the canvas after
each step); a sampler that never records is shown by its first and last canvas.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import numpy as np

MASKED = "\u2591"  # a light shade block stands for each masked token
LINE = 150  # characters per line of the text panels (8 pt monospace fills an 11-inch figure)


def commit_steps(frames: list[np.ndarray], mask_id: int) -> np.ndarray:
    """[L] int: the frame index at which each position stopped being masked (0: given)."""
    steps = np.zeros(len(frames[0]), dtype=int)
    for i, frame in enumerate(frames):
        if i:
            steps[(frames[i - 1] == mask_id) & (frame != mask_id)] = i
    return steps


def _pieces(frame, previous, mask_id, decode):
    """(text, kind) per token: kind 'masked', 'new' (committed since `previous`) or 'old'."""
    for token, before in zip(frame, previous):
        if token == mask_id:
            yield MASKED, "masked"
        else:
            yield decode([int(token)]).replace("\n", " "), "new" if before == mask_id else "old"


LINE_INCHES = 0.19  # height of one line of 8 pt text, with some leading


def _layout(pieces) -> tuple[list[tuple[int, int, str, str]], int]:
    """Monospaced flow layout: (column, row, text, kind) per piece, wrapped at LINE characters,
    and the number of rows."""
    placed, column, row = [], 0, 0
    for text, kind in pieces:
        for chunk in textwrap.wrap(text, LINE, drop_whitespace=False) or [text]:
            if column + len(chunk) > LINE:
                column, row = 0, row + 1
            placed.append((column, row, chunk, kind))
            column += len(chunk)
    return placed, row + 1


def _draw_text(ax, layout, title, height_inches):
    colours = {"masked": "#b0b0b0", "new": "#d62728", "old": "#202020"}
    placed, _ = layout
    ax.set_axis_off()
    ax.set_title(title, loc="left", fontsize=9)
    step = LINE_INCHES / height_inches
    for column, row, chunk, kind in placed:
        ax.text(column / LINE, 1 - row * step, chunk, family="monospace", fontsize=8, color=colours[kind],
                weight="bold" if kind == "new" else "normal", transform=ax.transAxes, va="top")


def draw_trace(frames: list[np.ndarray], mask_id: int, decode, path: str | Path, *, title: str = "",
               snapshots: int = 6) -> Path:
    """Write the trace of one row (`frames`: its canvas [L] after each step, the first being the
    starting canvas) to `path`, a .png (snapshots) or a .gif (every frame)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    if path.suffix.lower() == ".gif":
        return _draw_gif(frames, mask_id, decode, path, title)
    steps = commit_steps(frames, mask_id)
    picks = sorted({round(i) for i in np.linspace(1, len(frames) - 1, min(snapshots, len(frames) - 1))})
    previous = [0] + picks[:-1]
    layouts = [_layout(_pieces(frames[p], frames[q], mask_id, decode)) for p, q in zip(picks, previous)]
    heights = [0.3 + LINE_INCHES * rows for _, rows in layouts]  # inches: the title and the lines
    fig = plt.figure(figsize=(11, 1.2 + sum(heights) + 0.35 * len(picks)))
    grid = fig.add_gridspec(len(picks) + 1, 1, height_ratios=[0.8] + heights)
    strip = fig.add_subplot(grid[0])
    shown = np.ma.masked_where(steps == 0, steps)[None, :]
    image = strip.imshow(shown, aspect="auto", cmap="viridis", interpolation="nearest")
    strip.set_yticks([])
    strip.set_xlabel("position", fontsize=8)
    strip.set_title(f"{title} step at which each position was committed (blank: given)", loc="left", fontsize=9)
    fig.colorbar(image, ax=strip, pad=0.01, fraction=0.03)
    for panel, (pick, before, layout, height) in enumerate(zip(picks, previous, layouts, heights), start=1):
        ax = fig.add_subplot(grid[panel])
        masked = int((frames[pick] == mask_id).sum())
        _draw_text(ax, layout, f"after step {pick} of {len(frames) - 1} (steps that committed tokens): "
                               f"{masked} masked; red: new since step {before}", height)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _draw_gif(frames, mask_id, decode, path, title, max_frames: int = 64) -> Path:
    import matplotlib.pyplot as plt
    from matplotlib.animation import FuncAnimation, PillowWriter

    picks = sorted({round(i) for i in np.linspace(0, len(frames) - 1, min(max_frames, len(frames)))})
    fig, ax = plt.subplots(figsize=(10, 2.4))

    def show(k):
        ax.clear()
        i = picks[k]
        previous = frames[picks[k - 1]] if k else frames[0]
        _draw_text(ax, _layout(_pieces(frames[i], previous, mask_id, decode)),
                   f"{title} step {i} of {len(frames) - 1}: {int((frames[i] == mask_id).sum())} masked", 2.0)

    animation = FuncAnimation(fig, show, frames=len(picks))
    animation.save(path, writer=PillowWriter(fps=4))
    plt.close(fig)
    return path
