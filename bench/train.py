"""Train one run: inject the cell's LoRA into the shared base model, train, hand the base back intact.

The base model is loaded once per process. Each run wraps it with peft (LoRA on the target set's
modules; the vision policy's fully trained modules as ``modules_to_save``, which peft trains as
copies) and afterwards deletes the adapter before unloading. ``unload()`` alone would leave the
*trained* ``modules_to_save`` copies in the base model and leak them into the next run.

The cell's LoRA variant (bench.space.VARIANTS) is peft's own: ``dora`` (``use_dora``), ``rslora``
(``use_rslora``), ``pissa`` (``init_lora_weights="pissa"``) and ``loraplus`` (B matrices at a higher rate,
peft's ``create_loraplus_optimizer``: :func:`make_optimizer`). PiSSA subtracts each targeted weight's
principal part from the base weight itself; :func:`attach` keeps a CPU copy of those weights and
:func:`detach` puts them back, so the next run starts from the untouched base.

PiSSA uses the full SVD (peft's ``"pissa"``), not peft's fast ``"pissa_niter_N"``: on the embedded
model (weights of at most 256x128) a run's SVDs take well under a second. On a real checkpoint on CPU
they cost seconds per large matrix (measured on 2 busy cores: 5.5 s for a 1536x1536 weight, 5.5-9.4 s
for 4864x1536; from these, a 2B model's ``all`` set would take some 20 minutes per run), while
``pissa_niter_16`` was only about 3x faster and, on a weight with a slowly decaying spectrum, its rank-8
part differed from the SVD's by 83% (relative Frobenius norm): it would benchmark an approximation.
Not measured on a GPU. Being deterministic, the full SVD also lets a saved PiSSA adapter load onto the
untouched base with ``PeftModel.from_pretrained`` (peft repeats the SVD there; tested).
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass, field

import torch
from peft import LoraConfig, get_peft_model

from bench.errors import BenchError
from bench.measure import PeakMemory, Stopwatch, count_parameters
from bench.models.adapter import Example, RoleMap
from bench.parallel import Group
from bench.space import LORAPLUS_LR_RATIO, TARGET_SETS, Cell, TrainSettings

ADAPTER = "default"

# Each variant's LoraConfig fields (loraplus is plain LoRA with another optimizer: :func:`make_optimizer`).
VARIANT_CONFIG: dict[str, dict] = {
    "lora": {},
    "dora": {"use_dora": True},
    "rslora": {"use_rslora": True},
    "pissa": {"init_lora_weights": "pissa"},
    "loraplus": {},
}
MODIFIES_BASE = ("pissa",)  # variants whose initialisation rewrites the targeted base weights
CELL_ATTR = "bench_cell"  # the attached cell, on the peft model (its variant decides the optimizer)
BASE_COPY_ATTR = "bench_base_weights"  # PiSSA: the targeted layers' original weights, restored by detach


class Diverged(RuntimeError):
    """The loss became NaN or infinite; the run stops and is recorded as ``diverged``."""


@dataclass
class Resolution:
    """The modules a cell touches in one model, resolved before any training."""

    lora: list[str]
    full: list[str]
    target_regex: str

    def summary(self) -> str:
        kinds = sorted({re.sub(r"^.*?\.\d+\.", "", n) for n in self.lora})
        full = ", ".join(self.full) if self.full else "-"
        return f"LoRA on {len(self.lora)} modules ({', '.join(kinds)}); fully trained: {full}"


def resolve(model: torch.nn.Module, roles: RoleMap, cell: Cell) -> Resolution:
    """Which modules get LoRA and which train fully; an empty match is an error, not a no-op."""
    regex = roles.llm_pattern(TARGET_SETS[cell.targets])
    if cell.vision == "vpm-lora":
        regex = f"(?:{regex})|(?:{roles.vision_linear})"
    names = [n for n, m in model.named_modules() if re.fullmatch(regex, n) and isinstance(m, torch.nn.Linear)]
    llm_names = [n for n in names if not re.fullmatch(roles.vision_linear, n)]
    if not llm_names:
        raise BenchError(
            f"target set {cell.targets!r} matches no module of this model (pattern {regex}); "
            f"check the model family's role map or choose another --targets"
        )
    if cell.vision == "vpm-lora" and len(names) == len(llm_names):
        raise BenchError(f"vision policy 'vpm-lora' matches no linear layer in the vision encoder ({roles.vision_linear})")
    full = []
    if cell.vision == "minicpmv-recipe":  # MiniCPM-V finetune.py: modules_to_save = embed_tokens, resampler (+ vpm, tune_vision)
        if "embeddings" not in roles.extra:
            raise BenchError("vision policy 'minicpmv-recipe' is MiniCPM-V's own recipe and this family has no MiniCPM-V "
                             "token-embedding role; use it with tiny-minicpmv or a minicpmv checkpoint, or choose another --vision")
        full += [roles.extra["embeddings"], roles.connector, roles.vision]
    if cell.vision in ("resampler", "resampler+vpm", "vpm-lora"):
        full.append(roles.connector)
    if cell.vision == "resampler+vpm":
        full.append(roles.vision)
        full = [n for n in full if not any(n.startswith(f"{outer}.") for outer in full)]  # Qwen: the merger is inside the vision tower
    modules = dict(model.named_modules())
    for name in full:
        if name not in modules:
            raise BenchError(f"vision policy {cell.vision!r} needs module {name!r}, which this model lacks")
    return Resolution(lora=names, full=full, target_regex=regex)


def lora_params_per_rank(model: torch.nn.Module, roles: RoleMap, targets: str) -> int:
    """LLM LoRA parameters per unit of rank for a target set: r * (in + out) summed over its modules."""
    regex = roles.llm_pattern(TARGET_SETS[targets])
    return sum(m.in_features + m.out_features for n, m in model.named_modules()
               if re.fullmatch(regex, n) and isinstance(m, torch.nn.Linear))


def ranks_for_budget(model: torch.nn.Module, roles: RoleMap, targets: list[str], budget: int) -> dict[str, int]:
    """Each target set's rank whose LLM LoRA parameter count is nearest ``budget`` (at least 1): the
    LoRA paper's comparison of target sets at a fixed number of trainable parameters."""
    ranks = {}
    for t in targets:
        per_rank = lora_params_per_rank(model, roles, t)
        if per_rank == 0:
            raise BenchError(f"target set {t!r} matches no module of this model; check the role map or --targets")
        ranks[t] = max(1, round(budget / per_rank))
    return ranks


