"""Run a matrix: per suite, prepare data, score the base model, then train and evaluate each pending run.

Data flows one way: spec -> cells -> (base model loaded once) -> train -> evaluate -> record -> report.
Finished runs are found by their record and skipped, so a rerun (or a run after ``kill -9``) resumes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from bench import adapters, export, machine, report, stock_eval
from bench import suites as suite_registry
from bench.errors import BenchError
from bench.evaluate import evaluate, generation_budget
from bench.images import open_rgb
from bench.memory_model import train_state
from bench.models import get_adapter
from bench.models.hf import HFAdapter
from bench.parallel import Group
from bench.progress import console as log_console
from bench.progress import progress_bar
from bench.space import Cell, TrainSettings
from bench.spec import Spec
from bench.store import DONE, SCHEMA, DiskFull, Store, check_schemas, current, digest, disk_full, disk_full_reason
from bench.suite_data import content_digest, describe, read_split
from bench.train import Diverged, attach, detach, ranks_for_budget, resolve, train
from bench.vision_cache import VisionCache, encoder_is_frozen


def quiet_libraries() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    for name in ("lm-eval", "lm_eval", "datasets", "peft", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)


def check_out_folder(out: Path) -> None:
    """Refuse an unwritable --out before anything runs, without creating it yet."""
    probe = Path(out).resolve()
    if probe.exists() and not probe.is_dir():
        raise BenchError(f"output folder {out} exists and is a file; pass --out with a folder path")
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise BenchError(f"output folder {out} is not writable ({probe} denies writing); pass --out with a folder you can write to")


CURVE = (0.5, 0.75)  # fractions of training after which validation is scored (the curve and the plateau check)
PLATEAU = 0.01  # a run whose last quarter gained less than this on validation has plateaued


def checkpoint_steps(steps: int, fractions=CURVE) -> list[int]:
    return sorted({round(steps * f) for f in fractions if 0 < round(steps * f) < steps})


@dataclass
class SuiteRun:
    """One suite at one data regime: its own section of the report, its own store folder (``name``)."""

    suite: suite_registry.Suite
    data_dir: Path
    identity: dict  # everything about the suite's data and the model that decides a run's numbers
    source: str = ""
    train: TrainSettings | None = None  # the regime's reference settings (None: the spec's)
    regime: dict | None = None  # the factor levels this section stands for, e.g. {"train_items": 250}

    @property
    def name(self) -> str:
        return regime_label(self.suite.name, self.regime)

    @property
    def max_gen_toks(self) -> int:
        return self.identity["max_gen_toks"]

    def reference(self, spec: Spec) -> TrainSettings:
        return self.train or spec.train

    def settings(self, spec: Spec) -> list[TrainSettings]:
        """The training settings of each grid learning rate, at this regime."""
        return [self.reference(spec).at(lr) for lr in spec.lrs] if spec.lrs else [self.reference(spec)]

    def base_key(self) -> str:
        return f"base-{digest(self.identity)}"

    def key(self, spec: Spec, cell: Cell, seed: int, train: TrainSettings | None = None) -> str:
        payload = {**self.identity, "train": (train or self.reference(spec)).to_dict(), "cell": cell.to_dict(), "seed": seed}
        return f"{cell.name}-s{seed}-{digest(payload)}"


REGIME_TAGS = {"train_items": "n", "resolution": "res"}


def regime_label(suite: str, regime: dict | None) -> str:
    """``docvqa`` or, for one level of a data-regime factor, ``docvqa@n250`` (train items) /
    ``docvqa@res802816`` (image resolution knob); the store folder and report section of that level."""
    if not regime:
        return suite
    return f"{suite}@" + "-".join(f"{REGIME_TAGS[k]}{v}" for k, v in regime.items() if v is not None)


@dataclass
class Control:
    """A control suite every tuned run is also scored on (forgetting): the same items for every cell."""

    name: str  # the suite's name, or suite=folder for real data
    suite: suite_registry.Suite
    data_dir: Path
    max_gen_toks: int

    @property
    def data(self) -> str:
        return content_digest(self.data_dir)


CONTROL_ITEMS = 500  # control items per suite (real data: the first of its test split), or --test-items if fewer


def encode_split(adapter, suite, data_dir: Path, split: str):
    examples = []
    for row in read_split(data_dir, split):
        if adapter.keeps_paths:
            image = row.image
        else:
            image = open_rgb(row.image)
        examples.append(adapter.example(suite.prompt(row.question), image, row.answers[0]))
    return examples


class Session:
    """What the runs of one process share: the base model (loaded once), the accelerator, the prepared
    suites and the results store. :meth:`run` executes one run, or returns its record if one exists."""

    def __init__(self, spec: Spec, console: Console):
        from datetime import timedelta

        from accelerate import Accelerator
        from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs

        self.spec = spec
        quiet_libraries()
        if spec.device.type == "cpu":
            torch.set_flush_denormal(True)  # denormals stalled CPU steps for seconds in measurements
        self.mixed = "bf16" if spec.device.type == "cuda" and torch.cuda.is_bf16_supported() else "no"
        # under accelerate launch: followers wait while the leader evaluates (hours on a big suite), and a
        # module without a gradient in some cell (a merger a mode skips) must not stop DDP
        self.accelerator = Accelerator(cpu=spec.device.type == "cpu", mixed_precision=self.mixed, kwargs_handlers=[
            DistributedDataParallelKwargs(find_unused_parameters=True), InitProcessGroupKwargs(timeout=timedelta(hours=6))])
        self.group = Group(self.accelerator)
        self.console = console if self.group.leader else Console(quiet=True)
        if self.group.parallel:
            odd = sorted({t.batch_size for t in spec.settings if t.batch_size % self.group.size})
            if odd:
                raise BenchError(f"--batch-size {odd[0]} does not split over {self.group.size} processes; "
                                 f"use a multiple of {self.group.size} (it is the global batch)")
        device = self.accelerator.device if spec.device.type == "cuda" else spec.device  # each process its own GPU
        self.adapter = get_adapter(spec.model, spec.trust_remote_code)
        self.adapter.load(device)
        if spec.param_budget is not None:
            self.spec = spec = with_budget_ranks(spec, self.adapter)
        self.resolutions = {cell: resolve(self.adapter.model, self.adapter.roles, cell) for cell in spec.cells}
        _print_plan(self.console, spec, self.adapter, self.resolutions, self.group.size)
        self.store = Store(spec.out)
        self.context = {"machine": machine.describe(self.accelerator.device), "versions": machine.versions(),
                        "mixed_precision": self.mixed}
        self.suite_runs: dict[str, SuiteRun] = {}
        self._examples: tuple[str, list] | None = None  # one suite's training examples at a time
        self.vision_cache = VisionCache()  # for those examples
        self.controls: list[Control] = []
        self._control_base: dict[str, dict] = {}  # control name -> the base model's score on it (one per process)

    def prepare(self, progress: Progress) -> None:
        prep = progress.add_task("prepare data", total=len(self.spec.suites), info="")
        for name in self.spec.suites:
            suite = suite_registry.get(name)
            progress.update(prep, info=name)
            data_dir = suite.prepare(self.spec.train.train_items, self.spec.train.test_items, self.spec.data,
                                     self.spec.limit, progress.console, val_items=self.spec.train.val_items)
            identity = {"suite": suite.name, "data": content_digest(data_dir), "model": self.adapter.fingerprint(),
                        "device": self.accelerator.device.type, "precision": self.mixed,
                        "max_gen_toks": generation_budget(self.adapter, suite, data_dir)}
            if self.group.parallel:  # the same update, rounded differently: its own runs
                identity["processes"] = self.group.size
            for regime in self.spec.regimes:
                train = dataclasses.replace(self.spec.train, **regime) if regime else None
                resolution = (train or self.spec.train).resolution
                own = {**identity, "resolution": resolution} if resolution is not None else identity  # the base model's too
                source = describe(data_dir)
                if regime.get("train_items"):
                    source += f"; this section trains on the first {regime['train_items']} training items"
                sr = SuiteRun(suite, data_dir, own, source, train, regime or None)
                self.suite_runs[sr.name] = sr
            progress.advance(prep)
        progress.remove_task(prep)
        self.controls = self._prepare_controls(progress)

    def _prepare_controls(self, progress: Progress) -> list[Control]:
        names = self.spec.control if self.spec.control is not None else self.adapter.control_suites
        items = min(CONTROL_ITEMS, self.spec.train.test_items or CONTROL_ITEMS)  # a quick matrix, a quick control
        controls = []
        for name in names:
            suite_name, _, folder = name.partition("=")
            suite = suite_registry.get(suite_name)
            if folder:
                data_dir = suite.prepare(data=Path(folder).expanduser(), limit=items, console=progress.console)
            else:  # a few training items only size the answer budget; the test split is the control
                data_dir = suite.prepare(train_items=200, test_items=items, val_items=0)
            controls.append(Control(name, suite, data_dir, generation_budget(self.adapter, suite, data_dir)))
        return controls

    def controls_for(self, sr: SuiteRun) -> list[Control]:
        """The controls of a suite's runs: a suite is no control of itself."""
        return [c for c in self.controls if c.name != sr.suite.name]

    def runs(self) -> list[tuple[SuiteRun, Cell, TrainSettings, int]]:
        """Every run of the matrix (suite x regime x cell x learning rate x seed), in a stable order."""
        return [(sr, cell, settings, seed) for sr in self.suite_runs.values() for cell in self.spec.cells
                for settings in sr.settings(self.spec) for seed in self.spec.seeds]

    def keys(self) -> dict[str, set[str]]:
        keys = {sr.name: {sr.base_key()} for sr in self.suite_runs.values()}
        for sr, cell, settings, seed in self.runs():
            keys[sr.name].add(sr.key(self.spec, cell, seed, settings))
        return keys

    def base(self, sr: SuiteRun, progress: Progress) -> dict:
        self.adapter.set_resolution(sr.reference(self.spec).resolution)
        record = current(self.store.get(sr.name, sr.base_key()))
        if record is None or record.get("status") != "ok":
            progress.console.print(f"[dim]{sr.name}: scoring the base model[/dim]")
            record = _evaluate_base(self.spec, self.adapter, sr, self.accelerator, progress, self.context)
            self.store.put(record)
        controls = self.controls_for(sr)
        known = record.get("control") or {}
        if any((known.get(c.name) or {}).get("data") != c.data for c in controls):
            record = {**record, "control": {**known, **_control_scores(self.spec, self.adapter, self.adapter.model, controls,
                                                                      self.accelerator, progress, "base model", self._control_base)}}
            self.store.put(record)
        return record

    def run(self, sr: SuiteRun, cell: Cell, seed: int, progress: Progress, train: TrainSettings | None = None,
            on_val=None, fractions=CURVE, until: int | None = None) -> dict:
        """``train`` overrides the matrix's reference settings (a grid rate, a search trial);
        ``on_val(step, score)`` sees each validation checkpoint and may raise ``optuna.TrialPruned`` to
        stop the run early (recorded as ``pruned``). ``until``: a racing rung: train to that step and
        pause (state under ``<out>/.paused/``); a later call without ``until`` goes on from there."""
        self.executed = False
        key = sr.key(self.spec, cell, seed, train)
        record = current(self.store.get(sr.name, key))
        if record is not None and record.get("status") in DONE:
            return record
        if record is not None and until is not None and record.get("status") in ("paused", "raced") \
                and record.get("steps_trained") == until:
            return record
        paused = None
        if until is None and record is not None and record.get("status") == "paused":
            state = self.store.load_paused(sr.name, key)
            paused = (record, state) if state is not None else None  # no state (another machine paused it): from the start
        self.executed = True
        if self.group.parallel:  # the followers train this run with us
            self.group.share(("run", sr.name, cell, seed, train, fractions, until, paused[1] if paused else None))
        record = self._execute(sr, cell, seed, progress, train, on_val, fractions, until, paused,
                               on_pause=lambda state: self.store.save_paused(sr.name, key, state))
        self.store.put(record)
        if record["status"] != "paused":
            self.store.drop_paused(sr.name, key)
        if record["status"] not in ("ok", "paused"):
            progress.console.print(f"[yellow]{cell.name} seed {seed}: {record['status']}: {record['error']}[/yellow]")
        return record

    def _execute(self, sr, cell, seed, progress, train, on_val, fractions, until, paused, on_pause=None) -> dict:
        resolution = sr.reference(self.spec).resolution
        self.adapter.set_resolution(resolution)  # training, validation, test and controls all at the run's
        if self._examples is None or self._examples[0] != (sr.suite.name, resolution):  # sizes of a suite share them
            self._examples = None  # free the previous suite's examples first
            self.vision_cache.clear()
            self._examples = ((sr.suite.name, resolution), encode_split(self.adapter, sr.suite, sr.data_dir, "train"))
        if cell not in self.resolutions:
            self.resolutions[cell] = resolve(self.adapter.model, self.adapter.roles, cell)
        examples = self._examples[1]
        if sr.regime and sr.regime.get("train_items"):  # nested: a smaller level's items are the first of a larger's
            examples = examples[:sr.regime["train_items"]]
        return _one_run(self.spec, self.adapter, sr, cell, seed, self.resolutions[cell], examples,
                        self.accelerator, progress, self.context, on_val, train or sr.reference(self.spec),
                        None if self.group.parallel else self.vision_cache, fractions, until, paused, on_pause=on_pause,
                        controls=self.controls_for(sr))

    def follow(self, progress: Progress) -> None:
        """A follower's life: train each run the leader announces (its slice of every batch) until it stops."""
        while True:
            message = self.group.share()
            if message[0] == "stop":
                return
            _, suite, cell, seed, train, fractions, until, state = message
            self._execute(self.suite_runs[suite], cell, seed, progress, train, None, fractions, until,
                          ({}, state) if state is not None else None)

    def stop_followers(self) -> None:
        if self.group.parallel and self.group.leader:
            self.group.share(("stop",))

    def records(self, keys: dict[str, set[str]] | None = None) -> list[dict]:
        keys = keys or self.keys()
        records = [r for r in self.store.all() if r.get("key") in keys.get(r.get("suite"), set()) and current(r)]
        for r in records:  # records written before data_source existed
            r.setdefault("data_source", self.suite_runs[r["suite"]].source)
        return records


