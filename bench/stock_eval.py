"""The stock lm-eval command line that scores a saved adapter on its suite, written next to it.

lm-eval's own ``hf-multimodal`` model loads the base checkpoint with ``AutoModelForImageTextToText``,
the adapter with ``peft=`` and runs the suite's task from ``--include_path``, so a result can be checked
(or extended: other devices, batch sizes, logged samples) without the harness's LM. Three things it cannot
guess are pinned here: the prepared data folder of the run (a content-hashed cache folder, passed as
task metadata ``data_dir``), the prompt the model was trained on (the family's chat template:
``--apply_chat_template``), and the run's answer budget (``max_gen_toks``, bench.evaluate.generation_budget),
with which the stock model gives the harness's answers.

Only for transformers-native families (bench.models.hf): ``hf-multimodal`` cannot load the embedded
model or MiniCPM-V's shipped code. ``PYTHONPATH`` names this checkout, whose ``bench`` the suites' hooks import.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from bench import store

SCRIPT = "lm_eval.sh"


def command(model: Path, suite, data_dir: Path, max_gen_toks: int, adapter: Path | None = None,
            processor: dict | None = None, python: str | None = None) -> list[str]:
    """The lm-eval arguments that score checkpoint ``model`` (with ``adapter`` loaded onto it, when given; a
    merged folder without) over the test split of ``data_dir`` as the harness did; ``processor``: more
    model arguments (:func:`processor_args`). ``python -m lm_eval`` when ``python`` is given, else the
    ``lm_eval`` entry point."""
    head = [python, "-m", "lm_eval"] if python else ["lm_eval"]
    model_args = ",".join([f"pretrained={Path(model).resolve()}", *([f"peft={Path(adapter).resolve()}"] if adapter else []),
                           *(f"{k}={v}" for k, v in (processor or {}).items())])
    return [*head, "--model", "hf-multimodal", "--model_args", model_args,
            "--include_path", str(Path(suite.folder).parent.resolve()), "--tasks", suite.name,
            "--metadata", json.dumps({"data_dir": str(Path(data_dir).resolve())}),
            "--apply_chat_template", "--gen_kwargs", f"max_gen_toks={max_gen_toks}"]


def processor_args(vlm) -> dict[str, int] | None:
    """hf-multimodal's model arguments for the run's image resolution (``--resolutions``): none at the
    checkpoint's own setting; ``max_pixels`` (and ``min_pixels`` where the harness lowered that too) for the
    Qwen families' knob; None for another family's knob, which hf-multimodal cannot set (it hands the
    processor only these two)."""
    knob = vlm.spec.resolution
    if knob is None or vlm.resolution is None:
        return {}
    if knob.name != "max_pixels":
        return None
    args = {"max_pixels": vlm.resolution}
    if vlm.processor.image_processor.size.get(knob.at_most) == vlm.resolution:
        args["min_pixels"] = vlm.resolution
    return args


def write_script(folder: Path, vlm, adapter: Path, suite, data_dir: Path, max_gen_toks: int) -> Path:
    """``<folder>/lm_eval.sh``: the command for the adapter at ``adapter`` (its final path; ``folder`` may be
    the temporary it is written in) on ``vlm``'s checkpoint, with this interpreter and this checkout; its
    arguments go on to lm-eval."""
    root = Path(suite.folder).parent.parent.resolve()
    processor = processor_args(vlm)
    args = command(vlm.source, suite, data_dir, max_gen_toks, adapter=adapter, processor=processor, python=sys.executable)
    options: list[list[str]] = []  # one line per option and its value
    for arg in args[3:]:
        if arg.startswith("--") or not options:
            options.append([])
        options[-1].append(shlex.quote(arg))
    unset = [] if processor is not None else [
        f"# This run saw images at {vlm.spec.resolution.name}={vlm.resolution}, which hf-multimodal cannot set: it scores",
        "# at the checkpoint's own setting. The --export merged folder carries it (pretrained=<that folder>, no peft=)."]
    text = "\n".join([
        "#!/bin/sh",
        f"# lm-eval's stock hf-multimodal model on this adapter: the test split of {suite.name} the run was scored on,",
        "# its chat-template prompt and its answer budget. Arguments go on to lm-eval, e.g. --limit 50,",
        "# --device cuda, --batch_size 8, --output_path DIR --log_samples.",
        *unset,
        f"PYTHONPATH={shlex.quote(str(root))}${{PYTHONPATH:+:$PYTHONPATH}} exec "
        + " ".join(shlex.quote(a) for a in args[:3]) + " \\",
        *(f"  {' '.join(option)} \\" for option in options),
        '  "$@"',
        "",
    ])
    path = Path(folder) / SCRIPT
    path.write_text(text)
    path.chmod(0o777 & ~store._umask())
    return path