def param_groups(model: torch.nn.Module, roles: RoleMap, settings: TrainSettings) -> list[dict]:
    """AdamW groups with each part's learning rate: LoRA matrices, the connector and the vision
    encoder trained fully (peft's ``modules_to_save`` copies, found by their module path)."""
    connector = re.compile(rf"(?:^|\.){re.escape(roles.connector)}\.")
    vision = re.compile(rf"(?:^|\.){re.escape(roles.vision)}\.")
    embeddings = re.compile(rf"(?:^|\.){re.escape(roles.extra['embeddings'])}\.") if "embeddings" in roles.extra else None
    groups: dict[str, list] = {"lora": [], "connector": [], "vision": [], "embeddings": []}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part = "lora" if "lora_" in name else "connector" if connector.search(name) else "vision" if vision.search(name) \
            else "embeddings" if embeddings is not None and embeddings.search(name) else "lora"
        groups[part].append(p)
    # token embeddings trained fully (minicpmv-recipe) take full fine-tuning's rate, the vision encoder's
    rates = {"lora": settings.lr, "connector": settings.lr_connector, "vision": settings.lr_vision, "embeddings": settings.lr_vision}
    return [{"params": params, "lr": rates[part], "part": part} for part, params in groups.items() if params]


def make_optimizer(model: torch.nn.Module, roles: RoleMap, settings: TrainSettings) -> torch.optim.Optimizer:
    """AdamW over :func:`param_groups`; for a ``loraplus`` cell (read off the model :func:`attach` made)
    the LoRA group is split by peft's ``create_loraplus_optimizer`` into A matrices at ``lr`` and B
    matrices (and any 1-d LoRA parameter) at ``LORAPLUS_LR_RATIO x lr``.

    ``create_loraplus_optimizer`` groups *every* trainable parameter that way: a fully trained
    connector's or encoder's weight matrices would land at the A rate and their biases and norms at
    16 x the LoRA rate, instead of their own rates. So it is called with an optimizer class that takes
    its groups, keeps only their LoRA parameters (its grouping rule, its rates and weight decay) and
    adds the fully trained parts' groups as :func:`param_groups` makes them."""
    groups = param_groups(model, roles, settings)
    cell = getattr(model, CELL_ATTR, None)
    if cell is None or cell.variant != "loraplus":
        return torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    from peft.optimizers import create_loraplus_optimizer

    full = [g for g in groups if g["part"] != "lora"]
    held = {id(p) for g in full for p in g["params"]}
    parts = ("lora_A", "lora_embedding", "lora_B", "lora_B_no_decay")  # create_loraplus_optimizer's groups, in its order

    def adamw(loraplus_groups: list[dict], **kwargs) -> torch.optim.Optimizer:
        if len(loraplus_groups) != len(parts):
            raise RuntimeError(f"peft's create_loraplus_optimizer made {len(loraplus_groups)} parameter groups, not {len(parts)}")
        lora = [{**g, "params": [p for p in g["params"] if id(p) not in held], "part": part}
                for g, part in zip(loraplus_groups, parts)]
        return torch.optim.AdamW([g for g in lora if g["params"]] + full, **kwargs)

    return create_loraplus_optimizer(model, adamw, lr=settings.lr, loraplus_lr_ratio=LORAPLUS_LR_RATIO,
                                     loraplus_weight_decay=settings.weight_decay, weight_decay=settings.weight_decay)