def run(spec: Spec, console: Console | None = None) -> Path:
    """Run the matrix through an Optuna study (bench/study.py): this process is one of its workers."""
    from bench import study

    console = console or log_console()
    check_out_folder(spec.out)
    schemas = check_schemas(Path(spec.out) / "records")  # a folder of records this version cannot read is refused here
    older = sum(n for schema, n in schemas.items() if schema < SCHEMA)
    if older:
        console.print(f"[dim]{spec.out} holds {older} record(s) of an earlier record schema (before the validation split): "
                      f"kept, but not resumed or tabled (a run of this matrix with the same key is made again and replaces its record)[/dim]")
    if spec.storage:
        study.make_storage(spec)  # an unreachable database fails here, before the model loads or --out exists
    session = Session(spec, console)
    group = session.group
    with progress_bar(session.console) as progress:
        if not group.leader:  # the leader prepares the data first; the others then find it prepared
            group.accelerator.wait_for_everyone()
        session.prepare(progress)
        if group.leader:
            group.accelerator.wait_for_everyone() if group.parallel else None
        else:
            session.follow(progress)
            return spec.out
        if spec.report_only:  # the tables from the records there are, nothing trained (a stopped matrix, a new metric)
            session.stop_followers()
            records = session.records()
            if not any(r.get("kind") == "cell" for r in records):
                raise BenchError(f"--report-only: {spec.out} holds no finished run of this matrix; run it without --report-only first")
            report.write_all(records, session.spec, console, None)
            return spec.out
        try:
            session.store.check_writable()
            session.store.clean_temporaries()
            worker = study.work(session, progress)
        except OSError as exc:  # a full disk under the study's journal (Optuna's own writes)
            reason = disk_full_reason(exc)
            if reason:
                raise disk_full(Path(exc.filename).parent if exc.filename else spec.out, None, reason) from None
            raise
        finally:
            session.stop_followers()
    report.write_all(session.records(worker.keys()), session.spec, console, worker.study)
    return spec.out


