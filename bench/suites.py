"""Suite registry: every folder under ``suites/`` with ``<name>.yaml`` is a suite.

The YAML is an ordinary lm-eval task; the harness reads only its ``metadata.harness`` block (metric,
default sizes, seed) and ``generation_kwargs.max_gen_toks``. Adding a suite means adding a folder:
``<name>.yaml`` + ``utils.py`` (lm-eval hooks) + ``generate.py`` (offline generator).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import yaml

from bench.errors import BenchError
from bench.suite_data import prepare_generated

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
    max_new_tokens: int
    train_items: int
    test_items: int
    seed: int

    def generator(self):
        return importlib.import_module(f"suites.{self.folder.name}.generate").generate

    def prompt(self, question: str) -> str:
        """The suite's own prompt (its lm-eval ``doc_to_text``), so training and evaluation agree."""
        utils = importlib.import_module(f"suites.{self.folder.name}.utils")
        return utils.doc_to_text({"question": question})

    def prepare(self, train_items: int | None = None, test_items: int | None = None) -> Path:
        sizes = {"train": train_items or self.train_items, "test": test_items or self.test_items}
        return prepare_generated(self.name, self.generator(), sizes, self.seed)


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
            max_new_tokens=int(config.get("generation_kwargs", {}).get("max_gen_toks", 16)),
            train_items=int(harness.get("train_items", 2000)),
            test_items=int(harness.get("test_items", 500)),
            seed=int(harness.get("seed", 0)),
        )
    return suites


def get(name: str) -> Suite:
    suites = available()
    if name not in suites:
        raise BenchError(f"unknown suite {name!r}; choose from {', '.join(sorted(suites))}")
    return suites[name]