def attach(model: torch.nn.Module, resolution: Resolution, cell: Cell, dropout: float, seed: int):
    """Wrap ``model`` with the cell's LoRA (its variant's peft settings); :func:`detach` undoes it."""
    torch.manual_seed(seed)  # LoRA A matrices are drawn here
    config = LoraConfig(
        r=cell.rank,
        lora_alpha=cell.alpha,
        lora_dropout=dropout,
        target_modules=resolution.target_regex,
        modules_to_save=resolution.full or None,
        **VARIANT_CONFIG[cell.variant],
    )
    original = None
    if cell.variant in MODIFIES_BASE:  # only the targeted layers' weights, on the CPU (not the accelerator's memory)
        modules = dict(model.named_modules())
        original = {name: modules[name].weight.detach().to("cpu", copy=True) for name in resolution.lora}
    peft_model = get_peft_model(model, config, adapter_name=ADAPTER)
    setattr(peft_model, CELL_ATTR, cell)
    if original is not None:
        setattr(peft_model, BASE_COPY_ATTR, original)
    return peft_model


def detach(peft_model) -> torch.nn.Module:
    """The untouched base model back (LoRA layers removed, original modules in place, and the weights a
    PiSSA initialisation rewrote restored bit for bit from the copy :func:`attach` kept)."""
    original = vars(peft_model).pop(BASE_COPY_ATTR, None)
    vars(peft_model).pop(CELL_ATTR, None)
    peft_model.delete_adapter(ADAPTER)
    model = peft_model.unload()
    if original is not None:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, weight in original.items():
                modules[name].weight.copy_(weight)
    return model