def with_budget_ranks(spec: Spec, adapter) -> Spec:
    """``--param-budget``: each target set at the rank whose LLM LoRA parameter count is nearest the budget."""
    import dataclasses

    from bench.space import alpha_for

    ranks = ranks_for_budget(adapter.model, adapter.roles, sorted({c.targets for c in spec.cells}), spec.param_budget)
    cells = tuple(dict.fromkeys(Cell(c.targets, ranks[c.targets], alpha_for(ranks[c.targets], spec.alpha_rule), c.vision, c.variant)
                                for c in spec.cells))
    return dataclasses.replace(spec, cells=cells)


def _print_plan(console, spec: Spec, adapter, resolutions, processes: int = 1) -> None:
    rates = ", ".join(f"{t.lr:g}" for t in spec.settings)
    where = f"{processes} data-parallel processes ({spec.device.type}), batch split evenly" if processes > 1 else f"device {spec.device}"
    console.print(
        f"[bold]{'up to ' if spec.protocol == 'race' and not spec.search else ''}{spec.n_runs} runs[/bold] = {len(spec.suites)} suite(s) x "
        f"{f'{len(spec.regimes)} data regimes x ' if len(spec.regimes) > 1 else ''}{len(spec.cells)} cells x {len(spec.settings)} "
        f"learning rate(s) ({rates}) x {len(spec.seeds)} seed(s); model {adapter.display_name()}; "
        f"{spec.train.steps} steps x batch {spec.train.batch_size} per run; {where}"
    )
    if spec.protocol == "race" and not spec.search and spec.n_runs > len(spec.suites) * len(spec.cells):
        from bench import race

        exhaustive = spec.n_runs * spec.train.steps
        console.print(f"[dim]  racing (--protocol race): every rate to step {race.rung_step(spec.train.steps)}, the better "
                      f"{race.survivors_at_rung(len(spec.settings))} on to the end; {race.MIN_SEEDS} seeds per cell, more "
                      f"only while a cell could be the best; the exhaustive protocol would train {exhaustive:,} steps[/dim]")
    if spec.param_budget is not None:
        ranks = ", ".join(f"{t} r{r}" for t, r in dict.fromkeys((c.targets, c.rank) for c in spec.cells))
        console.print(f"[dim]  --param-budget {spec.param_budget:,}: {ranks}[/dim]")
    variants = list(dict.fromkeys(c.variant for c in spec.cells))
    if variants != ["lora"]:
        from bench.space import VARIANTS

        console.print("[dim]  LoRA variants: " + "; ".join(f"{v} ({VARIANTS[v]})" for v in variants) + "[/dim]")
    seen = set()
    for cell, res in resolutions.items():
        key = (cell.targets, cell.vision)
        if key not in seen:
            seen.add(key)
            console.print(f"[dim]  {cell.targets:>4} / {cell.vision:<15} {res.summary()}[/dim]")


