"""What to tune for the user's own data: target set, rank and vision policy, with the reasons.

The evidence is the benchmark itself, read with the protocol of bench.verdict: each cell at its
best learning rate on validation, every choice on validation, test only reported. Each benchmarked
suite contributes how far it is from the model's pretraining on two axes (its images in the vision
encoder's features, its questions and answers in the LLM's token embeddings: bench.similarity) and
how much each vision policy gained over ``frozen`` there on validation (paired on target set, rank
and alpha, averaged). bench.calibration turns those into a predicted gain at the user's distances; a
policy that costs more memory must gain at least ``MIN_GAIN`` over every cheaper one to be chosen.
Within the chosen policy, the configuration is the one closest to each suite's best, weighted by the
suites' shares of the prediction, subject to ``--memory-budget``, ``--min-throughput`` and
``--max-forgetting``. Memory is compared on a figure of each run alone
(bench.memory_figures.compared): CUDA peak allocated on a GPU; on CPU the memory model's exact
weights plus the run's growth over the process baseline. How much to trust the rule is measured,
not asserted: leave-one-suite-out (and -family-out) regret against every constant rule and against
copying the nearest suite's best (bench.calibration.validate). A suite asked about is never part of
its own evidence.

    python run_bench.py --recommend --data ~/my-images --memory-budget 16GiB --results results
"""

from __future__ import annotations

import io
import itertools
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from bench import memory_figures
from bench.calibration import (MIN_GAIN, NEAREST as NEAREST_RULE, POLICY_ORDER, Calibration, calibrate, point,
                               regret_table, validate)
from bench.costs import regime_of, task_of
from bench.errors import BenchError
from bench.similarity import Comparison

CONFIG = ["targets", "rank", "alpha", "vision", "variant"]  # a cell; its learning rate is each suite's own choice
RATES = ["lr", "lr_connector", "lr_vision", "lora_dropout"]


@dataclass
class Evidence:
    """One benchmarked suite: its cells (each at its chosen rate), the gains of each policy, its distance."""

    suite: str
    data: str
    metric: str
    base: float | None  # test score of the untuned model
    configs: pd.DataFrame  # one row per cell: CONFIG + RATES + val, score (test), seeds, mem_mib, train_samples_per_s
    gains: dict[str, float] = field(default_factory=dict)  # policy -> mean paired validation gain over frozen
    acceptable: set[str] = field(default_factory=set)  # policies with a cell in the confidence set of the best (validation)
    distance: Comparison | None = None  # of the images from the pretraining reference (vision features)
    task_distance: Comparison | None = None  # of the questions and answers from pretraining's (LLM token embeddings)
    memory: memory_figures.Figure = memory_figures.Figure(memory_figures.RECORDED)  # what mem_mib is (the same for every suite)

    @property
    def best(self) -> pd.Series:
        """The validation-chosen best cell."""
        return self.configs.sort_values("val", ascending=False, kind="stable").iloc[0]


# ------------------------------------------------------------------------------------------ records


def find_records(folders: list[Path]) -> list[dict]:
    """Every record under ``<folder>/**/records/<suite>/``, each run once (folders may overlap)."""
    from bench.store import check_schemas, read_record, record_files

    seen, records = set(), []
    for folder in folders:
        if not folder.exists():
            raise BenchError(f"--results {folder} does not exist; pass a folder written by run_bench.py")
        for records_dir in sorted(p for p in folder.rglob("records") if p.is_dir()):
            check_schemas(records_dir, "--results")  # records of a newer schema (or none) are refused
            for path in record_files(records_dir):
                record = read_record(path)
                if record is None or "kind" not in record:
                    continue
                ident = (record.get("suite"), record.get("key"), record.get("data"))
                if ident not in seen:
                    seen.add(ident)
                    records.append(record)
    return records


