"""Progress without a terminal: plain periodic lines, not a bar that prints only when it stops."""

import io

from rich.console import Console
from rich.progress import Progress

from bench.progress import PlainProgress, progress_bar


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_a_terminal_gets_the_bar_and_a_log_gets_lines():
    assert not isinstance(progress_bar(Console(file=io.StringIO(), force_terminal=True)), PlainProgress)
    assert isinstance(progress_bar(Console(file=io.StringIO(), force_terminal=True)), Progress)
    assert isinstance(progress_bar(Console(file=io.StringIO())), PlainProgress)


def test_lines_come_at_most_once_per_interval_and_at_the_end():
    buffer, clock = io.StringIO(), Clock()
    with PlainProgress(Console(file=buffer, width=200), interval=30, get_time=clock) as progress:
        runs = progress.add_task("runs", total=4, info="")
        quick = progress.add_task("  eval base model", total=None, info="")
        progress.update(quick, total=10, advance=10)  # done within a second of its start: nothing to say
        progress.remove_task(quick)
        train = progress.add_task("  train qv/frozen", total=200, info="")
        for step in range(1, 201):
            clock.now += 0.5  # 100 s of training: a line each 30 s after step 1 (its start), and one at the end
            progress.update(train, completed=step, info=f"loss {1 / step:.3f}")
        progress.remove_task(train)
        for i in range(1, 5):
            clock.now += 100
            progress.update(runs, completed=i, info=f"shapes: qv/frozen seed {i}")
    lines = buffer.getvalue().splitlines()
    trains = [line for line in lines if "train qv/frozen" in line]
    assert [line.split(": ", 1)[1].split(" (")[0] for line in trains] == ["61 of 200", "121 of 200", "181 of 200", "200 of 200"]
    assert "loss 0.005" in trains[-1]
    runs_lines = [line for line in lines if " runs: " in line]
    assert len(runs_lines) == 4 and "runs: 1 of 4 (25%)" in runs_lines[0]
    # remaining comes from the average rate so far: 1 run in 200 s leaves 3 runs, 600 s
    assert "elapsed 0:03:20, remaining 0:10:00" in runs_lines[0]
    assert "remaining 0:00:00" in runs_lines[-1] and "seed 4" in runs_lines[-1]
    assert not any("eval base model" in line for line in lines)


def test_a_task_that_does_not_move_says_nothing():
    buffer, clock = io.StringIO(), Clock()
    with PlainProgress(Console(file=buffer), interval=30, get_time=clock) as progress:
        task = progress.add_task("runs", total=3, info="")
        clock.now += 100
        progress.update(task, info="waiting for other workers")
    assert buffer.getvalue() == ""


def test_the_console_script_is_run_bench():
    """`lora-vlm-bench` (pip's console script) and `python run_bench.py` are one command."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    import pytest

    from conftest import ROOT

    script = Path(sys.executable).parent / "lora-vlm-bench"
    if not script.exists():
        script = shutil.which("lora-vlm-bench")
    if not script:
        pytest.skip("lora-vlm-bench is not installed (pip install -e . installs it)")
    via_script = subprocess.run([str(script), "--list"], capture_output=True, text=True, timeout=120)
    via_file = subprocess.run([sys.executable, str(ROOT / "run_bench.py"), "--list"], capture_output=True, text=True, timeout=120)
    assert via_script.returncode == via_file.returncode == 0
    assert via_script.stdout == via_file.stdout and "suites:" in via_script.stdout
    bad = subprocess.run([str(script), "--suite", "nosuch"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error:")


def test_a_resumed_task_estimates_from_this_process_s_own_rate():
    buffer, clock = io.StringIO(), Clock()
    with PlainProgress(Console(file=buffer, width=200), interval=30, get_time=clock) as progress:
        task = progress.add_task("race: training steps", total=None, info="")
        progress.update(task, total=1000, completed=600)  # at once: what earlier processes trained
        clock.now += 100
        progress.update(task, completed=700)  # 100 steps in 100 s: 300 left take 300 s
    (line,) = buffer.getvalue().splitlines()
    assert "700 of 1000 (70%)" in line and "remaining 0:05:00" in line
