"""lm-eval hooks for ``textvqa``: VQA accuracy, the official 10-answer form when a row has several
answers (real TextVQA), exact match after normalization with one (the generator)."""

from bench.metrics import vqa_accuracy
from bench.task_hooks import doc_to_image, doc_to_target, doc_to_text, load_dataset  # noqa: F401


def process_results(doc: dict, results: list[str]) -> dict:
    return {"vqa_accuracy": vqa_accuracy(results[0], doc["answers"])}