def build_evidence(records: list[dict], model: str) -> tuple[list[Evidence], list[str]]:
    """Group ok records by suite. Per suite the largest benchmark (data + training budget) is used."""
    notes = []
    models = sorted({r["model"] for r in records})
    if model not in models:
        raise BenchError(f"the records found were measured on {', '.join(models)}, not on --model {model}; "
                         f"pass --model {models[0]} or --results folders measured on {model}")
    if len(models) > 1:
        notes.append(f"ignored records of other models: {', '.join(m for m in models if m != model)}")
    old = [r for r in records if r["model"] == model and r.get("kind") == "cell" and r.get("status") == "ok" and "val_score" not in r]
    if old:
        notes.append(f"ignored {len(old)} records made before the validation split existed (nothing could be chosen on them); "
                     "rerun those benchmarks")
    units: dict[tuple, list[dict]] = {}
    for r in records:
        if r["model"] == model and r.get("status") == "ok" and "val_score" in r:
            units.setdefault((task_of(r), r["data"]), []).append(r)
    chosen = []
    for suite in sorted({s for s, _ in units}):
        candidates = sorted(((k, v) for k, v in units.items() if k[0] == suite), key=lambda kv: -sum(r["kind"] == "cell" for r in kv[1]))
        (_, data), runs = candidates[0]
        for (_, other), dropped in candidates[1:]:
            notes.append(f"{suite}: used the benchmark on {data}; ignored {len(dropped)} records on {other}")
        sections = {r["suite"] for r in runs}
        if len(sections) > 1:  # levels of --train-items: the full training set (or the largest) is the evidence
            section = max(sections, key=lambda s: (s == suite, max(int(regime_of(r).get("train_items") or 0)
                                                                  for r in runs if r["suite"] == s)))
            dropped = [r for r in runs if r["suite"] != section and r["kind"] == "cell"]
            notes.append(f"{suite}: used {section}; ignored {len(dropped)} runs of other training-set sizes")
            runs = [r for r in runs if r["suite"] == section]
        cells = [r for r in runs if r["kind"] == "cell"]
        budgets = {(r["train"]["steps"], r["train"]["batch_size"]) for r in cells}
        if len(budgets) > 1:  # matrix and search runs of different lengths: keep the commonest budget
            common = max(budgets, key=lambda b: sum((r["train"]["steps"], r["train"]["batch_size"]) == b for r in cells))
            notes.append(f"{suite}: kept runs of {common[0]} steps x batch {common[1]}; ignored "
                         f"{sum((r['train']['steps'], r['train']['batch_size']) != common for r in cells)} of other lengths")
            cells = [r for r in cells if (r["train"]["steps"], r["train"]["batch_size"]) == common]
        if not cells:
            continue
        base = next((r for r in runs if r["kind"] == "base"), None)
        chosen.append((suite, data, cells, base))
    memory = memory_figures.compared([r for _, _, cells, _ in chosen for r in cells])  # one figure across suites
    if memory.note:
        notes.append(memory.note)
    evidence = [_evidence(suite, data, cells, base, memory) for suite, data, cells, base in chosen]
    if not evidence:
        raise BenchError("no finished benchmark runs in the records found; run a benchmark first, e.g. python run_bench.py --suite docvqa")
    return evidence, notes


def _evidence(suite: str, data: str, cells: list[dict], base: dict | None, memory: memory_figures.Figure) -> Evidence:
    from bench.verdict import judge

    v = judge(cells, n_boot=1000)[cells[0]["suite"]]
    controls = {name: entry["score"] for name, entry in ((base or {}).get("control") or {}).items()}
    rows = []
    for c in v.cells:
        _, targets, rank, alpha, vision, variant = c.key
        rows.append({"targets": targets, "rank": rank, "alpha": alpha, "vision": vision, "variant": variant,
                     **dict(zip(RATES, c.setting)), "val": c.val, "score": c.test, "seeds": c.seeds,
                     "mem_mib": _mean(memory.mib(r) for r in c.runs), "train_samples_per_s": c.mean("train_samples_per_s"),
                     "forgetting": _forgetting(c.runs, controls)})
    ev = Evidence(suite, data, cells[0]["metric"], (base or {}).get("score"), pd.DataFrame(rows), memory=memory)
    ev.gains = _gains(ev.configs)
    ev.acceptable = {c.key[4] for c in v.cells if c.key in v.best_set}
    return ev


def _mean(values) -> float:
    values = [x for x in values if x is not None]
    return float(np.mean(values)) if values else math.nan


def _forgetting(runs: list[dict], base_controls: dict[str, float]) -> float:
    """Mean over seeds of the worst control's loss (base model's control score minus the run's); NaN
    when the runs were not scored on a control (bench.costs)."""
    worst = []
    for r in runs:
        lost = [base_controls[name] - entry["score"] for name, entry in (r.get("control") or {}).items() if name in base_controls]
        worst.append(max(lost) if lost else None)
    return math.nan if any(x is None for x in worst) else _mean(worst)


def _gains(configs: pd.DataFrame) -> dict[str, float]:
    """Per policy: mean over cells matched on target set, rank and alpha of val(policy) - val(frozen)."""
    match = [c for c in CONFIG if c != "vision"]
    frozen = {tuple(row[c] for c in match): row.val for _, row in configs[configs.vision == "frozen"].iterrows()}
    diffs: dict[str, list[float]] = {}
    for _, row in configs[configs.vision != "frozen"].iterrows():
        partner = frozen.get(tuple(row[c] for c in match))
        if partner is not None:
            diffs.setdefault(row.vision, []).append(row.val - partner)
    gains = {policy: float(np.mean(d)) for policy, d in diffs.items() if d}
    if frozen:
        gains["frozen"] = 0.0
    return gains


# ------------------------------------------------------------------------------------------- choice


@dataclass
class Choice:
    config: pd.Series  # CONFIG + RATES (from the most weighted suite) + mem_mib, measured_mib, train_samples_per_s
    per_suite: dict[str, tuple[float, float | None, float]]  # suite -> (test score, base, weight)


