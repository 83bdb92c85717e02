"""lm-eval hooks for ``shapes-task`` and ``shapes-task-50`` (pretraining images, new questions)."""

from bench.metrics import vqa_accuracy
from bench.task_hooks import doc_to_image, doc_to_target, doc_to_text, load_dataset  # noqa: F401


def process_results(doc: dict, results: list[str]) -> dict:
    return {"vqa_accuracy": vqa_accuracy(results[0], doc["answers"])}
