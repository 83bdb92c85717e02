"""lm-eval hooks shared by the VQA-style suites (each suite's ``utils.py`` re-exports what it uses).

The same hooks serve the harness's own LM (bench.evaluate.HarnessLM) and lm-eval's stock
``hf-multimodal`` model (README: "Stock tools"), so a saved adapter is scored on the same task either way:

* ``doc_to_text`` starts with lm-eval's image placeholder, which ``hf-multimodal`` turns into the
  model's image slot (in its chat template with ``--apply_chat_template``: the same user turn, image
  first, the harness renders); the harness strips it again (:func:`without_image`) and renders the turn itself.
* ``doc_to_image`` gives a :class:`bench.images.LazyImage`: a PIL image to ``hf-multimodal``, read from
  its file only when its batch is processed; the harness reads only its path, so requests built for a
  whole suite never hold its decoded images.
"""

from bench.images import LazyImage
from bench.suite_data import load_split_dataset as load_dataset  # noqa: F401  (custom_dataset hook)

INSTRUCTION = "Answer the question using a single word or phrase."
IMAGE = "<image>"  # lm-eval's image placeholder (lm_eval.models.hf_vlms.DEFAULT_IMAGE_PLACEHOLDER)


def doc_to_text(doc: dict) -> str:
    return f"{IMAGE}{doc['question']}\n{INSTRUCTION}"


def without_image(text: str) -> str:
    """The prompt's text, the image placeholder :func:`doc_to_text` puts first removed."""
    return text.removeprefix(IMAGE)


def doc_to_image(doc: dict) -> list:
    return [LazyImage(doc["image"])]


def doc_to_target(doc: dict) -> str:
    return doc["answers"][0]