def choose(evidence: list[Evidence], calibration: Calibration | None, at, nearest: str,
           budget_mib: float | None, min_throughput: float | None, memory: dict | None = None,
           max_forgetting: float | None = None) -> Choice | None:
    """The recommended configuration under the limits, or None when nothing measured fits.
    ``at``: the user's data's (visual, task) distance from pretraining; ``memory`` (configuration -> MiB)
    replaces the measured peaks: estimates on the user's model."""
    table = _feasible(evidence, budget_mib, min_throughput, memory, max_forgetting)
    if table.empty:
        return None
    if calibration is not None and at is not None:
        policy = calibration.decide(at, set(table.vision))
        weights = calibration.weights(at)
    else:  # no pretraining reference: the nearest suite's evidence decides
        weights = {nearest: 1.0}
        ev = next(e for e in evidence if e.suite == nearest)
        allowed = [p for p in POLICY_ORDER if p in ev.acceptable and p in set(table.vision)] or list(table.vision)
        policy = min(allowed, key=lambda p: table[table.vision == p].mem_mib.mean())
    rows = table[table.vision == policy].copy()
    best = {ev.suite: ev.best.val for ev in evidence}
    rows["fit"] = [  # on validation: closeness to each suite's best, weighted by the suites at the user's distance
        _weighted({s: (r.val_by_suite[s] - best[s], w) for s, w in weights.items() if s in r.val_by_suite})
        for r in rows.itertuples()
    ]
    rows = rows.dropna(subset=["fit"])
    if rows.empty:  # the chosen policy was never run on the weighted suites: use all suites equally
        rows = table[table.vision == policy].copy()
        rows["fit"] = [_weighted({s: (v - best[s], 1.0) for s, v in r.val_by_suite.items()}) for r in rows.itertuples()]
    top = rows.fit.max()
    pick = rows[rows.fit >= top - MIN_GAIN].sort_values(["mem_mib", "fit"], ascending=[True, False]).iloc[0].copy()
    rates_from = max(pick.rates_by_suite, key=lambda s: (weights.get(s, 0.0), s == nearest))
    for name_, value in zip(RATES, pick.rates_by_suite[rates_from]):
        pick[name_] = value
    pick["rates_from"] = rates_from
    bases = {ev.suite: ev.base for ev in evidence}
    per_suite = {s: (v, bases[s], weights.get(s, 0.0)) for s, v in pick.test_by_suite.items()}
    return Choice(pick, per_suite)


def _weighted(values: dict[str, tuple[float, float]]) -> float:
    total = sum(w for _, w in values.values())
    return sum(v * w for v, w in values.values()) / total if total > 0 else math.nan


def _feasible(evidence: list[Evidence], budget_mib: float | None, min_throughput: float | None,
              memory: dict | None = None, max_forgetting: float | None = None) -> pd.DataFrame:
    """Every measured configuration (across suites) with its worst memory (the evidence's figure) and mean
    throughput (memory from ``memory`` instead, when given: estimates on another model)."""
    frames = [ev.configs.assign(suite=ev.suite) for ev in evidence]
    allc = pd.concat(frames)
    if "forgetting" not in allc:  # evidence built without control scores
        allc["forgetting"] = math.nan
    grouped = allc.groupby(CONFIG, sort=False)
    table = grouped.agg(mem_mib=("mem_mib", "max"), train_samples_per_s=("train_samples_per_s", "mean"),
                        forgetting=("forgetting", lambda x: x.max(skipna=False))).reset_index()
    table["val_by_suite"] = [dict(zip(g.suite, g.val)) for _, g in grouped]
    table["test_by_suite"] = [dict(zip(g.suite, g.score)) for _, g in grouped]
    table["rates_by_suite"] = [{s: tuple(row[c] for c in RATES) for s, (_, row) in zip(g.suite, g.iterrows())} for _, g in grouped]
    table["measured_mib"] = table.mem_mib
    if memory is not None:
        table["mem_mib"] = [memory[_key(r)].total_bytes / 2**20 for _, r in table.iterrows()]
    if budget_mib is not None:
        table = table[table.mem_mib <= budget_mib]
    if min_throughput is not None:
        table = table[table.train_samples_per_s >= min_throughput]
    if max_forgetting is not None:  # unmeasured forgetting (NaN) is not known to be within the limit
        table = table[table.forgetting <= max_forgetting]
    return table


def _key(config) -> tuple:
    return tuple(config[c].item() if hasattr(config[c], "item") else config[c] for c in CONFIG)


@dataclass
class MemoryTarget:
    """Where the memory model is applied: the user's model at the user's batch and sequence length."""

    model: str
    batch_size: int
    seq_len: int
    image_tokens: int
    bytes_per_param: int  # 2: bf16, as the harness loads transformers families on CUDA

    def describe(self) -> str:
        return (f"{self.model} at batch {self.batch_size} x {self.seq_len} tokens ({self.image_tokens} vision-encoder tokens "
                f"per image), {'bf16' if self.bytes_per_param == 2 else f'{8 * self.bytes_per_param}-bit'} weights")


def estimate_memory(target: MemoryTarget, skeleton: torch.nn.Module, roles, configs: pd.DataFrame) -> dict:
    """Peak training memory of every configuration on the user's model, from bench.memory_model."""
    from bench.memory_model import estimate_on
    from bench.space import Cell

    out = {}
    for _, row in configs.iterrows():
        cell = Cell(row["targets"], int(row["rank"]), float(row["alpha"]), row["vision"], row["variant"])
        out[_key(row)] = estimate_on(skeleton, roles, cell, target.batch_size, target.seq_len, target.image_tokens,
                                     target.bytes_per_param)
    return out


