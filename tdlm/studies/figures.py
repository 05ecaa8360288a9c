"""How a report writes its figures: numbers in table cells and axis labels, and plots saved
(matplotlib, imported only when a plot is drawn) through the one atomic writer."""

from __future__ import annotations

from pathlib import Path

from tdlm.files import write_atomically


def pyplot():
    """matplotlib.pyplot on the Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: Path, plt, *, dpi: int = 110) -> Path:
    """Lay `fig` out, write it to `path` (its suffix names the format) and close it."""
    fig.tight_layout()
    write_atomically(path, lambda f: fig.savefig(f, format=Path(path).suffix.lstrip(".") or "png", dpi=dpi))
    plt.close(fig)
    return path


def format_count(value) -> str:
    """1234567 -> '1.23M'; None -> '-'."""
    if value is None:
        return "-"
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.3g}{suffix}"
    return str(value)


def format_number(value) -> str:
    """Three significant digits; None -> '-'."""
    return "-" if value is None else f"{value:.3g}"
