"""A validated description of one benchmark invocation: preset defaults overridden by the command line.

Everything is checked here, before any model loads or any file is written, so bad input ends with a
one-line message and an untouched results folder.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from bench import suites as suite_registry
from bench.errors import BenchError
from bench.flags import SEED_MAX, memory_mib
from bench.space import PRESETS, Cell, TrainSettings, build_cells

DEFAULT_OUT = Path("results") / "runs"


@dataclass(frozen=True)
class Spec:
    suites: tuple[str, ...]
    model: str
    preset: str
    cells: tuple[Cell, ...]
    seeds: tuple[int, ...]
    train: TrainSettings  # at the reference LoRA rate; each grid rate is train.at(lr)
    out: Path
    device: torch.device
    alpha_rule: str
    data: Path | None = None  # a real dataset for the (single) suite, instead of its generator
    limit: int | None = None  # at most this many items per split
    storage: str | None = None  # Optuna storage URL; None = a journal file in the output folder
    worker: bool = False  # join an existing study only
    objectives: tuple[str, ...] = ("score", "memory", "throughput")
    search: str | None = None  # "optuna": a sampler proposes cells (plus lr, alpha, dropout) instead of the matrix
    trials: int = 20
    memory_budget_mib: float | None = None  # a constraint on peak memory, never an objective
    sampler_seed: int = 0
    pruner: str = "median"
    step_budget: int | None = None  # --search: stop proposing trials once this many training steps are spent
    eval_batch_size: int = 64
    trust_remote_code: bool = False  # run model code shipped inside a checkpoint (MiniCPM-V)
    save_adapters: str = "best"  # best (per suite), all, none: PEFT folders under <out>/adapters/
    export: str | None = None  # merged: a merged model folder per saved adapter, under <out>/merged/
    lrs: tuple[float, ...] = ()  # LoRA learning rates each cell runs at (empty: train.lr alone)
    margin: float = 0.01  # equivalence margin: differences inside +-margin are "equivalent" (TOST)
    param_budget: int | None = None  # LLM LoRA parameters per cell: each target set's rank is derived
    protocol: str = "race"  # race (bench/race.py) or exhaustive: every cell x rate x seed to the end
    # levels of the data-regime factors (--train-items with several values): each is a TrainSettings
    # override, run as its own section of the report (bench.runner.SuiteRun.label)
    regimes: tuple[dict, ...] = ({},)
    control: tuple[str, ...] | None = None  # control suites / folders for forgetting; None: the model's default
    report_only: bool = False  # write the tables from the records there are; train nothing
    resolutions: tuple[int | None, ...] = (None,)  # values of the family's resolution knob; None: the checkpoint's own

    @property
    def settings(self) -> list[TrainSettings]:
        """The training settings of each grid learning rate."""
        return [self.train.at(lr) for lr in self.lrs] if self.lrs else [self.train]

    @property
    def n_runs(self) -> int:
        return len(self.suites) * len(self.regimes) * len(self.cells) * len(self.settings) * len(self.seeds)


def _split(value: str | None, cast=str, what: str = "") -> list | None:
    if value is None:
        return None
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise BenchError(f"--{what} is empty; give at least one value, e.g. --{what} {_EXAMPLES[what]}")
    try:
        return [cast(p) for p in parts]
    except ValueError:
        raise BenchError(f"--{what} {value!r} has a value that is not a {cast.__name__}; e.g. --{what} {_EXAMPLES[what]}") from None


_EXAMPLES = {"train_items": "250,1000,8000", "control": "shapes", "objectives": "score,memory", "suite": "docvqa", "targets": "qk,qv", "ranks": "4,16", "vision": "frozen,resampler",
             "variants": "lora,dora", "seeds": "0,1,2", "lrs": "1e-3,3e-3,1e-2", "resolutions": "200704,802816"}



def parse_resolutions(value: str | None) -> tuple[int | None, ...]:
    """``--resolutions 200704,802816``: values of the model family's resolution knob (whole numbers >= 1;
    ``default`` is the checkpoint's own setting, None). Whether the family has a knob is the adapter's
    to say (``set_resolution`` refuses in one line), once the model is known."""
    if value is None:
        return (None,)
    parts = [p.strip() for p in value.split(",") if p.strip()]
    if not parts:
        raise BenchError(f"--resolutions is empty; give at least one value, e.g. --resolutions {_EXAMPLES['resolutions']}")
    out = []
    for part in parts:
        if part.lower() == "default":
            out.append(None)
            continue
        number = int(part) if re.fullmatch(r"\+?[0-9]+", part) else None
        if number is None or number < 1:
            raise BenchError(f"--resolutions has {part!r}: each value must be a whole number >= 1 (the family's knob, "
                             f"e.g. Qwen-VL max_pixels) or default; e.g. --resolutions {_EXAMPLES['resolutions']}")
        out.append(number)
    return tuple(dict.fromkeys(out))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise BenchError(f"--device {name!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise BenchError("--device cuda was asked for but no CUDA GPU is available; use --device cpu (or auto)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise BenchError(f"--device {name} does not exist: {torch.cuda.device_count()} GPU(s) visible")
    if device.type not in ("cpu", "cuda"):
        raise BenchError(f"--device {name!r} is not supported; use auto, cpu or cuda[:N]")
    return device


def from_args(args) -> Spec:
    if args.preset not in PRESETS:
        raise BenchError(f"unknown preset {args.preset!r}; choose from {', '.join(PRESETS)}")
    preset = PRESETS[args.preset]
    suite_names = _split(args.suite, str, "suite")
    for name in suite_names:
        suite_registry.get(name)  # raises with the list of known suites
    targets = _split(args.targets, str, "targets") or list(preset.targets)
    ranks = _split(args.ranks, int, "ranks") or list(preset.ranks)
    vision = _split(args.vision, str, "vision") or list(preset.vision)
    variants = _split(getattr(args, "variants", None), str, "variants") or list(preset.variants)
    seeds = _split(args.seeds, int, "seeds") or list(preset.seeds)
    for s in seeds:
        if not 0 <= s <= SEED_MAX:
            raise BenchError(f"--seeds {s} is out of range: seeds must be whole numbers in [0, {SEED_MAX}]; e.g. --seeds {_EXAMPLES['seeds']}")
    param_budget = getattr(args, "param_budget", None)
    if param_budget is not None:
        if args.ranks:
            raise BenchError("--param-budget derives each target set's rank; drop --ranks (or drop --param-budget)")
        if param_budget <= 0:
            raise BenchError(f"--param-budget must be a positive number of LoRA parameters (got {param_budget})")
        ranks = [1]  # placeholder: the session derives each target set's rank on the loaded model
    cells = build_cells(targets, ranks, vision, args.alpha, variants)
    train = preset.train
    for flag in ("lr", "lr_connector", "lr_vision"):
        value = getattr(args, flag, None)
        if value is not None and not (math.isfinite(value) and value > 0):
            raise BenchError(f"--{flag.replace('_', '-')} must be a finite number > 0 (got {value})")
    if args.lr is not None:
        train = train.at(args.lr)  # the fully trained parts keep the preset's ratio unless given
    for flag in ("lr_connector", "lr_vision"):
        if getattr(args, flag, None) is not None:
            train = dataclasses.replace(train, **{flag: getattr(args, flag)})
    lrs = _split(getattr(args, "lrs", None), float, "lrs") or ([args.lr] if args.lr is not None else list(preset.lrs))
    for lr in lrs:
        if not (math.isfinite(lr) and lr > 0):
            raise BenchError(f"--lrs has a rate that is not positive ({lr:g}): rates must be finite numbers > 0; e.g. --lrs {_EXAMPLES['lrs']}")
    train_items = _split(str(args.train_items) if args.train_items is not None else None, int, "train_items")
    regimes: tuple[dict, ...] = ({},)
    if train_items and len(set(train_items)) > 1:  # a factor: data prepared once at the largest, each level nested in it
        regimes = tuple({"train_items": n} for n in sorted(set(train_items)))
    overrides = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lora_dropout": args.lora_dropout,
        "train_items": max(train_items) if train_items else None,
        "early_stopping": True if getattr(args, "early_stopping", False) else None,
        "test_items": args.test_items,
        "val_items": getattr(args, "val_items", None),
        "gradient_checkpointing": True if getattr(args, "gradient_checkpointing", False) else None,
    }
    for key, value in overrides.items():
        if value is None:
            continue
        if key in ("steps", "batch_size", "train_items", "test_items", "val_items") and value <= 0:
            raise BenchError(f"--{key.replace('_', '-')} must be positive (got {value})")
        if key == "lora_dropout" and not 0 <= value < 1:
            raise BenchError(f"--lora-dropout must be in [0, 1) (got {value})")
        train = dataclasses.replace(train, **{key: value})
    margin = getattr(args, "equivalence_margin", None)
    margin = 0.01 if margin is None else margin
    if not 0 < margin < 1:
        raise BenchError(f"--equivalence-margin must be in (0, 1), in score units (got {margin}); e.g. 0.01 for one point")
    data = Path(args.data).expanduser() if getattr(args, "data", None) else None
    if data is not None:
        if len(suite_names) != 1:
            raise BenchError(f"--data loads one dataset, but --suite names {len(suite_names)} suites; run one suite per dataset")
        if not data.exists():
            raise BenchError(f"--data {data} does not exist; pass a dataset file or folder")
    limit = getattr(args, "limit", None)
    if limit is not None and limit <= 0:
        raise BenchError(f"--limit must be positive (got {limit})")
    storage = getattr(args, "storage", None)
    if storage is not None and not storage.split(":", 1)[0].split("+")[0] in ("postgresql", "mysql", "sqlite"):
        raise BenchError(f"--storage must be a database URL such as postgresql://user@host/db (got {storage.split(':', 1)[0]}:...); "
                         "omit it to use a journal file in the output folder")
    if storage is not None:
        from bench.study import check_storage_url

        check_storage_url(storage)
    out = Path(args.out) if args.out else DEFAULT_OUT / args.preset
    if getattr(args, "worker", False) and storage is None and not (out / "study.journal").is_file():
        raise BenchError(f"--worker joins a study, but {out} holds none (no study.journal); start it with the same command "
                         "without --worker (or pass the --storage it runs on)")
    from bench.study import OBJECTIVES

    objectives = _split(getattr(args, "objectives", None), str, "objectives") or ["score", "memory", "throughput"]
    for o in objectives:
        if o not in OBJECTIVES:
            raise BenchError(f"unknown objective {o!r}; choose from {', '.join(OBJECTIVES)}")
    search = getattr(args, "search", None)
    if search is not None and search != "optuna":
        raise BenchError(f"--search {search!r} is not a search method; use --search optuna")
    if search and len(suite_names) != 1:
        raise BenchError(f"--search optimises one suite, but --suite names {len(suite_names)}; run one search per suite")
    trials = getattr(args, "trials", None)
    trials = 20 if trials is None else trials  # not `or 20`: that read --trials 0 as "not given" and ran 20
    if trials <= 0:
        raise BenchError(f"--trials must be a whole number >= 1 (got {trials}); e.g. --trials 20")
    pruner = getattr(args, "pruner", None) or "median"
    if pruner not in ("median", "hyperband", "none"):
        raise BenchError(f"--pruner {pruner!r} is unknown; choose median, hyperband or none")
    if getattr(args, "step_budget", None) is not None and args.step_budget <= 0:
        raise BenchError(f"--step-budget must be positive (got {args.step_budget})")
    from bench.adapters import MODES

    save_adapters = getattr(args, "save_adapters", None) or "best"
    if save_adapters not in MODES:
        raise BenchError(f"--save-adapters {save_adapters!r} is unknown; choose {', '.join(MODES)}")
    export = getattr(args, "export", None)
    if export is not None:
        from bench import export as exports

        if export not in exports.MODES:
            raise BenchError(f"--export {export!r} is unknown; choose {', '.join(exports.MODES)}")
        if save_adapters == "none":
            raise BenchError("--export merged merges each saved adapter, and --save-adapters none saves none; "
                             "drop one of them (or use --save-adapters best or all)")
        exports.check(args.model, bool(getattr(args, "trust_remote_code", False)))
    budget = parse_memory(args.memory_budget) if getattr(args, "memory_budget", None) is not None else None
    sampler_seed = getattr(args, "sampler_seed", None)
    sampler_seed = 0 if sampler_seed is None else sampler_seed
    if not 0 <= sampler_seed <= SEED_MAX:
        raise BenchError(f"--sampler-seed must be a whole number in [0, {SEED_MAX}] (got {sampler_seed}); e.g. 0")
    protocol = getattr(args, "protocol", None) or "race"
    if protocol not in ("race", "exhaustive"):
        raise BenchError(f"--protocol {protocol!r} is unknown; choose race (default) or exhaustive")
    if search and getattr(args, "protocol", None):
        raise BenchError("--protocol applies to the matrix; --search runs its own trials (drop one of them)")
    control = None
    if getattr(args, "control", None) is not None:
        named = _split(args.control, str, "control")
        control = () if [n.lower() for n in named] == ["none"] else tuple(dict.fromkeys(named))
        for name in control:
            if name.lower() == "none":
                raise BenchError("--control none turns control scoring off; give it alone, not with other controls")
            suite_name, _, folder = name.partition("=")
            if suite_name not in suite_registry.available():
                raise BenchError(f"--control {name!r} is neither a suite ({', '.join(suite_registry.available())}) nor "
                                 "SUITE=FOLDER (real data read as that suite); e.g. --control shapes, textvqa=~/data/textvqa, or none")
            if folder and not Path(folder).expanduser().exists():
                raise BenchError(f"--control {name}: {folder} does not exist; pass the control data's file or folder")
            if folder and not suite_registry.get(suite_name).data_formats:
                raise BenchError(f"--control {name}: suite {suite_name} is generated only and reads no real data; drop the folder")
    if search and len(regimes) > 1:
        raise BenchError("--search optimises one data regime; give --train-items a single value (or run the matrix without --search)")
    resolutions = parse_resolutions(getattr(args, "resolutions", None))
    if len(resolutions) == 1 and resolutions[0] is not None:  # one setting: every run at it, no factor
        train = dataclasses.replace(train, resolution=resolutions[0])
    elif len(resolutions) > 1:  # a factor: crossed with the training-set sizes, each level its own section
        if search:
            raise BenchError("--search optimises one data regime; give --resolutions a single value (or run the matrix without --search)")
        regimes = tuple({**r, **({"resolution": res} if res is not None else {})} for r in regimes for res in resolutions)
    if train.warmup_steps > train.steps:
        train = dataclasses.replace(train, warmup_steps=max(1, train.steps // 10))
    return Spec(
        suites=tuple(dict.fromkeys(suite_names)),
        model=args.model,
        preset=args.preset,
        cells=tuple(cells),
        seeds=tuple(dict.fromkeys(seeds)),
        train=train,
        out=out,
        device=resolve_device(args.device),
        alpha_rule=args.alpha,
        data=data,
        limit=limit,
        storage=storage,
        worker=bool(getattr(args, "worker", False)),
        objectives=tuple(dict.fromkeys(objectives)),
        search=search,
        trials=trials,
        memory_budget_mib=budget,
        sampler_seed=sampler_seed,
        pruner=pruner,
        step_budget=getattr(args, "step_budget", None),
        save_adapters=save_adapters,
        export=export,
        trust_remote_code=bool(getattr(args, "trust_remote_code", False)),
        lrs=tuple(dict.fromkeys(lrs)),
        margin=margin,
        param_budget=param_budget,
        protocol=protocol,
        regimes=regimes,
        control=control,
        report_only=bool(getattr(args, "report_only", False)),
        resolutions=resolutions,
    )


def parse_memory(text: str) -> float:
    """``16GiB``, ``512MiB``, ``1.5GB`` -> MiB."""
    mib = memory_mib(text)
    if mib is None:
        raise BenchError(f"--memory-budget {text!r} is not a memory size > 0; write e.g. 16GiB, 512MiB or 1.5GB")
    return mib
