"""What the harness needs to know about one VLM family, and nothing more.

A family is data (a :class:`RoleMap`: which module names are the vision encoder, the connector, the
LLM's attention and MLP projections) plus a small :class:`VLMAdapter` that loads it, turns
(prompt, image, answer) triples into training batches and generates answers. Everything else in the
harness (LoRA injection, vision policies, training, evaluation) works from these two.
"""

from __future__ import annotations

import hashlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from bench.errors import BenchError


@dataclass(frozen=True)
class RoleMap:
    """Module-name patterns of one family (regexes matched in full against ``named_modules``).

    ``llm_layer`` matches one decoder layer of the language model; ``attention`` and ``mlp`` map a
    projection role (``q``, ``k``, ``v``, ``o``; ``gate``, ``up``, ``down``) to its name inside a layer.
    ``vision`` and ``connector`` are module paths trained fully (``modules_to_save``) when a vision
    policy asks; ``vision_linear`` matches the vision encoder's linear layers for LoRA inside it.
    ``names_are_regex`` makes the attention/mlp names regexes (a role that is a different module in
    different layers, e.g. Mllama's ``(?:self_attn|cross_attn)\\.q_proj``); by default they are literal.
    """

    vision: str
    connector: str
    llm_layer: str
    attention: dict[str, str]
    mlp: dict[str, str]
    vision_linear: str
    extra: dict[str, str] = field(default_factory=dict)
    names_are_regex: bool = False

    def llm_pattern(self, roles: tuple[str, ...]) -> str:
        names = []
        for role in roles:
            if role in self.attention:
                names.append(self.attention[role])
            elif role in self.mlp:
                names.append(self.mlp[role])
            else:
                raise KeyError(role)
        alternatives = "|".join(n if self.names_are_regex else re.escape(n) for n in names)
        return rf"{self.llm_layer}\.(?:{alternatives})"


@dataclass
class Example:
    """One supervised item, already in the model's terms."""

    prompt_ids: list[int]
    answer_ids: list[int]
    pixels: np.ndarray  # uint8, H x W x 3


