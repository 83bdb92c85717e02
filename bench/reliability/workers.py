"""Several workers on one database study, as the README runs them on several machines: the first
without ``--worker``, the others with it, each with its own ``--out``, all with the same ``--storage``.
Checked after every round: every worker exits 0; no run is executed twice and no run is told twice;
every executed run's record is in every output folder, once; every worker's tables are identical
(``results.csv`` rows and ``results.md``, its command line aside); the password is in no output or
file; no attribute stored in the database exceeds MySQL's TEXT column (64 KiB).

    python -m bench.reliability --only workers                              # 4 workers on PostgreSQL and on MariaDB
    python -m bench.reliability --only workers --rounds 1 --backends mariadb # options: --rounds, --workers, --backends
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[2]
TEXT_LIMIT = 65535  # bytes in MySQL's TEXT column, where Optuna keeps attributes
# A small raced matrix with records of realistic size: 4 cells x 3 rates (every rate to the rung, two
# on to the end) x 2 seeds; 1000 test and 200 validation items with their predictions per record
# (~75 KB of JSON each, over MySQL's 64 KiB TEXT).
MATRIX = ["--suite", "shapes", "--preset", "smoke", "--targets", "qv,all", "--vision", "frozen,resampler",
          "--seeds", "0,1", "--lrs", "2e-3,5e-3,1e-2", "--test-items", "1000", "--val-items", "200", "--save-adapters", "none"]


@dataclass
class Outcome:
    """What a round of workers did, read back from the study and the output folders."""

    backend: str
    workers: int
    wall_s: float = 0.0
    returncodes: list = field(default_factory=list)
    pids: list = field(default_factory=list)
    errors: list = field(default_factory=list)  # the last stderr line of each worker that failed
    trials: collections.Counter = field(default_factory=collections.Counter)  # state -> trials
    failed: collections.Counter = field(default_factory=collections.Counter)  # why a trial failed -> trials
    executed: collections.Counter = field(default_factory=collections.Counter)  # run id -> times executed
    told: collections.Counter = field(default_factory=collections.Counter)  # run id -> trials finished with its record
    per_worker: collections.Counter = field(default_factory=collections.Counter)  # pid -> runs executed
    record_keys: list = field(default_factory=list)  # per output folder: its record keys, sorted
    missing_records: list = field(default_factory=list)  # executed runs whose record is not in some folder
    table_differences: list = field(default_factory=list)
    vs_one_process: list | None = None  # differences from one process's tables for the matrix, measured figures aside
    secrets: list = field(default_factory=list)  # outputs and files holding the password
    largest_attr: int = 0  # bytes of the largest attribute value stored (JSON text)
    largest_record: int = 0  # bytes of the largest record as JSON

    @property
    def twice(self) -> list[str]:
        return sorted(r for r, n in self.executed.items() if n > 1)

    @property
    def told_twice(self) -> list[str]:
        return sorted(r for r, n in self.told.items() if n > 1)

    @property
    def ok(self) -> bool:
        return (all(rc == 0 for rc in self.returncodes) and not self.twice and not self.told_twice
                and not self.missing_records and not self.table_differences and not self.secrets and set(self.per_worker) <= set(self.pids)
                and not self.vs_one_process
                and len({tuple(k) for k in self.record_keys}) == 1 and self.largest_attr <= TEXT_LIMIT
                and bool(self.executed))


def storage(url: str):
    """The harness's own storage for a URL (the driver it picks, the options it sets)."""
    from bench.study import make_storage

    return make_storage(SimpleNamespace(storage=url, out=None))