def _mib(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.1f}" if abs(x) < 100 else f"{x:.0f}"


def _gib(nbytes: float) -> str:
    return f"{nbytes / 2**30:.2f} GiB"


def name(config) -> str:
    text = f"{config['targets']} r{config['rank']} (alpha {config['alpha']:g}) + {config['vision']}"
    if config.get("variant", "lora") != "lora":
        text += f", {config['variant']}"
    if "lr" in config and not pd.isna(config["lr"]):
        text += f", lr {config['lr']:.2g}"
        if config["vision"] != "frozen":
            text += f" (connector {config['lr_connector']:.2g}, vision encoder {config['lr_vision']:.2g})"
        text += f", dropout {config['lora_dropout']:g}"
    return text


# ---------------------------------------------------------------------------------------------- CLI


def run(args) -> int:
    from rich.console import Console

    from bench import features, html_report
    from bench.models import get_adapter
    from bench.calibration import AXES
    from bench.similarity import compare, compare_samples, mmd2
    from bench.spec import parse_memory, resolve_device
    from bench.store import atomic_write_bytes, atomic_write_text

    console = Console(stderr=True)
    if not args.data:
        raise BenchError("--recommend needs --data: a folder of your images (or a suite name)")
    if args.samples < 10:
        raise BenchError(f"--samples must be at least 10 (got {args.samples}); 500 is a good default")
    budget = parse_memory(args.memory_budget) if args.memory_budget else None
    if args.min_throughput is not None and args.min_throughput <= 0:
        raise BenchError(f"--min-throughput must be positive (got {args.min_throughput})")
    folders = [Path(f) for f in (args.results or ["results"])]
    records = find_records(folders)
    if not records:
        raise BenchError(f"no benchmark records under {', '.join(map(str, folders))}; run a benchmark first "
                         "(python run_bench.py --suite docvqa) or pass --results DIR")
    evidence, notes = build_evidence(records, args.model)
    data_set = features.resolve(args.data, args.samples)
    own = [ev for ev in evidence if ev.suite == data_set.name]
    if own:  # the answer must not be read off the data's own benchmark
        evidence = [ev for ev in evidence if ev.suite != data_set.name]
        if not evidence:
            raise BenchError(f"the only benchmark in the records is of {data_set.name} itself, and a recommendation never "
                             "uses the data's own results; benchmark other suites too (e.g. python run_bench.py --suite shapes,docvqa)")
        notes.append(f"{data_set.name}'s own benchmark ({sum(len(e.configs) for e in own)} cells) is left out of its "
                     "recommendation, so the advice is what the other suites predict")
    memory = target = None
    if args.estimate_for:
        if args.seq_len is not None and args.seq_len < 1 or args.batch_size is not None and args.batch_size < 1:
            raise BenchError("--batch-size and --seq-len must be positive")
        other = get_adapter(args.estimate_for, args.trust_remote_code)
        skeleton = other.skeleton()
        tokens = other.image_tokens()
        size = other.weight_dtype("cuda").itemsize  # the model is meant to train on a GPU
        target = MemoryTarget(args.estimate_for, args.batch_size or 8, args.seq_len or 1024, tokens or 1024, size)
        if tokens is None:
            notes.append(f"{args.estimate_for} has no fixed image resolution in its config: the estimate assumes 1024 "
                         "vision-encoder tokens per image")
        memory = estimate_memory(target, skeleton, other.roles, _feasible(evidence, None, None))
    kind = "estimated peak" if memory is not None else f"measured memory ({evidence[0].memory.short})"
    if budget is not None and _feasible(evidence, budget, None, memory).empty:
        smallest = _feasible(evidence, None, None, memory).sort_values("mem_mib").iloc[0]
        raise BenchError(f"no benchmarked configuration fits --memory-budget {args.memory_budget} (the smallest {kind} is "
                         f"{smallest.mem_mib:.0f} MiB: {name(smallest)}); raise the budget or benchmark smaller cells")
    max_forgetting = getattr(args, "max_forgetting", None)
    max_forgetting = None if max_forgetting is None else max_forgetting / 100  # points -> score units
    if max_forgetting is not None:
        measured = _feasible(evidence, None, None, memory).dropna(subset=["forgetting"])
        if measured.empty:
            raise BenchError("--max-forgetting needs runs scored on a control suite, and these records have none; benchmark "
                             "with controls (the embedded model's default, or --control SUITE) and pass those --results")
        if _feasible(evidence, budget, args.min_throughput, memory, max_forgetting).empty:
            least = measured.sort_values("forgetting").iloc[0]
            raise BenchError(f"no benchmarked configuration within the limits forgets at most {args.max_forgetting:g} points "
                             f"(the least is {100 * least.forgetting:.1f}: {name(least)}); raise --max-forgetting")
    if args.min_throughput is not None and _feasible(evidence, budget, args.min_throughput, memory).empty:
        raise BenchError(f"no benchmarked configuration within the limits trains at >= {args.min_throughput:g} samples/s; "
                         "lower --min-throughput or raise --memory-budget")
    out = Path(args.out) if args.out else Path("results") / "runs" / "recommend"

    adapter = get_adapter(args.model, args.trust_remote_code)
    adapter.load(resolve_device(args.device))
    reference = features.reference_images(adapter, args.reference, args.samples)
    data_feats = features.embed(adapter, data_set)
    suite_feats, suite_text = {}, {}
    with console.status("embedding suites") as status:
        for ev in evidence:
            status.update(f"embedding {ev.suite}")
            suite_feats[ev.suite] = features.embed(adapter, features.suite_images(ev.suite, args.samples, prepared=ev.data))
            texts = features.suite_texts(ev.suite, args.samples, prepared=ev.data)
            suite_text[ev.suite] = features.embed_texts(adapter, texts)
    to_suite = {ev.suite: compare(data_feats, suite_feats[ev.suite]) for ev in evidence}
    nearest = min(to_suite, key=lambda s: to_suite[s].mmd2)
    calibration = at = data_distance = task_distance = None
    rows = pd.DataFrame()
    if reference is not None:
        ref_feats = features.embed(adapter, reference)
        reference_text = features.reference_texts(adapter, args.samples)
        ref_text = features.embed_texts(adapter, reference_text) if reference_text is not None else None
        for ev in evidence:
            ev.distance = compare(suite_feats[ev.suite], ref_feats)
            ev.task_distance = compare_samples(suite_text[ev.suite], ref_text) if ref_text is not None else None
        data_distance = compare(data_feats, ref_feats)
        data_text = features.data_texts(args.data, args.samples)
        if ref_text is None:
            notes.append(f"{adapter.display_name()} has no sample of its pretraining questions: the task axis is off, the "
                         "decision uses the visual distance only")
        elif data_text is None:
            notes.append(f"{args.data} holds images without questions: its task distance is unknown, so the decision uses "
                         "the visual distance only; pass a dataset with questions (or a suite) to use both axes")
        else:
            task_distance = compare_samples(features.embed_texts(adapter, data_text), ref_text)
        axes = AXES if task_distance is not None else ("visual",)
        calibration = calibrate(evidence, axes)
        if memory is not None:  # the policies' costs on the user's model decide which is cheaper, not the tiny model's
            estimated = _feasible(evidence, None, None, memory)
            calibration.cost = {p: (float(g.mem_mib.mean()), calibration.cost[p][1])
                                for p, g in estimated.groupby("vision") if p in calibration.cost}
        at = point(data_distance, task_distance)
        between = {}
        for a, b in itertools.combinations(suite_feats, 2):  # symmetric: one MMD^2 per pair of suites
            between[a, b] = between[b, a] = mmd2(suite_feats[a]["final"], suite_feats[b]["final"])
        families = {ev.suite: _family(ev.suite) for ev in evidence}
        rows = validate(evidence, between, families, axes, calibration.cost if memory is not None else None)
    else:
        notes.append(f"{adapter.display_name()} has no pretraining sample and no --reference was given: the nearest "
                     "suite decides; pass --reference DIR for a calibrated decision")
    choice = choose(evidence, calibration, at, nearest, budget, args.min_throughput, memory, max_forgetting)
    runner_up = None
    if choice is not None:
        runner_up = choose(evidence, calibration, at, nearest, choice.config.mem_mib * 0.99, args.min_throughput, memory,
                           max_forgetting)
    table = regret_table(rows) if len(rows) else pd.DataFrame()
    text = markdown(args, adapter, data_set, (data_distance, task_distance), to_suite, nearest, evidence, calibration,
                    choice, runner_up, (rows, table), budget, notes, target, memory)
    png = calibration_png(calibration, at, data_set.name) if calibration is not None else None
    summary = {"data": args.data, "recommended": _plain(choice.config) if choice else None,
               "memory": (f"estimated on {target.describe()}" if target else "measured on the benchmark model"),
               "memory_figure": evidence[0].memory.kind, "memory_figure_label": evidence[0].memory.label,
               "estimated_bytes": memory[_key(choice.config)].to_dict() if memory and choice else None,
               "runner_up": _plain(runner_up.config) if runner_up else None,
               "mmd2_from_pretraining": data_distance.mmd2 if data_distance else None,
               "task_mmd2_from_pretraining": task_distance.mmd2 if task_distance else None,
               "axes": calibration.axes() if calibration else [], "nearest_suite": nearest,
               "leave_one_suite_out": _summary(table, "leave-one-suite-out"),
               "leave_one_family_out": _summary(table, "leave-one-family-out")}
    out.mkdir(parents=True, exist_ok=True)
    if png is not None:
        atomic_write_bytes(out / "calibration.png", png)
    atomic_write_text(out / "recommendation.json", json.dumps(summary, indent=1) + "\n")
    atomic_write_text(out / "recommendation.md", text)
    html_report.write_next_to(out / "recommendation.md", text)
    if len(rows):
        atomic_write_text(out / "validation.csv", rows.to_csv(index=False, float_format="%.5g"))
    console.print(text.split("\n## Calibration")[0])
    console.print(f"wrote {out / 'recommendation.md'}")
    return 0


