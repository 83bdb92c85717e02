"""Evaluation through lm-eval: each suite is an lm-eval task, the harness is an lm-eval ``LM``.

lm-eval hands every request of a task to one ``generate_until`` call; sorting by prompt length,
batching, decoding images lazily (requests carry lazy images: only their paths are read here) and
restoring the order are ours. The task's text starts with lm-eval's image placeholder (for stock
``hf-multimodal``, bench.task_hooks); the adapter renders the image slot itself, so it is stripped.
Scores come from the task's ``process_results``; per-item scores are kept for paired statistics.

Every cell of a matrix is evaluated on the same test items, so decoded test images and encoded
prompts are kept per adapter for the life of the process (images only for families with small
fixed-size inputs, up to ``MAX_CACHED_IMAGE_BYTES``): a profiled default run spent 11% of its
evaluation time decoding and tokenizing the same 1000 items again for each of its 21 evaluations.
"""

from __future__ import annotations

import logging
import os
import time
import weakref
from dataclasses import dataclass

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's own bars; ours are rich
# lm-eval deep-copies every logged sample to hash the PIL images in it; ours carry paths, not images
os.environ.setdefault("LMEVAL_HASHMM", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from lm_eval.api.model import LM  # noqa: E402
from PIL import Image  # noqa: E402

from bench.images import LazyImage  # noqa: E402
from bench.models.adapter import VLMAdapter  # noqa: E402
from bench.suites import Suite  # noqa: E402
from bench.task_hooks import without_image  # noqa: E402

MAX_CACHED_IMAGE_BYTES = 512 * 2**20
CACHE_INPUTS = True  # False: decode, tokenize and build requests afresh in every evaluation (the before of bench.perf)


class _Inputs:
    """One adapter's decoded test images (by path) and encoded prompts (by text)."""

    def __init__(self, adapter: VLMAdapter):
        self.adapter = weakref.proxy(adapter)
        self.images: dict[str, np.ndarray] = {}
        self.image_bytes = 0
        self.prompts: dict[str, object] = {}

    def prompt(self, text: str):
        if text not in self.prompts:
            self.prompts[text] = self.adapter.encode_prompt(text)
        return self.prompts[text]

    def image(self, image):
        if self.adapter.keeps_paths or not isinstance(image, (str, os.PathLike)):
            return self.adapter.image_array(_open(image))
        key = os.fspath(image)
        array = self.images.get(key)
        if array is None:
            array = self.adapter.image_array(_open(image))
            if self.image_bytes + array.nbytes <= MAX_CACHED_IMAGE_BYTES:
                array.flags.writeable = False  # shared by every evaluation from now on
                self.images[key] = array
                self.image_bytes += array.nbytes
        return array


_INPUTS: "weakref.WeakKeyDictionary[VLMAdapter, _Inputs]" = weakref.WeakKeyDictionary()


def inputs_of(adapter: VLMAdapter) -> _Inputs:
    if not CACHE_INPUTS:
        return _Inputs(adapter)
    if adapter not in _INPUTS:
        _INPUTS[adapter] = _Inputs(adapter)
    return _INPUTS[adapter]


class HarnessLM(LM):
    """Batched greedy generation for any :class:`VLMAdapter` (KV cache through ``generate``)."""

    MULTIMODAL = True

    def __init__(self, adapter: VLMAdapter, model: torch.nn.Module, device: torch.device,
                 batch_size: int = 64, progress=None):
        super().__init__()
        self.adapter, self.model, self._device = adapter, model, device
        self.batch_size = batch_size
        self.progress = progress  # callable(n_done, n_total) or None
        self.generated = 0

    def loglikelihood(self, requests):
        raise NotImplementedError("suites here are generative; loglikelihood tasks are not supported")

    def loglikelihood_rolling(self, requests):
        raise NotImplementedError("suites here are generative; loglikelihood tasks are not supported")

    def generate_until(self, requests) -> list[str]:
        cache = inputs_of(self.adapter)
        prompts, images, kwargs = [], [], []
        for req in requests:
            context, gen_kwargs, aux = req.args
            visual = aux["visual"]
            visual = visual[0] if isinstance(visual, list) else visual
            prompts.append(cache.prompt(without_image(context)))
            images.append(visual.path if isinstance(visual, LazyImage) else visual)  # decoded by the cache, not kept
            kwargs.append(gen_kwargs)
        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        outputs: list[str] = [""] * len(prompts)
        was_training = self.model.training
        self.model.eval()
        try:
            for start in range(0, len(order), self.batch_size):
                idx = order[start : start + self.batch_size]
                arrays = [cache.image(images[i]) for i in idx]
                batch = self.adapter.prompt_batch([prompts[i] for i in idx], arrays, self._device)
                max_new = max(int(kwargs[i].get("max_gen_toks", 16)) for i in idx)
                with torch.no_grad():
                    texts = self.adapter.decode(self.adapter.generate_ids(self.model, batch, max_new))
                for i, text in zip(idx, texts):
                    outputs[i] = _cut(text, kwargs[i].get("until") or [])
                self.generated += len(idx)
                if self.progress:
                    self.progress(len(idx), len(order))
        finally:
            self.model.train(was_training)
        return outputs


def _open(image) -> Image.Image:
    from bench.images import open_rgb, to_rgb

    if isinstance(image, Image.Image):
        return to_rgb(image)
    return open_rgb(image)


def _cut(text: str, until: list[str]) -> str:
    for stop in until:
        if stop and stop in text:
            text = text.split(stop, 1)[0]
    return text.strip()


@dataclass
class EvalResult:
    score: float
    items: list[dict]  # id, prediction, score (one per test item, in dataset order)
    seconds: float

    @property
    def items_per_s(self) -> float:
        return len(self.items) / self.seconds if self.seconds > 0 else 0.0


_TASKS: dict[tuple, dict] = {}


def generation_budget(adapter: VLMAdapter, suite: Suite, data_dir) -> int:
    """``max_gen_toks`` for a suite's data in this model's tokenizer: the longest training or validation
    answer (end-of-turn included) plus a quarter, at least 2 tokens, of room. A fixed number truncates
    real tokenizers' answers (and wastes decoding steps on a character-level one); test answers are
    not looked at."""
    from bench.suite_data import read_split

    rows = [r for split in ("train", "val") for r in read_split(data_dir, split)]
    if not rows:
        return 32
    prompt = suite.prompt(rows[0].question)
    longest = max(adapter.answer_tokens(prompt, a) for a in {r.answers[0] for r in rows})
    return longest + max(2, -(-longest // 4))


def load_task(suite: Suite, data_dir, split: str = "test", max_gen_toks: int | None = None) -> dict:
    """The suite's lm-eval task over a prepared data folder, evaluated on ``split`` (the YAML's
    ``test_split`` overridden), built once per process and reused."""
    key = (suite.name, str(data_dir), split, max_gen_toks)
    if key not in _TASKS:
        from lm_eval.tasks import TaskManager

        for name in ("lm-eval", "lm_eval", "datasets"):
            logging.getLogger(name).setLevel(logging.ERROR)
        manager = TaskManager(include_path=str(suite.folder), include_defaults=False,
                              metadata={"data_dir": str(data_dir)})
        _TASKS[key] = manager.load([suite.name])
        for task in _TASKS[key]["tasks"].values():
            # lm-eval reads both when it builds requests (eval_docs is a property of test_split)
            task.config.test_split = split
            if max_gen_toks is not None:
                task.config.generation_kwargs = {**(task.config.generation_kwargs or {}), "max_gen_toks": max_gen_toks}
            _reuse_requests(task)
    return _TASKS[key]


def _reuse_requests(task) -> None:
    """Build the task's requests once per set of arguments, then hand the same ones out again with
    their responses cleared. lm-eval rebuilds them for every evaluation (a pass over the dataset and
    an object per item); every cell evaluates the same items, and lm-eval's own request cache is
    keyed by task name only, which would mix data folders."""
    build, built = task.build_all_requests, {}

    def build_all_requests(*args, **kwargs):
        key = repr((args, sorted(kwargs.items())))
        if key not in built or not CACHE_INPUTS:
            build(*args, **kwargs)
            if CACHE_INPUTS:
                built[key] = task._instances
            return
        for instance in built[key]:
            instance.resps, instance.filtered_resps = [], {}
        task._instances = built[key]

    task.build_all_requests = build_all_requests


def evaluate(adapter: VLMAdapter, model, suite: Suite, data_dir, device, limit: int | None = None,
             batch_size: int = 64, progress=None, split: str = "test", max_gen_toks: int | None = None) -> EvalResult:
    """Run the suite's lm-eval task on ``split`` of the prepared data and return the mean score and
    per-item scores. ``max_gen_toks`` replaces the YAML's (see :func:`generation_budget`).

    Uses ``lm_eval.evaluator.evaluate`` rather than ``simple_evaluate``: the latter collects the whole
    environment (``torch.utils.collect_env``, git) on every call, seconds per run for nothing we keep.
    """
    from lm_eval.evaluator import evaluate as lm_evaluate

    task_dict = load_task(suite, data_dir, split, max_gen_toks)
    lm = HarnessLM(adapter, model, device, batch_size=batch_size, progress=progress)
    start = time.perf_counter()
    out = lm_evaluate(lm, task_dict, limit=limit, log_samples=True, bootstrap_iters=0, cache_requests=False)
    seconds = time.perf_counter() - start
    metric = suite.metric
    score = float(out["results"][suite.name][f"{metric},none"])
    items = [
        {"id": s["doc"]["id"], "prediction": s["filtered_resps"][0], "score": float(s[metric]),
         **({"source_id": s["doc"]["source_id"]} if s["doc"].get("source_id") else {})}  # the dataset's own id
        for s in sorted(out["samples"][suite.name], key=lambda s: s["doc_id"])
    ]
    return EvalResult(score=score, items=items, seconds=seconds)
