"""MiniCPM-V checkpoints (``model_type: minicpmv``): their modelling code ships inside the checkpoint.

Running that code is the user's decision, so loading refuses without ``--trust-remote-code``. The role
map is MiniCPM-V's own (``vpm`` / ``resampler`` / ``llm``), the one the embedded tiny model shares.
Two batch formats exist:

* OpenBMB's released checkpoints (2.6, 4.0, 4.5; their config carries ``query_num`` and
  ``slice_config``): ``forward(data=...)`` with image slices, ``tgt_sizes`` and ``image_bound``,
  built here as OpenBMB's ``finetune/dataset.py`` builds it (:class:`OpenBMBAdapter`). Their code
  needs fixes to run under transformers 5 (bench/models/minicpmv_compat.py).
* Token-level remote models (``forward(input_ids, attention_mask, pixel_values, labels)``, the image
  placeholder slots filled from vpm -> resampler, as in the embedded model): :class:`MiniCPMVAdapter`.
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from bench.errors import BenchError
from bench.images import open_rgb, to_rgb
from bench.models import minicpmv_compat as compat
from bench.models.adapter import VLMAdapter
from bench.models.minicpmv_slices import SliceGeometry, Slices, patch_tensor, slice_image
from bench.models.tiny_minicpmv import MINICPMV_ROLES, TinyMiniCPMVAdapter

THINK_OFF = "<think>\n\n</think>\n\n"  # what a Qwen3 chat template renders before an answer without thinking


def _refuse(source) -> None:
    raise BenchError(f"{source} is a MiniCPM-V checkpoint whose model code ships inside it; "
                     "rerun with --trust-remote-code if you trust that code")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_openbmb(config: dict) -> bool:
    """OpenBMB's MiniCPM-V configs carry the slicing settings (and 2.6+ batch their vision inputs)."""
    return "query_num" in config and ("slice_config" in config or "slice_mode" in config)


def minicpmv_adapter(folder: Path, trust_remote_code: bool) -> VLMAdapter:
    config = json.loads((Path(folder) / "config.json").read_text())
    cls = OpenBMBAdapter if is_openbmb(config) else MiniCPMVAdapter
    return cls(folder, trust_remote_code)


