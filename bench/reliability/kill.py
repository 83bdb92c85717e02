"""kill -9 soak: two local workers on one results folder, one of them killed at random moments.

    python -m bench.reliability --only kill                 # 10 kills of one of 2 workers (~10 min on 2 cores)
    python -m bench.reliability --only kill --kills 3 --seeds 0,1

Two processes run the same command on the same ``--out``, as the README's *Many workers* says to run
local workers. Again and again one of them, drawn at random, is sent SIGKILL and started again at once.
Half of the kills (in a random order) wait for a random delay (start-up, training, evaluation, telling the study: whatever
the worker is doing then); the other half wait until the worker is inside a write (alternately a
run's record, and any write): the test hook ``BENCH_TEST_PAUSE_IN_WRITE`` holds every atomic write
(records, tables, adapter folders) between its temporary and the rename, so the kill lands there. A kill landed inside a write when the worker's
temporary (its pid is in the name) is left behind. At the end the study must be complete: no run lost
(each has a done record and a complete trial), none duplicated (completed or trained twice), every
file in the results folder parses, and no temporary is left.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.store import DONE, HOST, PAUSE_ENV, PID_NS, Store, read_record

ROOT = Path(__file__).resolve().parents[2]
# 24 runs of a few seconds each: enough for 10 kills (each costs its worker a restart) before the study ends
MATRIX = ["--suite", "shapes", "--preset", "smoke", "--limit", "24", "--protocol", "exhaustive",
          "--targets", "qv,qkvo,all", "--vision", "frozen,resampler"]
SEEDS = "0,1,2,3"


AIMS = {"record": "a record's write", "write": "a write", "random": "a random moment"}


@dataclass
class Kill:
    worker: int
    after_s: float  # since that worker (re)started
    aimed: str  # "record" (inside a record's write), "write" (inside any write) or "random"
    writing: str | None  # the temporary it left behind (the kill landed inside that write), else None


@dataclass
class Soak:
    kills: list[Kill] = field(default_factory=list)
    runs: int = 0  # in the matrix
    lost: list[str] = field(default_factory=list)
    duplicated: list[str] = field(default_factory=list)
    retried: int = 0  # trials of killed workers, failed as stale, their runs enqueued again
    files: int = 0
    unparsed: list[str] = field(default_factory=list)
    temporaries: list[str] = field(default_factory=list)
    exit_codes: list[int] = field(default_factory=list)
    finished_early: bool = False  # the study ended before every kill was made
    wall_s: float = 0.0


def _temporaries(out: Path, pid: int | None = None) -> list[Path]:
    """Temporaries under ``out`` (of the writer ``pid`` on this host, when given)."""
    mark = f"~{HOST}~{PID_NS}~{pid}~" if pid is not None else "~"
    return sorted(p for pattern in Store.TEMPORARIES for p in out.glob(pattern)
                  if p.name.endswith(".tmp") and mark in p.name)


def _start(out: Path, matrix: list[str], env: dict, logs: Path, n: int) -> subprocess.Popen:
    with open(logs / f"worker-{n:02d}.log", "w") as log:
        return subprocess.Popen([sys.executable, str(ROOT / "run_bench.py"), *matrix, "--out", str(out)],
                                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait(proc: subprocess.Popen, until: float, out: Path | None = None, under: str = "") -> None:
    """Until the deadline, the process's exit, or (``out`` given) a temporary of it in ``out/under``."""
    while time.time() < until and proc.poll() is None:
        if out is not None and any(str(p.relative_to(out)).startswith(under) for p in _temporaries(out, proc.pid)):
            return
        time.sleep(0.02)


