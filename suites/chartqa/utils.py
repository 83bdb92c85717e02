"""lm-eval hooks for ``chartqa``: relaxed accuracy (numbers within 5%, other answers exact)."""

from bench.metrics import relaxed_accuracy
from bench.task_hooks import doc_to_image, doc_to_target, doc_to_text, load_dataset  # noqa: F401


def process_results(doc: dict, results: list[str]) -> dict:
    return {"relaxed_accuracy": max(relaxed_accuracy(results[0], answer) for answer in doc["answers"])}