def _family(suite: str) -> str:
    from bench import suites

    known = suites.available()
    return known[suite].family if suite in known else suite


def _summary(table: pd.DataFrame, scheme: str) -> dict | None:
    """Mean regret of each rule under ``scheme`` (for recommendation.json)."""
    if table.empty or scheme not in set(table.scheme):
        return None
    part = table[table.scheme == scheme]
    return {r.rule: {"mean_regret": float(r["mean regret"]), "in_best_set": r["in best set"]} for _, r in part.iterrows()}


def _plain(config: pd.Series) -> dict:
    out = dict(zip(CONFIG, _key(config)))
    out.update({r: float(config[r]) for r in RATES if r in config})
    out["memory_mib"] = float(config.mem_mib)  # estimated on --estimate-for's model, else measured_mib
    out["measured_mib"] = float(config.measured_mib)
    out["train_samples_per_s"] = float(config.train_samples_per_s)
    return out


def markdown(args, adapter, data_set, distances, to_suite, nearest, evidence, calibration, choice, runner_up, validation,
             budget, notes, target: MemoryTarget | None = None, memory: dict | None = None) -> str:
    data_distance, task_distance = distances
    rows, table = validation
    at = None if data_distance is None else point(data_distance, task_distance)
    limits = []
    if target is not None:
        limits.append(f"--estimate-for {target.model} --batch-size {target.batch_size} --seq-len {target.seq_len}")
    if budget is not None:
        limits.append(f"--memory-budget {args.memory_budget}")
    if args.min_throughput is not None:
        limits.append(f"--min-throughput {args.min_throughput:g}")
    if getattr(args, "max_forgetting", None) is not None:
        limits.append(f"--max-forgetting {args.max_forgetting:g} points (on the control suites)")
    lines = [f"# Recommendation for {data_set.name}", "",
             f"Command: `python run_bench.py --recommend --data {args.data}"
             + "".join(f" {x}" for x in limits) + (f" --results {' '.join(args.results)}" if args.results else "") + "`", "",
             f"Model: {adapter.display_name()}. Data: {data_set.origin}.", ""]
    if choice is None:
        lines += ["**Nothing measured fits the limits.**", ""]
    else:
        c = choice.config
        lines += [f"**Recommended: {name(c)}**", ""]
        if "rates_from" in c:
            lines.append(f"- learning rates: the cell's best on {c['rates_from']}'s validation split (the most weighted suite)")
        if memory is not None:
            e = memory[_key(c)]
            lines.append(f"- estimated peak training memory on {target.describe()}: {_gib(e.total_bytes)} (weights "
                         f"{_gib(e.weight_bytes)}, gradients {_gib(e.grad_bytes)}, AdamW {_gib(e.optimizer_bytes)}, activations "
                         f"{_gib(e.activation_bytes)}; {e.trainable_params:,} trainable parameters). Parameter terms are exact; "
                         "activations are a model (bench/memory_model.py), not a measurement")
        figure = evidence[0].memory
        lines.append(f"- measured on the benchmark model: memory {_mib(c.measured_mib)} MiB ({figure.short}; the most over the "
                     f"suites), {c.train_samples_per_s:.0f} train samples/s")
        if not math.isnan(c.forgetting):
            lines.append(f"- forgetting: it lost {100 * c.forgetting:.1f} points on the control suites at most over the "
                         "benchmarked suites (the base model's control score minus the run's; bench/costs.py)")
        for suite, (score, base, w) in sorted(choice.per_suite.items(), key=lambda kv: -kv[1][2]):
            if w > 0:
                lines.append(f"- on {suite} (weight {w:.2f} at your distance) it scored {score:.3f} on test"
                             + (f" (base model {base:.3f})" if base is not None else ""))
        weighted = [(s, v) for s, v in choice.per_suite.items() if v[2] > 0.01]
        if weighted:
            lo, hi = min(v[0] for _, v in weighted), max(v[0] for _, v in weighted)
            lines.append(f"- expected score: {lo:.3f}-{hi:.3f} on the suites that carry the prediction (absolute levels differ by task)")
        if calibration is not None:
            g, r = calibration.gain(c.vision, at), calibration.residual
            lines.append(f"- predicted gain of {c.vision} over frozen: {g:+.3f} [{g - 1.96 * r:+.3f}, {g + 1.96 * r:+.3f}] "
                         f"(95%, from the calibration's leave-one-suite-out error {r:.3f})")
            if not calibration.distinguishable(at):
                lines.append("- **No policy is distinguishable here**: the predicted gains of every policy lie within twice "
                             "the calibration's error of each other, so the cheapest acceptable policy is the advice, not a "
                             "measured winner")
        if runner_up is not None:
            r = runner_up.config
            short = evidence[0].memory.short
            mem = _gib(r.mem_mib * 2**20) + " estimated" if memory is not None else f"{_mib(r.mem_mib)} MiB ({short})"
            lines.append(f"- runner-up for a smaller budget: {name(r)}: {mem}, {r.train_samples_per_s:.0f} samples/s")
        else:
            lines.append("- runner-up for a smaller budget: none benchmarked below this memory")
        lines.append("")
    lines += ["## Why", ""]
    if data_distance is not None and calibration is not None:
        policy = choice.config.vision if choice is not None else None
        lines.append(f"- Your images are at visual MMD^2 {data_distance.mmd2:.4f} [{data_distance.low:.4f}, {data_distance.high:.4f}] "
                     f"from the model's pretraining (permutation p = {data_distance.p_value:.3f}: "
                     f"{'indistinguishable from' if data_distance.same else 'different from'} pretraining; classifier AUC {data_distance.auc:.2f}).")
        if task_distance is not None:
            lines.append(f"- Your questions and answers are at task MMD^2 {task_distance.mmd2:.4f} [{task_distance.low:.4f}, "
                         f"{task_distance.high:.4f}] from pretraining's (p = {task_distance.p_value:.3f}).")
        lines.append(f"- Axes that mattered: {_axes_text(calibration)}.")
        for p in calibration.policies():
            if p == "frozen":
                continue
            t = calibration.threshold(p, at[1])
            where = "never pays on the measured suites" if t is None else f"pays from visual MMD^2 >= {t:.3f} at your task distance"
            above = "" if t is None else (" (you are above it)" if at[0] >= t else " (you are below it)")
            lines.append(f"- {p}: predicted gain over frozen {calibration.gain(p, at):+.3f}; {where}{above}.")
        if policy:
            lines.append(f"- Chosen policy {policy}: the cheapest ({evidence[0].memory.short}) whose predicted gain is within "
                         f"{MIN_GAIN:g} of the best.")
    if to_suite:
        n = to_suite[nearest]
        ev = next(e for e in evidence if e.suite == nearest)
        lines.append(f"- Nearest benchmarked suite: {nearest} (MMD^2 {n.mmd2:.4f}); its best measured configuration was "
                     f"{name(ev.best)} (validation {ev.metric} {ev.best.val:.3f}, test {ev.best.score:.3f}); policies in its "
                     "confidence set of the best there: "
                     f"{', '.join(p for p in POLICY_ORDER if p in ev.acceptable)}.")
    lines += [f"- Note: {n}" for n in notes] + [""]
    if calibration is not None:
        lines += ["## Calibration", "", "Gain of each vision policy over frozen on validation (cells matched on target set, rank "
                  "and alpha, each at its best rate; mean), per suite, with the suite's distances from pretraining (visual: "
                  "images in the vision encoder's features; task: questions and answers in the LLM's token embeddings; "
                  "symmetric MMD^2) and its *weight*, its share of the prediction at your data; `*` = the policy has a cell in the suite's 95% confidence set of the best (validation, seeds and items resampled); "
                  "best = test score of the validation-chosen best cell. Plot below: calibration.png.", ""]
        policies = calibration.policies()
        shown = []
        for ev in sorted((e for e in evidence if e.distance is not None), key=lambda e: e.distance.mmd2):
            row = {"suite": ev.suite, "visual MMD^2": f"{ev.distance.mmd2:.4f}",
                   "task MMD^2": "" if ev.task_distance is None else f"{ev.task_distance.mmd2:.4f}",
                   "weight": f"{calibration.weights(at).get(ev.suite, 0):.2f}" if at is not None else "",
                   "base": "" if ev.base is None else f"{ev.base:.3f}", "best": f"{ev.best.score:.3f}"}
            for p in policies:
                row[p] = "" if p not in ev.gains else f"{ev.gains[p]:+.3f}" + ("*" if p in ev.acceptable else "")
            shown.append(row)
        lines += [pd.DataFrame(shown).to_markdown(index=False, disable_numparse=True), "",
                  "![gain over frozen against distance from pretraining](calibration.png)", ""]
        figure = evidence[0].memory
        cost = pd.DataFrame([{"policy": p, f"{figure.header}, mean": _mib(calibration.cost[p][0]),
                              "train samples/s (mean)": f"{calibration.cost[p][1]:.0f}",
                              "pays from visual MMD^2": "" if p == "frozen" else
                              (lambda t: "never" if t is None else f"{t:.3f}")(calibration.threshold(p, at[1] if at else 0.0))}
                             for p in policies if p in calibration.cost])
        lines += [f"Measured cost per policy (all configurations, all suites); memory: {figure.label}:", "",
                  cost.to_markdown(index=False), ""]
    if len(table):
        lines += ["## Is the rule worth having? Leave-one-out regret", "",
                  "Each suite (then each family of graded suites) is hidden in turn; the recommender is calibrated on the "
                  "rest (bandwidths included) and decides the hidden suite's policy, as does every constant rule and "
                  f"\"{NEAREST_RULE}\" (the policy of the validation-best cell of the suite nearest in images). Regret = test "
                  "score of the hidden suite's validation-best cell minus that of the decided policy's validation-best cell "
                  "(0 = as good as the best measured; below 0 when the decided policy's cell did better on test than the "
                  "validation-chosen best). Intervals: 95% bootstrap over the held-out suites; the recommender "
                  "minus each rule is paired on the same suites. The recommender may give up to "
                  f"{MIN_GAIN:g} of score for less memory by design; *mean MiB* shows what each rule costs.", ""]
        for scheme, part in table.groupby("scheme", sort=False):
            shown = part.drop(columns=["scheme"]).copy()
            shown["mean regret"] = shown["mean regret"].map("{:.4f}".format)
            shown["mean MiB"] = shown["mean MiB"].map(_mib)
            lines += [f"**{scheme}** ({int(part.suites.iloc[0])} suites):", "", shown.fillna("").to_markdown(index=False), ""]
        lines += [_regret_verdict(table), ""]
        per = rows[rows.rule == "recommender"][["scheme", "suite", "decided", "correct", "regret", "axes"]]
        lines += ["Per held-out suite (the recommender):", "", per.to_markdown(index=False, floatfmt=".4f"), ""]
    return "\n".join(lines)


