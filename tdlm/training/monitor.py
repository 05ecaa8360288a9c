"""Where a run's figures go: metrics.jsonl for scripts, TensorBoard for people.

Only the main process writes. Every record carries the optimizer step, so a resumed run
appends to the same files and TensorBoard draws one continuous curve. A resume first cuts
metrics.jsonl back to its checkpoint's step (rewrite_metrics: atomic); a last line that a kill
or a full disk left half-written is dropped with a warning.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from tdlm.errors import TdlmError
from tdlm.files import append_line, write_atomically


class MetricsError(TdlmError):
    """metrics.jsonl holds a line that is not a record (other than a half-written last one)."""


class RunLogger:
    def __init__(self, run_dir: Path, *, tensorboard: bool = True, enabled: bool = True):
        self.run_dir, self.enabled = Path(run_dir), enabled
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float], kind: str = "train") -> None:
        """Append one record; scalars go to TensorBoard as `kind/name`."""
        if not self.enabled:
            return
        record = {"step": step, "kind": kind, "time": round(time.time(), 3), **metrics}
        append_line(self.run_dir / "metrics.jsonl", json.dumps(record))
        if self.writer is not None:
            for name, value in metrics.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{kind}/{name}", value, step)

    def text(self, step: int, tag: str, text: str) -> None:
        if self.enabled and self.writer is not None:
            # TensorBoard renders text as markdown: indent to keep line breaks and spacing
            self.writer.add_text(tag, "    " + text.replace("\n", "\n    "), step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()


def read_metrics(run_dir: Path, kind: str | None = None) -> list[dict]:
    """The records of metrics.jsonl (of `kind`, if given). A last line that is not valid JSON was
    cut short by a kill or a full disk mid-write: it is dropped, with a one-line warning."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MetricsError(f"{path} is not UTF-8 text (byte {exc.start}): it is damaged; move it aside "
                           "(the run's figures logged so far are lost with it)") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    records = []
    for i, (n, line) in enumerate(lines):
        try:
            record = json.loads(line)
            if not (isinstance(record, dict) and "step" in record and "kind" in record):
                raise ValueError("not a record with a step and a kind")
            records.append(record)
        except ValueError as exc:  # json.JSONDecodeError is one
            if i < len(lines) - 1:
                raise MetricsError(f"{path}: line {n} is not a metrics record ({exc})") from None
            print(f"tdlm: warning: {path}: dropped its last line, {len(line)} characters cut short "
                  "(a kill or a full disk while it was written)", file=sys.stderr)
    return [r for r in records if kind is None or r["kind"] == kind]


def rewrite_metrics(run_dir: Path, records: list[dict]) -> None:
    """Replace metrics.jsonl with `records`, atomically: a kill at any moment leaves either the
    old file or the new one, never an empty or partial one."""
    write_atomically(Path(run_dir) / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))