def _base_record(spec: Spec, sr: SuiteRun, context: dict, key: str, kind: str) -> dict:
    return {
        "key": key,
        "kind": kind,
        "suite": sr.name,
        **({"task": sr.suite.name, "regime": sr.regime} if sr.regime else {}),
        "metric": sr.suite.metric,
        "model": spec.model,
        "data": str(sr.data_dir.name),
        "data_source": sr.source,
        **context,
    }


def _evaluate_base(spec, adapter, sr: SuiteRun, accelerator, progress, context) -> dict:
    record = _base_record(spec, sr, context, sr.base_key(), "base")
    val = _evaluate(spec, adapter, adapter.model, sr, accelerator, progress, "base model (validation)", "val")
    result = _evaluate(spec, adapter, adapter.model, sr, accelerator, progress, "base model")
    total = sum(p.numel() for p in adapter.model.parameters())
    record.update(
        status="ok", error=None, cell=None, seed=None, score=result.score, val_score=val.score, trainable_params=0,
        total_params=total, eval_items_per_s=result.items_per_s, eval_s=result.seconds, items=result.items,
        val_items=val.items, finished_at=_now(),
    )
    return record


def _evaluate(spec, adapter, model, sr: SuiteRun | Control, accelerator, progress, label: str, split: str = "test"):
    task = progress.add_task(f"  eval {label}", total=None, info="")

    def advance(n: int, total: int) -> None:
        progress.update(task, total=total, advance=n)

    try:
        return evaluate(adapter, model, sr.suite, sr.data_dir, accelerator.device, batch_size=spec.eval_batch_size,
                        progress=advance, split=split, max_gen_toks=sr.max_gen_toks)
    finally:
        progress.remove_task(task)


