"""Progress reporting: a live rich bar on a terminal, plain periodic lines anywhere else.

A rich bar on a console that is not a terminal (CI, nohup, a job scheduler's log) prints nothing until it
stops, so a run of hours looks hung. :class:`PlainProgress` keeps rich's task bookkeeping (the same
``add_task``/``update``/``advance`` calls the runner makes) and writes a line per task when it moves, at
most one per task every ``interval`` seconds, plus one when a task with a total reaches it: short
evaluations stay silent, a run of hours says "runs 12 of 360, elapsed, remaining" as it goes.
"""

from __future__ import annotations

import os
import time

from rich.console import Console
from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn,
                           TimeRemainingColumn)

START_S = 1.0  # what a task reports this soon after it is added is where it starts, not progress
INTERVAL_S = 30.0  # the least time between two lines of one task; LORA_VLM_BENCH_PROGRESS_S overrides it


def console() -> Console:
    """The run's console: a log file (not a terminal) gets 160 columns, not rich's 80, so that a line of
    the plan or of progress stays one line (COLUMNS, when set, still wins)."""
    plain = Console()
    if plain.is_terminal or "COLUMNS" in os.environ:
        return plain
    return Console(width=160)


def progress_bar(console: Console) -> Progress:
    """A rich bar for a terminal, plain lines otherwise (``console.is_terminal`` decides)."""
    if not console.is_terminal:
        return PlainProgress(console, interval=float(os.environ.get("LORA_VLM_BENCH_PROGRESS_S", INTERVAL_S)))
    return Progress(
        TextColumn("{task.description}", justify="left"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
    )


def clock(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class PlainProgress(Progress):
    """rich's Progress with the live display off; each task reports itself as a plain line."""

    def __init__(self, console: Console, interval: float = INTERVAL_S, get_time=None):
        super().__init__(console=console, disable=True, get_time=get_time)
        self.interval = interval
        self._said: dict[TaskID, tuple[float, float]] = {}  # task -> (time of its last line, completed then)
        self._first: dict[TaskID, tuple[float, float]] = {}  # task -> (time, completed) where this process started it

    def add_task(self, description: str, start: bool = True, total: float | None = 100.0, completed: int = 0,
                 visible: bool = True, **fields) -> TaskID:
        task_id = super().add_task(description, start=start, total=total, completed=completed, visible=visible, **fields)
        self._said[task_id] = (self.get_time(), completed)
        self._first[task_id] = (self.get_time(), completed)
        return task_id

    def update(self, task_id: TaskID, **kwargs) -> None:
        super().update(task_id, **kwargs)
        self._report(task_id)

    def advance(self, task_id: TaskID, advance: float = 1) -> None:
        super().advance(task_id, advance)
        self._report(task_id)

    def remove_task(self, task_id: TaskID) -> None:
        self._said.pop(task_id, None)
        self._first.pop(task_id, None)
        super().remove_task(task_id)

    def _report(self, task_id: TaskID) -> None:
        with self._lock:
            task = self._tasks.get(task_id)
        if task is None or task_id not in self._said:
            return
        now = self.get_time()
        if now - task.start_time < START_S if task.start_time is not None else False:  # where the task starts (a resumed matrix: earlier processes' work)
            self._first[task_id] = (now, task.completed)
            self._said[task_id] = (now, task.completed)
        said_at, said_completed = self._said[task_id]
        done = task.total is not None and task.completed >= task.total
        if task.completed == said_completed or (now - said_at < self.interval and not done):
            return
        self._said[task_id] = (now, task.completed)
        self.console.print(self.line(task, *self._first[task_id], now), markup=False, highlight=False, soft_wrap=True)

    @staticmethod
    def line(task, since: float, from_completed: float, now: float) -> str:
        """``12:03:04 runs: 12 of 360 (3%), elapsed 0:10:00, remaining 4:50:00 | shapes: qv/frozen ...``

        Remaining time is at this process's rate since the task started: a resumed matrix starts with
        work done by earlier processes, which took none of this one's time."""
        elapsed = task.elapsed or 0.0
        if task.total:
            rate = (task.completed - from_completed) / (now - since) if now > since else 0.0
            remaining = (task.total - task.completed) / rate if rate > 0 else None
            done = f"{task.completed:g} of {task.total:g} ({task.completed / task.total:.0%}), elapsed {clock(elapsed)}, " \
                   f"remaining {clock(max(remaining, 0.0) if remaining is not None else None)}"
        else:
            done = f"{task.completed:g} done, elapsed {clock(elapsed)}"
        info = task.fields.get("info") or ""
        return f"{time.strftime('%H:%M:%S')} {task.description.strip()}: {done}" + (f" | {info}" if info else "")