class MiniCPMVAdapter(TinyMiniCPMVAdapter):
    """Token-level remote MiniCPM-V models: the embedded model's batches, the checkpoint's code."""

    family = "minicpmv"
    roles = MINICPMV_ROLES
    loads_bf16_on_cuda = True

    def __init__(self, source: Path, trust_remote_code: bool = False):
        super().__init__(source)
        self.trust_remote_code = trust_remote_code

    def display_name(self) -> str:
        return f"{self.family} ({self.source})"

    def load(self, device: torch.device) -> None:
        if not self.trust_remote_code:
            _refuse(self.source)
        from transformers import AutoModel, AutoTokenizer

        dtype = self._load_dtype(device)
        try:
            model = AutoModel.from_pretrained(self.source, trust_remote_code=True, dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(self.source, trust_remote_code=True)
        except (OSError, ValueError, ImportError) as exc:
            raise BenchError(f"cannot load MiniCPM-V checkpoint {self.source} ({_first_line(exc)}); "
                             "point --model at a complete local folder") from None
        if "data" in inspect.signature(model.forward).parameters:
            raise BenchError(f"{self.source} takes OpenBMB's forward(data=...) batches but its config.json lacks query_num and "
                             "slice_config; restore the checkpoint's original config.json")
        self.attach(model.to(device).eval(), tokenizer)


@dataclass
class Turn:
    """One training example: the user's text, the answer, and the image (a path, or pixels)."""

    prompt: str
    answer: str
    image: object


def _setting(obj, name: str, default):
    """A field of a config that may be a dict or a config object (OpenBMB's slice_config is either)."""
    if isinstance(obj, dict):
        return obj.get(name, default)
    return getattr(obj, name, default)


class OpenBMBAdapter(VLMAdapter):
    """OpenBMB's MiniCPM-V 2.6 / 4.0 / 4.5 remote code, in the batch format of its ``finetune/dataset.py``.

    A sample is a ChatML conversation (the tokenizer's chat template) whose user turn starts with the
    image placeholder: ``<image>`` + ``query_num`` x ``<unk>`` + ``</image>`` for the whole image and,
    when the image is sliced, ``<image_id>0</image_id>`` before it and one
    ``<slice>`` + ``query_num`` x ``<unk>`` + ``</slice>`` per slice after it, a line per row of slices.
    Labels are shifted in the data (the target of position i is token i+1) and cover the answer, its
    ``<|im_end|>``, and after that the tokenizer's EOS: the loss is cross-entropy on the logits, never
    ``labels=`` to the model (its LLM would shift them again).
    """

    family = "minicpmv"
    roles = MINICPMV_ROLES
    keeps_paths = True  # slices are cut per batch from the original image
    loads_bf16_on_cuda = True
    resolution_knob = "max_slice_nums"

    def __init__(self, source: Path, trust_remote_code: bool = False):
        self.source = Path(source)
        self.trust_remote_code = trust_remote_code
        self.fixes: list[str] = []
        self.resolution = None
        try:  # the slicing is known from config.json alone: visual tokens can be counted before loading
            self._read_geometry(json.loads((self.source / "config.json").read_text()))
        except (OSError, ValueError, TypeError, KeyError):
            self.geometry = self._default_geometry = None  # attach() reads it from the loaded model's config

    def _read_geometry(self, config) -> None:
        slices = _setting(config, "slice_config", None) or {}
        self.query_num = int(_setting(config, "query_num", None))
        self._default_geometry = SliceGeometry(
            patch_size=int(_setting(slices, "patch_size", None) or _setting(config, "patch_size", None)),
            scale_resolution=int(_setting(slices, "scale_resolution", 448)),
            max_slice_nums=int(_setting(slices, "max_slice_nums", 9)),
        )
        self.geometry = self._geometry_at(self.resolution)

    def _geometry_at(self, value: int | None) -> SliceGeometry:
        return self._default_geometry if value is None else replace(self._default_geometry, max_slice_nums=value)

    def display_name(self) -> str:
        return f"{self.family} ({self.source}, OpenBMB format)"

    # ---------------------------------------------------------------- loading
    def load(self, device: torch.device) -> None:
        if not self.trust_remote_code:
            _refuse(self.source)
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.logging.disable_progress_bar()
        try:
            loaded = compat.load(self.source, self._load_dtype(device))
        except (OSError, ValueError, ImportError, AttributeError, TypeError) as exc:
            raise BenchError(f"cannot load MiniCPM-V checkpoint {self.source} ({_first_line(exc)}); "
                             "point --model at a complete local folder with its code, weights and tokenizer") from None
        if "data" not in inspect.signature(loaded.model.forward).parameters:
            raise BenchError(f"{self.source}: its model does not take forward(data=...) although its config looks like "
                             "OpenBMB's; restore the checkpoint's original config.json and code")
        self.attach(loaded.model.to(device).eval(), loaded.tokenizer)
        self.fixes = loaded.fixes
        print(loaded.summary(), flush=True)

    def attach(self, model: torch.nn.Module, tokenizer) -> None:
        config = model.config
        if not getattr(config, "batch_vision_input", True):
            raise BenchError(f"{self.source} feeds whole images to its vision encoder (batch_vision_input false, MiniCPM-V 2.0 style); "
                             "only the patch-batched format of 2.6 / 4.0 / 4.5 is built")
        self.model, self.tokenizer = model, tokenizer
        self._read_geometry(config)  # the loaded config is authoritative; a resolution set earlier stays
        tok = tokenizer
        names = {"im_start": "<image>", "im_end": "</image>", "slice_start": "<slice>", "slice_end": "</slice>",
                 "im_id_start": "<image_id>", "im_id_end": "</image_id>"}
        self.marks = {key: getattr(tok, key, default) for key, default in names.items()}
        self.marks["unk"] = tok.unk_token
        chatml = {"chat_start": "<|im_start|>", "chat_end": "<|im_end|>", "assistant": "assistant"}
        self.ids = {key: tok.convert_tokens_to_ids(text) for key, text in {**self.marks, **chatml}.items()}
        unknown = [text for key, text in {**self.marks, **chatml}.items()
                   if key != "unk" and self.ids[key] in (None, tok.unk_token_id)]
        if unknown or tok.unk_token is None or not getattr(tok, "chat_template", None):
            missing = ", ".join(unknown) or "a chat template and an unk token"
            raise BenchError(f"{self.source}: the tokenizer lacks {missing}; only the ChatML format of MiniCPM-V 2.6 / 4.0 / 4.5 "
                             "(llm_type qwen in OpenBMB's finetune) is built")
        self.terminators = [tok.convert_tokens_to_ids(t) for t in getattr(model, "terminators", ["<|im_end|>", "<|endoftext|>"])]
        self.terminators = [t for t in self.terminators if t is not None and t != tok.unk_token_id]
        eot = getattr(tok, "eot_id", None)
        self.after_answer = eot if eot is not None else tok.eos_token_id  # dataset.py's target after the answer's end

    def skeleton(self) -> torch.nn.Module:
        """The module tree on the meta device (shapes only), built by the checkpoint's own code."""
        if getattr(self, "model", None) is not None:
            return self.model
        if getattr(self, "_skeleton", None) is None:
            if not self.trust_remote_code:
                _refuse(self.source)
            from transformers import AutoConfig
            from transformers.dynamic_module_utils import get_class_from_dynamic_module

            try:
                with compat.remote_code_imports():
                    config = AutoConfig.from_pretrained(self.source, trust_remote_code=True)
                    cls = get_class_from_dynamic_module(config.auto_map["AutoModel"], self.source)
                    compat.ensure_post_init(cls)
                    with torch.device("meta"):
                        self._skeleton = cls(config)
            except (OSError, ValueError, ImportError, KeyError, AttributeError, TypeError) as exc:
                raise BenchError(f"cannot build MiniCPM-V checkpoint {self.source}'s model from its config ({_first_line(exc)}); "
                                 "point --model at a complete local folder") from None
        return self._skeleton

    # ---------------------------------------------------------------- resolution
    def _need_geometry(self) -> None:
        if self._default_geometry is None:
            raise BenchError(f"{self.source}: config.json lacks query_num / slice_config; load the model first")

    def default_resolution(self) -> int:
        self._need_geometry()
        return self._default_geometry.max_slice_nums

    def set_resolution(self, value: int | None) -> None:
        """``max_slice_nums`` for every later batch: the whole image plus up to that many slices
        (None: the checkpoint's ``slice_config``)."""
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise BenchError(f"max_slice_nums must be a whole number >= 1 (got {value!r})")
        self._need_geometry()
        self.resolution = value
        self.geometry = self._geometry_at(value)

    def visual_tokens(self, image) -> int:
        """``query_num`` resampler outputs for the whole image and for each slice."""
        self._need_geometry()
        return len(self.slices(image).images) * self.query_num

    def vision_patches(self, image) -> int:
        """Patches of the whole image and of every slice, as the vision encoder sees them (tgt_sizes)."""
        self._need_geometry()
        patch = self.geometry.patch_size
        return sum((im.height // patch) * (im.width // patch) for im in self.slices(image).images)

    # ---------------------------------------------------------------- text
    def encode_prompt(self, prompt: str) -> str:
        return prompt  # the image placeholder depends on the image's slices: built per batch

    def example(self, prompt: str, image, answer: str) -> Turn:
        return Turn(prompt, answer, image)

    def answer_tokens(self, prompt: str, answer: str) -> int:
        return len(self.tokenizer.encode(answer, add_special_tokens=False)) + 1  # and <|im_end|>

    def image_array(self, image: Image.Image) -> np.ndarray:
        return np.asarray(to_rgb(image), dtype=np.uint8)

    def placeholder(self, slices: Slices) -> str:
        m, unk = self.marks, self.marks["unk"] * self.query_num
        text = f"{m['im_start']}{unk}{m['im_end']}"
        if slices.grid is None:
            return text
        cols, rows = slices.grid
        row = f"{m['slice_start']}{unk}{m['slice_end']}" * cols
        return f"{m['im_id_start']}0{m['im_id_end']}{text}" + "\n".join([row] * rows)

    def _user(self, prompt: str, slices: Slices) -> dict:
        return {"role": "user", "content": f"{self.placeholder(slices)}\n{prompt}"}

    def prompt_ids(self, prompt: str, slices: Slices) -> list[int]:
        """The user turn and the generation prompt (an empty think block where the template has one)."""
        return compat.chat_ids(self.tokenizer, [self._user(prompt, slices)], add_generation_prompt=True, enable_thinking=False)[0]

    def conversation(self, prompt: str, answer: str, slices: Slices) -> tuple[list[int], list[int]]:
        """Token ids of the whole exchange and its pre-shifted labels, as OpenBMB's dataset.py makes them:
        the answer span runs from two tokens after ``<|im_start|>assistant`` (four more past an empty
        think block) through the turn's ``<|im_end|>``; the label of position i is token i+1 inside
        the span, and the label of the span's last position is the tokenizer's EOS (its eot_id if any)."""
        messages = [self._user(prompt, slices), {"role": "assistant", "content": answer}]
        ids = compat.chat_ids(self.tokenizer, messages, add_generation_prompt=False, enable_thinking=False)[0]
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False, enable_thinking=False)
        turns = [i for i, t in enumerate(ids) if t == self.ids["assistant"] and i > 0 and ids[i - 1] == self.ids["chat_start"]]
        start = turns[-1] + 2 + (4 if THINK_OFF in text else 0) if turns else None
        end = next((i for i, t in enumerate(ids) if t == self.ids["chat_end"] and start is not None and i > start), None)
        if end is None:
            raise BenchError(f"{self.source}: the chat template renders no `<|im_start|>assistant ... <|im_end|>` turn to learn from; "
                             "MiniCPM-V 2.6 / 4.0 / 4.5 tokenizers do, restore the checkpoint's tokenizer_config.json")
        labels = [-100] * len(ids)
        for i in range(start, end + 1):
            labels[i - 1] = ids[i]
        if end + 1 < len(ids):
            labels[end] = self.after_answer
        return ids, labels

    def image_bound(self, ids: list[int]) -> torch.Tensor:
        """``[n, 2]`` ranges ``[start, end)`` of the ``<unk>`` slots between each start and end mark."""
        ids_t = torch.tensor(ids)
        starts = torch.nonzero((ids_t == self.ids["im_start"]) | (ids_t == self.ids["slice_start"])).flatten() + 1
        ends = torch.nonzero((ids_t == self.ids["im_end"]) | (ids_t == self.ids["slice_end"])).flatten()
        if len(starts) != len(ends) or bool(((ends - starts) != self.query_num).any()):
            raise BenchError("a prompt or answer contains the image marks <image>/<slice> itself; remove them from the suite's text")
        return torch.stack([starts, ends], dim=1) if len(starts) else torch.zeros((0, 2), dtype=torch.long)

    # ---------------------------------------------------------------- images
    def _open(self, image) -> Image.Image:
        if isinstance(image, np.ndarray):
            return Image.fromarray(image)
        if isinstance(image, Image.Image):
            return to_rgb(image)
        return open_rgb(image)

    def slices(self, image) -> Slices:
        return slice_image(self._open(image), self.geometry)

    def vision_inputs(self, slices: Slices, device) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per slice ``[3, 14, h*w*14]`` pixels and the ``[n, 2]`` tgt_sizes (h, w)."""
        tensors, sizes = zip(*(patch_tensor(im, self.geometry.patch_size) for im in slices.images))
        return [t.to(device) for t in tensors], torch.tensor(sizes, dtype=torch.int32, device=device)

    # ---------------------------------------------------------------- batches
    def train_batch(self, examples: list[Turn], device: torch.device) -> dict:
        """OpenBMB's collator: right-padded with 0 (labels with -100), per-sample lists for the images."""
        rows = []
        for e in examples:
            sl = self.slices(e.image)
            ids, labels = self.conversation(e.prompt, e.answer, sl)
            pixels, sizes = self.vision_inputs(sl, device)
            rows.append((ids, labels, pixels, sizes, self.image_bound(ids)))
        width = max(len(r[0]) for r in rows)
        batch = len(rows)
        input_ids = torch.zeros((batch, width), dtype=torch.long)
        position_ids = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.bool)
        for row, (ids, lab, *_rest) in enumerate(rows):
            n = len(ids)
            input_ids[row, :n] = torch.tensor(ids)
            position_ids[row, :n] = torch.arange(n)
            labels[row, :n] = torch.tensor(lab)
            mask[row, :n] = True
        return {
            "input_ids": input_ids.to(device),
            "position_ids": position_ids.to(device),
            "labels": labels.to(device),
            "attention_mask": mask.to(device),
            "pixel_values": [r[2] for r in rows],
            "tgt_sizes": [r[3] for r in rows],
            "image_bound": [r[4].to(device) for r in rows],
        }

    def forward_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Cross-entropy of the logits against the (already shifted) labels, mean over labelled tokens,
        as OpenBMB's trainer computes it; ``attention_mask`` goes as a keyword (the model ignores the
        one inside ``data``)."""
        data = {k: v for k, v in batch.items() if k != "labels"}
        logits = model(data=data, attention_mask=batch["attention_mask"], use_cache=False).logits
        labels = batch["labels"]
        keep = labels != -100
        return F.cross_entropy(logits[keep].float(), labels[keep])

    def loss_tokens(self, batch: dict) -> int:
        return int((batch["labels"] != -100).sum())  # already shifted: every label counts

    def prompt_batch(self, prompts: list[str], arrays: list, device) -> dict:
        """Left-padded prompts for batched generation; each image_bound moved by its row's padding."""
        rows = []
        for prompt, image in zip(prompts, arrays):
            sl = self.slices(image)
            ids = self.prompt_ids(prompt, sl)
            pixels, sizes = self.vision_inputs(sl, device)
            rows.append((ids, pixels, sizes, self.image_bound(ids)))
        width = max(len(r[0]) for r in rows)
        input_ids = torch.zeros((len(rows), width), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        bounds = []
        for row, (ids, _, _, bound) in enumerate(rows):
            pad = width - len(ids)
            input_ids[row, pad:] = torch.tensor(ids)
            mask[row, pad:] = 1
            bounds.append((bound + pad).to(device))
        return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device),
                "pixel_values": [r[1] for r in rows], "tgt_sizes": [r[2] for r in rows], "image_bound": bounds}

    def generate_ids(self, model: torch.nn.Module, batch: dict, max_new_tokens: int) -> torch.Tensor:
        """Greedy decoding through the checkpoint's own ``generate`` (it embeds the images and runs its
        LLM's ``generate`` on the embeddings, stopping at <|im_end|> / <|endoftext|>); new tokens only."""
        return model.generate(**batch, tokenizer=self.tokenizer, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1)

    def decode(self, new_ids: torch.Tensor) -> list[str]:
        """Each row up to its first terminator (the model pads finished rows with token 0, a real token)."""
        out = []
        for row in new_ids.tolist():
            stop = next((i for i, t in enumerate(row) if t in self.terminators), len(row))
            out.append(self.tokenizer.decode(row[:stop], skip_special_tokens=True).strip())
        return out

    @torch.no_grad()
    def vision_features(self, arrays, device) -> dict[str, torch.Tensor]:
        """Mean-pooled vision-encoder states over every patch of every slice of each image: an early layer
        (a quarter of the way in) and the final one."""
        encoder = self.model.get_submodule(self.roles.vision)
        dtype = next(encoder.parameters()).dtype
        patch = self.geometry.patch_size
        out: dict[str, list[torch.Tensor]] = {"early": [], "final": []}
        for array in arrays:
            pixels, sizes = self.vision_inputs(self.slices(array), device)
            counts = (sizes[:, 0] * sizes[:, 1]).tolist()
            longest = max(counts)
            x = torch.zeros((len(pixels), 3, patch, longest * patch), device=device, dtype=dtype)
            attend = torch.zeros((len(pixels), 1, longest), dtype=torch.bool, device=device)
            for i, (p, n) in enumerate(zip(pixels, counts)):
                x[i, :, :, : n * patch] = p.to(dtype)
                attend[i, 0, :n] = True
            result = encoder(x, patch_attention_mask=attend, tgt_sizes=sizes, output_hidden_states=True)
            hidden = result.hidden_states
            valid = attend[:, 0, :, None].to(torch.float32)
            for label, states in (("early", hidden[max(1, (len(hidden) - 1) // 4)]), ("final", result.last_hidden_state)):
                out[label].append((states.float() * valid).sum((0, 1)) / valid.sum())
        return {label: torch.stack(rows) for label, rows in out.items()}
