"""What must be equal between the tables of two output folders (workers of one study, or a study run
by several workers and the same matrix run by one process), and where they differ.

``results.csv`` is compared as its header plus its rows sorted; ``results.md`` line by line without
its ``Command:`` line (each worker's own command line: ``--out``, ``--worker``). With
``measured=False`` the figures a machine measures rather than computes (memory, throughput, seconds)
are left out too: two processes running the same runs reach the same scores, never the same timings.
"""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

FILES = ("results.csv", "results.md")
# csv columns that are measurements: peak_mem_mib, peak_reserved_mib, memory_kind, *_per_s, train_s, eval_s, wall_s
MEASURED_COLUMN = re.compile(r"mem|mib|_per_s$|_s$", re.I)
# Markdown table headers and row labels that are measurements: "peak MiB", "samples/s", "memory (fANOVA)", ...
MEASURED_HEADER = re.compile(r"MiB|GiB|/s\b|memory|throughput|seconds", re.I)
MEASURED_ROW = re.compile(r"MiB|GiB|/s\b|memory|throughput|seconds|Pareto", re.I)
MEASURED_TEXT = re.compile(r"[\d.,]+(\s*)(MiB|GiB|train samples/s|samples/s|items/s)")


def csv_rows(text: str, measured: bool = True) -> list[tuple]:
    """The header, then every row sorted: which worker wrote a row first does not matter."""
    rows = list(csv.reader(io.StringIO(text)))
    if not rows:
        return []
    keep = [i for i, name in enumerate(rows[0]) if measured or not MEASURED_COLUMN.search(name)]
    pick = lambda row: tuple(row[i] if i < len(row) else "" for i in keep)  # noqa: E731
    return [pick(rows[0]), *sorted(pick(r) for r in rows[1:])]


def _cells(line: str) -> list[str]:
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _table(lines: list[str]) -> list[str]:
    """A Markdown table without its measured columns and rows (a row about memory, throughput or the
    Pareto rank, which both decide), its other columns in name order: an importance table orders its
    columns by the largest value of any row, measured rows included."""
    header, *rows = [_cells(line) for line in lines]
    body = [r for r in rows[1:] if not (r and MEASURED_ROW.search(r[0]))]
    keep = [0, *sorted((i for i, h in enumerate(header) if i and not MEASURED_HEADER.search(h)), key=lambda i: header[i])]
    pick = lambda row: "| " + " | ".join(row[i] if i < len(row) else "" for i in keep) + " |"  # noqa: E731
    return [pick(header), *(pick(r) for r in body)]


def markdown_lines(text: str, measured: bool = True) -> list[str]:
    """results.md without its command line; without measured columns, rows and figures unless ``measured``."""
    out: list[str] = []
    block: list[str] = []
    for line in [*text.splitlines(), ""]:
        if line.startswith("Command:"):
            continue
        if measured:
            out.append(line)
        elif line.startswith("|"):
            block.append(line)
        else:
            if block:
                out += _table(block)
                block = []
            out.append(MEASURED_TEXT.sub(r"#\1\2", line))
    return out[:-1]


def read(out: Path, measured: bool = True) -> dict[str, list]:
    """The comparable content of a folder's tables; a missing file reads as None."""
    out = Path(out)
    found = {}
    for name in FILES:
        path = out / name
        if not path.is_file():
            found[name] = None
            continue
        text = path.read_text()
        found[name] = csv_rows(text, measured) if name.endswith(".csv") else markdown_lines(text, measured)
    return found


def differences(a: Path, b: Path, measured: bool = True) -> list[str]:
    """One line per table that differs between folders ``a`` and ``b`` (the first differing line); [] when equal."""
    left, right = read(a, measured), read(b, measured)
    found = []
    for name in FILES:
        x, y = left[name], right[name]
        if x == y:
            continue
        if x is None or y is None:
            found.append(f"{name}: missing in {a if x is None else b}")
            continue
        i = next((i for i, (p, q) in enumerate(zip(x, y)) if p != q), min(len(x), len(y)))
        p = x[i] if i < len(x) else "(end)"
        q = y[i] if i < len(y) else "(end)"
        found.append(f"{name} line {i + 1}: {str(p)[:200]!r} != {str(q)[:200]!r}")
    return found
