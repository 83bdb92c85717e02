"""lm-eval hooks for ``docvqa``. ANLS is scored per item here, not as a metric_list function:
lm-eval collapses a list-of-answers target to 0/1 when a metric function scores it."""

from bench.metrics import anls
from bench.task_hooks import doc_to_image, doc_to_target, doc_to_text, load_dataset  # noqa: F401


def process_results(doc: dict, results: list[str]) -> dict:
    return {"anls": anls(results[0], doc["answers"])}
