"""Fault-injection and soak measurements; each writes its section to results/reliability/<name>.md, then
results/reliability.md is assembled from all sections present (one can be rerun without the others).

    python -m bench.reliability                  # all of them
    python -m bench.reliability --only kill      # random kill -9 of one of two workers, mid-write included
    python -m bench.reliability --only workers   # 4 workers on PostgreSQL and on MySQL: exactly-once, identical tables
    python -m bench.reliability --only inputs    # every kind of bad input, and what the harness does with it
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")

SECTIONS = ["kill", "workers", "inputs"]  # each a module bench/reliability/<name>.py with section(argv) -> str
TITLE = """# Reliability: faults injected, and what the harness did

Every figure here is produced by `python -m bench.reliability` (one section each: `--only NAME`); each
section gives its command, machine and versions.
"""


def assemble(folder: Path) -> str:
    from bench.store import assemble_sections

    return assemble_sections(TITLE, SECTIONS, folder)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma-separated from {', '.join(SECTIONS)}")
    p.add_argument("--out", type=Path, default=Path("results/reliability.md"))
    args, rest = p.parse_known_args(argv)
    from bench.store import atomic_write_text

    names = [n.strip() for n in args.only.split(",") if n.strip()]
    unknown = [n for n in names if n not in SECTIONS]
    if unknown:
        print(f"error: unknown section {unknown[0]!r}; choose from {', '.join(SECTIONS)}", file=sys.stderr)
        return 2
    folder = args.out.with_suffix("")
    for name in names:
        text = importlib.import_module(f"bench.reliability.{name}").section(rest)
        atomic_write_text(folder / f"{name}.md", text)
        print(text)
    atomic_write_text(args.out, assemble(folder))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