def _control_scores(spec, adapter, model, controls: list[Control], accelerator, progress, label: str,
                    cache: dict | None = None) -> dict:
    """``{control: {"score", "data", "items"}}``: the model scored on each control suite's test items."""
    out = {}
    for c in controls:
        if cache is not None and (cache.get(c.name) or {}).get("data") == c.data:
            out[c.name] = cache[c.name]
            continue
        result = _evaluate(spec, adapter, model, c, accelerator, progress, f"{label} on control {c.name}")
        out[c.name] = {"score": result.score, "data": c.data,  # per-item scores only: the bootstrap's input
                       "items": [{"id": i["id"], "score": i["score"]} for i in result.items]}
        if cache is not None:
            cache[c.name] = out[c.name]
    return out


# --early-stopping: validation denser early, where small data over-fits first (and at the racing rung, 0.5)
EARLY_STOPPING_CURVE = (0.1, 0.2, 0.3, 0.5, 0.75)


class _BestCheckpoint:
    """Validation-based stopping: the trainable weights at the best validation score so far (CPU copies
    of the trainable tensors only), put back before test is scored."""

    def __init__(self, saved: dict | None = None):
        saved = saved or {}
        self.step, self.score, self.weights = saved.get("step"), saved.get("score"), saved.get("weights")

    def offer(self, step: int, score: float, model) -> None:
        if self.score is None or score > self.score:
            self.step, self.score = step, score
            self.weights = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}

    def restore(self, model) -> None:
        params = dict(model.named_parameters())
        with torch.no_grad():
            for name, value in self.weights.items():
                params[name].copy_(value.to(params[name].device))

    def to_state(self) -> dict:
        return {"step": self.step, "score": self.score, "weights": self.weights}


