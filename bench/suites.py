"""Suite registry: every folder under ``suites/`` with ``<name>.yaml`` is a suite.

The YAML is an ordinary lm-eval task; the harness reads only its ``metadata.harness`` block (metric,
default sizes, seed) and ``generation_kwargs`` (whose ``max_gen_toks`` the harness replaces with a
budget derived from the suite's answers in the model's tokenizer: bench.evaluate.generation_budget). Adding a suite means adding a folder:
``<name>.yaml`` + ``utils.py`` (lm-eval hooks) + ``generate.py`` (offline generator); the optional
``data_formats`` list names the real-data formats ``--data`` may hold for it (see bench/loaders.py).
A folder may hold several YAMLs sharing one generator: ``generator_options`` (keyword arguments of
``generate``) makes each a level of a graded family, e.g. ``shapes-shift-25`` (``strength: 0.25``)
next to ``shapes-shift``; ``family`` names the group, so leave-one-family-out checks can hide it whole.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from bench.errors import BenchError
from bench import loaders
from bench.suite_data import cache_root, prepare_generated

SUITES_DIR = Path(__file__).resolve().parent.parent / "suites"


class _TaskLoader(yaml.SafeLoader):
    """Reads lm-eval YAML without importing its ``!function`` hooks."""


_TaskLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


@dataclass(frozen=True)
class Suite:
    name: str
    folder: Path
    task_yaml: Path
    metric: str
    train_items: int
    test_items: int
    val_items: int
    seed: int
    generation_kwargs: tuple = ()  # the YAML's generation_kwargs items (max_gen_toks is the harness's own)
    data_formats: tuple[str, ...] = ()  # real-data formats --data accepts (bench/loaders.py)
    generator_options: tuple = ()  # keyword arguments of the folder's generate(): this suite's level of a graded family
    family: str = ""  # suites of one graded family (default: the suite's own name)

    def generator(self):
        return importlib.import_module(f"suites.{self.folder.name}.generate").generate

    def prompt(self, question: str) -> str:
        """The suite's own prompt (its lm-eval ``doc_to_text``, without the image placeholder: the
        adapter places the image), so training and evaluation agree."""
        from bench.task_hooks import without_image

        utils = importlib.import_module(f"suites.{self.folder.name}.utils")
        return without_image(utils.doc_to_text({"question": question}))

    def prepare(self, train_items: int | None = None, test_items: int | None = None, data: Path | None = None,
                limit: int | None = None, console=None, val_items: int | None = None) -> Path:
        """The prepared folder: real data from ``data`` when given, else the generator's output.
        ``limit`` caps the items of each split."""
        if data is not None:
            if not self.data_formats:
                raise BenchError(f"suite {self.name} has no real-data loader (it is generated only); drop --data or pick "
                                 f"one of {', '.join(n for n, s in available().items() if s.data_formats)}")
            return loaders.prepare(self.name, data, self.data_formats, limit, cache_root(), console)
        sizes = {"train": train_items or self.train_items, "test": test_items or self.test_items,
                 "val": self.val_items if val_items is None else val_items}
        if limit:
            sizes = {split: min(n, limit) for split, n in sizes.items()}
        return prepare_generated(self.name, self.generator(), sizes, self.seed, dict(self.generator_options))


@lru_cache(maxsize=None)
def available() -> dict[str, Suite]:
    suites = {}
    for task_yaml in sorted(SUITES_DIR.glob("*/*.yaml")):
        config = yaml.load(task_yaml.read_text(), Loader=_TaskLoader)
        harness = (config.get("metadata") or {}).get("harness") or {}
        name = config["task"]
        suites[name] = Suite(
            name=name,
            folder=task_yaml.parent,
            task_yaml=task_yaml,
            metric=harness["metric"],
            train_items=int(harness.get("train_items", 2000)),
            test_items=int(harness.get("test_items", 500)),
            val_items=int(harness.get("val_items", 500)),
            generation_kwargs=tuple(sorted((config.get("generation_kwargs") or {}).items())),
            seed=int(harness.get("seed", 0)),
            data_formats=tuple(harness.get("data_formats", ())),
            generator_options=tuple(sorted((harness.get("generator_options") or {}).items())),
            family=str(harness.get("family", name)),
        )
    return suites


def get(name: str) -> Suite:
    suites = available()
    if name not in suites:
        raise BenchError(f"unknown suite {name!r}; choose from {', '.join(sorted(suites))}")
    return suites[name]