class VLMAdapter(ABC):
    """Loads one VLM family and speaks its input format."""

    family: str
    roles: RoleMap
    keeps_paths = False  # True: training examples hold image paths, opened per batch (large images)
    # suites the base model already does well (its pretraining's own task): tuned runs are also scored
    # on them to measure forgetting when --control is not given
    control_suites: tuple[str, ...] = ()

    model: torch.nn.Module
    tokenizer: object

    @abstractmethod
    def load(self, device: torch.device) -> None:
        """Load base weights onto ``device`` (once per process)."""

    @abstractmethod
    def image_array(self, image: Image.Image) -> np.ndarray:
        """The image as the uint8 array the model consumes (resized as the family expects)."""

    # Token-level families (the embedded model) implement these three and inherit the batching below;
    # processor-based families (bench/models/hf.py) override example/train_batch/prompt_batch instead.
    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a user turn holding one image and ``prompt``, up to where the answer starts."""
        raise NotImplementedError(f"{type(self).__name__} builds its batches with its processor")

    def answer_ids(self, answer: str) -> list[int]:
        """Token ids of an answer, end-of-turn included."""
        raise NotImplementedError(f"{type(self).__name__} builds its batches with its processor")

    def answer_tokens(self, prompt: str, answer: str) -> int:
        """How many tokens the model must generate to give ``answer`` (end-of-turn included)."""
        return len(self.answer_ids(answer))

    def pixel_values(self, arrays: list[np.ndarray], device: torch.device) -> torch.Tensor:
        """Stack uint8 arrays into the model's normalised pixel tensor."""
        raise NotImplementedError(f"{type(self).__name__} builds its pixel inputs with its processor")

    def encode_prompt(self, prompt: str):
        """A prompt as :meth:`prompt_batch` takes it (token ids here; chat-formatted text for processor families)."""
        return self.prompt_ids(prompt)

    @abstractmethod
    def forward_loss(self, model: torch.nn.Module, batch: dict) -> torch.Tensor:
        """Mean token loss of a batch from :meth:`train_batch`."""

    def loss_tokens(self, batch: dict) -> int:
        """How many label tokens :meth:`forward_loss` averages over (labels shifted by one, -100 ignored):
        data-parallel processes weight their losses by it to make the single-process update."""
        return int((batch["labels"][..., 1:] != -100).sum())

    @abstractmethod
    def generate_ids(self, model: torch.nn.Module, batch: dict, max_new_tokens: int) -> torch.Tensor:
        """Greedy new tokens for a batch from :meth:`prompt_batch`."""

    source: Path | None = None

    def display_name(self) -> str:
        return self.family if self.source is None else f"{self.family} ({self.source})"

    def fingerprint(self) -> dict:
        """What identifies the weights: family, config and weight files (size and content hash; only
        the first 64 MiB of a big file are hashed, so multi-GB checkpoints stay cheap)."""
        files = {}
        if self.source is not None:
            for path in sorted(Path(self.source).glob("*")):
                if path.suffix in (".json", ".safetensors", ".model") and path.is_file():
                    with open(path, "rb") as fh:
                        head = hashlib.sha256(fh.read(64 << 20)).hexdigest()[:16]
                    files[path.name] = [path.stat().st_size, head]
        return {"family": self.family, "files": files}

    def example(self, prompt: str, image: Image.Image, answer: str) -> Example:
        return Example(self.prompt_ids(prompt), self.answer_ids(answer), self.image_array(image))

    def train_batch(self, examples: list[Example], device: torch.device) -> dict:
        """Left-padded ids, mask, labels (-100 on prompt and padding) and pixels."""
        pad = self.tokenizer.pad_token_id
        seqs = [e.prompt_ids + e.answer_ids for e in examples]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, (e, seq) in enumerate(zip(examples, seqs)):
            start = width - len(seq)
            ids[row, start:] = torch.tensor(seq)
            mask[row, start:] = 1
            labels[row, start + len(e.prompt_ids) :] = torch.tensor(e.answer_ids)
        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "labels": labels.to(device),
            "pixel_values": self.pixel_values([e.pixels for e in examples], device),
        }

    def prompt_batch(self, prompt_ids: list[list[int]], arrays: list[np.ndarray], device) -> dict:
        pad = self.tokenizer.pad_token_id
        width = max(len(p) for p in prompt_ids)
        ids = torch.full((len(prompt_ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompt_ids), width), dtype=torch.long)
        for row, seq in enumerate(prompt_ids):
            ids[row, width - len(seq) :] = torch.tensor(seq)
            mask[row, width - len(seq) :] = 1
        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "pixel_values": self.pixel_values(arrays, device),
        }

    def vision_features(self, arrays: list[np.ndarray], device: torch.device) -> dict[str, torch.Tensor]:
        """Mean-pooled vision-encoder states of a batch: an ``early`` layer (a quarter of the way in)
        and the ``final`` one. Similarity is judged in the model's own features: what matters is what
        its encoder has learned to see, not pixel statistics."""
        encoder = self.model.get_submodule(self.roles.vision)
        out = encoder(pixel_values=self.pixel_values(arrays, device), output_hidden_states=True)
        hidden = out.hidden_states
        return {"early": hidden[max(1, (len(hidden) - 1) // 4)].mean(1), "final": out.last_hidden_state.mean(1)}

    loads_bf16_on_cuda = False  # checkpoint families load their weights in bf16 on a GPU; the embedded model stays fp32

    def weight_dtype(self, device_type: str) -> torch.dtype:
        """The dtype :meth:`load` gives the weights on this kind of device (memory estimates use it too)."""
        return torch.bfloat16 if device_type == "cuda" and self.loads_bf16_on_cuda else torch.float32

    def _load_dtype(self, device: torch.device) -> torch.dtype:
        dtype = self.weight_dtype(device.type)
        return torch.float32 if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported() else dtype

    def skeleton(self) -> torch.nn.Module:
        """The model's module tree with real shapes, for memory estimates (weights need not be real).
        By default the model itself (loaded on the CPU if need be); transformers families override this
        with an empty model on the meta device, so a 7B checkpoint costs nothing to estimate."""
        if getattr(self, "model", None) is None:
            self.load(torch.device("cpu"))
        return self.model

    def image_tokens(self) -> int | None:
        """Vision-encoder tokens per image at the model's native resolution, when that is fixed."""
        return None

    # ------------------------------------------------------------ image resolution
    # Families with dynamic resolution expose their own knob (Qwen-VL: max_pixels; Idefics3 / SmolVLM:
    # longest_edge; MiniCPM-V: max_slice_nums). The setting applies to every later batch, training and
    # evaluation alike, until it is set again; None is the checkpoint's own default.
    resolution_knob: str | None = None
    resolution: int | None = None  # the knob's value now; None: the checkpoint's default

    def set_resolution(self, value: int | None) -> None:
        """Set the family's resolution knob for every later batch (None: the checkpoint's default)."""
        if value is None:
            self.resolution = None
            return
        from bench.models.hf import resolution_families

        raise BenchError(f"{self.display_name()} has no image-resolution knob; --resolutions applies to {resolution_families()}")

    def default_resolution(self) -> int | None:
        """The checkpoint's own value of :attr:`resolution_knob` (None for families without one)."""
        return None

    def visual_tokens(self, image) -> int:
        """LLM sequence positions one image fills at the current resolution (the image placeholders the
        processor expands, summed over tiles or slices; not the surrounding marker tokens)."""
        raise NotImplementedError(f"{type(self).__name__} does not count its visual tokens")

    def vision_patches(self, image) -> int:
        """Positions the vision encoder runs over for one image at the current resolution (patches of
        every tile or slice, before any merger). By default the fixed count of :meth:`image_tokens`."""
        return self.image_tokens() or 0

    def pretraining_reference(self, n: int, seed: int) -> list[Image.Image] | None:
        """``n`` images drawn like the model's pretraining data, when the family can make them (the
        embedded model can; for a real checkpoint the user passes ``--reference DIR``)."""
        return None

    def pretraining_questions(self, n: int, seed: int) -> list[str] | None:
        """``n`` "question answer" strings drawn like the model's pretraining tasks, when the family can
        make them (the embedded model can): the reference of the task axis in bench.calibration."""
        return None

    @torch.no_grad()
    def text_features(self, texts: list[str], device: torch.device) -> torch.Tensor:
        """Each text's mean input-token embedding in the LLM (no forward pass: cheap on any model size).
        Where a set of questions sits in the model's own token space, the task axis of the recommender."""
        model = self.model
        try:
            table = model.get_input_embeddings()
        except (AttributeError, NotImplementedError):
            table = None
        if table is None:  # remote-code wrappers (MiniCPM-V) keep the language model as .llm
            table = model.llm.get_input_embeddings()
        tokenizer = getattr(self.tokenizer, "tokenizer", self.tokenizer)
        rows = []
        for text in texts:
            ids = tokenizer(text, add_special_tokens=False)["input_ids"] or [tokenizer.eos_token_id]
            rows.append(table(torch.tensor(ids, device=device)).float().mean(0))
        return torch.stack(rows)

    def decode(self, new_ids: torch.Tensor) -> list[str]:
        return [t.strip() for t in self.tokenizer.batch_decode(new_ids, skip_special_tokens=True)]