def _axes_text(calibration: Calibration) -> str:
    used = calibration.axes()
    h = dict(zip(("visual", "task"), calibration.bandwidth))
    if len(calibration.points) < 3:
        return (f"neither: {len(calibration.points)} calibration suite(s) are too few to tell by leave-one-suite-out "
                "whether a distance predicts the gains, so every suite counts alike (benchmark more suites)")
    if not used:
        return ("neither: no bandwidth predicted held-out suites better than the mean over all suites, so the decision "
                "is the same constant rule everywhere")
    return " and ".join(f"{a} (bandwidth {h[a]:.3g})" for a in used) + (
        "; an axis left out predicted held-out suites no better (leave-one-suite-out error "
        f"{calibration.residual:.3f})" if len(used) < 2 else f" (leave-one-suite-out error {calibration.residual:.3f})")


def _regret_verdict(table: pd.DataFrame) -> str:
    """One sentence: does the recommender beat every constant rule under leave-one-suite-out?"""
    part = table[(table.scheme == "leave-one-suite-out") & table.rule.str.startswith("always ")]
    mine = table[(table.scheme == "leave-one-suite-out") & (table.rule == "recommender")]["mean regret"]
    if part.empty or mine.empty:
        return ""
    least = part.sort_values("mean regret").iloc[0]
    below = (part["mean regret"] > mine.iloc[0]).all()
    shown = (part.verdict == "recommender lower").all()
    if shown:
        return "**The recommender's regret is below every constant rule's, each shown by its interval.**"
    if below:
        return (f"The recommender's mean regret ({mine.iloc[0]:.4f}) is below every constant rule's (the best of them, "
                f"{least.rule}, {least['mean regret']:.4f}), but not shown for every rule: intervals over this few suites include 0.")
    return (f"**The recommender does not beat every constant rule**: {least.rule} has mean regret {least['mean regret']:.4f} "
            f"against the recommender's {mine.iloc[0]:.4f}.")