def _one_run(spec: Spec, adapter, sr: SuiteRun, cell: Cell, seed: int, resolution, examples, accelerator, progress, context,
             on_val=None, settings: TrainSettings | None = None, vision_cache: VisionCache | None = None,
             fractions=CURVE, until: int | None = None, paused: tuple[dict, dict] | None = None, on_pause=None,
             controls: list[Control] = ()) -> dict:
    """Train one run, score validation at the curve's checkpoints and at the end, then score test (and
    each control suite, for forgetting). Test is scored once, after training, and nothing downstream
    chooses on it. With early stopping the weights scored are those of the best validation checkpoint.

    ``until``: pause after that step (a racing rung, bench/race.py) and record the run as ``paused``,
    handing the training state to ``on_pause``; ``paused``: (the paused record, its state) to go on from."""
    import optuna

    settings = settings or spec.train
    group = Group(accelerator)
    from accelerate.utils import set_seed

    record = _base_record(spec, sr, context, sr.key(spec, cell, seed, settings), "cell")
    record.update(cell=cell.to_dict(), seed=seed, train=settings.to_dict(), max_gen_toks=sr.max_gen_toks,
                  resolution={"lora_modules": len(resolution.lora), "lora_examples": resolution.lora[:4], "full": resolution.full})
    total = sum(p.numel() for p in adapter.model.parameters())
    state_bytes = {k: v for k, v in train_state(adapter.model, resolution, cell).items() if k.endswith("_bytes")}
    set_seed(seed)
    wall = time.perf_counter()
    peft_model = attach(adapter.model, resolution, cell, settings.lora_dropout, seed)
    label = f"{cell.name} lr {settings.lr:g} s{seed}"
    steps_task = progress.add_task(f"  train {label}", total=settings.steps, info="")
    prior, state = paused or ({}, None)
    if settings.early_stopping and fractions == CURVE:
        fractions = EARLY_STOPPING_CURVE
    best = _BestCheckpoint((state or {}).get("best")) if settings.early_stopping else None
    curve: list[list] = [list(c) for c in prior.get("val_curve") or []]
    wall -= prior.get("wall_s") or 0.0  # a resumed run's wall time counts both legs
    try:
        trained = [0]

        def step_done(step: int, loss: float) -> None:
            trained[0] = step
            progress.update(steps_task, completed=step, info=f"loss {loss:.3f}")

        def checkpoint(step: int, _model) -> None:
            if not group.leader:  # the leader evaluates; a follower learns whether the run goes on
                if (pruned := group.share()) is not None:
                    raise optuna.TrialPruned(pruned)
                return
            score = _evaluate(spec, adapter, peft_model, sr, accelerator, progress, f"{label} step {step} (validation)", "val").score
            curve.append([step, score])
            if best is not None:
                best.offer(step, score, peft_model)
            pruned = None
            try:
                if on_val:
                    on_val(step, score)
            except optuna.TrialPruned as exc:
                pruned = str(exc) or "pruned"
            group.share(pruned)
            if pruned is not None:
                raise optuna.TrialPruned(pruned)

        frozen = encoder_is_frozen(adapter.roles.vision, resolution.lora, resolution.full)
        checkpoints = sorted({*checkpoint_steps(settings.steps, fractions), *([until] if until else [])})
        result = train(adapter, peft_model, examples, settings, seed, accelerator, on_step=step_done,
                       vision_cache=vision_cache if frozen else None, checkpoints=checkpoints,
                       on_checkpoint=checkpoint, pause_at=until, resume=state)
        progress.remove_task(steps_task)
        if result.state is not None:
            if on_pause:
                on_pause({**result.state, "best": best.to_state()} if best is not None else result.state)
            record.update(status="paused", error=None, score=None, val_score=None, val_curve=curve, steps_trained=until,
                          train_s=result.train_s, losses=result.losses, trainable_params=result.trainable_params,
                          total_params=total, **memory_fields(result, state_bytes))
            record["wall_s"] = time.perf_counter() - wall
            record["finished_at"] = _now()
            return record
        if not group.leader:  # trained its share; the leader scores and records the run
            record.update(status="followed", error=None)
            return record
        val = _evaluate(spec, adapter, peft_model, sr, accelerator, progress, f"{label} (validation)", "val")
        curve.append([settings.steps, val.score])
        if best is not None:
            best.offer(settings.steps, val.score, peft_model)
            record["stopped_at"] = best.step
            if best.step != settings.steps:  # the best checkpoint was earlier: its weights are the run's
                best.restore(peft_model)
                val = _evaluate(spec, adapter, peft_model, sr, accelerator, progress, f"{label} step {best.step} (validation)", "val")
        evaluation = _evaluate(spec, adapter, peft_model, sr, accelerator, progress, label)
        if controls:
            record["control"] = _control_scores(spec, adapter, peft_model, controls, accelerator, progress, label)
        late = [s for step, s in curve if step == round(settings.steps * (0.8 if best is not None else CURVE[-1]))]
        record.update(
            status="ok", error=None, score=evaluation.score, val_score=val.score, val_curve=curve,
            plateaued=bool(val.score - late[0] < PLATEAU) if late else None,
            trainable_params=result.trainable_params, total_params=total, **memory_fields(result, state_bytes),
            train_samples_per_s=result.samples_per_s, train_tokens_per_s=result.tokens_per_s, train_s=result.train_s,
            eval_items_per_s=evaluation.items_per_s, eval_s=evaluation.seconds, losses=result.losses, steps_trained=settings.steps,
            items=evaluation.items, val_items=val.items,
        )
        stock = isinstance(adapter, HFAdapter)  # what lm-eval's hf-multimodal and from_pretrained load

        def command(folder: Path, target: Path) -> None:
            stock_eval.write_script(folder, adapter, target, sr.suite, sr.data_dir, sr.max_gen_toks)

        saved = adapters.keep(peft_model, record, spec.out, spec.save_adapters, add=command if stock else None)
        if saved is not None:
            record["adapter"] = str(saved.relative_to(spec.out))
            if spec.export == "merged":
                record["merged"] = str(export.write(adapter, saved, spec.out, record["suite"]).relative_to(spec.out))
    except optuna.TrialPruned as exc:
        record.update(status="pruned", error=str(exc) or "pruned", score=None, val_score=None, val_curve=curve,
                      steps_trained=trained[0])
    except Diverged as exc:
        record.update(status="diverged", error=str(exc), score=None, val_score=None)
    except torch.cuda.OutOfMemoryError as exc:
        record.update(status="oom", error=str(exc).splitlines()[0], score=None, val_score=None)
    except DiskFull:  # not the run's failure: the worker stops, and the run is retried on the next start
        raise
    except Exception as exc:  # recorded, and the matrix goes on
        reason = disk_full_reason(exc)
        if reason:
            raise disk_full(Path(exc.filename).parent if getattr(exc, "filename", None) else spec.out, None, reason) from None
        record.update(status="failed", error=f"{type(exc).__name__}: {exc}".splitlines()[0], score=None, val_score=None,
                      traceback=traceback.format_exc())
    finally:
        with contextlib.suppress(Exception):
            progress.remove_task(steps_task)
        adapter.model = detach(peft_model)
        if accelerator.device.type == "cuda":
            torch.cuda.empty_cache()
    record["wall_s"] = time.perf_counter() - wall
    record["finished_at"] = _now()
    return record


def memory_fields(result, state_bytes: dict) -> dict:
    """A run's memory as recorded: the device's figures (bench.measure: CUDA peak allocated; CPU process
    peak, and growth over the process baseline) and the memory model's exact weight / gradient / AdamW
    bytes of the cell (bench.memory_model.train_state). bench.memory_figures reads them back."""
    return {"peak_mem_mib": result.peak_mem_mib, "peak_reserved_mib": result.peak_reserved_mib,
            "peak_delta_mib": result.peak_delta_mib, "memory_kind": result.memory_kind,
            "memory_baseline_mib": result.memory_baseline_mib, "memory_released": result.memory_released,
            "state_bytes": dict(state_bytes)}


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
