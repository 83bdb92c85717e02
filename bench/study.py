"""Optuna is how runs are distributed: one study per matrix, any number of workers on it.

Every run of the matrix (cell x learning rate x seed) is a trial, enqueued with its cell and rate as
params and its run key as a user attribute; the value told to Optuna is the validation score. Workers (this process, the same command started again on the same ``--out``, or
``--worker`` processes on other machines sharing ``--storage``) pull waiting trials with ``ask``,
execute them through the same :meth:`bench.runner.Session.run` and ``tell`` the outcome. A trial
whose worker died (its pid is gone on this host, or its heartbeat is older than the grace period) is
failed and its run enqueued again; a run whose record exists is never executed twice. The records
travel in the trials, so every worker can write the same final tables: zlib-compressed, base64 text
in pieces of at most ``PIECE`` characters (MySQL keeps an attribute in a TEXT column, 64 KiB, and a
record with its per-item predictions is larger), see :func:`put_payload`.

Storage: a JournalStorage file in the output folder by default (safe for several local processes);
``--storage postgresql://...`` or ``mysql://...`` for several machines. GridSampler is not used: with
several workers it leaves holes and duplicates.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import json
import os
import re
import socket
import threading
import time
import zlib
from pathlib import Path
from urllib.parse import unquote

from bench.errors import BenchError
from bench.store import current, digest

OBJECTIVES = {"score": "maximize", "memory": "minimize", "throughput": "maximize"}
HEARTBEAT_S = float(os.environ.get("BENCH_HEARTBEAT_S", 15))
GRACE_S = float(os.environ.get("BENCH_GRACE_S", 120))  # a remote worker silent this long is dead
POLL_S = 2.0
SEARCH_CURVE = (0.25, 0.5, 0.75)  # validation checkpoints of a search trial: the pruner's reports
HOST = socket.gethostname()


_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://)(.*)", re.S)
_SECRET_KEY = re.compile(r"pass|pwd|secret|token|key", re.I)  # query parameters that hold credentials
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"`]+")


def _password_spans(rest: str) -> list[tuple[int, int] | None]:
    """Where the password sits in ``rest`` (a URL after ``scheme://``), read three ways: SQLAlchemy's
    (``user:password@``, no ``@`` in the password: what the server is sent), urllib's (the authority
    ends at the first ``/``, ``?`` or ``#``, its user info at its last ``@``), and up to the last ``@``
    before the query (a raw ``@`` or ``/`` typed inside a password). A well-formed URL reads the same
    all three ways."""
    match = re.match(r"[^:/]*:([^@]*)@", rest)
    views = [match.span(1) if match else None]
    for end in (min([i for i in (rest.find(c) for c in "/?#") if i != -1], default=len(rest)),
                rest.find("?") if "?" in rest else len(rest)):
        at = rest.rfind("@", 0, end)
        colon = rest.find(":", 0, at) if at != -1 else -1
        views.append((colon + 1, at) if colon != -1 else None)
    return views


def redact(url: str) -> str:
    """A storage URL without its secrets, for messages and reports: the password (however a parser
    reads it: a raw ``@`` or ``/`` inside it included) and query parameters such as ``?password=``,
    ``?passwd=``, ``?sslpassword=``. Anything that is not a URL comes back unchanged."""
    match = _SCHEME.match(url)
    if not match:
        return url
    head, rest = match.groups()
    spans = [s for s in _password_spans(rest) if s is not None]
    if spans:
        start, end = min(s[0] for s in spans), max(s[1] for s in spans)
        rest = rest[:start] + "***" + rest[end:]
    if "?" in rest:
        path, query = rest.split("?", 1)
        fragment = ""
        if "#" in query:
            query, fragment = query.split("#", 1)
            fragment = "#" + fragment
        pairs = [(p.split("=", 1)[0] + "=***") if "=" in p and _SECRET_KEY.search(unquote(p.split("=", 1)[0])) else p
                 for p in query.split("&")]
        rest = f"{path}?{'&'.join(pairs)}{fragment}"
    return head + rest


def secrets_of(url: str) -> list[str]:
    """The URL's secrets as they may be echoed back (raw and percent-decoded), longest first."""
    match = _SCHEME.match(url or "")
    if not match:
        return []
    rest = match.group(2)
    found = {rest[a:b] for a, b in (s for s in _password_spans(rest) if s is not None)}
    query = rest.split("?", 1)[1] if "?" in rest else ""
    found |= {p.split("=", 1)[1] for p in query.split("#")[0].split("&") if "=" in p and _SECRET_KEY.search(unquote(p.split("=", 1)[0]))}
    found |= {unquote(s) for s in found}
    found |= {piece for s in found for piece in re.split(r"[@/?#]", s)}  # a part read as a host or a path
    return sorted((s for s in found if s), key=len, reverse=True)


def redact_text(text: str, url: str | None = None) -> str:
    """Free text (an exception, a command line) with every URL in it redacted, and ``url``'s secrets
    removed wherever they appear on their own (a driver may echo a decoded password or a mis-read host).
    Secrets shorter than 4 characters are only hidden inside URLs: replacing them everywhere would
    garble the message."""
    if url:
        text = text.replace(url, redact(url))
    text = _URL_IN_TEXT.sub(lambda m: redact(m.group(0)), text)
    for secret in secrets_of(url or ""):
        if len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


def check_storage_url(url: str) -> None:
    """Refuse a URL whose password would be read differently by SQLAlchemy than it reads: a raw
    ``@``, ``/``, ``?`` or ``#`` in it (``user:p@ss@host`` connects to host ``ss@host`` with password
    ``p``, and the server's error then prints that host). Percent-encoding fixes it. (A URL with an ``@``
    after its host, in a database name, is refused too: such names are not worth the ambiguity.)"""
    match = _SCHEME.match(url)
    if not match:
        return
    if len(set(_password_spans(match.group(2)))) > 1:
        raise BenchError(f"--storage {redact(url)}: its password holds a character that URLs reserve (@ / ? #); "
                         "percent-encode it (@ as %40, / as %2F, ? as %3F, # as %23), e.g. "
                         "python -c \"import urllib.parse; print(urllib.parse.quote(input(), safe=''))\"")


PIECE = 32768  # characters of base64 per attribute: Optuna stores it JSON-quoted, MySQL's TEXT holds 65,535 bytes
CODEC = "zlib+base64"
ERROR_CHARS = 1000  # a failed run's reason as a trial attribute (the record keeps it whole)


def put_payload(set_attr, name: str, value) -> None:
    """Store a JSON value (a record) through ``set_attr(key, value)`` in bounded pieces: compressed, as
    base64 text under ``<name>#<digest>:<i>``, then ``name`` = {codec, pieces, digest} written last, so a
    reader never finds a header whose pieces are missing, and two workers writing the same name at once
    (the base record) each write their own pieces."""
    data = zlib.compress(json.dumps(value, separators=(",", ":")).encode(), 9)
    text = base64.b64encode(data).decode("ascii")
    digest_ = hashlib.sha256(data).hexdigest()[:16]
    pieces = [text[i:i + PIECE] for i in range(0, len(text), PIECE)]
    for i, piece in enumerate(pieces):
        set_attr(f"{name}#{digest_}:{i}", piece)
    set_attr(name, {"codec": CODEC, "pieces": len(pieces), "digest": digest_})


def get_payload(attrs: dict, name: str):
    """The value :func:`put_payload` stored under ``name`` in ``attrs`` (a trial's or a study's user
    attributes); a JSON string as earlier versions stored records whole; None when absent."""
    header = attrs.get(name)
    if header is None:
        return None
    if isinstance(header, str):
        return json.loads(header)
    try:
        if header.get("codec") != CODEC:
            raise ValueError(f"unknown codec {header.get('codec')!r}")
        text = "".join(attrs[f"{name}#{header['digest']}:{i}"] for i in range(int(header["pieces"])))
        data = base64.b64decode(text, validate=True)
        if hashlib.sha256(data).hexdigest()[:16] != header["digest"]:
            raise ValueError("its pieces do not match their digest")
        return json.loads(zlib.decompress(data))
    except KeyError as exc:
        reason = f"piece {exc.args[0]!r} is missing"
    except (ValueError, TypeError, AttributeError, zlib.error) as exc:
        reason = str(exc) or type(exc).__name__
    raise BenchError(f"the study's attribute {name!r} cannot be read ({reason}); the storage was changed by hand or by "
                     "another program: restore it, or use a new --storage database or --out")


def trial_record(trial) -> dict | None:
    """The run record a finished trial carries (see :meth:`Worker._tell`)."""
    return get_payload(trial.user_attrs, "record")


def _storage_url(url: str) -> str:
    """``mysql://`` means the mysqlclient driver to SQLAlchemy; where only PyMySQL is installed (the
    driver the README names), use it."""
    import importlib.util

    scheme, sep, rest = url.partition("://")
    if sep and scheme == "mysql" and importlib.util.find_spec("MySQLdb") is None and importlib.util.find_spec("pymysql"):
        return f"mysql+pymysql://{rest}"
    return url


def make_storage(spec):
    import optuna

    if spec.storage is None:
        from optuna.storages import JournalStorage

        from bench.store import journal_backend

        return JournalStorage(journal_backend(Path(spec.out) / "study.journal"))
    try:
        return optuna.storages.RDBStorage(_storage_url(spec.storage), engine_kwargs={"pool_pre_ping": True})
    except Exception as exc:  # sqlalchemy raises many types; none should print the URL's password
        reason = redact_text(str(exc).splitlines()[0], spec.storage) if str(exc).strip() else type(exc).__name__
        raise BenchError(f"cannot open --storage {redact(spec.storage)} ({reason}); check the URL, the server and the driver (pip install 'psycopg[binary]' or pymysql)") from None


def study_name(session) -> str:
    spec = session.spec
    identity = {
        "suites": [{k: v for k, v in sr.identity.items() if k not in ("device", "precision")} for sr in session.suite_runs.values()],
        "cells": [c.to_dict() for c in spec.cells], "seeds": list(spec.seeds), "train": spec.train.to_dict(),
        "lrs": list(spec.lrs),
    }
    if len(spec.regimes) > 1:
        identity["regimes"] = list(spec.regimes)
    if spec.search:
        identity.update(objectives=list(spec.objectives), budget=spec.memory_budget_mib, sampler_seed=spec.sampler_seed,
                        pruner=spec.pruner)
        return f"search-{digest(identity)}"
    if spec.protocol == "race":
        identity["protocol"] = "race"
        return f"{spec.preset}-race-{digest(identity)}"
    return f"{spec.preset}-{digest(identity)}"


def make_sampler(spec):
    """TPE (multi-objective when several objectives; it honours ``trial.set_constraint``), seeded."""
    import optuna

    return optuna.samplers.TPESampler(seed=spec.sampler_seed, n_startup_trials=min(5, max(2, spec.trials // 4)))


def make_pruner(spec):
    """Median by default: with the few trials a benchmark affords (10-30), Hyperband's brackets each
    see too few trials to rank them, while the median rule prunes from the 4th trial on."""
    import optuna

    if spec.pruner == "none" or len(spec.objectives) > 1:
        return optuna.pruners.NopPruner()
    if spec.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, spec.train.steps // 4), max_resource=spec.train.steps)
    return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=max(1, spec.train.steps // 4) - 1)


@contextlib.contextmanager
def _local_lock(out: Path):
    """Serialises enqueueing and stale-trial recovery between processes on this machine."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".study.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _alive(trial) -> bool:
    worker = trial.user_attrs.get("worker") or {}
    if worker.get("host") == HOST and worker.get("pid"):
        try:
            os.kill(int(worker["pid"]), 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    beat = trial.user_attrs.get("heartbeat") or (trial.datetime_start.timestamp() if trial.datetime_start else 0)
    return time.time() - beat < GRACE_S


class Worker:
    def __init__(self, session, progress):
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.session, self.spec, self.progress = session, session.spec, progress
        self.storage = make_storage(self.spec)
        self.name = study_name(session)
        self.racing = self.spec.protocol == "race" and not self.spec.search
        # run id -> (suite run, cell, seed, settings, pause step); racing adds runs as its plan reveals them
        self.runs = {} if self.racing else \
            {sr.key(self.spec, cell, seed, train): (sr, cell, seed, train, None) for sr, cell, train, seed in session.runs()}
        self.plans: dict = {}  # suite -> its race's latest bench.race.Plan
        self.todo: set[str] = set()  # racing: the run ids its latest plan asks for
        self.seen_exits: set = set()
        self.moved = 0  # racing: training steps of legs finished since the latest plan
        self.planned: dict = {}  # suite -> (what its plan was made from, the plan): no replanning while nothing changed
        self.materialized: set[int] = set()  # finished trials whose records are in this output folder
        directions = [OBJECTIVES[o] for o in self.spec.objectives]
        if self.spec.worker:
            try:
                self.study = optuna.load_study(study_name=self.name, storage=self.storage)
            except KeyError:
                raise BenchError(f"--worker: no study {self.name} for this matrix in the storage; start it with the same command without --worker") from None
        else:
            self.study = optuna.create_study(study_name=self.name, storage=self.storage, directions=directions, load_if_exists=True,
                                             sampler=make_sampler(self.spec), pruner=make_pruner(self.spec))
        self.study.sampler, self.study.pruner = make_sampler(self.spec), make_pruner(self.spec)
        if [d.name.lower() for d in self.study.directions] != directions:
            raise BenchError(f"study {self.name} optimises {[d.name.lower() for d in self.study.directions]}, not {directions}; use the same --objectives or another --out")

    # ------------------------------------------------------------------ queue

    def _trials(self, states=None):
        return [t for t in self.study.get_trials(deepcopy=False, states=states) if "run" in t.user_attrs]

    def sync(self, initial: bool) -> None:
        """Fail trials of dead workers; enqueue each run that is neither done, waiting nor running.

        The first sync of a process also retries runs that failed (as a rerun of the command always
        did); later syncs only re-enqueue runs whose worker died.
        """
        from optuna.trial import TrialState

        with _local_lock(Path(self.spec.out)):
            for t in self._trials((TrialState.RUNNING,)):
                if not _alive(t):
                    with contextlib.suppress(Exception):  # another worker failed it first
                        self.storage.set_trial_user_attr(t._trial_id, "stale", True)
                        self.study.tell(t.number, state=TrialState.FAIL)
            trials = self._trials()
            busy = {t.user_attrs["run"] for t in trials if t.state in (TrialState.WAITING, TrialState.COMPLETE)
                    or (t.state == TrialState.RUNNING and _alive(t))}
            stale = {t.user_attrs["run"] for t in trials if t.state == TrialState.FAIL and t.user_attrs.get("stale")}
            if self.racing:
                self.plan_race(initial)
                done = {t.user_attrs["run"] for t in trials if t.state == TrialState.PRUNED}
                for key in sorted(self.todo - busy - done):
                    sr, cell, seed, train, _ = self.runs[key]
                    self.study.enqueue_trial(self._params(cell, train), user_attrs={"run": key, "suite": sr.name, "seed": seed})
                return
            if self.spec.search:  # a dead worker's trial is proposed again, once, with the same params
                everything = self.study.get_trials(deepcopy=False)
                retried = {t.user_attrs.get("retry_of") for t in everything}
                for t in trials:
                    if t.state == TrialState.FAIL and t.user_attrs.get("stale") and t.number not in retried:
                        self.study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
                return
            for key, (sr, cell, seed, train, _) in self.runs.items():
                if key not in busy and (initial or key in stale):
                    # a run whose record exists completes at once when pulled, carrying its record
                    self.study.enqueue_trial(self._params(cell, train), user_attrs={"run": key, "suite": sr.name, "seed": seed})

    def plan_race(self, initial: bool) -> None:
        """Ask bench/race.py what each suite needs next, from the records so far: record the rates
        that lost at the rung as raced out, and make the runs it asks for the queue's."""
        from bench import race

        self.materialize()
        store, spec = self.session.store, self.spec
        keys = self.session.keys()
        self.todo = set()
        self.moved = 0  # the new plans count every leg trained so far
        for sr in self.session.suite_runs.values():
            rates = {t.lr: t for t in sr.settings(spec)}
            made_from = (initial, _listing(store.records_dir / sr.name))
            if self.planned.get(sr.name, (None,))[0] == made_from:
                p = self.planned[sr.name][1]  # a poll while other workers train: the same records, the same plan
            else:
                records = [r for r in store.all(sr.name) if r.get("key") in keys[sr.name] and current(r)]
                if initial:  # a run that failed in an earlier process is tried again, once per process
                    records = [r for r in records if r.get("status") not in ("failed", "oom")]
                p = race.plan(records, list(spec.cells), sorted(rates), list(spec.seeds), spec.train.steps)
                self.planned[sr.name] = (made_from, p)
            for job in p.stops:
                key = sr.key(spec, job.cell, job.seed, rates[job.lr])
                record = store.get(sr.name, key)
                if record is not None and record.get("status") == "paused":
                    store.put({**record, "status": "raced",
                               "error": f"raced out at step {job.until}: its validation score there was not among the cell's best rates"})
                store.drop_paused(sr.name, key)
            for job in p.jobs:
                key = sr.key(spec, job.cell, job.seed, rates[job.lr])
                run_id = key if job.until is None else f"{key}@{job.until}"
                self.runs[run_id] = (sr, job.cell, job.seed, rates[job.lr], job.until)
                self.todo.add(run_id)
            for e in p.exits:
                if (sr.name, e.cell) not in self.seen_exits:
                    self.seen_exits.add((sr.name, e.cell))
                    self.progress.console.print(
                        f"[dim]{sr.name}: {e.cell.name} leaves the race after {e.seeds} seed(s): validation "
                        f"{e.val[0]:.3f} [{e.val[1]:.3f}, {e.val[2]:.3f}], best {e.best_cell.name} {e.best[0]:.3f} "
                        f"[{e.best[1]:.3f}, {e.best[2]:.3f}][/dim]")
            self.plans[sr.name] = p

    def _show(self) -> None:
        if not self.racing:
            self.progress.update(self.task, completed=self.finished())
            return
        spent = sum(p.spent_steps for p in self.plans.values()) + self.moved
        expected = sum(p.expected_steps for p in self.plans.values())
        exhaustive = sum(p.exhaustive_steps for p in self.plans.values())
        parts = [f"{suite} {'rates' if p.round == 0 else f'seed {p.round + 1}'}, {len(p.alive)} cells in"
                 for suite, p in self.plans.items()]
        self.progress.update(self.task, total=max(expected, spent, 1), completed=spent,
                             info=f"{'; '.join(parts)} ({spent / max(exhaustive, 1):.0%} of exhaustive)")

    def _variants(self) -> list[str]:
        return sorted({c.variant for c in self.spec.cells})

    def _params(self, cell, train) -> dict:
        params = {"targets": cell.targets, "rank": cell.rank, "vision": cell.vision, "lr": train.lr}
        if len(self._variants()) > 1:  # a factor only when it varies (a plain-LoRA study keeps its params)
            params["variant"] = cell.variant
        return params

    def _suggest(self, trial) -> tuple[str, int, str, str]:
        """The cell's factors as the trial's params (enqueued values in the matrix, the sampler's in a
        search); params feed importance and the dashboard. The LoRA variant is a categorical only when
        more than one is given."""
        spec = self.spec
        variants = self._variants()
        return (trial.suggest_categorical("targets", sorted({c.targets for c in spec.cells})),
                trial.suggest_categorical("rank", sorted({c.rank for c in spec.cells})),
                trial.suggest_categorical("vision", sorted({c.vision for c in spec.cells})),
                trial.suggest_categorical("variant", variants) if len(variants) > 1 else variants[0])

    # ------------------------------------------------------------------ loop

    def next_trial(self):
        """A claimed waiting trial, or None when nothing is waiting."""
        from optuna.trial import TrialState

        while self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            trial = self.study.ask()
            if "run" not in trial.user_attrs:  # another worker popped the last waiting trial first
                trial.set_user_attr("idle", True)
                self.study.tell(trial, state=TrialState.FAIL)
                continue
            trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid()})
            trial.set_user_attr("heartbeat", time.time())
            return trial
        return None

    def duplicate_of(self, trial) -> int | None:
        from optuna.trial import TrialState

        for t in self._trials((TrialState.COMPLETE, TrialState.RUNNING)):
            if t.number != trial.number and t.user_attrs["run"] == trial.user_attrs["run"]:
                if t.state == TrialState.COMPLETE or (_alive(t) and t.number < trial.number):
                    return t.number
        return None

    def execute(self, trial) -> None:
        from optuna.trial import TrialState

        self._suggest(trial)
        trial.suggest_categorical("lr", sorted(t.lr for t in self.spec.settings))
        key = trial.user_attrs["run"]
        other = self.duplicate_of(trial)
        if other is not None or key not in self.runs:  # key unknown: a race plan of an earlier process no longer needs it
            trial.set_user_attr("duplicate_of" if other is not None else "obsolete", other if other is not None else True)
            self.study.tell(trial, state=TrialState.FAIL)
            return
        sr, cell, seed, train, until = self.runs[key]
        leg = f" to step {until}" if until else ""
        self.progress.update(self.task, info=f"{sr.name}: {cell.name} lr {train.lr:g} seed {seed}{leg}")
        if self.racing:
            from bench.race import steps_spent

            before = steps_spent(self.session.store.get(sr.name, sr.key(self.spec, cell, seed, train)), self.spec.train.steps)
        record = self._run_with_heartbeat(trial, lambda: self.session.run(sr, cell, seed, self.progress, train=train, until=until))
        if self.racing:  # the race's progress moves with each leg, not only when the next plan is made
            self.moved += steps_spent(record, self.spec.train.steps) - before
        self._finish(trial, record)

    def _tell(self, trial, record: dict) -> None:
        """Attach the run's record to its trial and finish it: values when ok, PRUNED or FAIL otherwise."""
        from optuna.trial import TrialState

        trial.set_user_attr("executed", self.session.executed)  # False: its record already existed
        trial.set_user_attr("status", record["status"])
        trial.set_user_attr("steps_trained", record.get("steps_trained"))
        put_payload(trial.set_user_attr, "record", record)
        from bench.memory_figures import compared

        memory = compared([record]).mib(record) if record.get("peak_mem_mib") is not None else None  # comparable across runs
        if self.spec.memory_budget_mib is not None:
            peak = memory
            over = (peak - self.spec.memory_budget_mib) if peak is not None else (1.0 if record["status"] == "oom" else 0.0)
            trial.set_constraint("memory", over)
        if record["status"] == "ok":  # the score Optuna sees is validation's: every choice looks at validation only
            values = {"score": record["val_score"], "memory": memory, "throughput": record["train_samples_per_s"]}
            self.study.tell(trial, [values[o] for o in self.spec.objectives])
        elif record["status"] in ("pruned", "paused", "raced"):  # paused: a racing rung, done with this leg
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            error = record.get("error")
            trial.set_user_attr("error", error[:ERROR_CHARS] if isinstance(error, str) else error)
            self.study.tell(trial, state=TrialState.FAIL)

    def _finish(self, trial, record: dict) -> None:
        """:meth:`_tell`, unless another worker has already failed the trial: it took this one for dead (a
        heartbeat late past the grace period, a pid clash between containers) and enqueued the run again.
        The record was written before the tell, so it is kept, and the retry completes from it."""
        from optuna.exceptions import UpdateFinishedTrialError

        try:
            self._tell(trial, record)
        except UpdateFinishedTrialError:
            self.progress.console.print(
                f"[yellow]trial {trial.number} ({record['key']}) was failed by another worker that took this one for dead; "
                f"its {record['status']} record is kept, and the retry completes from it[/yellow]")

    def _heartbeat(self, trial, stop: threading.Event) -> None:
        while not stop.wait(HEARTBEAT_S):
            with contextlib.suppress(Exception):
                trial.set_user_attr("heartbeat", time.time())

    def finished(self) -> int:
        from optuna.trial import TrialState

        done = set()
        for t in self._trials((TrialState.COMPLETE, TrialState.FAIL)):
            if t.state == TrialState.COMPLETE or t.user_attrs.get("status"):
                done.add(t.user_attrs["run"])
        return len(done & set(self.runs))

    def loop(self) -> None:
        from optuna.trial import TrialState

        recorded = sum(self.session.store.is_done(sr.name, sr.key(self.spec, cell, seed, train))
                       for sr, cell, train, seed in self.session.runs())
        if recorded:
            self.progress.console.print(f"[dim]{recorded} of {self.spec.n_runs} runs already recorded in {self.spec.out}; skipping them[/dim]")
        self.sync(initial=True)
        for sr in self.session.suite_runs.values():
            self.base(sr)
        self.task = self.progress.add_task("race: training steps" if self.racing else "runs", total=len(self.runs) or None, info="")
        while True:
            self._show()
            trial = self.next_trial()
            if trial is not None:
                self.execute(trial)
                continue
            if not self._trials((TrialState.RUNNING,)):
                self.sync(initial=False)
                if not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                    break
                continue
            self.progress.update(self.task, info="waiting for other workers")
            time.sleep(POLL_S)
            self.sync(initial=False)
        self._show()
        self.materialize()

    def base(self, sr) -> None:
        """The base model's score, once per study: the first worker's record is everyone's."""
        attr = f"base:{sr.name}:{sr.base_key()}"
        with _local_lock(Path(self.spec.out)):
            shared = get_payload(self.study.user_attrs, attr)
            if shared is not None:
                _put_if_changed(self.session.store, shared)
                return
            record = self.session.base(sr, self.progress)
            put_payload(self.study.set_user_attr, attr, record)

    def keys(self) -> dict[str, set[str]]:
        """The record keys this study's tables cover: the matrix's runs, or the search's trials."""
        keys = self.session.keys()
        if self.spec.search:
            (sr,) = self.session.suite_runs.values()
            keys = {sr.name: {sr.base_key()} | {t.user_attrs["run"] for t in self._trials() if not t.user_attrs.get("stale")}}
        return keys

    # ------------------------------------------------------------------ search

    def propose(self, trial):
        """A cell and training settings from the sampler: the matrix's factors plus learning rate,
        LoRA alpha (as a multiple of the rank) and dropout, as continuous parameters."""
        import dataclasses

        from bench.space import Cell

        spec = self.spec
        targets, rank, vision, variant = self._suggest(trial)
        lr = trial.suggest_float("lr", spec.train.lr / 10, spec.train.lr * 10, log=True)
        alpha_ratio = trial.suggest_float("alpha_ratio", 0.5, 4.0, log=True)
        dropout = trial.suggest_float("lora_dropout", 0.0, 0.2)
        cell = Cell(targets, rank, round(alpha_ratio * rank, 3), vision, variant)
        return cell, dataclasses.replace(spec.train.at(lr), lora_dropout=dropout)

    def _pruning_hook(self, trial, sr):
        """Report each validation checkpoint's score; stop the run when the pruner says so."""
        import optuna

        if len(self.spec.objectives) > 1 or self.spec.pruner == "none":
            return None

        def hook(step: int, score: float) -> None:
            try:
                trial.report(score, step)
            except optuna.exceptions.UpdateFinishedTrialError:  # another worker failed it: nothing to prune, the run goes on
                return
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (validation {sr.suite.metric} {score:.3f})")

        return hook

    def search_trial(self, trial, sr) -> None:
        cell, train = self.propose(trial)
        seed = self.spec.seeds[0]
        key = sr.key(self.spec, cell, seed, train)
        trial.set_user_attr("run", key)
        self.progress.update(self.task, info=f"trial {trial.number}: {cell.name} lr {train.lr:.1e}")
        record = self._run_with_heartbeat(trial, lambda: self.session.run(sr, cell, seed, self.progress, train=train,
                                                                           on_val=self._pruning_hook(trial, sr),
                                                                           fractions=SEARCH_CURVE))
        self._finish(trial, record)

    def _counted(self) -> int:
        """Trials that count towards --trials: finished ones and live running ones."""
        from optuna.trial import TrialState

        n = 0
        for t in self.study.get_trials(deepcopy=False):
            if t.user_attrs.get("idle") or t.user_attrs.get("stale") or "run" not in t.user_attrs:
                continue
            if t.state != TrialState.RUNNING or _alive(t):
                n += 1
        return n

    def steps_used(self) -> int:
        """Training steps spent by the search: finished trials' steps, plus a full run per live trial."""
        from optuna.trial import TrialState

        used = 0
        for t in self._trials():
            if t.user_attrs.get("stale") or t.user_attrs.get("idle"):
                continue
            if t.state == TrialState.RUNNING:
                used += self.spec.train.steps if _alive(t) else 0
            elif t.user_attrs.get("executed") is not False:
                used += t.user_attrs.get("steps_trained") or 0
        return used

    def search_loop(self) -> None:
        from optuna.trial import TrialState

        (sr,) = self.session.suite_runs.values()
        self.base(sr)
        self.task = self.progress.add_task("trials", total=self.spec.trials, info="")
        while True:
            self.sync(initial=False)
            counted = self._counted()
            self.progress.update(self.task, completed=min(counted, self.spec.trials))
            over_budget = self.spec.step_budget is not None and self.steps_used() + self.spec.train.steps > self.spec.step_budget
            if (counted >= self.spec.trials or over_budget) and not self.study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
                if not any(_alive(t) for t in self._trials((TrialState.RUNNING,))):
                    break
                self.progress.update(self.task, info="waiting for other workers")
                time.sleep(POLL_S)
                continue
            trial = self.study.ask()
            trial.set_user_attr("worker", {"host": HOST, "pid": os.getpid()})
            trial.set_user_attr("heartbeat", time.time())
            self.search_trial(trial, sr)
        self.materialize()

    def _run_with_heartbeat(self, trial, fn):
        from optuna.trial import TrialState

        from bench.store import DiskFull

        stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(trial, stop), daemon=True)
        beat.start()
        try:
            return fn()
        except DiskFull:  # the run is unfinished, not failed: any worker (this one on its next start) retries it
            stop.set()
            with contextlib.suppress(Exception):  # the journal may be on the full disk too
                trial.set_user_attr("stale", True)
                self.study.tell(trial, state=TrialState.FAIL)
            raise
        finally:
            stop.set()
            beat.join()

    def materialize(self) -> None:
        """Write records that other machines' workers produced into this output folder."""
        from optuna.trial import TrialState

        store = self.session.store
        for sr in self.session.suite_runs.values():  # two machines may have scored the base at once
            shared = get_payload(self.study.user_attrs, f"base:{sr.name}:{sr.base_key()}")
            if shared is not None:
                _put_if_changed(store, shared)
        keys = self.session.keys()
        for t in self._trials((TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)):
            if "record" not in t.user_attrs or t.number in self.materialized:  # a finished trial's record is final
                continue
            self.materialized.add(t.number)
            record = trial_record(t)
            if not self.spec.search and record.get("key") not in keys.get(record.get("suite"), set()):
                continue
            mine = store.get(record["suite"], record["key"])
            if mine is None or _progress(record) > _progress(mine):
                store.put(record)


def _listing(folder: Path) -> tuple:
    """Names and modification times of a records folder: changes whenever a record is written."""
    try:
        return tuple(sorted((e.name, e.stat().st_mtime_ns) for e in os.scandir(folder)))
    except FileNotFoundError:
        return ()


def _progress(record: dict) -> int:
    """How far a record has got: a racing rung's leg, then a finished run (a rate stopped at the rung
    counts as finished: the race decided it)."""
    status = record.get("status")
    return 2 if status in ("ok", "diverged", "raced") else 1 if status == "paused" else 0


def _put_if_changed(store, record: dict) -> None:
    from bench.store import SCHEMA

    if store.get(record["suite"], record["key"]) != {"schema": SCHEMA, **record}:
        store.put(record)


def work(session, progress):
    """Run this process's share of the study; returns the worker (its study feeds the report)."""
    worker = Worker(session, progress)
    worker.search_loop() if session.spec.search else worker.loop()
    return worker