def calibration_png(calibration: Calibration, at, label: str) -> bytes:
    """Gain over frozen against each axis in use: the suites as points, the calibration's prediction
    as lines (the other axis held at the user's value)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    at = (at[0], at[1] if at[1] is not None else 0.0) if at is not None else (0.0, 0.0)
    axes_shown = [0] + ([1] if "task" in calibration.axes() or any(x[1] for _, x, _ in calibration.points) else [])
    fig, panels = plt.subplots(1, len(axes_shown), figsize=(6.5 * len(axes_shown), 4.2), dpi=110, squeeze=False)
    for panel, axis in zip(panels[0], axes_shown):
        far = max(max(x[axis] for _, x, _ in calibration.points), at[axis]) * 1.1 or 1.0
        grid = np.linspace(0, far, 200)
        for i, policy in enumerate(calibration.policies()):
            color = f"C{i}"
            line = [calibration.gain(policy, (x, at[1]) if axis == 0 else (at[0], x)) for x in grid]
            panel.plot(grid, line, color=color, lw=1, alpha=0.6)
            pts = [(x[axis], g[policy]) for _, x, g in calibration.points if policy in g]
            panel.scatter([p[0] for p in pts], [p[1] for p in pts], color=color, label=policy, zorder=3)
        for suite, x, _ in calibration.points:
            panel.annotate(suite, (x[axis], panel.get_ylim()[0]), rotation=90, fontsize=7, va="bottom", ha="right", alpha=0.7)
        panel.axvline(at[axis], color="k", ls="--", lw=1)
        panel.annotate(label, (at[axis], panel.get_ylim()[1]), fontsize=8, va="top", ha="left")
        panel.axhline(0, color="grey", lw=0.5)
        used = ("visual", "task")[axis] in calibration.axes()
        panel.set_xlabel(("visual MMD^2 (vision features)", "task MMD^2 (question/answer token embeddings)")[axis]
                         + ("" if used else ": not used by the calibration"))
        panel.set_ylabel("gain over frozen (validation, paired mean)")
        panel.legend(fontsize=8, loc="best")
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
