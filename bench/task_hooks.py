"""lm-eval hooks shared by the VQA-style suites (each suite's ``utils.py`` re-exports what it uses).

Requests carry image *paths*; the harness's LM decodes them lazily, so lm-eval never holds a
suite's images in memory.
"""

from bench.suite_data import load_split_dataset as load_dataset  # noqa: F401  (custom_dataset hook)

INSTRUCTION = "Answer the question using a single word or phrase."


def doc_to_text(doc: dict) -> str:
    return f"{doc['question']}\n{INSTRUCTION}"


def doc_to_image(doc: dict) -> list:
    return [doc["image"]]


def doc_to_target(doc: dict) -> str:
    return doc["answers"][0]