def run_soak(out: Path, kills: int = 10, seed: int = 0, pause_s: float = 1.0, matrix: list[str] | None = None,
             workers: int = 2, timeout_s: float = 3600, say=lambda line: None) -> Soak:
    """Start ``workers`` workers on ``out``, make ``kills`` kills, let the study finish, check everything."""
    matrix = matrix or [*MATRIX, "--seeds", SEEDS]
    rng = random.Random(seed)
    logs = out.with_name(out.name + "-logs")
    logs.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "COLUMNS": "200", "PYTHONUNBUFFERED": "1",
           PAUSE_ENV: str(pause_s)}
    result, t0, n = Soak(), time.time(), 0
    # half of them aimed inside a write: alternately a run's record, and whatever the worker writes first
    # (a run writes its adapter folder before its record)
    aims = [("record", "write")[i % 2] for i in range(kills // 2)] + ["random"] * (kills - kills // 2)
    rng.shuffle(aims)
    procs, since = [], []
    for _ in range(workers):
        procs.append(_start(out, matrix, env, logs, n))
        since.append(time.time())
        n += 1
    while len(result.kills) < kills:
        alive = [i for i, p in enumerate(procs) if p.poll() is None]
        if not alive:
            result.finished_early = True
            break
        victim = rng.choice(alive)
        aimed = aims[len(result.kills)]
        if aimed != "random":
            _wait(procs[victim], time.time() + 60, out, "records/" if aimed == "record" else "")
        else:
            _wait(procs[victim], time.time() + rng.uniform(0.5, 15))
        proc = procs[victim]
        if proc.poll() is not None:  # it finished meanwhile: the study is done, or nearly
            continue
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        left = _temporaries(out, proc.pid)
        kill = Kill(victim, time.time() - since[victim], aimed, str(left[0].relative_to(out)) if left else None)
        result.kills.append(kill)
        say(f"kill {len(result.kills)}: worker {victim} (pid {proc.pid}) {kill.after_s:.1f} s after its start, aimed at "
            f"{AIMS[aimed]}: " + (f"inside the write of {kill.writing}" if left else "not inside a write"))
        procs[victim] = _start(out, matrix, env, logs, n)
        since[victim] = time.time()
        n += 1
    deadline = time.time() + timeout_s
    for proc in procs:
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    result.exit_codes = [p.returncode for p in procs]
    result.wall_s = time.time() - t0
    _check(out, matrix, result)
    return result


def _study_trials(out: Path):
    import optuna
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFileBackend(str(out / "study.journal")))
    (summary,) = optuna.get_all_study_summaries(storage)
    return optuna.load_study(study_name=summary.study_name, storage=storage).get_trials(deepcopy=False)


def _parses(path: Path) -> bool:
    name = path.name
    try:
        if name.endswith((".json.gz", ".json")) and path.parent.parent.name == "records":
            return read_record(path) is not None
        if name.endswith(".json"):
            json.loads(path.read_text())
        elif name.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(str(path), "pt") as fh:
                for key in fh.keys():
                    fh.get_tensor(key)
        elif name.endswith(".png"):
            from PIL import Image

            with Image.open(path) as im:
                im.verify()
        elif name.endswith(".csv"):
            import pandas as pd

            pd.read_csv(path)
        elif name.endswith(".md"):
            path.read_text(encoding="utf-8")
        elif name.endswith(".html"):
            return path.read_text(encoding="utf-8").rstrip().endswith("</html>")  # bench/html_report.py, whole
        elif name == "study.journal":
            _study_trials(path.parent)
        elif name.endswith(".pt"):
            import torch

            torch.load(path, map_location="cpu", weights_only=False)
        elif name != ".study.lock":
            return False  # a file the harness does not write
    except Exception:
        return False
    return True


def _matrix_runs(matrix: list[str]) -> int:
    from bench.cli import parser
    from bench.spec import from_args

    return from_args(parser().parse_args([*matrix, "--out", "unused"])).n_runs


def _check(out: Path, matrix: list[str], result: Soak) -> None:
    """Runs lost or duplicated, files that do not parse, temporaries left."""
    result.runs = _matrix_runs(matrix)
    trials = [t for t in _study_trials(out) if "run" in t.user_attrs]
    complete = collections.Counter(t.user_attrs["run"] for t in trials if t.state.name == "COMPLETE")
    trained = collections.Counter(t.user_attrs["run"] for t in trials if t.user_attrs.get("executed"))
    records = {r["key"]: r for r in Store(out).all() if r.get("kind") == "cell"}
    runs = {t.user_attrs["run"] for t in trials}
    if len(runs) != result.runs:
        result.lost.append(f"the study holds {len(runs)} runs, the matrix {result.runs}")
    result.lost += sorted(r for r in runs if complete[r] == 0 or records.get(r, {}).get("status") not in DONE)
    result.duplicated = sorted(r for r in runs if complete[r] > 1 or trained[r] > 1)
    result.retried = sum(1 for t in trials if t.user_attrs.get("stale"))
    files = [p for p in out.rglob("*") if p.is_file() or p.is_symlink()]
    result.files = len(files)
    result.temporaries = [str(p.relative_to(out)) for p in files if p.name.endswith(".tmp")]
    result.unparsed = [str(p.relative_to(out)) for p in files if not p.name.endswith(".tmp") and not _parses(p)]
    for folder in (out / "adapters").glob("*/*"):
        if folder.is_dir() and not folder.name.startswith("."):
            missing = [f for f in ("adapter_config.json", "adapter_model.safetensors", "run.json") if not (folder / f).is_file()]
            if missing:
                result.unparsed.append(f"{folder.relative_to(out)}/ (without {', '.join(missing)})")


def _versions_line() -> str:
    import platform

    from bench.machine import versions

    v = versions()
    return (f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores (workers at OMP_NUM_THREADS=1); {platform.platform()}; "
            f"python {v['python']}, torch {v['torch']}, transformers {v['transformers']}, peft {v['peft']}, optuna {v['optuna']}")


def section(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog="python -m bench.reliability --only kill", description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=10)
    p.add_argument("--seed", type=int, default=0, help="draws the victims, the moments and the aims")
    p.add_argument("--seeds", default=SEEDS, help=f"the matrix's seeds (default {SEEDS})")
    p.add_argument("--pause", type=float, default=1.0, help="seconds each atomic write is held inside (the test hook)")
    args, _ = p.parse_known_args(argv)
    matrix = [*MATRIX, "--seeds", args.seeds]
    with tempfile.TemporaryDirectory(prefix="bench-kill-") as tmp:
        result = run_soak(Path(tmp) / "out", kills=args.kills, seed=args.seed, pause_s=args.pause, matrix=matrix,
                          say=lambda line: print(line, file=sys.stderr, flush=True))
    return markdown(result, args, matrix)


def markdown(r: Soak, args, matrix: list[str]) -> str:
    options = "".join(f" --{k} {v}" for k, v in (("kills", args.kills), ("seed", args.seed), ("seeds", args.seeds), ("pause", args.pause))
                      if v != {"kills": 10, "seed": 0, "seeds": SEEDS, "pause": 1.0}[k])
    inside = [k for k in r.kills if k.writing]
    aimed = sum(k.aimed != "random" for k in r.kills)
    lines = [
        "## kill -9 of one of two local workers", "",
        f"Command: `python -m bench.reliability --only kill{options}` ({r.wall_s / 60:.1f} min)", "",
        _versions_line(), "",
        f"Two workers run `python run_bench.py {' '.join(matrix)} --out <temporary folder>` on the same folder. "
        f"{len(r.kills)} times, one of the running workers, drawn at random (seed {args.seed}), gets SIGKILL and is started "
        f"again at once: {len(r.kills) - aimed} at a random moment 0.5-15 s after its start, {aimed} as soon as it is inside a "
        f"write (alternately a run's record, and any write: a run writes its adapter folder first); the test hook "
        f"`{PAUSE_ENV}={args.pause:g}` holds each atomic write (records, tables, adapter folders) {args.pause:g} s between "
        f"its temporary and the rename. A kill landed inside a write when the killed worker's temporary (its pid is in "
        f"the name) was left behind.", "",
        "| figure | value |", "|---|---|",
        f"| kills | {len(r.kills)}{' (the study finished before the rest)' if r.finished_early else ''} |",
        f"| landed inside a write | {len(inside)} ({', '.join(sorted({_kind(k.writing) for k in inside})) or '-'}) |",
        f"| runs in the matrix | {r.runs} |",
        f"| runs lost (no done record, or no complete trial) | {len(r.lost)}{_few(r.lost)} |",
        f"| runs duplicated (completed or trained twice) | {len(r.duplicated)}{_few(r.duplicated)} |",
        f"| trials of killed workers (failed as stale, their runs enqueued again) | {r.retried} |",
        f"| files in the results folder that failed to parse | {len(r.unparsed)} of {r.files}{_few(r.unparsed)} |",
        f"| temporaries left at the end | {len(r.temporaries)}{_few(r.temporaries)} |",
        f"| exit status of the last two workers | {', '.join(map(str, r.exit_codes))} |",
        f"| wall time | {r.wall_s / 60:.1f} min |", "",
        "| kill | worker | after its start | aimed at | landed inside the write of |", "|---|---|---|---|---|",
        *[f"| {i} | {k.worker} | {k.after_s:.1f} s | {AIMS[k.aimed]} | "
          f"{('`' + k.writing + '`') if k.writing else '-'} |" for i, k in enumerate(r.kills, 1)],
        "",
    ]
    return "\n".join(lines)


def _kind(tmp: str) -> str:
    """What a temporary was going to be: a run's record, the base model's, a table, an adapter folder."""
    name = Path(tmp).name[1:].split("~")[0]
    if tmp.startswith("adapters/"):
        return "adapter folder"
    if tmp.startswith("records/"):
        return "base record" if name.startswith("base-") else "run record"
    return name


def _few(items: list[str]) -> str:
    return f": {', '.join(f'`{i}`' for i in items[:5])}{' ...' if len(items) > 5 else ''}" if items else ""
