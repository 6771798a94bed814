"""Console progress of training: one rich bar per epoch with the running means of the losses
(a plain line per epoch when the output is not a terminal)."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["EpochProgress", "NoProgress", "format_value", "losses_text"]


def format_value(value: float) -> str:
    if value is None or not math.isfinite(value):
        return str(value)
    a = abs(value)
    if a != 0 and (a >= 1e5 or a < 1e-3):
        return f"{value:.3e}"
    return f"{value:.4f}" if a < 10 else f"{value:.2f}"


def losses_text(values: Mapping[str, Any], limit: int = 8) -> str:
    items = [(k, v) for k, v in values.items() if isinstance(v, float)]
    shown = "  ".join(f"{k} {format_value(v)}" for k, v in items[:limit])
    if len(items) > limit:
        shown += f"  (+{len(items) - limit} more)"
    return shown


class NoProgress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def start_epoch(self, epoch, epochs, total, done):
        return None

    def advance(self, task, state, step):
        pass

    def stop_epoch(self, task, state, row=None, interrupted=False):
        pass

    def print_row(self, row):
        pass

    def announce_surgery(self, imodel):
        pass


class EpochProgress(NoProgress):
    """One rich progress bar per epoch with the running means of the losses (a plain line per
    epoch when the output is not a terminal)."""

    def __init__(self, console) -> None:
        self.console = console
        self.live = console.is_terminal
        self.progress = None
        self._last = 0.0
        self._epoch_started = 0.0

    def __enter__(self):
        if self.live:
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
            )
            from rich.table import Column

            self.progress = Progress(
                TextColumn(
                    "[bold]{task.description}", table_column=Column(no_wrap=True, min_width=11)
                ),
                BarColumn(bar_width=20, table_column=Column(no_wrap=True, min_width=20)),
                MofNCompleteColumn(table_column=Column(no_wrap=True, min_width=5)),
                TimeElapsedColumn(table_column=Column(no_wrap=True, min_width=7)),
                TextColumn(
                    "{task.fields[info]}",
                    table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1),
                ),
                console=self.console,
                transient=False,
            )
            self.progress.start()
        return self

    def __exit__(self, *exc):
        if self.progress is not None:
            self.progress.stop()
        return False

    def start_epoch(self, epoch, epochs, total, done):
        self._epoch_started = time.time()
        if self.progress is None:
            return None
        return self.progress.add_task(
            f"epoch {epoch}/{epochs}", total=total, completed=done, info=""
        )

    def advance(self, task, state, step):
        if self.progress is None:
            return
        now = time.time()
        task_obj = self.progress.tasks[task] if task < len(self.progress.tasks) else None
        last = task_obj is not None and task_obj.total is not None and step >= task_obj.total
        if now - self._last < 0.25 and not last:
            self.progress.update(task, completed=step)
            return
        self._last = now
        self.progress.update(task, completed=step, info=losses_text(state.running_means()))

    def stop_epoch(self, task, state, row=None, interrupted=False):
        seconds = time.time() - self._epoch_started
        values = row if row is not None else state.running_means()
        if self.progress is not None:
            self.progress.update(task, info=losses_text(values))
            return
        from rich.text import Text

        head = f"epoch {row['epoch']} train" if row is not None else "interrupted epoch"
        self.console.print(
            Text(f"{head}  {losses_text(values)}  ({seconds:.1f} s)"), soft_wrap=True
        )

    def print_row(self, row):
        from rich.text import Text

        text = Text(f"epoch {row['epoch']} {row['split']}  {losses_text(row)}")
        if self.progress is not None:
            self.progress.console.print(text, soft_wrap=True)
        else:
            self.console.print(text, soft_wrap=True)

    def announce_surgery(self, imodel):
        from rich.text import Text

        if imodel.is_vanilla:
            line = "method sum: vanilla training (no surgery)"
        else:
            stats = imodel.last_stats()
            if not stats:
                line = "no branch point where two task streams meet: plain training"
            else:
                parts = [
                    f"{where} ({' | '.join('+'.join(s) for s in st['streams'])})"
                    for where, st in stats.items()
                ]
                engine = getattr(imodel, "last_engine", None)
                how = f" ({engine} engine)" if engine in ("graph", "hook") else ""
                line = f"surgery{how} at {len(parts)} branch point(s): " + "; ".join(parts)
        target = self.progress.console if self.progress is not None else self.console
        target.print(Text(line, style="dim"), soft_wrap=True)
        # which engine runs each input structure and why, with the self-check's outcome
        for note in imodel.engine_notes:
            target.print(Text(f"engine: {note}", style="dim"), soft_wrap=True)