def start(out: Path, url: str, args: list[str], worker: bool) -> subprocess.Popen:
    cmd = [sys.executable, str(ROOT / "run_bench.py"), *args, "--out", str(out), "--storage", url, *(["--worker"] if worker else [])]
    env = {**os.environ, "TQDM_DISABLE": "1"}
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def one_process(folder: Path, args: list[str], timeout: float = 3600) -> Path:
    """The matrix run by one process on its own (a journal study in its --out): the tables to match."""
    out = Path(folder) / "one-process"
    cmd = [sys.executable, str(ROOT / "run_bench.py"), *args, "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env={**os.environ, "TQDM_DISABLE": "1"})
    if done.returncode != 0:
        raise SystemExit(f"error: the one-process run failed: {(done.stderr.strip().splitlines() or ['exit ' + str(done.returncode)])[-1]}")
    return out


def run_workers(url: str, folder: Path, n: int, args: list[str], backend: str = "", timeout: float = 3600,
                reference: Path | None = None) -> Outcome:
    """Start ``n`` workers on ``url`` (machine 1, then machines 2..n once its study exists), wait, check;
    with ``reference`` (:func:`one_process`'s folder), also compare machine 1's tables with it."""
    import optuna

    from bench.reliability import servers, tables

    outcome = Outcome(backend=backend, workers=n)
    outs = [Path(folder) / f"machine-{i + 1}" for i in range(n)]
    t0 = time.perf_counter()
    first = start(outs[0], url, args, worker=False)
    store = storage(url)
    deadline = time.time() + 600
    while time.time() < deadline and first.poll() is None and not optuna.get_all_study_summaries(store):
        time.sleep(0.5)
    procs = [first, *(start(out, url, args, worker=True) for out in outs[1:])]
    texts = [p.communicate(timeout=timeout) for p in procs]
    outcome.wall_s = time.perf_counter() - t0
    outcome.returncodes = [p.returncode for p in procs]
    outcome.pids = [p.pid for p in procs]
    outcome.errors = [f"worker {i + 1}: {(err.strip().splitlines() or ['exit ' + str(p.returncode)])[-1]}"
                      for i, (p, (_, err)) in enumerate(zip(procs, texts)) if p.returncode != 0]
    outcome.secrets = [f"worker {i + 1} output" for i, (o, e) in enumerate(texts) if servers.PASSWORD in o + e]

    store = storage(url)
    summaries = optuna.get_all_study_summaries(store)
    if len(summaries) != 1:
        outcome.errors.append(f"{len(summaries)} studies in the storage, expected 1")
        return outcome
    study = optuna.load_study(study_name=summaries[0].study_name, storage=store)
    trials = study.get_trials(deepcopy=False)
    attrs = [study.user_attrs, *(t.user_attrs for t in trials)]
    outcome.largest_attr = max((len(json.dumps(v).encode()) for a in attrs for v in a.values()), default=0)
    for t in trials:
        outcome.trials[t.state.name.lower()] += 1
        if t.state.name == "FAIL":
            outcome.failed[_why_failed(t.user_attrs)] += 1
        run = t.user_attrs.get("run")
        if run is None:
            continue
        if t.user_attrs.get("executed"):
            outcome.executed[run] += 1
            outcome.per_worker[t.user_attrs["worker"]["pid"]] += 1
        if "record" in t.user_attrs and not t.user_attrs.get("stale"):
            outcome.told[run] += 1

    from bench.store import read_record, record_files

    ran = {run.split("@")[0] for run in outcome.executed}
    for out in outs:
        files = record_files(out / "records")
        keys = [p.name.split(".json")[0] for p in files]
        outcome.record_keys.append(sorted(keys))
        if len(keys) != len(set(keys)):
            outcome.errors.append(f"{out.name}: a record twice")
        outcome.missing_records += [f"{out.name}: {k}" for k in sorted(ran - set(keys))]
        for path in files:
            record = read_record(path)
            if record is None:
                outcome.errors.append(f"{out.name}: {path.name} does not parse")
                continue
            outcome.largest_record = max(outcome.largest_record, len(json.dumps(record).encode()))
        outcome.secrets += [str(p.relative_to(folder)) for p in out.rglob("*")
                            if p.is_file() and servers.PASSWORD in p.read_text(errors="ignore")]
        if out != outs[0]:
            outcome.table_differences += [f"{outs[0].name} vs {out.name}: {d}" for d in tables.differences(outs[0], out)]
    if reference is not None:
        outcome.vs_one_process = tables.differences(reference, outs[0], measured=False)
    return outcome


def _why_failed(attrs: dict) -> str:
    """The worker's reason for a failed trial (bench/study.py); none of them runs anything twice."""
    for attr, why in (("idle", "empty ask"), ("duplicate_of", "claimed twice"), ("obsolete", "obsolete"), ("stale", "stale")):
        if attrs.get(attr) is not None:
            return why
    return "run failed" if attrs.get("status") else "other"


def _versions() -> str:
    from bench.machine import versions

    v = versions()
    parts = [f"python {v['python']}", f"torch {v.get('torch')}", f"optuna {v.get('optuna')}"]
    for name in ("sqlalchemy", "psycopg", "pymysql"):
        try:
            import importlib.metadata

            parts.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            pass
    return ", ".join(parts)


def _server_versions() -> str:
    """"PostgreSQL 15.18, MariaDB 10.11.19-MariaDB-0+deb12u1" from the binaries the rounds start."""
    from bench.reliability.servers import _binary, mariadb_binaries

    found = []
    for label, exe, index in (("PostgreSQL", _binary("postgres", "/usr/lib/postgresql/*/bin/postgres"), 2),
                              ("MariaDB", mariadb_binaries()[0], 2)):
        if exe:
            words = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.split()
            found.append(f"{label} {words[index] if len(words) > index else '?'}")
    return ", ".join(found)


def rounds(backends: list[str], n: int, repeat: int, args: list[str], log=print) -> list[Outcome]:
    import tempfile

    from bench.reliability import servers

    factories = {"postgresql": servers.postgres, "mariadb": servers.mariadb}
    unknown = [b for b in backends if b not in factories]
    if unknown:
        raise SystemExit(f"error: unknown backend {unknown[0]!r}; choose from {', '.join(factories)}")
    done = []
    with tempfile.TemporaryDirectory(prefix="bench-one-process-") as ref_tmp:
        t0 = time.perf_counter()
        reference = one_process(Path(ref_tmp), args)
        log(f"one process: {time.perf_counter() - t0:.0f} s")
        for backend in backends:
            for r in range(repeat):
                try:
                    with factories[backend]() as url, tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
                        outcome = run_workers(url, Path(tmp), n, args, backend=backend, reference=reference)
                except servers.Unavailable as exc:
                    raise SystemExit(f"error: {backend}: {exc}") from None
                log(f"{backend} round {r + 1}: {'ok' if outcome.ok else 'FAILED'} in {outcome.wall_s:.0f} s")
                done.append(outcome)
    return done


def table(outcomes: list[Outcome]) -> str:
    head = ("| backend | round | workers | wall s | trials (state: n) | failed trials (why: n) | runs executed | executed twice | told twice "
            "| runs per worker | records per folder | tables identical | same as one process | password found | largest record | largest attribute | exit codes |")
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    rounds_seen = collections.Counter()
    for o in outcomes:
        rounds_seen[o.backend] += 1
        states = ", ".join(f"{k}: {v}" for k, v in sorted(o.trials.items()))
        why = ", ".join(f"{k}: {v}" for k, v in sorted(o.failed.items())) or "none"
        per_folder = sorted({len(k) for k in o.record_keys})
        same_keys = len({tuple(k) for k in o.record_keys}) == 1
        lines.append(
            f"| {o.backend} | {rounds_seen[o.backend]} | {o.workers} | {o.wall_s:.0f} | {states} | {why} | {len(o.executed)} "
            f"| {len(o.twice)} | {len(o.told_twice)} | {', '.join(str(v) for v in sorted(o.per_worker.values(), reverse=True))} "
            f"| {'/'.join(map(str, per_folder))}{'' if same_keys else ' (**differ**)'} "
            f"| {'yes' if not o.table_differences else '**no**'} "
            f"| {'-' if o.vs_one_process is None else 'yes' if not o.vs_one_process else '**no**'} | {len(o.secrets)} "
            f"| {o.largest_record / 1024:.0f} KiB | {o.largest_attr / 1024:.1f} KiB | {', '.join(map(str, o.returncodes))} |")
    return "\n".join(lines)


def section(argv: list[str]) -> str:
    p = argparse.ArgumentParser(prog="python -m bench.reliability --only workers")
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--rounds", type=int, default=2, help="rounds per backend, each on a fresh server")
    p.add_argument("--backends", default="postgresql,mariadb")
    args = p.parse_args(argv)
    if args.workers < 2 or args.rounds < 1:
        raise SystemExit("error: --workers must be at least 2 and --rounds at least 1")
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    outcomes = rounds(backends, args.workers, args.rounds, MATRIX, log=lambda s: print(s, file=sys.stderr))
    failures = [f"- {o.backend}: {line}" for o in outcomes
                for line in [*o.errors, *(f"executed twice: {r}" for r in o.twice), *(f"told twice: {r}" for r in o.told_twice),
                             *(f"record missing: {m}" for m in o.missing_records), *o.table_differences,
                             *(f"vs one process: {d}" for d in o.vs_one_process or []),
                             *(f"password in {s}" for s in o.secrets)]]
    import torch

    command = "python -m bench.reliability --only workers" + (" " + " ".join(argv) if argv else "")
    all_ok = all(o.ok for o in outcomes)
    lines = [
        "## Workers: several machines on one database study",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {platform.machine()} CPU, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')} "
        f"(torch {torch.get_num_threads()} threads); {platform.platform()}; {_versions()}; servers: {_server_versions()}",
        "",
        f"Each round: a fresh server (bench/reliability/servers.py), {args.workers} workers started as the README runs them on "
        f"{args.workers} machines (the first without `--worker`, then the others with it once its study exists; each its own "
        "`--out`; the same `--storage`), on the matrix `python run_bench.py " + " ".join(MATRIX) + "` (raced: rung legs, "
        "continuations and seed rounds are enqueued as the race decides; every record carries 1000 test and 200 validation items "
        "with their predictions). Checked: every worker exits 0; no run executed twice (`executed`), no run told twice (trials "
        "finished with a record); every executed run's record in every folder; identical `results.csv` rows and "
        "`results.md` (command line aside) in every folder, and the same rows, scores and verdicts as the matrix run "
        "by one process on its own (`tables.differences(..., measured=False)`: memory, throughput and seconds aside); the password in no output or file; no stored attribute over "
        f"MySQL's TEXT limit ({TEXT_LIMIT:,} bytes). Failed trials are the queue's bookkeeping, never a second "
        "execution: *empty ask* (a worker asked after another took the last waiting trial), *claimed twice* (two "
        "workers enqueued the same run; the later trial stepped aside before running), *obsolete* (a run another "
        "worker's race plan enqueued that this worker's plan does not hold; it is enqueued again while a plan needs it); *stale* (a worker declared dead) and *run failed* "
        "would be real failures.",
        "",
        table(outcomes),
        "",
        f"Result: {'every round kept every promise' if all_ok else '**a round broke a promise**'} "
        f"({sum(o.ok for o in outcomes)} of {len(outcomes)} rounds).",
        "",
    ]
    if failures:
        lines += ["Failures:", "", *failures, ""]
    return "\n".join(lines)