@dataclass
class TrainResult:
    losses: list[float]
    train_s: float
    samples: int
    tokens: int
    trainable_params: int
    total_params: int
    peak_mem_mib: float
    peak_reserved_mib: float
    peak_delta_mib: float  # growth over the process baseline at the start (CPU: after freed memory was released)
    memory_kind: str
    memory_baseline_mib: float = 0.0
    memory_released: bool = False  # CPU: freed memory went back to the kernel before the baseline (bench.measure)
    extra: dict = field(default_factory=dict)
    state: dict | None = None  # set when the run paused (``pause_at``): everything :func:`train` needs to go on

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_s if self.train_s else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.train_s if self.train_s else 0.0


def _gradient_checkpointing(model: torch.nn.Module, enable: bool) -> list:
    """Turn on (non-reentrant) gradient checkpointing in every transformers model inside ``model``
    (the whole VLM, or the vision encoder and LLM of a composite one); returns those to turn off."""
    if not enable:
        return []
    from transformers import PreTrainedModel

    outer, names = [], []
    for name, m in model.named_modules():  # pre-order: a model comes before the models inside it
        if isinstance(m, PreTrainedModel) and m.supports_gradient_checkpointing and \
                not any(name.startswith(f"{n}.") for n in names):
            outer.append(m)
            names.append(name)
    if not outer:
        raise BenchError("--gradient-checkpointing: this model has no transformers module that supports it")
    for m in outer:
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return outer


def batch_order(n_examples: int, steps: int, batch_size: int, seed: int) -> list[list[int]]:
    """Epoch-wise shuffled indices, fixed by ``seed`` alone (same for every cell with that seed)."""
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    while len(order) < steps * batch_size:
        order += torch.randperm(n_examples, generator=gen).tolist()
    return [order[i * batch_size : (i + 1) * batch_size] for i in range(steps)]


def schedule(settings: TrainSettings):
    """Linear warmup then cosine decay to zero, as a factor of each group's learning rate."""
    warmup, steps = max(1, settings.warmup_steps), settings.steps

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    return factor


def pause_state(peft_model, optimizer, scheduler, step: int, losses: list, tokens: int) -> dict:
    """What a paused run needs to go on as if it never stopped: trainable weights, optimizer moments,
    schedule position and the random generators (dropout masks), all on the CPU."""
    cpu = lambda x: x.detach().to("cpu", copy=True) if torch.is_tensor(x) else x  # noqa: E731
    opt = optimizer.state_dict()
    state = {
        "step": step, "losses": list(losses), "tokens": tokens,
        "trainable": {n: cpu(p) for n, p in peft_model.named_parameters() if p.requires_grad},
        "optimizer": {"state": {k: {n: cpu(v) for n, v in st.items()} for k, st in opt["state"].items()},
                      "param_groups": opt["param_groups"]},
        "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    return state


def _restore(state: dict, peft_model, optimizer, scheduler) -> None:
    params = dict(peft_model.named_parameters())
    missing = set(state["trainable"]) ^ {n for n, p in params.items() if p.requires_grad}
    if missing:
        raise RuntimeError(f"paused state does not fit this run's trainable parameters ({sorted(missing)[:3]})")
    with torch.no_grad():
        for name, value in state["trainable"].items():
            params[name].copy_(value)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])


def train(adapter, peft_model, examples: list[Example], settings: TrainSettings, seed: int,
          accelerator, on_step=None, vision_cache=None, checkpoints=(), on_checkpoint=None,
          pause_at: int | None = None, resume: dict | None = None) -> TrainResult:
    """A plain loop: AdamW (one learning rate per part: :func:`param_groups`), linear warmup then
    cosine decay, grad clipping, NaN check each step. ``vision_cache`` (a bench.vision_cache.VisionCache,
    only for cells that leave the vision encoder frozen) serves the encoder's output for batches an
    earlier cell already ran. After each step in ``checkpoints``, ``on_checkpoint(step, model)`` runs
    (validation scores; it may raise to stop the run) with the clock and the memory measurement paused,
    so throughput and peak memory are training's.

    ``pause_at``: stop after that step (and its checkpoint) and return the state in ``result.state``;
    ``resume``: such a state, to go on from its step. Paused and resumed, a run makes the same
    numbers as uninterrupted (racing's rungs, bench/race.py).

    Under ``accelerate launch`` each process trains on its slice of every global batch
    (bench/parallel.py); the loss is weighted by label tokens so the update is the whole batch's."""
    device = accelerator.device
    group = Group(accelerator)
    params = [p for p in peft_model.parameters() if p.requires_grad]
    trainable, total = count_parameters(peft_model)
    optimizer = make_optimizer(peft_model, adapter.roles, settings)
    steps = settings.steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule(settings))
    checkpointed = _gradient_checkpointing(peft_model, settings.gradient_checkpointing)
    model, optimizer = accelerator.prepare(peft_model, optimizer)
    batches = batch_order(len(examples), steps, settings.batch_size, seed)
    losses, tokens, start, before_s, before_peak, before_delta, state = [], 0, 0, 0.0, 0.0, 0.0, None
    if resume is not None:
        _restore(resume, model, optimizer, scheduler)
        losses, tokens, start = list(resume["losses"]), resume["tokens"], resume["step"]
        before_s, before_peak = resume["train_s"], resume["peak_mem_mib"]
        before_delta = resume.get("peak_delta_mib", 0.0)  # states paused before it was kept: this leg's alone
    model.train()
    cached = contextlib.nullcontext() if vision_cache is None else \
        vision_cache.serving(adapter.model.get_submodule(adapter.roles.vision))
    try:
        with PeakMemory(device) as mem, Stopwatch(device) as clock, cached:
            for step, idx in enumerate(batches):
                if step < start:
                    continue
                batch = adapter.train_batch([examples[i] for i in group.shard(idx)], device)
                tokens += int(group.total(int(batch["attention_mask"].sum())))
                key = (seed, settings.batch_size, len(examples), step)
                with accelerator.autocast(), (vision_cache.step(key) if vision_cache else contextlib.nullcontext()):
                    loss = adapter.forward_loss(model, batch)
                if group.parallel:  # sum over this slice's label tokens / the global batch's; DDP averages over processes
                    share = adapter.loss_tokens(batch) / group.total(adapter.loss_tokens(batch))
                    value = group.total(loss.item() * share)
                    loss = loss * (share * group.size)
                else:
                    value = loss.item()
                if not math.isfinite(value):
                    raise Diverged(f"loss is {value} at step {step + 1}")
                accelerator.backward(loss)
                if settings.max_grad_norm:
                    accelerator.clip_grad_norm_(params, settings.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                losses.append(value)
                if on_step:
                    on_step(step + 1, value)
                if on_checkpoint and step + 1 in checkpoints:
                    with clock.paused(), mem.paused():  # validation: neither training's time nor its memory
                        model.eval()
                        try:
                            on_checkpoint(step + 1, model)
                        finally:
                            model.train()
                if pause_at is not None and step + 1 == pause_at and pause_at < steps:
                    state = pause_state(model, optimizer, scheduler, step + 1, losses, tokens)
                    break
    finally:
        accelerator.free_memory()
        for module in checkpointed:
            module.gradient_checkpointing_disable()
    model.eval()
    if state is not None:  # the clock and the memory high-water mark are read once their blocks closed
        state.update(train_s=before_s + clock.seconds, peak_mem_mib=max(before_peak, mem.peak_mib),
                     peak_delta_mib=max(before_delta, mem.delta_mib))
    return TrainResult(
        losses=losses,
        train_s=before_s + clock.seconds,
        samples=len(losses) * settings.batch_size,
        tokens=tokens,
        trainable_params=trainable,
        total_params=total,
        peak_mem_mib=max(before_peak, mem.peak_mib),
        peak_reserved_mib=mem.reserved_mib,
        peak_delta_mib=max(before_delta, mem.delta_mib),
        memory_kind=mem.kind,
        memory_baseline_mib=mem.baseline_mib,
        memory_released=mem.released,
        state=state,
    )
